"""Version rollouts against a real tritonserver under continuous client load (the repository side without a
server: tests/parity/test_rollout.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig
from amc_model.checkpoint import load_checkpoint
from export.configs import STEPS, to_text
from export.onnx_export import export_network
from export.publish import publish, published_versions
from export.repository import SEARCH_STEPS, store_serving_version
from serving import loadtest
from serving.rollout import Rollout, RolloutError, admin_headers
from serving.server import TritonServer
from tests.parity.test_rollout import store_gallery

KEY = "rollout-test-key"


def test_rollout_under_load_canary_promote_rollback(trained, trained_other, tmp_path):
    # The test models are tiny and of unequal quality; the NDCG gate has its own test below.
    report = loadtest.run(trained.checkpoint, trained_other.checkpoint, tmp_path, clients=4, share=0.1,
                          canary_requests=600, ndcg_margin=1.0, log=lambda *_: None)
    assert report["failed_requests"] == 0, report["errors"]
    assert report["mixed_version_responses"] == 0
    # 600+ requests at p=0.1: standard deviation 0.012, so 0.04 is over three of them.
    assert abs(report["canary_share"] - 0.1) < 0.04, report
    assert report["after_promote_total"] > 0 and report["after_promote_from_new"] == report["after_promote_total"]
    assert report["after_rollback_total"] > 0 and report["after_rollback_from_old"] == report["after_rollback_total"]


@pytest.fixture
def serving_v1(trained, tmp_path):
    repository = tmp_path / "repository"
    v1 = publish(trained.checkpoint, repository, log=lambda *_: None)
    models = [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(v1), sig.ENSEMBLE_NAME]
    with TritonServer(repository, models=models, admin_key=KEY) as server:
        load = loadtest.Load(server.grpc_url, clients=4)
        load.start(loadtest.collection_words(repository, v1))
        with Rollout(repository, server.grpc_url, admin_key=KEY, log=lambda *_: None) as rollout:
            yield server, rollout, repository, load
        load.stop()


def _corrupt(repository, version, trained_other):
    (repository / "amc_van" / str(version) / "model.onnx").write_bytes(b"\x08\x07not an onnx model" * 100)


class _VANFor640Channels(torch.nn.Module):
    """VAN's tensor names and outputs, but expecting 640-channel region features instead of 1280."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.project, self.version = torch.nn.Linear(640, 128), version

    def forward(self, query_embedding, regions, region_mask):
        u = self.project(regions)  # (B, N, R, H)
        attention = region_mask.float() / region_mask.float().sum(-1, keepdim=True)
        version = torch.zeros_like(query_embedding[:, :1], dtype=torch.int64) + self.version
        return (attention.unsqueeze(-1) * u).sum(2), attention, version


def _wrong_shapes(repository, version, trained_other):
    args = (torch.randn(2, 128), torch.randn(2, 3, 49, 640), torch.ones(2, 3, 49, dtype=torch.bool))
    axes = {t.name: t.onnx_dynamic_axes for t in (*sig.VAN.inputs, *sig.VAN.outputs)}
    torch.onnx.export(_VANFor640Channels(version), args, str(repository / "amc_van" / str(version) / "model.onnx"),
                      input_names=sig.VAN.input_names, output_names=sig.VAN.output_names, dynamic_axes=axes,
                      dynamo=False)


def _other_scores(repository, version, trained_other):
    other = load_checkpoint(trained_other.checkpoint).build_model()
    export_network(other, "mtn", repository / "amc_mtn" / str(version) / "model.onnx", version=version,
                   fingerprint="another-checkpoint")


@pytest.mark.parametrize("tamper, message", [(_corrupt, "failed to load"), (_wrong_shapes, "golden"),
                                             (_other_scores, "differ from its checkpoint")])
def test_failed_rollout_keeps_the_old_version_serving(serving_v1, trained, trained_other, tamper, message):
    server, rollout, repository, load = serving_v1
    load.wait_for(50, time.monotonic())
    v2 = publish(trained.checkpoint, repository, log=lambda *_: None)
    tamper(repository, v2, trained_other)
    with pytest.raises(RolloutError, match=message):
        rollout.canary(v2, 0.5)
    t_after = time.monotonic()
    load.wait_for(100, t_after)
    load.stop()
    assert [r.error for r in load.records if r.error] == []
    assert all(r.version == 1 for r in load.records)
    assert rollout.routing().serving_version == 1 and rollout.routing().canary_version is None
    assert v2 not in published_versions(repository)  # quarantined, so later loads don't retry it
    assert not (repository / "amc_van" / str(v2)).exists()


def test_ndcg_gate_refuses_a_worse_version(serving_v1, trained_other):
    """The gate compares the manifests' test NDCG@10: make the serving one clearly better, then publish."""
    server, rollout, repository, load = serving_v1
    candidate = load_checkpoint(trained_other.checkpoint).metrics["test_ndcg@10"]
    manifest = repository / sig.versioned_ensemble_name(1) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["metrics"]["test_ndcg@10"] = candidate + 0.05
    manifest.write_text(json.dumps(data))
    with pytest.raises(RolloutError, match="below serving version 1"):
        rollout.publish(trained_other.checkpoint)
    load.stop()
    assert [r.error for r in load.records if r.error] == [] and all(r.version == 1 for r in load.records)
    assert published_versions(repository) == [1]


def test_admin_key_guards_load_and_unload_but_not_inference(serving_v1):
    server, rollout, repository, load = serving_v1
    plain = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (lambda: plain.load_model("amc"), lambda: plain.unload_model("amc_qen"),
                 lambda: plain.load_model("amc", headers=admin_headers("wrong-key"))):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    assert plain.is_model_ready("amc")
    plain.load_model("amc", headers=admin_headers(KEY))  # the key holder can
    t = time.monotonic()
    load.wait_for(40, t)
    load.stop()
    assert [r.error for r in load.records if r.error] == []


