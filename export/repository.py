"""Generates every Triton ``config.pbtxt`` of the AMC repository from :mod:`amc_client.signatures`.

Configs are built as Triton's ``ModelConfig`` protobuf (so an invalid field cannot be written) and printed
with ``text_format``. Layout of a serving repository::

    amc_tokenizer/config.pbtxt   amc_tokenizer/<N>/{model.py, amc_text.py, amc_onnx_runner.py, amc_top_k.py,
                                                    amc_admission.py, tokenizer.json,
                                                    text_encoder.onnx, term_weights.json, keyword_table.npz,
                                                    version.json}        (the text step, mode raw)
    amc_qen/config.pbtxt         amc_qen/<N>/{model.onnx [, model.py, amc_admission.py]}
                                                    (and amc_van, amc_lan, amc_mtn)
    amc_topk/config.pbtxt        amc_topk/<N>/{model.py, amc_onnx_runner.py, amc_admission.py}
                                                    (server-side top-k, mode raw)
    amc_v<N>/config.pbtxt        ensemble pinned to version N of every step; amc_v<N>/manifest.json
    amc/config.pbtxt             ensemble pinned to the serving version; routing in its parameters

Two flavours come from the same code: ``python`` (each network is a Python-backend model running
onnxruntime, with the CUDA execution provider when a GPU is present; runs on the tritonserver from the
nvidia-pytriton wheel) and ``onnxruntime`` (``platform: onnxruntime_onnx``, for NVIDIA's Triton container;
``KIND_GPU``, or ``KIND_CPU`` for a CPU server: ``kind``). A network's dims are the signature's with the
model's numbers on its model axes (``sizes``, ``export.onnx_export.model_sizes``), the same the export checks
the graph against: that backend refuses a config that declares -1 where the graph fixes a dim. The text step
(``serving/backends/text_step.py``: WordPiece, the sentence encoder ``text_encoder.onnx`` under onnxruntime,
the lexical features) is a Python-backend model in both; one module serves the raw ensemble (``amc_tokenizer``,
parameter ``mode: raw``) and the store ensembles (``amc_store_tokenizer``, ``mode: store``).

Why pinned ensembles: an ensemble step with ``model_version: -1`` resolves to the latest loaded version at
request time, so during a rollout one request could run VAN of one version and MTN of another. Every
ensemble here pins one explicit version on every step, so the version set of a request is fixed by the
ensemble it was sent to.
"""

from __future__ import annotations

import compileall
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from amc_client import Routing
from amc_client import signatures as sig
from amc_client._routing import parse as parse_routing
from amc_client.text import EMOJI_NAMES_FILE, TEXT_RULES

FLAVOURS = ("python", "onnxruntime")
STEPS: tuple[sig.StepSignature, ...] = (sig.TOKENIZER, *sig.NETWORKS, sig.TOPK)
ONNX_FILE = "model.onnx"
BACKENDS_DIR = Path(__file__).resolve().parent.parent / "serving" / "backends"
TEMPLATE_ROOT = Path(__file__).resolve().parent.parent / "model_repository"
# Networks that gain from merging requests: VAN does most of the work; the others are cheap but batching
# them costs nothing when requests arrive together.
BATCH_DELAY_US = 200
# Overload, in two parts.
#
# 1. The text step, where every request enters an ensemble, has a bounded queue (MAX_QUEUE_SIZE requests, not
# batch elements: with MAX_BATCH 8, two batches waiting behind the one running); more are answered at once by
# Triton (UNAVAILABLE "Exceeds maximum queue size"). Only the entrance, and no queue timeout, because of what
# Triton 2.51 does with queue policies (seen here, 24 client threads against the CPU server, 10 candidates a
# request): with a bounded queue on every step, amc_qen stopped executing for good within seconds (execution
# count frozen, its queue full, every later request, a lone one too, rejected until the model is reloaded); with
# a queue timeout (default_timeout_microseconds) the same, expiring instead: the batcher then gates dispatch on
# a waiting-consumer count that drifts when it merges payloads (triton-inference-server/server#8870, fixed by
# core#509 in 2026-07, after 2.51). With the bound on the text step alone: no stall.
#
# 2. That bound alone does not hold latency: the text step is fast, so requests pass it and wait in the
# unbounded queue of the slow step behind it (Triton's statistics under overload on the 2-core CPU: almost all of a
# request's latency was amc_van's queue; the run is in commit 5fac526's message). So the
# text step also bounds the requests in flight through its version's pipeline (admitted by it, not yet answered
# by the top-k step at the end) to sig.MAX_IN_FLIGHT, through a counter that the text step, the top-k step and
# VAN share (serving/backends/admission.py); beyond it the text step answers UNAVAILABLE "overloaded: ... in
# flight" itself. No queue of Triton's changes, so the batcher bug cannot bite: what waits in VAN's queue is at
# most MAX_IN_FLIGHT requests. Counted: amc, amc_v<N> (counter "raw") and amc_search, amc_search_v<N>
# ("store"); amc_store and amc_store_fused end in an ONNX network, which cannot free a slot, so the store text
# step does not count their requests (they keep the entrance queue bound only).
# What a refusal and an answered request then take, in the server and at the clients: reports/overload_runs.json
# (device_runs_early_refusals) and docs/reliability.md. With the clients on the same 2 cores as the server, their
# packing takes as much CPU as the server's work.
MAX_QUEUE_SIZE = 16
# What the raw pipeline's network steps add to their niceness (config parameter ``nice``,
# onnx_runner.lower_cpu_priority): on a CPU server their compute yields to Triton's gRPC intake and to the text step,
# which refuses the excess, so under overload a refusal does not wait behind the networks' compute. The A/B of 10
# against 0 (a refusal's time in the server, answered requests a minute): reports/overload_runs.json,
# device_runs_early_refusals.
# Other processes on the same CPUs (outside the server's container) also take precedence over the networks.
NETWORK_NICE = 10
# Keywords the text step encodes on the fly (not in the version's keyword table) and keeps: 1.5 KB each.
KEYWORD_CACHE_SIZE = 20_000
ADMISSION_FILE = "admission.py"  # serving/backends/admission.py, copied as amc_admission.py beside the steps
TEXT_STEP_FILE = "text_step.py"
TOP_K_FILE = "top_k.py"
# The search graph beside the search step (a Python step in both flavours: not model.onnx, which Triton's ONNX Runtime
# backend would take for its own).
SEARCH_GRAPH_FILE = "search_store.onnx"
STORE_FILE = "store.json"  # in amc_store_tokenizer/<N>/: {"version": N, "size": G, "ids": [...], "keywords": [...]}
# A text step version's query rules: version.json's "text_rules" (absent: 1, queries as sent) and, from rules 2 on,
# its emoji names (amc_client.text.EMOJI_NAMES_FILE). KNOWN_TEXT_RULES: the rules this release's text step implements.
TEXT_RULES_KEY = "text_rules"
KNOWN_TEXT_RULES = tuple(range(1, TEXT_RULES + 1))


