"""Publish a checkpoint as a new model version of a serving repository.

    python -m export.publish --checkpoint runs/amc/checkpoint.pt --repository runs/repository

Exports QEN, VAN, LAN and MTN to ONNX, validates them against PyTorch, and lays the version out in a
staging folder inside the repository; only when everything passed is it renamed into place, step models
first and the pinned ensemble ``amc_v<N>`` last. ``amc_v<N>`` existing is what makes version N published,
so a failure at any point leaves the repository as it was (an interrupted rename leaves only unreferenced
step directories, which ``amc-rollout gc`` removes). An existing version is never overwritten.

Each version gets ``amc_v<N>/manifest.json`` (fingerprint, training config, evaluation figures, parity
errors, creation time) and ``amc_v<N>/golden.npz``: a few requests with the PyTorch outputs of the same
checkpoint, which the rollout tool replays through Triton before the version takes traffic.
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
from pathlib import Path

import numpy as np
import torch

from amc_client import signatures as sig
from amc_client.text import Tokenizer
from export.onnx_export import ExportError, export_all
from export.repository import FLAVOURS, STEPS, init_repository, repository_flavour, stage_version
from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint

MANIFEST = "manifest.json"
GOLDEN = "golden.npz"
_VERSION_DIR = re.compile(r"^\d+$")


def published_versions(repository: Path) -> list[int]:
    """Versions whose pinned ensemble exists, ascending."""
    prefix = f"{sig.ENSEMBLE_NAME}_v"
    return sorted(int(p.name[len(prefix):]) for p in repository.glob(f"{prefix}*")
                  if p.name[len(prefix):].isdigit() and (p / "config.pbtxt").exists())


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



def golden_requests(ckpt: Checkpoint, *, seed: int = 1234, queries: int = 3, candidates: int = 7) -> dict[str, np.ndarray]:
    """Deterministic requests built from the checkpoint's own vocabulary, with PyTorch's outputs."""
    rng = np.random.default_rng(seed)
    words = ckpt.vocab[1:]
    texts = np.array([" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(queries)])
    keywords = np.array([[[" ".join(rng.choice(words, size=rng.integers(1, 3))) if rng.random() < 0.8 else ""
                           for _ in range(5)] for _ in range(candidates)] for _ in range(queries)])
    keywords[:, :, 0] = rng.choice(words, size=(queries, candidates))  # every candidate has a keyword
    regions = np.abs(rng.normal(0, 1.5, size=(queries, candidates, sig.REGIONS_PER_IMAGE,
                                              sig.REGION_FEATURE_DIM))).astype(np.float32)
    region_mask = np.ones(regions.shape[:3], dtype=bool)
    tokenizer = Tokenizer(ckpt.vocab)
    model = ckpt.build_model()
    with torch.no_grad():
        out = model(torch.from_numpy(tokenizer.encode_queries(list(texts))), torch.from_numpy(regions),
                    torch.from_numpy(region_mask), torch.from_numpy(tokenizer.encode_keywords(keywords)))
    return {"query": texts, "regions": regions, "region_mask": region_mask, "keywords": keywords,
            "scores": out.scores.numpy(), "modality_weights": out.modality_weights.numpy(),
            "region_attention": out.region_attention.numpy(), "keyword_attention": out.keyword_attention.numpy()}


def publish(checkpoint: str | Path, repository: str | Path, *, flavour: str | None = None,
            eval_metrics: dict | None = None, log=print) -> int:
    """Export, validate and publish ``checkpoint`` as the next version of ``repository``; returns it."""
    repository = Path(repository)
    ckpt = load_checkpoint(checkpoint)
    with repository_lock(repository):
        if flavour is None:
            flavour = repository_flavour(repository) if (repository / sig.QEN.model_name).exists() else "python"
        init_repository(repository, flavour)
        version = _highest_version_on_disk(repository) + 1
        staging = repository / ".staging" / f"v{version}-{time.time_ns()}"
        staging.mkdir(parents=True)
        moved: list[Path] = []
        try:
            started = time.perf_counter()
            parity = export_all(ckpt.build_model(), staging / "onnx", version=version, fingerprint=ckpt.fingerprint)
            log(f"exported and validated 4 networks in {time.perf_counter() - started:.1f} s "
                f"(worst relative error {max(r.max_relative_error for rs in parity.values() for r in rs):.1e})")
            tree = staging / "tree"
            stage_version(tree, version=version, flavour=flavour, onnx_dir=staging / "onnx",
                          vocab_json=json.dumps(ckpt.vocab))
            ensemble = tree / sig.versioned_ensemble_name(version)
            np.savez(ensemble / GOLDEN, **golden_requests(ckpt))
            manifest = {
                "version": version, "fingerprint": ckpt.fingerprint, "flavour": flavour,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "checkpoint": str(Path(checkpoint).resolve()), "model_config": ckpt.model_config.to_dict(),
                "train_config": ckpt.train_config, "metrics": {**ckpt.metrics, **(eval_metrics or {})},
                "parity": {n: {"max_relative_error": max(r.max_relative_error for r in rs),
                               "shapes": [asdict(r.shape) for r in rs]} for n, rs in parity.items()},
            }
            (ensemble / MANIFEST).write_text(json.dumps(manifest, indent=2))
            # Step versions first, the pinned ensemble last: it is the marker that the version exists.
            for step in STEPS:
                target = repository / step.model_name / str(version)
                (tree / step.model_name / str(version)).rename(target)
                moved.append(target)
            ensemble.rename(repository / ensemble.name)
        except BaseException:
            for path in moved:
                shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # an empty .staging left in the repository is noise
                staging.parent.rmdir()
    log(f"published version {version} (fingerprint {ckpt.fingerprint}) into {repository}")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--flavour", choices=FLAVOURS, default=None,
                        help="for a new repository (default python); an existing one keeps its own")
    parser.add_argument("--eval-json", type=Path, default=None, help="evaluation figures to put in the manifest")
    args = parser.parse_args(argv)
    try:
        metrics = json.loads(args.eval_json.read_text()) if args.eval_json else None
        publish(args.checkpoint, args.repository, flavour=args.flavour, eval_metrics=metrics)
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"error: publish failed, repository unchanged: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
