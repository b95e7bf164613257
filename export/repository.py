"""The serving repository's state: what a publish lays out, the routing, a version's candidate store, what gc removes.

The configs themselves come from :mod:`export.configs`. A publish writes only what :class:`amc_client.AMCClient`
calls and the steps those models run::

    amc_tokenizer/config.pbtxt   amc_tokenizer/<N>/{model.py, amc_steps/, amc_contract/,
                                                    tokenizer.json, text_encoder.onnx, term_weights.json,
                                                    keyword_table.npz,
                                                    version.json}        (the text step, mode raw)
    amc_qen/config.pbtxt         amc_qen/<N>/{model.onnx [, model.py, amc_steps/, amc_contract/]}
                                                    (and amc_van, amc_lan, amc_mtn)
    amc_topk/config.pbtxt        amc_topk/<N>/{model.py, amc_steps/, amc_contract/}
                                                    (server-side top-k, mode raw)
    amc_v<N>/config.pbtxt        ensemble pinned to version N of every step; amc_v<N>/{manifest.json, golden.npz}
    amc/config.pbtxt             ensemble pinned to the serving version; routing in its parameters

and, for a version published with a candidate store (whole-store search, ``AMCClient.search``)::

    amc_search_step/config.pbtxt amc_search_step/<N>/{the text step's files but the encoder, store.json,
                                                      search_store.onnx}   (mode search)

Every Python-backend version folder carries the code it was published with (:func:`write_step_code`): the step
package ``serving/backends`` copied whole as ``amc_steps/``, the contract ``amc_contract/`` copied whole, and
``model.py``, the entry Triton imports, which puts its folder first on ``sys.path`` and imports
``amc_steps.<step>.TritonPythonModel`` the ordinary way. Each model instance is a stub process of its own, so each
version runs its own copies. A version published before this layout (its ``model.py`` a copy of the step module,
with its siblings beside it as ``amc_text.py``, ``amc_onnx_runner.py``, ...) loads them by path and serves beside
these unchanged: the configs, which its versions share, are the same.
    amc_search_v<N>/config.pbtxt search pinned to version N
    amc_search/config.pbtxt      search pinned to the version whose store serves (re-pinned with the serving version)

Nothing else. A repository published by an earlier release may also hold issue 10's store ensembles
(``amc_store``, ``amc_store_fused``, ... :data:`LEGACY_STORE_STEPS`): nothing loads or re-pins them, and gc and
quarantine remove a removed version's folders of them with it.
"""

from __future__ import annotations

import compileall
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from amc_contract import signatures as sig
from amc_contract.routing import Routing
from amc_contract.routing import parse as parse_routing
from amc_contract.text import EMOJI_NAMES_FILE, TEXT_RULES
from export.configs import (  # SEARCH_SETTINGS, device_kind: benchmarks.search imports them from here
    ONNX_FILE,
    SEARCH_GRAPH_FILE,
    SEARCH_SETTINGS,  # noqa: F401
    STEPS,
    device_kind,  # noqa: F401
    ensemble_config,
    parse_config,
    search_ensemble_config,
    search_settings,
    search_step_config,
    template_files,
    template_sizes,
    to_text,
)

