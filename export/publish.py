"""Publish a checkpoint as a new model version of a serving repository.

    python -m export.publish --checkpoint runs/amc/checkpoint.pt --repository runs/repository

Exports the text encoder (all-MiniLM-L6-v2), QEN, VAN, LAN and MTN to ONNX, validates them against PyTorch,
precomputes the keyword table of the text step (the sentence embedding of every keyword of the training
corpus's images, so that common tags cost a lookup when served), and lays the version out in a staging
folder inside the repository; only when everything passed is it renamed into place, step models
first and the pinned ensemble ``amc_v<N>`` last. ``amc_v<N>`` existing is what makes version N published,
so a failure at any point leaves the repository as it was (an interrupted rename leaves only unreferenced
step directories, which ``amc-rollout gc`` removes). An existing version is never overwritten.

Each version gets ``amc_v<N>/manifest.json`` (fingerprint, training config, evaluation figures, parity
errors, creation time) and ``amc_v<N>/golden.npz``: a few requests with the PyTorch outputs of the same
checkpoint, which the rollout tool replays through Triton before the version takes traffic (their text
features computed by :class:`export.reference.Reference`, the text step's rules with the PyTorch encoder).

``--store-corpus`` also builds the version's candidate store (whole-store search, ``amc_search``) from every image
of the checkpoint's training corpus, inside the same publish (see :func:`publish`).

A publish writes only the models :class:`amc_client.AMCClient` calls (``amc``, ``amc_v<N>``, ``amc_search``,
``amc_search_v<N>``) and the steps they run; :mod:`export.repository` lists them.

A checkpoint trained with another text encoder (format 1: GloVe) is refused with the checkpoint loader's
"encoder mismatch" message, before anything is written; so is one trained with query rules this release does not
implement (``Checkpoint.text_rules`` above ``amc_contract.text.TEXT_RULES``). The version's text step gets the
checkpoint's rules (``text_rules`` in its ``version.json``) and, from rules 2 on, the emoji names it normalizes
queries with (``emoji_names.json``, CLDR's, built here by ``training.corpus.catalog.emoji_names``); the golden
requests' PyTorch outputs read their queries by the same rules.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from amc_contract import signatures as sig
from amc_contract.text import TEXT_RULES, TermWeights
from amc_model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from amc_model.text_encoder import ENCODER_NAME, PACKAGE, TextEmbeddings, tokenizer_json
from export.configs import DEVICE_KINDS, FLAVOURS, STEPS
from export.onnx_export import TEXT_ENCODER_FILE, ExportError, export_all, model_sizes
from export.reference import Reference
from export.repository import (
    KNOWN_TEXT_RULES,
    TextStepFiles,
    init_repository,
    published_versions,
    read_routing,
    repository_flavour,
    set_store_serving,
    stage_version,
    store_paths,
)
from export.store import Gallery, keyword_table_embed, publish_store
from export.thumbnails import thumbnail_dir, write_thumbnails

MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
KEYWORD_TABLE = "keyword_table.npz"
_VERSION_DIR = re.compile(r"^\d+$")


def _highest_version_on_disk(repository: Path) -> int:
    found = [int(p.name) for step in STEPS for p in (repository / step.model_name).glob("*")
             if p.is_dir() and _VERSION_DIR.match(p.name)]
    return max([0, *found, *published_versions(repository)])


def read_manifest(repository: Path, version: int) -> dict:
    return json.loads((repository / sig.versioned_ensemble_name(version) / MANIFEST).read_text())


@contextmanager
def repository_lock(repository: Path):
    """One publish or rollout change at a time per repository."""
    repository.mkdir(parents=True, exist_ok=True)
    with open(repository / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield



def training_corpus(ckpt: Checkpoint):
    """The corpus described by the checkpoint's training config (loaded from its cache, or built)."""
    from dataclasses import fields

    # The data set, not the trainer: export reads it only here (--store-corpus, the default keyword table), so export
    # loads without training (tests/unit/test_layout.py).
    from training.corpus import CorpusConfig, load_corpus

    values = dict(ckpt.train_config.get("corpus") or {})
    if not values:
        raise ValueError("the checkpoint names no training corpus")
    known = {f.name for f in fields(CorpusConfig)}
    return load_corpus(CorpusConfig(**{k: v for k, v in values.items() if k in known}), progress=False)