def test_status_gc_and_rollback_without_history(serving_v1, trained):
    server, rollout, repository, load = serving_v1
    with pytest.raises(RolloutError, match="no earlier version"):
        rollout.rollback()
    versions = [rollout.publish(trained.checkpoint) for _ in range(2)]
    status = rollout.status()
    assert status["serving_version"] == 1 and [v["version"] for v in status["versions"]] == [1, *versions]
    assert all(v["ready"] and v["fingerprint"] for v in status["versions"])
    # What a publish killed before it marked version 99 published leaves: step versions (ranking and store) and
    # a pinned store ensemble; gc removes them with the old versions, and nothing else.
    leftovers = [repository / STEPS[0].model_name / "99", repository / SEARCH_STEPS[0].model_name / "99",
                 repository / sig.versioned_search_ensemble_name(99)]
    # What an earlier release published beside a version for the benchmarks (issue 22: no longer): gc removes the
    # removed version's folders of it, amc_store pinned to it included, and leaves those of the versions it keeps.
    gone, kept = versions[0], versions[1]
    legacy = [repository / "amc_store_tokenizer" / str(gone), repository / "amc_van_store" / str(gone),
              repository / f"amc_store_v{gone}", repository / "amc_store_fused" / "1"]
    staying = [repository / "amc_store_tokenizer" / str(kept), repository / f"amc_store_v{kept}",
               repository / "amc_store" / "1"]
    for path in leftovers + legacy + staying:
        path.mkdir(parents=True)
    for name, version in (("amc_store_fused", gone), ("amc_store", kept)):
        # As an earlier release wrote them (last present at 1285aea: benchmarks/store_models.py): an ensemble of
        # steps pinned to one version; gc reads only the pinned versions.
        pinned = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=sig.MAX_BATCH)
        for step in ("amc_store_tokenizer", "amc_fused_store"):
            pinned.ensemble_scheduling.step.add(model_name=step, model_version=version)
        (repository / name / "config.pbtxt").write_text(to_text(pinned))
    removed = rollout.gc(keep=1)
    assert removed == [gone] and published_versions(repository) == [1, kept]
    assert not any(p.exists() for p in leftovers + legacy) and not (repository / "amc_store_fused").exists()
    assert all(p.exists() for p in staying)
    assert (repository / STEPS[0].model_name / str(versions[1])).is_dir()
    load.stop()
    assert [r.error for r in load.records if r.error] == []
    with pytest.raises(RolloutError, match="at least 1"):
        rollout.gc(keep=0)


# ---- whole-store search follows the serving version ---------------------------------------------------------
def test_search_follows_promote_and_rollback(trained, trained_other, small_corpus, tmp_path):
    """Versions published with a candidate store: the first one's search serves at once; a later one's takes the
    canary's share of the searches, then all of them from promote on (publish loads and readies it, no traffic);
    rollback takes search back with the rankings, and gc keeps the version whose store serves."""
    from amc_client import AMCClient

    repository = tmp_path / "repository"
    v1 = publish(trained.checkpoint, repository, store=store_gallery(small_corpus), log=lambda *_: None)
    assert store_serving_version(repository) == v1
    models = [s.model_name for s in STEPS] + [sig.versioned_ensemble_name(v1), sig.ENSEMBLE_NAME]
    models += [sig.SEARCH_STEP.model_name, sig.versioned_search_ensemble_name(v1), sig.SEARCH_ENSEMBLE_NAME]
    with TritonServer(repository, models=models, admin_key=KEY) as server, \
            AMCClient(server.grpc_url, timeout_s=60) as client, \
            Rollout(repository, server.grpc_url, admin_key=KEY, ndcg_margin=1.0, log=lambda *_: None) as rollout:

        def search_version() -> int:
            found = client.search("cat face", top_k=3)
            assert len(found) == 3 and all(r.candidate_id.startswith("s") for r in found)
            return found[0].model_version

        assert search_version() == v1
        v2 = rollout.publish(trained_other.checkpoint, store=store_gallery(small_corpus))
        assert rollout.ready(v2) and search_version() == v1  # loaded and verified, no traffic yet
        assert client.search("cat", top_k=2) and store_serving_version(repository) == v1
        rollout.canary(v2, 0.5)
        assert client.routing().canary_search
        # 40 searches at share 0.5: both versions answer (all from one: probability 2 * 0.5**40).
        assert {search_version() for _ in range(40)} == {v1, v2}
        assert store_serving_version(repository) == v1  # the canary takes a share; amc_search stays
        rollout.promote(v2)
        assert search_version() == v2 and store_serving_version(repository) == v2
        rollout.rollback()
        time.sleep(1.2)  # the client re-reads routing every second: until then it may still follow the canary
        assert search_version() == v1
        # A search step config of another release (its tensors differ) is refused before anything changes.
        config = repository / sig.SEARCH_STEP.model_name / "config.pbtxt"
        text = config.read_text()
        config.write_text(text.replace(sig.STORED_IDS.name, "stored_names"))
        with pytest.raises(RolloutError, match=f"version {v2} cannot serve whole-store search here, nothing changed"):
            rollout.promote(v2)
        assert rollout.routing().serving_version == v1 and store_serving_version(repository) == v1
        config.write_text(text)
        assert rollout.gc(keep=1) == []  # v1 serves (and its store), v2 is the newest
        assert sorted(published_versions(repository)) == [v1, v2]