def routing_parameters(routing: Routing) -> dict[str, str]:
    """``amc``'s config parameters for ``routing`` (the client parses them back with the same names)."""
    params = {sig.ROUTING_SERVING_VERSION: str(routing.serving_version),
              sig.ROUTING_CANARY_VERSION: "" if routing.canary_version is None else str(routing.canary_version),
              sig.ROUTING_CANARY_SHARE: f"{routing.canary_share:g}"}
    if routing.canary_search:  # only then: repositories without a store keep the configs they had
        params[sig.ROUTING_CANARY_SEARCH] = "1"
    return params


def _tensor(spec: sig.TensorSpec, cls, sizes: Mapping[str, int] | None):
    tensor = cls(name=spec.name, data_type=mc.DataType.Value(spec.triton_dtype), dims=spec.triton_dims(sizes))
    if spec.optional:
        tensor.optional = True
    return tensor


def _io(config: mc.ModelConfig, signature: sig.StepSignature, sizes: Mapping[str, int] | None = None) -> None:
    config.input.extend(_tensor(t, mc.ModelInput, sizes) for t in signature.inputs)
    config.output.extend(_tensor(t, mc.ModelOutput, sizes) for t in signature.outputs)


DEVICE_KINDS = ("gpu", "cpu")


def _onnxruntime_instances(config: mc.ModelConfig, kind: str, count: int) -> None:
    """The onnxruntime flavour's network: Triton's ONNX Runtime backend on ``kind``'s instances."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(DEVICE_KINDS)}")
    config.platform = "onnxruntime_onnx"
    config.default_model_filename = ONNX_FILE
    group = mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=group, count=count)


def step_config(signature: sig.StepSignature, flavour: str, *, sizes: Mapping[str, int] | None = None,
                kind: str = "gpu") -> mc.ModelConfig:
    """Config of one step model, shared by every version directory: ``sizes`` are the numbers of the model
    axes (``sig.MODEL_AXES``) of its versions' graphs (default :func:`template_sizes`, the default model's);
    ``kind`` the machine that serves the onnxruntime flavour's networks (the python flavour's are Python
    processes)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    sizes = template_sizes() if sizes is None else sizes
    config = mc.ModelConfig(name=signature.model_name, max_batch_size=sig.MAX_BATCH)
    # Every version on disk is loaded; the rollout tool decides which directories exist.
    config.version_policy.all.SetInParent()
    _io(config, signature, sizes)
    if signature is sig.TOKENIZER:
        # Dynamic batching without delay: the step takes whatever requests are waiting (its execute() encodes
        # their queries in one call) and its queue gets the bounds of queue_policy().
        config.dynamic_batching.SetInParent()
        queue_policy(config)
        _text_step(config, "raw", instances=1)
        return config
    if signature is sig.TOPK:
        _top_k_step(config, "raw")
        return config
    config.dynamic_batching.max_queue_delay_microseconds = BATCH_DELAY_US
    if flavour == "python":
        config.backend = "python"
        # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
        config.parameters["onnx_file"].string_value = ONNX_FILE
        config.parameters["nice"].string_value = str(NETWORK_NICE)
        if signature is sig.VAN:  # refuses what the text step let in (NaN regions): frees the request's slot
            config.parameters[ADMISSION].string_value = "raw"
    else:
        _onnxruntime_instances(config, kind, 1)
    return config


