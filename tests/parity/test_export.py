"""Export tier: ONNX parity against PyTorch (text encoder and networks), generated configs, the text step's
features against the PyTorch reference, the candidate store, and publish's all-or-nothing behaviour."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from amc_contract import signatures as sig
from amc_contract.text import TermWeights
from amc_model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from amc_model.model import AMC, AMCConfig
from export import onnx_export
from export import publish as publish_module
from export.configs import (
    FLAVOURS,
    SEARCH_GRAPH_FILE,
    SEARCH_SETTINGS,
    STEPS,
    TEMPLATE_ROOT,
    device_kind,
    parse_config,
    search_settings,
    template_files,
)
from export.onnx_export import ExportError, export_all
from export.publish import publish, published_versions
from export.repository import SEARCH_STEPS, STORE_FILE, set_store_serving
from export.store import Gallery

DOCUMENTS = [["cat", "face"], ["grinning face"], ["dog", "pet"], ["red heart", "love"], ["kiwi fruit", "food"]]
TERM_WEIGHTS = TermWeights.from_documents(DOCUMENTS).to_json()
KEYWORDS = sorted({k for d in DOCUMENTS for k in d})


def tiny_model(seed: int = 0, **config) -> AMC:
    torch.manual_seed(seed)
    model = AMC(AMCConfig(query_dim=16, hidden=12, pca_dim=8, **config)).eval()
    model.set_region_pca(torch.rand(1280), torch.randn(1280, 8) / 30)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "tiny.pt", tiny_model(), TERM_WEIGHTS, train_config={"note": "test"},
                           metrics={"test_ndcg@10": 0.5}), tmp_path / "tiny.pt"


def quiet(*_):
    pass


def test_committed_configs_equal_the_generator():
    for flavour in FLAVOURS:
        for rel, text in template_files(flavour).items():
            path = TEMPLATE_ROOT / flavour / rel
            assert path.read_text() == text, f"{path} differs: run python -m export.configs"


def test_text_encoder_and_every_network_match_pytorch_at_every_shape(tmp_path):
    report = export_all(tiny_model(), tmp_path, version=7, fingerprint="fp-test")
    shapes = {(r.shape.batch, r.shape.candidates) for r in report["van"]}
    assert {(b, n) for b in (1, 3, 5) for n in (1, 7, 100)} <= shapes
    # The sentence encoder at several batch sizes and token lengths, up to the query budget.
    assert {(r.shape.batch, r.shape.tokens) for r in report["text_encoder"]} == {
        (b, t) for b in (1, 3, 5) for t in (3, 16, 48)}
    signatures = {name: s for name, (s, _) in onnx_export.GRAPHS.items()} | {"text_encoder": sig.TEXT_ENCODER}
    for name, results in report.items():
        assert all(r.ok and r.max_relative_error < onnx_export.TOLERANCE for r in results), name
        file = onnx_export.TEXT_ENCODER_FILE if name == "text_encoder" else f"{name}.onnx"
        session = ort.InferenceSession(str(tmp_path / file), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map  # the file's metadata_props, as onnxruntime reads them
        assert meta == {"amc_fingerprint": "fp-test", "amc_version": "7", "amc_network": name}
        assert [i.name for i in session.get_inputs()] == signatures[name].input_names
        assert [o.name for o in session.get_outputs()] == signatures[name].output_names


def test_random_inputs_are_realistic():
    rng = np.random.default_rng(3)
    model = tiny_model()
    lan = onnx_export.random_inputs(sig.LAN, model, onnx_export.Shape(3, 7, keywords=5), 1, rng)
    embeddings, lexical = lan[sig.KEYWORD_EMBEDDINGS.name], lan[sig.KEYWORD_LEXICAL.name]
    assert embeddings.shape == (3, 7, 5, sig.TEXT_EMBEDDING_DIM) and lexical.shape == (3, 7, 5, sig.LEXICAL_DIM)
    norms = np.linalg.norm(embeddings, axis=-1)
    padding = norms == 0
    assert padding.any() and not padding[..., 0].any()  # zero-vector padding; every candidate has a keyword
    np.testing.assert_allclose(norms[~padding], 1.0, rtol=1e-5)
    assert lexical.min() >= 0 and lexical.max() <= 1 and np.all(lexical[padding] == 0) and (lexical > 0).any()
    qen = onnx_export.random_inputs(sig.QEN, model, onnx_export.Shape(4, 1), 1, rng)
    np.testing.assert_allclose(np.linalg.norm(qen[sig.QUERY_TEXT.name], axis=-1), 1.0, rtol=1e-5)
    tokens = onnx_export.random_inputs(sig.TEXT_ENCODER, model, onnx_export.Shape(3, 1, tokens=6), 1, rng)
    ids = tokens[sig.TEXT_TOKENS.name]
    assert ids.shape == (3, 6) and np.all(ids[:, 0] == 101) and ids[0, -1] == 102  # [CLS] ... [SEP], 0 pads


@pytest.mark.parametrize("config", [{"lexical_axis": False, "gate_lexical": False, "visual_agreement": False, "tag_agreement": False, "query_skip": False},
                                    {"lexical_axis": True, "query_skip": True, "projection_bias": True},
                                    {"lexical_pool": "attention", "mtn_guide": "separate", "gate_lexical": False, "visual_agreement": False, "tag_agreement": False,
                                     "lexical_monotone": False}])
def test_other_model_configurations_export(tmp_path, config):
    """Without LAN's lexical evidence axis (keyword_vector has hidden channels, not hidden + 1), without the
    query skip path, with projection biases, with the paper's MTN guide, attention-pooled lexical evidence
    and no lexical gate in MTN: every network exports and validates."""
    model = tiny_model(**config)
    for name in onnx_export.GRAPHS:
        onnx_export.export_network(model, name, tmp_path / f"{name}.onnx", version=1, fingerprint="fp")
        onnx_export.check_parity(name, onnx_export.validate_network(model, name, tmp_path / f"{name}.onnx",
                                                                    version=1))


def test_mtn_reports_mixed_versions_as_minus_one(tmp_path):
    onnx_export.export_network(tiny_model(), "mtn", tmp_path / "mtn.onnx", version=3, fingerprint="fp")
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
    assert publish(path, repo, keywords=KEYWORDS, log=quiet) == 1
    assert publish(path, repo, keywords=KEYWORDS, log=quiet) == 2
    assert published_versions(repo) == [1, 2]
    for step in STEPS:
        assert (repo / step.model_name / "1").is_dir() and (repo / step.model_name / "2").is_dir()
    text_step = repo / sig.TOKENIZER.model_name / "2"
    for name in ("model.py", "amc_steps/text_step.py", "amc_steps/onnx_runner.py", "amc_contract/text.py",
                 "amc_contract/signatures.py", "tokenizer.json", "text_encoder.onnx", "term_weights.json",
                 "keyword_table.npz", "version.json"):
        assert (text_step / name).is_file(), name
    assert not list(text_step.glob("amc_*.py"))  # the code is vendored packages, not renamed files
    assert (text_step / "term_weights.json").read_text() == TERM_WEIGHTS
    with np.load(text_step / "keyword_table.npz") as table:
        assert sorted(table["texts"].tolist()) == KEYWORDS and table["vectors"].shape == (len(KEYWORDS), 384)
    manifest = publish_module.read_manifest(repo, 2)
    assert manifest["fingerprint"] == ckpt.fingerprint and manifest["metrics"]["test_ndcg@10"] == 0.5
    assert manifest["text_encoder"]["keyword_table"] == len(KEYWORDS)
    assert manifest["parity"]["text_encoder"]["max_relative_error"] < onnx_export.TOLERANCE
    assert not (repo / ".staging").exists()  # staging is removed once empty


def test_failed_publish_leaves_the_repository_as_it_was(tmp_path, checkpoint, monkeypatch):
    _, path = checkpoint
    repo = tmp_path / "repo"
    publish(path, repo, keywords=KEYWORDS, log=quiet)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".staging" not in p.parts)

    def broken(*args, **kwargs):
        raise ExportError("injected failure")

    monkeypatch.setattr(publish_module, "export_all", broken)
    with pytest.raises(ExportError, match="injected"):
        publish(path, repo, keywords=KEYWORDS, log=quiet)
    after = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".staging" not in p.parts)
    assert after == before and published_versions(repo) == [1]
    assert not (repo / ".staging").exists()  # staging is removed once empty


def test_publish_refuses_a_checkpoint_of_the_old_encoder(tmp_path, checkpoint, capsys):
    """A format-1 checkpoint (GloVe word vectors) is refused, naming the encoder mismatch; nothing is written."""
    old = tmp_path / "glove.pt"
    payload = torch.load(checkpoint[1], weights_only=True)
    payload.pop("term_weights")
    torch.save({**payload, "format": "amc-checkpoint/1", "vocab": ["<pad>", "cat"]}, old)
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError, match="encoder mismatch"):
        publish(old, repo, log=quiet)
    assert not repo.exists()
    assert publish_module.main(["--checkpoint", str(old), "--repository", str(repo)]) == 2
    assert "encoder mismatch" in capsys.readouterr().err and not repo.exists()


def test_text_step_features_equal_the_pytorch_reference(tmp_path, checkpoint):
    """The text step's computation (in-process, on the published files) against export.reference: queries in
    any script, keywords from the table and keywords it never saw (encoded on the fly, then cached)."""
    from export.reference import Reference
    from serving.backends.text_features import TextFeatures

    _, path = checkpoint
    repo = tmp_path / "repo"
    publish(path, repo, keywords=KEYWORDS, log=quiet)
    features = TextFeatures(repo / sig.TOKENIZER.model_name / "1")
    reference = Reference(load_checkpoint(path))
    queries = ["kiwifruit guardsman", "猫", "кошка", "grinning cat 😺", "?!"]
    keywords = np.array([["cat", "grinning face", ""], ["guardsman hat", "kiwifruit", "猫 face"]], dtype=object)
    batch = np.stack([keywords] * len(queries))
    want = reference.text_features(queries, batch)
    got_query = features.query_text(queries)
    got_keywords = features.keyword_embeddings(keywords)
    assert features.encoded_keywords == 3  # the three strings not in the table
    for got, expected in ((got_query, want[sig.QUERY_TEXT.name]),
                          (got_keywords, want[sig.KEYWORD_EMBEDDINGS.name][0])):
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    assert not got_keywords[0, 2].any()  # padding is the zero vector
    np.testing.assert_array_equal(features.lexical(queries, batch), want[sig.KEYWORD_LEXICAL.name])
    features.keyword_embeddings(keywords)
    assert features.encoded_keywords == 3  # the cache answered the second time


def _gallery(size: int = 12, seed: int = 0) -> tuple[np.ndarray, list[list[str]]]:
    rng = np.random.default_rng(seed)
    regions = np.abs(rng.normal(0, 1.5, size=(size, sig.REGIONS_PER_IMAGE, sig.REGION_FEATURE_DIM))).astype(np.float16)
    keywords = [list(rng.choice(KEYWORDS, size=int(rng.integers(1, 4)), replace=False)) for _ in range(size)]
    return regions, keywords


def client_models(repo) -> set[str]:
    """What the client calls in ``repo`` (``amc``, ``amc_search`` and their pinned twins, as far as they exist) and
    every model their configs pin as a step."""
    versions = published_versions(repo)
    called = {sig.ENSEMBLE_NAME, sig.SEARCH_ENSEMBLE_NAME} | {
        name(v) for v in versions for name in (sig.versioned_ensemble_name, sig.versioned_search_ensemble_name)}
    called = {n for n in called if (repo / n / "config.pbtxt").is_file()}
    return called | {step.model_name for n in called
                     for step in parse_config((repo / n / "config.pbtxt").read_text()).ensemble_scheduling.step}


def model_folders(repo) -> set[str]:
    return {p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_a_publish_writes_only_what_the_client_calls(tmp_path, checkpoint):
    """The model folders of a published repository are the ensembles AMCClient calls (amc, amc_v<N>, with a store
    amc_search, amc_search_v<N>) and the steps they pin: nothing only a benchmark calls (issue 22)."""
    _, path = checkpoint
    repo = tmp_path / "repo"
    regions, keywords = _gallery()
    publish(path, repo, keywords=KEYWORDS, log=quiet, store=Gallery(regions, keywords, [f"g{i}" for i in range(12)]))
    ranking = {s.model_name for s in STEPS} | {sig.ENSEMBLE_NAME, sig.versioned_ensemble_name(1)}
    search = {sig.SEARCH_STEP.model_name, sig.SEARCH_ENSEMBLE_NAME, sig.versioned_search_ensemble_name(1)}
    assert model_folders(repo) == client_models(repo) == ranking | search
    publish(path, repo, keywords=KEYWORDS, log=quiet)  # without a store: amc_v2 and its steps' versions
    assert model_folders(repo) == client_models(repo) == ranking | search | {sig.versioned_ensemble_name(2)}
    assert (repo / sig.QEN.model_name / "2").is_dir() and not (repo / sig.SEARCH_STEP.model_name / "2").exists()


def test_store_graphs_equal_the_raw_path(tmp_path, checkpoint):
    """The store's LAN holds W_kl k of the keywords' sentence embeddings; the search graph matches PyTorch's raw
    path; the search step gets the instances asked for."""
    from export.store import build_store, export_search_graph, publish_store, validate_store

    ckpt, path = checkpoint
    repo = tmp_path / "repo"
    version = publish(path, repo, keywords=KEYWORDS, log=quiet)
    regions, keywords = _gallery()
    store = publish_store(repo, version, tiny_model(), TERM_WEIGHTS, regions, keywords, fingerprint="fp",
                          instances=3, log=quiet)
    counts = {s.model_name: parse_config((repo / s.model_name / "config.pbtxt").read_text()).instance_group[0].count
              for s in SEARCH_STEPS}
    assert counts == {sig.SEARCH_STEP.model_name: 3}
    assert store.keyword_projected.shape == (12, store.keywords.shape[1], 12)
    assert np.array_equal(store.keyword_mask, store.keywords != "")
    search = repo / sig.SEARCH_STEP.model_name / str(version)  # one step: the search graph, no encoder of its own
    manifest = json.loads((search / STORE_FILE).read_text())
    assert manifest["size"] == 12 and manifest["keywords"] == keywords
    assert (search / SEARCH_GRAPH_FILE).is_file() and not (search / "text_encoder.onnx").exists()
    # A search step config of other tensors (another release's) is refused before anything is written: every
    # version of a step shares its config.
    config = repo / sig.SEARCH_STEP.model_name / "config.pbtxt"
    config.write_text(config.read_text().replace(sig.STORED_IDS.name, "stored_names"))
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    stale = r"amc_search_step.*published by an older release; publish into a new"
    with pytest.raises(ValueError, match=stale):  # the next version: refused before its store is built
        publish_store(repo, version + 1, tiny_model(), TERM_WEIGHTS, regions, keywords, fingerprint="fp", log=quiet)
    with pytest.raises(ValueError, match=stale):  # a promote or rollback re-pinning amc_search
        set_store_serving(repo, version)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    # The validation fails loudly when the store's keyword projections are off.
    from amc_contract.text import LexicalMatcher

    matcher = LexicalMatcher(TermWeights.from_json(TERM_WEIGHTS))
    broken = build_store(tiny_model(), regions, keywords)
    broken.keyword_projected = broken.keyword_projected * 1.5
    export_search_graph(tiny_model(), broken, matcher, tmp_path / "onnx", version=1, fingerprint="fp")
    with pytest.raises(ExportError, match="search_store"):
        validate_store(tiny_model(), broken, matcher, regions, tmp_path / "onnx")


def test_the_search_step_runs_as_the_device_kind_says(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert device_kind() == "gpu" and search_settings() == SEARCH_SETTINGS["gpu"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert device_kind() == "cpu" and search_settings() == SEARCH_SETTINGS["cpu"]
    assert search_settings("gpu", instances=3).instances == 3
    assert search_settings("gpu", instances=3).cuda_graph == SEARCH_SETTINGS["gpu"].cuda_graph
    with pytest.raises(ValueError, match="unknown device kind 'tpu'"):
        search_settings("tpu")
    with pytest.raises(ValueError, match="instances must be >= 1"):
        search_settings("cpu", instances=0)