# The code a Python-backend version folder carries (write_step_code): the step package, vendored as STEPS_PACKAGE,
# and the contract, vendored under its own name.
BACKENDS_DIR = Path(__file__).resolve().parent.parent / "serving" / "backends"
CONTRACT_DIR = Path(sig.__file__).resolve().parent
STEPS_PACKAGE = "amc_steps"
CONTRACT_PACKAGE = CONTRACT_DIR.name  # amc_contract
# The step modules of serving/backends that a version's model.py takes TritonPythonModel from.
TEXT_STEP_MODULE, TOP_K_MODULE, NETWORK_MODULE = "text_step", "top_k", "onnx_runner"
ENTRY_FILE = "model.py"
# model.py of a Python-backend version: the stub imports it (as "<N>.model") in a process of its own.
ENTRY = '''"""Triton's entry to this version of {model} (written at publish by export.repository).

The step's code is the packages beside this file, as published: {steps} (the project's serving/backends) and
{contract}. This folder goes first on sys.path and they are imported the ordinary way; each model instance is a
Python-backend stub process of its own, so each runs its own version's copies.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.dont_write_bytecode = True  # publish compiled this folder; a __pycache__ written here would be a changed version
sys.path.insert(0, str(HERE))

import {contract}  # noqa: E402
import {steps}  # noqa: E402

for package in ({steps}, {contract}):
    if Path(package.__file__).resolve().parent.parent != HERE:
        raise ImportError(f"{{package.__file__}} is not this version's copy ({{HERE}}): other code of that name was "
                          "imported first in this process")

from {steps}.{module} import TritonPythonModel  # noqa: E402, F401
'''
STORE_FILE = "store.json"  # in amc_search_step/<N>/: {"version": N, "size": G, "ids": [...], "keywords": [...]}
# A text step version's query rules: version.json's "text_rules" (absent: 1, queries as sent) and, from rules 2 on,
# its emoji names (amc_contract.text.EMOJI_NAMES_FILE). KNOWN_TEXT_RULES: the rules this release's text step implements.
TEXT_RULES_KEY = "text_rules"
KNOWN_TEXT_RULES = tuple(range(1, TEXT_RULES + 1))
# The steps of a version's candidate store: one, the search step (text_step.py in mode search: checks, tokenizes,
# runs the search graph and adds the store's strings; issue 23). What gc, quarantine and rollouts look for.
SEARCH_STEPS: tuple[sig.StepSignature, ...] = (sig.SEARCH_STEP,)
# What releases before issue 22 also published with a store, for the benchmarks (which then built them into their own
# repository until they left the tree: git show 1285aea:benchmarks/store_models.py): store text step, per-network and
# fused store graphs (and, before issue 23, the three-step search's graph and top-k), their pinned ensemble
# amc_store_v<N> and amc_store / amc_store_fused.
LEGACY_STORE_STEPS = ("amc_store_tokenizer", "amc_van_store", "amc_lan_store", "amc_fused", "amc_fused_store",
                      "amc_search_store", "amc_store_topk")
LEGACY_PINNED_STORE = "amc_store_v"  # + N
LEGACY_SERVING_STORE = ("amc_store", "amc_store_fused")


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


# ---- the ranking pipeline -------------------------------------------------------------------------------------
def init_repository(repository: Path, flavour: str, *, sizes: Mapping[str, int] | None = None,
                    kind: str = "gpu") -> None:
    """Make ``repository`` ready for a version of a model of ``sizes`` served on ``kind`` (idempotent).

    A step without a version on disk gets its config written (a repository made from the committed templates
    takes the model's dims and the device kind); a step with versions keeps its own, whose tensors must have
    the same dims (:func:`check_step_configs`: ValueError before anything is written); ``amc``'s (which holds
    the routing) is only written where missing.
    """
    sizes = template_sizes() if sizes is None else sizes
    check_step_configs(repository, STEPS, sizes=sizes)
    for rel, text in template_files(flavour, sizes=sizes, kind=kind).items():
        model = rel.split("/")[0]
        if not (repository / rel).exists() or (model != sig.ENSEMBLE_NAME and not has_versions(repository / model)):
            write_atomic(repository / rel, text)
    # An ensemble still needs a version directory (empty) before Triton will load it.
    (repository / sig.ENSEMBLE_NAME / "1").mkdir(exist_ok=True)


def has_versions(model_dir: Path) -> bool:
    """Whether a model folder holds a version directory (its config then has a version to fit)."""
    return any(p.is_dir() and p.name.isdigit() for p in model_dir.glob("*"))