def queue_policy(config: mc.ModelConfig, *, max_queue_size: int = MAX_QUEUE_SIZE) -> None:
    """Bound ``config``'s dynamic-batching queue to ``max_queue_size`` waiting requests; more are rejected at
    once. No queue timeout. Only for an ensemble's first step (see MAX_QUEUE_SIZE for why)."""
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.default_timeout_microseconds = 0
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = False


ADMISSION = "admission"  # config parameter: the in-flight counter a step takes or frees slots of ("raw", "store")


def admission_parameters(counter: str) -> dict[str, str]:
    """The entrance's admission control (see MAX_QUEUE_SIZE's comment) as config parameters of the text step
    (``serving/backends/text_step.py`` reads them)."""
    return {ADMISSION: counter, "max_in_flight": str(sig.MAX_IN_FLIGHT),
            "in_flight_expiry_s": f"{sig.IN_FLIGHT_EXPIRY_S:g}"}


def _text_step(config: mc.ModelConfig, mode: str, *, instances: int) -> None:
    """The text step's backend, instances and parameters (``serving/backends/text_step.py`` reads them)."""
    config.backend = "python"
    # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    config.parameters["mode"].string_value = mode
    for key, value in request_bounds().items():
        config.parameters[key].string_value = str(value)
    if mode == "raw":  # the store path counts nothing (text_step.py): its ensembles end in no step that frees a slot
        for key, value in admission_parameters(mode).items():
            config.parameters[key].string_value = value
    config.parameters["keyword_cache_size"].string_value = str(KEYWORD_CACHE_SIZE)


def _top_k_step(config: mc.ModelConfig, mode: str) -> None:
    """The top-k step (``serving/backends/top_k.py``): Python, one CPU instance, requests taken as they come
    (dynamic batching without delay: it answers each request on its own, in one execute() call)."""
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.dynamic_batching.SetInParent()
    config.parameters["mode"].string_value = mode
    config.parameters[ADMISSION].string_value = mode  # the last step of its ensembles: frees every request's slot


def _add_step(config: mc.ModelConfig, step: sig.StepSignature, version: int,
              outputs: dict[str, str] | None = None, inputs: dict[str, str | None] | None = None) -> None:
    """One pinned step of an ensemble. Tensor names are unique across the pipeline, so a map is the identity,
    except where ``inputs``/``outputs`` rename (step tensor -> ensemble tensor): the networks' per-candidate
    outputs feed the top-k step under the names of ``sig.TOP_K_FEEDS``. ``outputs`` may also list a subset;
    ``inputs`` may map an optional input to None, leaving it unfed (the store text step's top_k in the ensembles
    that have no top-k)."""
    fed = {n: (inputs or {}).get(n, n) for n in step.input_names}
    config.ensemble_scheduling.step.add(
        model_name=step.model_name, model_version=version,
        input_map={n: tensor for n, tensor in fed.items() if tensor is not None},  # None: an optional input unfed
        output_map=outputs if outputs is not None else {n: n for n in step.output_names})


def _renamed(step: sig.StepSignature) -> dict[str, str]:
    return {n: sig.TOP_K_FEEDS.get(n, n) for n in step.output_names}


def request_bounds() -> dict[str, int]:
    """The bounds of :mod:`amc_client.signatures` as the text step's config parameters (``text_step.py``)."""
    return {"max_candidates": sig.MAX_CANDIDATES, "max_query_bytes": sig.MAX_QUERY_BYTES,
            "max_keywords": sig.MAX_KEYWORDS, "max_keyword_words": sig.MAX_KEYWORD_WORDS,
            "max_keyword_bytes": sig.MAX_KEYWORD_BYTES}


def ensemble_config(name: str, version: int, routing: Routing | None = None) -> mc.ModelConfig:
    """The text step -> QEN -> (VAN, LAN) -> MTN ensemble with every step pinned to ``version``."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=sig.MAX_BATCH)
    _io(config, sig.ENSEMBLE)
    for step in STEPS:
        _add_step(config, step, version, None if step is sig.TOPK else _renamed(step))
    for key, value in (routing_parameters(routing) if routing else {}).items():
        config.parameters[key].string_value = value
    return config


def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


@functools.cache
def template_sizes() -> dict[str, int]:
    """The model axes' numbers in ``model_repository/``: the default ``AMCConfig``'s. A publish writes its own
    model's (:func:`init_repository`)."""
    from export.onnx_export import model_sizes
    from training.model import AMCConfig

    return model_sizes(AMCConfig())


def template_files(flavour: str, *, sizes: Mapping[str, int] | None = None, kind: str = "gpu") -> dict[str, str]:
    """The version-independent configs of a fresh repository for a model of ``sizes`` (default
    :func:`template_sizes`) served on ``kind``: what ``model_repository/<flavour>/`` holds with the defaults.

    ``amc`` starts pinned to version 1, the first version a publish writes.
    """
    files = {f"{s.model_name}/config.pbtxt": to_text(step_config(s, flavour, sizes=sizes, kind=kind)) for s in STEPS}
    files[f"{sig.ENSEMBLE_NAME}/config.pbtxt"] = to_text(ensemble_config(sig.ENSEMBLE_NAME, 1, Routing(1)))
    return files