def corpus_gallery(checkpoint: str | Path) -> Gallery:
    """Every image of the checkpoint's training corpus as a store gallery (``--store-corpus``); a clear error
    where that corpus cannot be had."""
    try:
        return Gallery.of_corpus(training_corpus(load_checkpoint(checkpoint)))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - asked for: say why it cannot be had
        raise ValueError(f"--store-corpus: the training corpus cannot be loaded here ({type(e).__name__}: {e})") from e


def training_keywords(ckpt: Checkpoint, log=print) -> list[str]:
    """Every keyword of the training corpus's images (the corpus described by the checkpoint's training config);
    empty, with a log line, where that corpus cannot be loaded (e.g. a machine without the data)."""
    try:
        corpus = training_corpus(ckpt)
    except Exception as e:  # noqa: BLE001 - the table is an optimisation: unknown keywords are encoded when served
        log(f"keyword table: the training corpus is not available here ({type(e).__name__}: {e}); every keyword "
            "will be encoded when first served")
        return []
    return sorted({k for keywords in corpus.keywords for k in keywords if k})


def write_keyword_table(path: Path, ckpt: Checkpoint, reference: Reference, keywords: list[str]) -> int:
    """``keyword_table.npz`` of the text step: texts (U,) and their PyTorch sentence embeddings (U, E).

    The embeddings come from the training run's text-embedding cache where the checkpoint names one (the very
    vectors the model was trained with), else from the encoder. Returns U."""
    distinct = sorted({k for k in keywords if k})
    cache_dir = (ckpt.train_config.get("corpus") or {}).get("cache_dir")
    if not distinct:
        vectors = np.zeros((0, sig.TEXT_EMBEDDING_DIM), dtype=np.float32)
    elif cache_dir:
        vectors = TextEmbeddings(cache_dir).get(distinct, "keyword")
    else:
        vectors = reference.encoder.encode_keywords(distinct)
    np.savez(path, texts=np.array(distinct, dtype=str), vectors=np.asarray(vectors, dtype=np.float32))
    return len(distinct)


