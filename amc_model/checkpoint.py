"""Checkpoints that hold everything export needs: model arguments, weights, term weights, version fingerprint.

The fingerprint is a SHA-256 over the model configuration, the term weights (IDF of the candidate collection,
which the lexical features are computed with) and every weight tensor, so two checkpoints share it only if
they compute the same function. Export writes it into each ONNX file's
metadata and the version manifest, which is how a served version is traced back to its training run.

A checkpoint also records the text rules its queries were read with (``text_rules``, ``amc_contract.text.TEXT_RULES``
at save time; 1 where a checkpoint predates them): publish ships the same rules with the version. They are not
part of the fingerprint, so the fingerprints of existing checkpoints are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amc_contract.text import TEXT_RULES
from amc_model.model import AMC, ENCODER, AMCConfig

FORMAT = "amc-checkpoint/2"
# Format 1 held a GloVe vocabulary: its QEN and LAN read 50-d word vectors, which this code no longer has.
_OLD_FORMATS = {"amc-checkpoint/1": "GloVe 6B 50d word vectors"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, wrong format, tampered, or from another config."""


@dataclass
class Checkpoint:
    model_config: AMCConfig
    state_dict: dict[str, torch.Tensor]
    term_weights: str  # amc_contract.text.TermWeights as JSON
    train_config: dict = field(default_factory=dict)  # the training run's full configuration
    metrics: dict = field(default_factory=dict)  # validation/test figures at save time
    fingerprint: str = ""
    text_rules: int = 1  # the query rules it was trained with (amc_contract.text.TEXT_RULES); 1 before they existed

    def build_model(self) -> AMC:
        model = AMC(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def fingerprint(model_config: dict, term_weights: str, state_dict: dict[str, torch.Tensor]) -> str:
    """Over the model configuration as the checkpoint stores it (options added later are absent from older ones)."""
    h = hashlib.sha256()
    h.update(json.dumps(model_config, sort_keys=True).encode())
    h.update(term_weights.encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | Path, model: AMC, term_weights: str, *, train_config: dict,
                    metrics: dict | None = None, text_rules: int = TEXT_RULES) -> Checkpoint:
    """``text_rules``: the query rules training read its queries with (``training.data`` applies this release's)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(model.config, state, term_weights, train_config, dict(metrics or {}),
                      fingerprint(model.config.to_dict(), term_weights, state), int(text_rules))
    payload = {"format": FORMAT, "model_config": ckpt.model_config.to_dict(), "state_dict": state,
               "term_weights": term_weights, "train_config": train_config, "metrics": ckpt.metrics,
               "fingerprint": ckpt.fingerprint, "text_rules": ckpt.text_rules}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written checkpoint in place.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)
    return ckpt


def load_checkpoint(path: str | Path, *, expect: AMCConfig | None = None) -> Checkpoint:
    """Load and verify a checkpoint. ``expect`` refuses one trained with another model configuration."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(payload, dict) and payload.get("format") in _OLD_FORMATS:
        raise CheckpointError(
            f"{path}: encoder mismatch: trained with the old text encoder ({_OLD_FORMATS[payload['format']]}, "
            f"format {payload['format']}), but this release's model reads {ENCODER} sentence embeddings; "
            "retrain it (make train) and publish the new checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an AMC checkpoint (expected format {FORMAT})")
    encoder = payload.get("model_config", {}).get("encoder")
    if encoder != ENCODER:
        raise CheckpointError(f"{path}: encoder mismatch: trained with text encoder {encoder!r}, but this release "
                              f"serves {ENCODER!r}; retrain it (make train)")
    try:
        # Checkpoints written before MTN's guide, the lexical pooling, MTN's lexical gate and monotone evidence
        # became options used the paper's separate W', attention pooling, no gate and a free evidence weight c;
        # those before the visual agreement trusted every tag match alike, those before the tags' witness asked the
        # picture alone.
        config = AMCConfig.from_dict({"mtn_guide": "separate", "lexical_pool": "attention", "gate_lexical": False,
                                      "lexical_monotone": False, "visual_agreement": False, "tag_agreement": False,
                                      **payload["model_config"]})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model configuration: {e}") from e
    if expect is not None and expect != config:
        diff = {k: (v, getattr(expect, k)) for k, v in config.to_dict().items() if getattr(expect, k) != v}
        raise CheckpointError(
            f"{path} was trained with another model configuration; differing fields "
            + ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in diff.items()))
    state, term_weights = payload["state_dict"], payload["term_weights"]
    expected_shapes = {k: tuple(v.shape) for k, v in AMC(config).state_dict().items()}
    found_shapes = {k: tuple(v.shape) for k, v in state.items()}
    if expected_shapes != found_shapes:
        bad = sorted(set(expected_shapes.items()) ^ set(found_shapes.items()))[:5]
        raise CheckpointError(f"{path}: weights do not match its model configuration (first differences: {bad})")
    actual = fingerprint(payload["model_config"], term_weights, state)
    if actual != payload["fingerprint"]:
        raise CheckpointError(f"{path}: fingerprint mismatch (stored {payload['fingerprint']}, "
                              f"computed {actual}); the file was modified or is corrupt")
    return Checkpoint(config, state, term_weights, payload.get("train_config", {}), payload.get("metrics", {}), actual,
                      int(payload.get("text_rules", 1)))