def check_step_configs(repository: Path, steps: Sequence[sig.StepSignature], *,
                       sizes: Mapping[str, int]) -> None:
    """Refuse a repository where a step of ``steps`` that has versions declares other dims than a version of a
    model of ``sizes`` needs: every version of a step shares its config, and Triton's ONNX Runtime backend
    refuses a version whose graph fixes a dim otherwise (a model of other sizes, or a config of an older
    release, which wrote -1 there). Raises ValueError naming the tensor and the remedy."""
    for step in steps:
        path = repository / step.model_name / "config.pbtxt"
        if not path.exists() or not has_versions(path.parent):
            continue
        config = parse_config(path.read_text())
        declared = {t.name: list(t.dims) for t in (*config.input, *config.output)}
        for spec in (*step.inputs, *step.outputs):
            want = spec.triton_dims(sizes)
            if spec.name in declared and declared[spec.name] != want:
                raise ValueError(f"{path} declares {spec.name} dims {declared[spec.name]}, but this model's graph "
                                 f"needs {want}: every version of {step.model_name} shares that config; publish "
                                 "into a new repository")


def repository_flavour(repository: Path) -> str:
    text = (repository / sig.QEN.model_name / "config.pbtxt").read_text()
    return "onnxruntime" if "onnxruntime_onnx" in text else "python"


@dataclass(frozen=True)
class TextStepFiles:
    """What a text-step version directory holds besides the code (see ``serving/backends/text_features.py``)."""

    tokenizer_json: str  # the sentence encoder's WordPiece tokenizer.json
    term_weights_json: str  # the checkpoint's amc_contract.text.TermWeights
    text_encoder: Path  # text_encoder.onnx, exported and validated
    keyword_table: Path | None = None  # keyword_table.npz (raw mode)
    # The query rules of the version (amc_contract.text.TEXT_RULES of the checkpoint's training; 1: queries as sent)
    # and, from rules 2 on, the emoji names it normalizes queries with (amc_contract.text.EmojiNames JSON).
    text_rules: int = 1
    emoji_names_json: str | None = None

    @classmethod
    def of_version(cls, version_dir: Path) -> TextStepFiles:
        """The files of a published text-step version directory (the search step reuses the raw step's)."""
        declared = json.loads((version_dir / "version.json").read_text()) if (version_dir / "version.json").is_file() \
            else {}
        names = version_dir / EMOJI_NAMES_FILE
        return cls((version_dir / "tokenizer.json").read_text(encoding="utf-8"),
                   (version_dir / "term_weights.json").read_text(encoding="utf-8"), version_dir / "text_encoder.onnx",
                   text_rules=int(declared.get(TEXT_RULES_KEY, 1)),
                   emoji_names_json=names.read_text(encoding="utf-8") if names.is_file() else None)