def check_text_rules(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint trained with query rules this release's text step does not implement (a newer
    release's), before anything is written: served with these rules, its queries would be read otherwise than
    in training."""
    if ckpt.text_rules not in KNOWN_TEXT_RULES:
        raise ValueError(f"the checkpoint was trained with text rules {ckpt.text_rules}, but this release's text step "
                         f"implements text rules {', '.join(map(str, KNOWN_TEXT_RULES))} "
                         f"(amc_contract.text.TEXT_RULES = {TEXT_RULES}): publish it with the release that trained it")


def golden_requests(ckpt: Checkpoint, reference: Reference, keywords: list[str], *, seed: int = 1234,
                    queries: int = 3, candidates: int = 7) -> dict[str, np.ndarray]:
    """Deterministic requests with PyTorch's outputs: queries of the collection's words (one also in another
    script and with an emoji), keywords from ``keywords`` (the keyword table) and new phrases."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted(TermWeights.from_json(ckpt.term_weights).df) or ["cat", "face", "heart"]

    def phrase(most: int) -> str:
        return " ".join(rng.choice(vocabulary, size=int(rng.integers(1, most + 1))))

    texts = [phrase(3) for _ in range(queries)]
    texts[-1] = f"{phrase(1)} кошка 🐱"
    table = keywords or vocabulary
    kw = np.array([[[(str(rng.choice(table)) if rng.random() < 0.5 else phrase(2)) if rng.random() < 0.8 or j == 0
                     else "" for j in range(5)] for _ in range(candidates)] for _ in range(queries)], dtype=object)
    regions = np.abs(rng.normal(0, 1.5, size=(queries, candidates, sig.REGIONS_PER_IMAGE,
                                              sig.REGION_FEATURE_DIM))).astype(np.float32)
    region_mask = np.ones(regions.shape[:3], dtype=bool)
    out = reference(texts, regions, region_mask, kw)
    # Strings as numpy unicode arrays: golden.npz loads without pickle.
    return {"query": np.array(texts, dtype=str), "regions": regions, "region_mask": region_mask,
            "keywords": kw.astype(str), "scores": out.scores.numpy(), "modality_weights": out.modality_weights.numpy(),
            "region_attention": out.region_attention.numpy(), "keyword_attention": out.keyword_attention.numpy()}


def publish(checkpoint: str | Path, repository: str | Path, *, flavour: str | None = None,
            eval_metrics: dict | None = None, keywords: list[str] | None = None, store: Gallery | None = None,
            device_kind: str | None = None, log=print) -> int:
    """Export, validate and publish ``checkpoint`` as the next version of ``repository``; returns it.

    ``keywords``: what the text step's keyword table holds; default every keyword of the training corpus.
    ``store``: also build the version's candidate store from this gallery (whole-store search, ``amc_search``),
    validated like the networks, before the version is marked published; ``amc_search`` serves it at once
    only where the version itself serves (a repository's first version), else from ``amc-rollout promote`` on.
    ``device_kind`` ("gpu", "cpu"; default this machine's): the machine that serves, where a step's config is
    new: the onnxruntime flavour's instance kind (``KIND_GPU``, ``KIND_CPU``) and how the search step runs
    (``export.configs.SEARCH_SETTINGS``). The networks' configs declare this checkpoint's dims
    (``model_sizes``), the ones the export checks its graphs against; a repository whose steps have versions
    of other dims is refused before anything is written.
    """
    from export.configs import device_kind as machine_kind

    repository = Path(repository)
    ckpt = load_checkpoint(checkpoint)  # refuses other encoders' checkpoints: "encoder mismatch"
    check_text_rules(ckpt)
    kind = device_kind or machine_kind()
    sizes = model_sizes(ckpt.model_config)
    with repository_lock(repository):
        if flavour is None:
            flavour = repository_flavour(repository) if (repository / sig.QEN.model_name).exists() else "python"
        if device_kind is not None and store is None and flavour == "python":
            log(f"device kind {device_kind!r} ignored: it sizes the candidate store's steps and places the "
                "onnxruntime flavour's networks, and this publish has neither")
        init_repository(repository, flavour, sizes=sizes, kind=kind)
        version = _highest_version_on_disk(repository) + 1
        staging = repository / ".staging" / f"v{version}-{time.time_ns()}"
        staging.mkdir(parents=True)
        moved: list[Path] = []
        try:
            started = time.perf_counter()
            reference = Reference(ckpt)
            parity = export_all(reference.model, staging / "onnx", version=version, fingerprint=ckpt.fingerprint,
                                encoder=reference.encoder.model)
            log(f"exported and validated the text encoder and 4 networks in {time.perf_counter() - started:.1f} s "
                f"(worst relative error {max(r.max_relative_error for rs in parity.values() for r in rs):.1e})")
            if keywords is None:
                keywords = training_keywords(ckpt, log)
            table = write_keyword_table(staging / KEYWORD_TABLE, ckpt, reference, keywords)
            tree = staging / "tree"
            stage_version(tree, version=version, flavour=flavour, onnx_dir=staging / "onnx", text=TextStepFiles(
                tokenizer_json(), ckpt.term_weights, staging / "onnx" / TEXT_ENCODER_FILE, staging / KEYWORD_TABLE,
                text_rules=ckpt.text_rules,
                emoji_names_json=None if reference.emoji_names is None else reference.emoji_names.to_json()))
            ensemble = tree / sig.versioned_ensemble_name(version)
            np.savez(ensemble / GOLDEN, **golden_requests(ckpt, reference, keywords))
            manifest = {
                "version": version, "fingerprint": ckpt.fingerprint, "flavour": flavour,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "checkpoint": str(Path(checkpoint).resolve()), "model_config": ckpt.model_config.to_dict(),
                "text_encoder": {"name": ENCODER_NAME, "package": f"{PACKAGE}=={metadata.version(PACKAGE)}",
                                 "keyword_table": table},
                "train_config": ckpt.train_config, "metrics": {**ckpt.metrics, **(eval_metrics or {})},
                "text_rules": ckpt.text_rules,
                "parity": {n: {"max_relative_error": max(r.max_relative_error for r in rs),
                               "shapes": [asdict(r.shape) for r in rs]} for n, rs in parity.items()},
            }
            (ensemble / MANIFEST).write_text(json.dumps(manifest, indent=2))
            # Step versions first (and the store, which reads the text step's files), the pinned ensemble last:
            # it is the marker that the version exists.
            for step in STEPS:
                target = repository / step.model_name / str(version)
                (tree / step.model_name / str(version)).rename(target)
                moved.append(target)
            if store is not None:
                _publish_store(repository, version, ckpt, store, kind, log)
            ensemble.rename(repository / ensemble.name)
        except BaseException:
            for path in moved + store_paths(repository, version):
                shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # an empty .staging left in the repository is noise
                staging.parent.rmdir()
        if store is not None and read_routing(repository).serving_version == version:
            set_store_serving(repository, version)
    log(f"published version {version} (fingerprint {ckpt.fingerprint}) into {repository}")
    return version


def _publish_store(repository: Path, version: int, ckpt: Checkpoint, gallery: Gallery, kind: str, log) -> None:
    """The version's candidate store, its keywords embedded from the version's keyword table (not served yet)."""
    started = time.perf_counter()
    table = repository / sig.TOKENIZER.model_name / str(version) / KEYWORD_TABLE
    publish_store(repository, version, ckpt.build_model(), ckpt.term_weights, gallery.regions, gallery.keywords,
                  ids=gallery.ids, fingerprint=ckpt.fingerprint, serve=False, embed=keyword_table_embed(table),
                  kind=kind, log=log)
    if gallery.images is not None:  # the search page's pictures, removed with the store if the publish fails
        kept = write_thumbnails(thumbnail_dir(repository, version), gallery.images, version=version)
        log(f"kept {kept} thumbnails of the store's {len(gallery.ids)} rows")
    log(f"candidate store of {len(gallery.ids)} images built in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--flavour", choices=FLAVOURS, default=None,
                        help="for a new repository (default python); an existing one keeps its own")
    parser.add_argument("--eval-json", type=Path, default=None, help="evaluation figures to put in the manifest")
    stores = parser.add_mutually_exclusive_group()
    stores.add_argument("--store-corpus", action="store_true",
                        help="also build the candidate store for whole-store search (amc-client search) from every "
                             "image of the checkpoint's training corpus")
    stores.add_argument("--store-candidates", type=Path, metavar="FILE.npz",
                        help="the same from your own images: a file of amc-client make-candidates (its pictures "
                             "become the store's thumbnails)")
    parser.add_argument("--device-kind", choices=sorted(DEVICE_KINDS), default=None,
                        help="the machine that will serve, for how the search step runs and the onnxruntime "
                             "flavour's KIND_GPU / KIND_CPU (default: this one's: gpu where onnxruntime has its CUDA "
                             "provider)")
    args = parser.parse_args(argv)
    try:
        metrics = json.loads(args.eval_json.read_text()) if args.eval_json else None
        store = corpus_gallery(args.checkpoint) if args.store_corpus else None
        if args.store_candidates is not None:
            store = Gallery.of_candidates(args.store_candidates)
        publish(args.checkpoint, args.repository, flavour=args.flavour, eval_metrics=metrics, store=store,
                device_kind=args.device_kind)
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"error: publish failed, repository unchanged: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