def write_template(repository: Path, flavour: str) -> None:
    for rel, text in template_files(flavour).items():
        write_atomic(repository / rel, text)


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
    """What a text-step version directory holds besides the code (see ``serving/backends/text_step.py``)."""

    tokenizer_json: str  # the sentence encoder's WordPiece tokenizer.json
    term_weights_json: str  # the checkpoint's amc_client.text.TermWeights
    text_encoder: Path  # text_encoder.onnx, exported and validated
    keyword_table: Path | None = None  # keyword_table.npz (raw mode)
    # The query rules of the version (amc_client.text.TEXT_RULES of the checkpoint's training; 1: queries as sent)
    # and, from rules 2 on, the emoji names it normalizes queries with (amc_client.text.EmojiNames JSON).
    text_rules: int = 1
    emoji_names_json: str | None = None

    @classmethod
    def of_version(cls, version_dir: Path) -> TextStepFiles:
        """The files of a published text-step version directory (the store step reuses the raw step's)."""
        declared = json.loads((version_dir / "version.json").read_text()) if (version_dir / "version.json").is_file() \
            else {}
        names = version_dir / EMOJI_NAMES_FILE
        return cls((version_dir / "tokenizer.json").read_text(encoding="utf-8"),
                   (version_dir / "term_weights.json").read_text(encoding="utf-8"), version_dir / "text_encoder.onnx",
                   text_rules=int(declared.get(TEXT_RULES_KEY, 1)),
                   emoji_names_json=names.read_text(encoding="utf-8") if names.is_file() else None)


def write_text_step(version_dir: Path, *, version: int, files: TextStepFiles, store_json: str | None = None,
                    encoder: bool = True) -> None:
    """Lay out one text-step version directory: the module as ``model.py`` and the files it reads (``encoder``:
    with ``text_encoder.onnx``; the search step's graph holds the encoder instead)."""
    version_dir.mkdir(parents=True)
    shutil.copy(BACKENDS_DIR / TEXT_STEP_FILE, version_dir / "model.py")
    # The Python backend stub only sees site-packages, so the step gets the shared text rules and the
    # provider choice beside it, frozen with the model version.
    shutil.copy(Path(sig.__file__).with_name("text.py"), version_dir / "amc_text.py")
    shutil.copy(BACKENDS_DIR / "onnx_runner.py", version_dir / "amc_onnx_runner.py")
    shutil.copy(BACKENDS_DIR / TOP_K_FILE, version_dir / "amc_top_k.py")
    shutil.copy(BACKENDS_DIR / ADMISSION_FILE, version_dir / "amc_admission.py")
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
    else:  # the step applies these rules (text_step.TextFeatures refuses rules its code does not implement)
        if files.emoji_names_json is None:
            raise ValueError(f"text rules {files.text_rules} need the emoji names ({EMOJI_NAMES_FILE})")
        (version_dir / "version.json").write_text(json.dumps({"version": version, TEXT_RULES_KEY: files.text_rules}))
        (version_dir / EMOJI_NAMES_FILE).write_text(files.emoji_names_json, encoding="utf-8")
    if store_json is not None:
        (version_dir / STORE_FILE).write_text(store_json, encoding="utf-8")


def write_top_k_step(version_dir: Path) -> None:
    """Lay out one top-k step version directory (``serving/backends/top_k.py``)."""
    version_dir.mkdir(parents=True)
    shutil.copy(BACKENDS_DIR / TOP_K_FILE, version_dir / "model.py")
    shutil.copy(BACKENDS_DIR / "onnx_runner.py", version_dir / "amc_onnx_runner.py")
    shutil.copy(BACKENDS_DIR / ADMISSION_FILE, version_dir / "amc_admission.py")


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
            shutil.copy(BACKENDS_DIR / "onnx_runner.py", version_dir / "model.py")
            shutil.copy(BACKENDS_DIR / ADMISSION_FILE, version_dir / "amc_admission.py")
    # The Python backend stub writes __pycache__ into the version directory on first import, which Triton
    # then sees as a modified version and reloads on the next load_model; compiling now avoids that.
    for step in STEPS:
        compileall.compile_dir(stage / step.model_name / str(version), quiet=1)
    ensemble_dir = stage / sig.versioned_ensemble_name(version)
    (ensemble_dir / "1").mkdir(parents=True)
    write_atomic(ensemble_dir / "config.pbtxt", to_text(ensemble_config(ensemble_dir.name, version)))


