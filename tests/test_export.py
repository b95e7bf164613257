"""Export tier: ONNX parity against PyTorch, generated configs, and publish's all-or-nothing behaviour."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from amc_client import signatures as sig
from export import onnx_export
from export import publish as publish_module
from export.onnx_export import ExportError, export_all, read_metadata
from export.publish import publish, published_versions
from export.repository import FLAVOURS, STEPS, TEMPLATE_ROOT, template_files
from training.checkpoint import save_checkpoint
from training.model import AMC, AMCConfig

VOCAB = ["<pad>"] + [f"word{i}" for i in range(59)]


def tiny_model(seed: int = 0) -> AMC:
    torch.manual_seed(seed)
    model = AMC(AMCConfig(vocab_size=len(VOCAB), query_dim=16, hidden=12, pca_dim=8)).eval()
    model.set_word_vectors(torch.randn(len(VOCAB), 50))
    model.set_region_pca(torch.rand(1280), torch.randn(1280, 8) / 30)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "tiny.pt", tiny_model(), VOCAB, train_config={"note": "test"},
                           metrics={"test_ndcg@10": 0.5}), tmp_path / "tiny.pt"


def test_committed_configs_equal_the_generator():
    for flavour in FLAVOURS:
        for rel, text in template_files(flavour).items():
            path = TEMPLATE_ROOT / flavour / rel
            assert path.read_text() == text, f"{path} differs: run python -m export.repository"


def test_every_network_matches_pytorch_at_every_shape(tmp_path):
    report = export_all(tiny_model(), tmp_path, version=7, fingerprint="fp-test")
    shapes = {(r.shape.batch, r.shape.candidates) for r in report["van"]}
    assert {(b, n) for b in (1, 3, 5) for n in (1, 7, 100)} <= shapes
    for name, results in report.items():
        assert all(r.ok and r.max_relative_error < onnx_export.TOLERANCE for r in results), name
        meta = read_metadata(tmp_path / f"{name}.onnx")
        assert meta == {"amc_fingerprint": "fp-test", "amc_version": "7", "amc_network": name}
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        signature = onnx_export.GRAPHS[name][0]
        assert [i.name for i in session.get_inputs()] == signature.input_names
        assert [o.name for o in session.get_outputs()] == signature.output_names


def test_mtn_reports_mixed_versions_as_minus_one(tmp_path):
    export_all(tiny_model(), tmp_path, version=3, fingerprint="fp")
    session = ort.InferenceSession(str(tmp_path / "mtn.onnx"), providers=["CPUExecutionProvider"])
    inputs = onnx_export.random_inputs(sig.MTN, tiny_model(), onnx_export.Shape(4, 2), 3, np.random.default_rng(0))
    for name in ("tokenizer_version", "qen_version", "van_version", "lan_version"):
        inputs[name] = np.full((4, 1), 3, dtype=np.int64)
    inputs["van_version"][2] = 4  # one query scored by another version's VAN
    version = session.run(["model_version"], inputs)[0]
    assert version.ravel().tolist() == [3, 3, sig.MIXED_VERSION, 3]


def test_a_parity_failure_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "TOLERANCE", 0.0)  # nothing is exact to 0: every shape must fail
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_all(tiny_model(), tmp_path, version=1, fingerprint="fp")


def test_publish_adds_versions_and_never_overwrites(tmp_path, checkpoint):
    ckpt, path = checkpoint
    repo = tmp_path / "repo"
    assert publish(path, repo, log=lambda *_: None) == 1
    assert publish(path, repo, log=lambda *_: None) == 2
    assert published_versions(repo) == [1, 2]
    for step in STEPS:
        assert (repo / step.model_name / "1").is_dir() and (repo / step.model_name / "2").is_dir()
    manifest = publish_module.read_manifest(repo, 2)
    assert manifest["fingerprint"] == ckpt.fingerprint and manifest["metrics"]["test_ndcg@10"] == 0.5
    assert not (repo / ".staging").exists()  # staging is removed once empty


def test_failed_publish_leaves_the_repository_as_it_was(tmp_path, checkpoint, monkeypatch):
    _, path = checkpoint
    repo = tmp_path / "repo"
    publish(path, repo, log=lambda *_: None)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".staging" not in p.parts)

    def broken(*args, **kwargs):
        raise ExportError("injected failure")

    monkeypatch.setattr(publish_module, "export_all", broken)
    with pytest.raises(ExportError, match="injected"):
        publish(path, repo, log=lambda *_: None)
    after = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".staging" not in p.parts)
    assert after == before and published_versions(repo) == [1]
    assert not (repo / ".staging").exists()  # staging is removed once empty