def write_step_code(version_dir: Path, module: str) -> None:
    """The code of one Python-backend step version in ``version_dir`` (made if missing): ``serving/backends`` copied
    whole as ``amc_steps/``, ``amc_contract`` copied whole, and ``model.py``, Triton's entry, taking
    ``TritonPythonModel`` from ``amc_steps.<module>`` (``text_step``, ``top_k``, ``onnx_runner``). Compiled here: the
    stub writes no bytecode into the folder (Triton would take a new file there for a changed version and reload
    it)."""
    version_dir.mkdir(parents=True, exist_ok=True)
    if not (BACKENDS_DIR / f"{module}.py").is_file():
        raise ValueError(f"{BACKENDS_DIR} has no step module {module}.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(BACKENDS_DIR, version_dir / STEPS_PACKAGE, ignore=skip)
    shutil.copytree(CONTRACT_DIR, version_dir / CONTRACT_PACKAGE, ignore=skip)
    (version_dir / ENTRY_FILE).write_text(ENTRY.format(model=version_dir.parent.name, steps=STEPS_PACKAGE,
                                                       contract=CONTRACT_PACKAGE, module=module), encoding="utf-8")
    compileall.compile_dir(version_dir, quiet=1)


def write_text_step(version_dir: Path, *, version: int, files: TextStepFiles, store_json: str | None = None,
                    encoder: bool = True) -> None:
    """Lay out one text-step version directory: its code (:func:`write_step_code`) and the files it reads
    (``encoder``: with ``text_encoder.onnx``; the search step's graph holds the encoder instead)."""
    version_dir.mkdir(parents=True)
    write_step_code(version_dir, TEXT_STEP_MODULE)
    if encoder:
        shutil.copy(files.text_encoder, version_dir / "text_encoder.onnx")
    if files.keyword_table is not None:
        shutil.copy(files.keyword_table, version_dir / "keyword_table.npz")
    (version_dir / "tokenizer.json").write_text(files.tokenizer_json, encoding="utf-8")
    (version_dir / "term_weights.json").write_text(files.term_weights_json, encoding="utf-8")
    if files.text_rules not in KNOWN_TEXT_RULES:
        raise ValueError(f"text rules {files.text_rules} are not among the rules this release's text step implements "
                         f"{KNOWN_TEXT_RULES}: publish with the release that trained the checkpoint")
    if files.text_rules == 1:  # as versions were before text rules existed: the step uses queries as sent
        (version_dir / "version.json").write_text(f'{{"version": {version}}}')
    else:  # the step applies these rules (text_features.TextFeatures refuses rules its code does not implement)
        if files.emoji_names_json is None:
            raise ValueError(f"text rules {files.text_rules} need the emoji names ({EMOJI_NAMES_FILE})")
        (version_dir / "version.json").write_text(json.dumps({"version": version, TEXT_RULES_KEY: files.text_rules}))
        (version_dir / EMOJI_NAMES_FILE).write_text(files.emoji_names_json, encoding="utf-8")
    if store_json is not None:
        (version_dir / STORE_FILE).write_text(store_json, encoding="utf-8")


def write_top_k_step(version_dir: Path) -> None:
    """Lay out one top-k step version directory (``serving/backends/top_k.py``)."""
    version_dir.mkdir(parents=True)
    write_step_code(version_dir, TOP_K_MODULE)


def stage_version(stage: Path, *, version: int, flavour: str, onnx_dir: Path, text: TextStepFiles) -> None:
    """Lay out one version's step directories and its pinned ensemble under ``stage`` (not yet live)."""
    write_text_step(stage / sig.TOKENIZER.model_name / str(version), version=version, files=text)
    write_top_k_step(stage / sig.TOPK.model_name / str(version))
    for network in sig.NETWORKS:
        version_dir = stage / network.model_name / str(version)
        version_dir.mkdir(parents=True)
        short = network.model_name.removeprefix("amc_")
        shutil.copy(onnx_dir / f"{short}.onnx", version_dir / ONNX_FILE)
        if flavour == "python":
            write_step_code(version_dir, NETWORK_MODULE)
    ensemble_dir = stage / sig.versioned_ensemble_name(version)
    (ensemble_dir / "1").mkdir(parents=True)
    write_atomic(ensemble_dir / "config.pbtxt", to_text(ensemble_config(ensemble_dir.name, version)))


def published_versions(repository: Path) -> list[int]:
    """Versions whose pinned ensemble exists, ascending."""
    prefix = f"{sig.ENSEMBLE_NAME}_v"
    return sorted(int(p.name[len(prefix):]) for p in repository.glob(f"{prefix}*")
                  if p.name[len(prefix):].isdigit() and (p / "config.pbtxt").exists())


def set_routing(repository: Path, routing: Routing) -> str:
    """Rewrite ``amc`` pinned to ``routing.serving_version``; returns the new config text."""
    text = to_text(ensemble_config(sig.ENSEMBLE_NAME, routing.serving_version, routing))
    write_atomic(repository / sig.ENSEMBLE_NAME / "config.pbtxt", text)
    (repository / sig.ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    return text


def read_routing(repository: Path) -> Routing:
    config = parse_config((repository / sig.ENSEMBLE_NAME / "config.pbtxt").read_text())
    return parse_routing({"parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}})


# ---- a version's candidate store: whole-store search ----------------------------------------------------------
def stage_store_version(repository: Path, *, version: int, onnx_dir: Path, text: TextStepFiles, store_json: str,
                        instances: int | None = None, sizes: Mapping[str, int] | None = None,
                        kind: str | None = None) -> list[Path]:
    """Write version ``version``'s search step and ``amc_search_v<N>`` into ``repository``; returns what was written.

    ``onnx_dir`` holds the search graph (``search_store.onnx``); ``text`` the text step files the search step takes
    (those of the version's raw text step, without the encoder: the graph runs it). The step's config is written if
    it has none yet or no version, for a model of ``sizes`` served on ``kind`` (default this machine's
    :func:`export.configs.device_kind`), run as ``SEARCH_SETTINGS[kind]`` says with ``instances`` if given; an
    existing one is the caller's to check first (:func:`check_store_configs`, as ``export.store.publish_store`` does
    before it builds the store). ``amc_search`` is pinned to ``version`` by :func:`set_store_serving`.
    """
    settings = search_settings(kind, instances=instances)
    written: list[Path] = []
    config_path = repository / sig.SEARCH_STEP.model_name / "config.pbtxt"
    if not config_path.exists() or not has_versions(config_path.parent):
        write_atomic(config_path, to_text(search_step_config(settings, sizes=sizes)))
    version_dir = repository / sig.SEARCH_STEP.model_name / str(version)
    write_text_step(version_dir, version=version, files=text, store_json=store_json, encoder=False)
    shutil.copy(onnx_dir / SEARCH_GRAPH_FILE, version_dir / SEARCH_GRAPH_FILE)
    written.append(version_dir)
    search_dir = repository / sig.versioned_search_ensemble_name(version)
    (search_dir / "1").mkdir(parents=True, exist_ok=True)
    write_atomic(search_dir / "config.pbtxt", to_text(search_ensemble_config(search_dir.name, version)))
    written.append(search_dir)
    return written


def check_store_configs(repository: Path, steps: Sequence[sig.StepSignature] = SEARCH_STEPS, *,
                        sizes: Mapping[str, int] | None = None) -> None:
    """Refuse a repository whose config of one of ``steps`` declares other tensors than this release's: every
    version of a step shares its config, so a version added beside it would not load, and ensembles written for
    this release's tensors would not load over it (a repository whose search step an older release published with
    other tensors). Raises ValueError naming the step and the remedy. With ``sizes``, also other dims than a version
    of a model of those sizes needs (:func:`check_step_configs`)."""
    for step in steps:
        path = repository / step.model_name / "config.pbtxt"
        if not path.exists():
            continue
        config = parse_config(path.read_text())
        have = ([t.name for t in config.input], [t.name for t in config.output])
        if have != (step.input_names, step.output_names):
            raise ValueError(f"{path} declares tensors {have[0]} -> {have[1]}, but this release's "
                             f"{step.model_name} has {step.input_names} -> {step.output_names}: its versions "
                             "were published by an older release; publish into a new repository")
    if sizes is not None:
        check_step_configs(repository, steps, sizes=sizes)


def store_models(repository: Path, version: int) -> tuple[list[str], list[str]]:
    """The store steps that have version ``version`` and its pinned store ensemble (``amc_search_v<N>``), in load
    order; both empty where the version was published without a store."""
    steps = [s.model_name for s in version_store_steps(repository, version)]
    ensembles = [n for n in (sig.versioned_search_ensemble_name(version),) if (repository / n).is_dir()]
    return steps, ensembles


def version_store_steps(repository: Path, version: int) -> list[sig.StepSignature]:
    """The store steps that have version ``version`` in ``repository`` (what its store ensemble pins)."""
    return [s for s in SEARCH_STEPS if (repository / s.model_name / str(version)).is_dir()]


def store_step_names(repository: Path) -> list[str]:
    """The store steps ``repository`` has a config for (any version)."""
    return [s.model_name for s in SEARCH_STEPS if (repository / s.model_name / "config.pbtxt").exists()]


def store_paths(repository: Path, version: int) -> list[Path]:
    """Every folder version ``version``'s store added to ``repository`` (what gc and quarantine remove), an earlier
    release's store models of the version included (:func:`legacy_paths`)."""
    steps, ensembles = store_models(repository, version)
    return ([repository / m / str(version) for m in steps] + [repository / e for e in ensembles]
            + legacy_paths(repository, version))


def legacy_ensembles(repository: Path, version: int) -> list[str]:
    """The store ensembles an earlier release published that serve version ``version`` only: its
    ``amc_store_v<N>``, and ``amc_store`` / ``amc_store_fused`` where pinned to it (nothing re-pins them now)."""
    names = [f"{LEGACY_PINNED_STORE}{version}"] if (repository / f"{LEGACY_PINNED_STORE}{version}").is_dir() else []
    for name in LEGACY_SERVING_STORE:
        path = repository / name / "config.pbtxt"
        if path.is_file():
            steps = parse_config(path.read_text()).ensemble_scheduling.step
            if steps and all(s.model_version == version for s in steps):
                names.append(name)
    return names


def legacy_paths(repository: Path, version: int) -> list[Path]:
    """An earlier release's store folders of version ``version`` (:data:`LEGACY_STORE_STEPS` and
    :func:`legacy_ensembles`), which go when the version goes."""
    steps = [repository / name / str(version) for name in LEGACY_STORE_STEPS]
    return [p for p in steps if p.is_dir()] + [repository / n for n in legacy_ensembles(repository, version)]


def unpublished_paths(repository: Path, published: list[int]) -> list[Path]:
    """Folders of versions not in ``published``, left by a publish that was interrupted before it marked the
    version published (``amc_v<N>`` is written last): ranking and store step versions, pinned store ensembles."""
    keep = set(published)
    names = [s.model_name for s in (*STEPS, *SEARCH_STEPS)] + list(LEGACY_STORE_STEPS)
    paths = [p for name in names for p in sorted((repository / name).glob("[0-9]*"))
             if p.is_dir() and p.name.isdigit() and int(p.name) not in keep]
    for prefix in (sig.versioned_search_ensemble_name(0).removesuffix("0"), LEGACY_PINNED_STORE):  # "amc_search_v"
        for p in sorted(repository.glob(prefix + "[0-9]*")):
            number = p.name.removeprefix(prefix)
            if p.is_dir() and number.isdigit() and int(number) not in keep:
                paths.append(p)
    return paths


def store_serving_models(repository: Path) -> list[str]:
    """The unversioned store ensemble if ``repository`` has it (``amc_search``): what follows the serving version
    when it changes."""
    return [n for n in (sig.SEARCH_ENSEMBLE_NAME,) if (repository / n / "config.pbtxt").exists()]


def store_serving_version(repository: Path) -> int | None:
    """The version ``amc_search`` is pinned to; None if no store serves."""
    path = repository / sig.SEARCH_ENSEMBLE_NAME / "config.pbtxt"
    if not path.exists():
        return None
    return int(parse_config(path.read_text()).ensemble_scheduling.step[0].model_version)


def set_store_serving(repository: Path, version: int) -> str | None:
    """Rewrite ``amc_search`` pinned to ``version`` where version ``version`` has the search step; returns its new
    config text (None: the version has no store, nothing written). Nothing is written where the config of a store
    step version ``version`` has is of an older release (:func:`check_store_configs`)."""
    check_store_configs(repository, version_store_steps(repository, version))
    if not (repository / sig.SEARCH_STEP.model_name / str(version)).is_dir():
        return None
    text = to_text(search_ensemble_config(sig.SEARCH_ENSEMBLE_NAME, version))
    write_atomic(repository / sig.SEARCH_ENSEMBLE_NAME / "config.pbtxt", text)
    (repository / sig.SEARCH_ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    return text