def set_routing(repository: Path, routing: Routing) -> str:
    """Rewrite ``amc`` pinned to ``routing.serving_version``; returns the new config text."""
    text = to_text(ensemble_config(sig.ENSEMBLE_NAME, routing.serving_version, routing))
    write_atomic(repository / sig.ENSEMBLE_NAME / "config.pbtxt", text)
    (repository / sig.ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    return text


def read_routing(repository: Path) -> Routing:
    config = parse_config((repository / sig.ENSEMBLE_NAME / "config.pbtxt").read_text())
    return parse_routing({"parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}})


def main(argv: list[str] | None = None) -> int:
    """Regenerate the committed templates: ``python -m export.repository [--check]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.repository", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=TEMPLATE_ROOT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed configs differ")
    args = parser.parse_args(argv)
    stale = [f"{fl}/{rel}" for fl in FLAVOURS for rel, text in template_files(fl).items()
             if not (args.root / fl / rel).exists() or (args.root / fl / rel).read_text() != text]
    if args.check:
        print("\n".join(f"differs from generator: {s}" for s in stale) or "model_repository matches the generator")
        return 1 if stale else 0
    for flavour in FLAVOURS:
        write_template(args.root / flavour, flavour)
    print(f"wrote {sum(len(template_files(f)) for f in FLAVOURS)} configs under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ---- candidate store and fused graphs -------------------------------------------------------------------------
# Store steps: the store text step (text_step.py in mode store: for amc_store the query's embedding and the lexical
# features of the stored rows' keywords, for the fused store graphs the query's tokens and numbered words) and the
# store variants of VAN and LAN, whose ONNX graphs hold the version's candidate store as constants. QEN and MTN are
# shared with the raw ensemble.
STORE_STEPS: tuple[sig.StepSignature, ...] = (sig.STORE_TOKENIZER, *sig.STORE_NETWORKS)
FUSED_STEPS: tuple[sig.StepSignature, ...] = (sig.FUSED, sig.FUSED_STORE)
# Whole-store search (written with the fused graphs): one Python step that checks, tokenizes, runs the search graph
# and adds the store's strings (text_step.py, mode search; issue 23: before, three steps).
SEARCH_STEPS: tuple[sig.StepSignature, ...] = (sig.SEARCH_STEP,)
# Every step a version's candidate store can have (what gc, quarantine and rollouts look for).
ALL_STORE_STEPS: tuple[sig.StepSignature, ...] = STORE_STEPS + FUSED_STEPS + SEARCH_STEPS


STORE_BATCH_DELAY_US = 100  # store steps: requests are cheap to merge, so wait less for company at low load
# Instances of the store path's text step and fused graph by the kind of machine that will serve (issue 10, "fast by
# default"). GPU: 4:4, what answered the most at 100 candidates of the instance counts tried on an H100 (the sweep:
# reports/gpu_instances_run6.json; reports/gpu.md, run 6). On a CPU one each: more processes
# only split the same cores. The other store steps keep one. Each fused-graph instance holds its own copy of the
# store's projections (~1.25 GB in fp16 for 100,000 images) and of the sentence encoder (~90 MB).
STORE_INSTANCES = {"gpu": 4, "cpu": 1}
TUNED_STORE_STEPS: tuple[sig.StepSignature, ...] = (sig.STORE_TOKENIZER, sig.FUSED_STORE)


@dataclass(frozen=True)
class SearchSettings:
    """How ``amc_search_step`` runs on one kind of machine (config of :func:`store_step_config`)."""

    instances: int  # Python processes, each with its own session, store copy and CUDA context
    batch_delay_us: int  # the dynamic batcher's wait for more requests to merge into one graph call
    io_binding: bool  # onnx_runner.BoundSession: inputs and outputs bound on the device
    cuda_graph: bool  # capture each batch shape's run (where onnxruntime allows it for the graph)
    intra_op_threads: int | None  # onnxruntime's CPU pool per instance (None: its default, the machine's cores)


# The search step by the kind of machine that will serve (issue 23, "fast by default"). GPU: what the sweep of
# ``benchmarks.search_gpu`` chose on one H100 (reports/gpu.json, ``search_defaults``, which a test checks against
# this: no lever gained past the run's noise at both sizes, so these stay). CUDA graphs are asked for but onnxruntime
# refuses to capture this graph (it places shape ops on the CPU; ``search_cuda_graph_refusals``), and the step then
# runs it uncaptured, as the step's description says. The graph's work is on the device, so one onnxruntime thread per instance (its CPU pool only runs shape ops)
# leaves the cores to the other instances and to Triton. CPU: one instance with onnxruntime's own pool (more
# processes would split the same cores), bound host buffers (the same code path as the GPU's), no graphs.
SEARCH_SETTINGS = {"gpu": SearchSettings(instances=2, batch_delay_us=200, io_binding=True, cuda_graph=True,
                                         intra_op_threads=1),
                   "cpu": SearchSettings(instances=1, batch_delay_us=100, io_binding=True, cuda_graph=False,
                                         intra_op_threads=None)}
# Requests the search step lets wait (each execution takes up to sig.SEARCH_MAX_BATCH queries); more are answered
# UNAVAILABLE at once by Triton, which the client backs off from. Only the one step: no later step to stall.
SEARCH_QUEUE_SIZE = 256
# Queries x rows per graph call at most: the graph holds (B, N, R, hidden) float32 tensors, ~2.5 GB per query of a
# 100,000-row store, so a whole-store search runs one query per call, a search among 1,000 rows up to 64.
SEARCH_ROWS_PER_RUN = 131_072


def device_kind() -> str:
    """"gpu" where this environment's onnxruntime offers its CUDA provider (onnxruntime-gpu is installed; the
    requirements pin the CPU build, so a development machine says "cpu"), else "cpu". Publishing for a GPU server
    from elsewhere: name the kind (``export.publish --device-kind gpu``, ``amc-rollout publish --device-kind gpu``)."""
    import onnxruntime as ort

    return "gpu" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def store_instances(kind: str | None = None) -> int:
    """Instances of each of :data:`TUNED_STORE_STEPS` for ``kind`` (default: this machine's :func:`device_kind`)."""
    kind = kind or device_kind()
    if kind not in STORE_INSTANCES:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(STORE_INSTANCES)}")
    return STORE_INSTANCES[kind]


def store_step_config(signature: sig.StepSignature, flavour: str, *, instances: int = 1,
                      max_batch: int | None = None, batch_delay_us: int = STORE_BATCH_DELAY_US,
                      sizes: Mapping[str, int] | None = None, kind: str = "gpu") -> mc.ModelConfig:
    """Config of a store step or a fused graph (``STORE_STEPS`` / ``FUSED_STEPS``); version-independent.

    Like :func:`step_config`, with ``instances`` per step and dynamic batching on every step, the store
    text step included (it encodes the queries of all the requests Triton hands it in one encoder call, so
    merging requests is what lets it keep up). ``max_batch`` defaults to ``sig.STORE_MAX_BATCH`` (ids and
    fixed-size text features only), ``sig.MAX_BATCH`` for ``amc_fused`` (raw features). onnxruntime's CUDA
    provider runs without TF32 (``use_tf32: 0``), as fp32 as the CPU path. ``sizes`` and ``kind`` as for
    :func:`step_config`.
    """
    if signature not in ALL_STORE_STEPS:
        raise ValueError(f"{signature.model_name} is not a store step or fused graph")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    if max_batch is None:
        max_batch = sig.MAX_BATCH if signature is sig.FUSED else sig.STORE_MAX_BATCH
    sizes = template_sizes() if sizes is None else sizes
    config = mc.ModelConfig(name=signature.model_name, max_batch_size=max_batch)
    config.version_policy.all.SetInParent()
    _io(config, signature, sizes)
    if signature is sig.SEARCH_STEP:
        return search_step_config(dataclasses.replace(SEARCH_SETTINGS[kind], instances=instances), sizes=sizes,
                                  max_batch=max_batch)
    config.dynamic_batching.max_queue_delay_microseconds = batch_delay_us
    if signature is sig.STORE_TOKENIZER:
        queue_policy(config, max_queue_size=max(MAX_QUEUE_SIZE, 2 * max_batch))
        _text_step(config, "store", instances=instances)
        config.parameters["use_tf32"].string_value = "0"
        return config
    if flavour == "python":
        config.backend = "python"
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
        config.parameters["onnx_file"].string_value = ONNX_FILE
        config.parameters["use_tf32"].string_value = "0"
        if sig.QUERY_WORDS.name in signature.input_names:
            # The graphs' lexical match scatters the query's word weights by word number: a repeated number
            # would count once, silently. The text step never repeats one; a direct caller gets INVALID_ARGUMENT.
            config.parameters["distinct"].string_value = sig.QUERY_WORDS.name
    else:
        _onnxruntime_instances(config, kind, instances)
    return config


def search_step_config(settings: SearchSettings, *, sizes: Mapping[str, int] | None = None,
                       max_batch: int = sig.SEARCH_MAX_BATCH) -> mc.ModelConfig:
    """``amc_search_step``'s config: the text step's module in mode search, run as ``settings`` say (the
    benchmarks write their A/B variants with it), with the search graph's parameters (``text_step.SearchGraph``)."""
    config = mc.ModelConfig(name=sig.SEARCH_STEP.model_name, max_batch_size=max_batch)
    config.version_policy.all.SetInParent()
    _io(config, sig.SEARCH_STEP, template_sizes() if sizes is None else sizes)
    config.backend = "python"
    # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.instances)
    config.dynamic_batching.max_queue_delay_microseconds = settings.batch_delay_us
    queue_policy(config, max_queue_size=SEARCH_QUEUE_SIZE)
    params = {"mode": "search", **{k: str(v) for k, v in request_bounds().items()}, "onnx_file": SEARCH_GRAPH_FILE,
              "use_tf32": "0",
              "graph_inputs": ",".join(sig.SEARCH_STORE.input_names),
              "io_binding": str(int(settings.io_binding)), "cuda_graph": str(int(settings.cuda_graph)),
              "max_rows_per_run": str(SEARCH_ROWS_PER_RUN), "max_graph_batch": str(max_batch)}
    if settings.intra_op_threads is not None:
        params["intra_op_num_threads"] = str(settings.intra_op_threads)
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def store_ensemble_config(name: str, version: int, max_batch: int = sig.MAX_BATCH) -> mc.ModelConfig:
    """store text step -> QEN -> (VAN store, LAN store) -> MTN, every step pinned to ``version``."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    _io(config, sig.STORE_ENSEMBLE)
    for step in (sig.STORE_TOKENIZER, sig.QEN, sig.VAN_STORE, sig.LAN_STORE, sig.MTN):
        # Of the text step's outputs, the query embedding, the lexical features and the version (not the rows it
        # was sent, search_k, nor what the fused store graphs read); its top_k input is not used either.
        unused = (sig.CANDIDATE_ROWS, sig.SEARCH_K, sig.QUERY_TOKENS, sig.QUERY_WORDS, sig.QUERY_WORD_WEIGHTS)
        used = {n: n for n in step.output_names if n not in {t.name for t in unused}}
        _add_step(config, step, version, used, inputs={sig.TOP_K.name: None})
    return config


def stage_store_version(repository: Path, *, version: int, flavour: str, onnx_dir: Path, text: TextStepFiles,
                        store_json: str, fused: bool = True, instances: int | None = None,
                        sizes: Mapping[str, int] | None = None, kind: str | None = None) -> list[Path]:
    """Write version ``version``'s store steps (and fused graphs) into ``repository``; returns what was written.

    ``onnx_dir`` holds ``van_store.onnx``, ``lan_store.onnx`` (and ``fused.onnx``, ``fused_store.onnx``,
    ``search_store.onnx``: with them come the search steps and ``amc_search_v<N>``);
    ``text`` the store text step's files (those of the version's raw text step); step configs are written if
    the step has none yet or no version, for a model of ``sizes`` served on ``kind`` (default this machine's
    :func:`device_kind`), :data:`TUNED_STORE_STEPS` with ``instances`` each (default :func:`store_instances` of
    ``kind``); existing ones are the caller's to check first (:func:`check_store_configs`, as
    ``export.store.publish_store`` does before it builds the store). The pinned ``amc_store_v<N>`` comes last; ``amc_store`` is pinned to ``version`` by
    :func:`set_store_serving`.
    """
    if instances is not None and instances < 1:
        raise ValueError(f"store step instances must be >= 1, got {instances}")
    kind = kind or device_kind()
    tuned = instances or store_instances(kind)
    searching = instances or SEARCH_SETTINGS[kind].instances
    written: list[Path] = []
    steps = STORE_STEPS + (FUSED_STEPS + SEARCH_STEPS if fused else ())
    for step in steps:
        config_path = repository / step.model_name / "config.pbtxt"
        if not config_path.exists() or not has_versions(config_path.parent):
            count = searching if step is sig.SEARCH_STEP else tuned if step in TUNED_STORE_STEPS else 1
            write_atomic(config_path, to_text(store_step_config(step, flavour, instances=count, sizes=sizes,
                                                                kind=kind)))
        version_dir = repository / step.model_name / str(version)
        if step is sig.STORE_TOKENIZER:
            write_text_step(version_dir, version=version, files=text, store_json=store_json)
        elif step is sig.SEARCH_STEP:  # the text step's files, the search graph, no sentence encoder of its own
            write_text_step(version_dir, version=version, files=text, store_json=store_json, encoder=False)
            shutil.copy(onnx_dir / SEARCH_GRAPH_FILE, version_dir / SEARCH_GRAPH_FILE)
        else:
            version_dir.mkdir(parents=True)
            short = step.model_name.removeprefix("amc_")
            shutil.copy(onnx_dir / f"{short}.onnx", version_dir / ONNX_FILE)
            if flavour == "python":
                shutil.copy(BACKENDS_DIR / "onnx_runner.py", version_dir / "model.py")
        written.append(version_dir)
        compileall.compile_dir(version_dir, quiet=1)
    ensemble_dir = repository / sig.versioned_store_ensemble_name(version)
    (ensemble_dir / "1").mkdir(parents=True, exist_ok=True)
    write_atomic(ensemble_dir / "config.pbtxt", to_text(store_ensemble_config(ensemble_dir.name, version)))
    written.append(ensemble_dir)
    if fused:
        search_dir = repository / sig.versioned_search_ensemble_name(version)
        (search_dir / "1").mkdir(parents=True, exist_ok=True)
        write_atomic(search_dir / "config.pbtxt", to_text(search_ensemble_config(search_dir.name, version)))
        written.append(search_dir)
    return written


def check_store_configs(repository: Path, steps: Sequence[sig.StepSignature] = ALL_STORE_STEPS, *,
                        sizes: Mapping[str, int] | None = None) -> None:
    """Refuse a repository whose config of one of ``steps`` declares other tensors than this release's: every
    version of a step shares its config, so a version added beside it would not load, and ensembles written for
    this release's tensors would not load over it (a repository whose store steps an older release published,
    before the fused store graphs took the query's tokens). Raises ValueError naming the step and the remedy.
    With ``sizes``, also other dims than a version of a model of those sizes needs (:func:`check_step_configs`)."""
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


def search_ensemble_config(name: str, version: int) -> mc.ModelConfig:
    """Whole-store search, pinned to ``version``: one step, ``amc_search_step`` (checks the request, tokenizes, runs
    the search graph over every row of the store or the rows of the optional ``candidate_ids`` filter, adds the kept
    rows' store ids and keywords; ``serving/backends/text_step.py``, mode search).

    Why one step (issue 23): each Python step costs CPU per request in the stub and the shared-memory hand-off
    (reports/gpu.md, run 8), and the graph keeps only the top k rows, so no per-row tensor of a whole store
    crosses the Python backend. The ensemble stays so that a version's search is pinned by name, as before."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=sig.SEARCH_MAX_BATCH)
    _io(config, sig.SEARCH_ENSEMBLE)
    _add_step(config, sig.SEARCH_STEP, version)
    return config


def store_fused_ensemble_config(name: str, version: int,
                                max_batch: int = sig.STORE_MAX_BATCH) -> mc.ModelConfig:
    """store text step -> ``amc_fused_store`` (2 steps), pinned to ``version``: ``amc_store``'s request and
    response, with one network step instead of four (the text step's version output is not used)."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    _io(config, sig.STORE_FUSED_ENSEMBLE)
    text_features = [n for n in sig.STORE_TOKENIZER.output_names if n in sig.FUSED_STORE.input_names]
    config.ensemble_scheduling.step.add(
        model_name=sig.STORE_TOKENIZER.model_name, model_version=version,
        input_map={n: n for n in sig.STORE_TOKENIZER.input_names if n != sig.TOP_K.name},
        output_map={n: n for n in text_features})
    config.ensemble_scheduling.step.add(
        model_name=sig.FUSED_STORE.model_name, model_version=version,
        input_map={n: n for n in sig.FUSED_STORE.input_names},
        output_map={n: n for n in sig.FUSED_STORE.output_names})
    return config


def store_models(repository: Path, version: int) -> tuple[list[str], list[str]]:
    """The store steps that have version ``version`` and its pinned store ensembles (``amc_store_v<N>``,
    ``amc_search_v<N>``), in load order; both empty where the version was published without a store."""
    steps = [s.model_name for s in version_store_steps(repository, version)]
    ensembles = [n for n in (sig.versioned_store_ensemble_name(version), sig.versioned_search_ensemble_name(version))
                 if (repository / n).is_dir()]
    return steps, ensembles


def version_store_steps(repository: Path, version: int) -> list[sig.StepSignature]:
    """The store steps that have version ``version`` in ``repository`` (what its store ensembles pin)."""
    return [s for s in ALL_STORE_STEPS if (repository / s.model_name / str(version)).is_dir()]


def store_step_names(repository: Path) -> list[str]:
    """The store steps ``repository`` has a config for (any version)."""
    return [s.model_name for s in ALL_STORE_STEPS
            if (repository / s.model_name / "config.pbtxt").exists()]


def published_versions(repository: Path) -> list[int]:
    """Versions whose pinned ensemble exists, ascending."""
    prefix = f"{sig.ENSEMBLE_NAME}_v"
    return sorted(int(p.name[len(prefix):]) for p in repository.glob(f"{prefix}*")
                  if p.name[len(prefix):].isdigit() and (p / "config.pbtxt").exists())


def store_paths(repository: Path, version: int) -> list[Path]:
    """Every folder version ``version``'s store added to ``repository`` (what gc and quarantine remove)."""
    steps, ensembles = store_models(repository, version)
    return [repository / m / str(version) for m in steps] + [repository / e for e in ensembles]


def unpublished_paths(repository: Path, published: list[int]) -> list[Path]:
    """Folders of versions not in ``published``, left by a publish that was interrupted before it marked the
    version published (``amc_v<N>`` is written last): ranking and store step versions, pinned store ensembles."""
    keep = set(published)
    paths = [p for name in [s.model_name for s in (*STEPS, *ALL_STORE_STEPS)]
             for p in sorted((repository / name).glob("[0-9]*"))
             if p.is_dir() and p.name.isdigit() and int(p.name) not in keep]
    for pinned in (sig.versioned_store_ensemble_name, sig.versioned_search_ensemble_name):
        prefix = pinned(0).removesuffix("0")  # "amc_store_v"
        for p in sorted(repository.glob(prefix + "[0-9]*")):
            number = p.name.removeprefix(prefix)
            if p.is_dir() and number.isdigit() and int(number) not in keep:
                paths.append(p)
    return paths


def store_serving_models(repository: Path) -> list[str]:
    """The unversioned store ensembles that exist in ``repository`` (``amc_store``, ``amc_store_fused``,
    ``amc_search``): what follows the serving version when it changes."""
    names = (sig.STORE_ENSEMBLE_NAME, sig.STORE_FUSED_ENSEMBLE_NAME, sig.SEARCH_ENSEMBLE_NAME)
    return [n for n in names if (repository / n / "config.pbtxt").exists()]


def store_serving_version(repository: Path) -> int | None:
    """The version ``amc_store`` is pinned to; None if no store serves."""
    path = repository / sig.STORE_ENSEMBLE_NAME / "config.pbtxt"
    if not path.exists():
        return None
    return int(parse_config(path.read_text()).ensemble_scheduling.step[0].model_version)


def set_store_serving(repository: Path, version: int) -> str:
    """Rewrite ``amc_store`` pinned to ``version`` (and ``amc_store_fused`` where version ``version`` has the
    fused store graph); returns ``amc_store``'s new config text. Nothing is written where the config of a store
    step version ``version`` has is of an older release (:func:`check_store_configs`)."""
    check_store_configs(repository, version_store_steps(repository, version))
    text = to_text(store_ensemble_config(sig.STORE_ENSEMBLE_NAME, version))
    write_atomic(repository / sig.STORE_ENSEMBLE_NAME / "config.pbtxt", text)
    (repository / sig.STORE_ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    if (repository / sig.FUSED_STORE.model_name / str(version)).is_dir():
        write_atomic(repository / sig.STORE_FUSED_ENSEMBLE_NAME / "config.pbtxt",
                     to_text(store_fused_ensemble_config(sig.STORE_FUSED_ENSEMBLE_NAME, version)))
        (repository / sig.STORE_FUSED_ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    if (repository / sig.SEARCH_STEP.model_name / str(version)).is_dir():
        write_atomic(repository / sig.SEARCH_ENSEMBLE_NAME / "config.pbtxt",
                     to_text(search_ensemble_config(sig.SEARCH_ENSEMBLE_NAME, version)))
        (repository / sig.SEARCH_ENSEMBLE_NAME / "1").mkdir(exist_ok=True)
    return text
