"""Unit tests: attention masking, MTN weights, loss, NDCG, BM25, configs and checkpoints."""

import argparse
import math

import numpy as np
import pytest
import torch

from amc_contract.text import TermWeights
from amc_model.checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from amc_model.model import AMC, AMCConfig, masked_softmax, ranking_loss
from training.config import ConfigError, add_dataclass_args, config_from_args
from training.metrics import BM25, dcg, ndcg_at_k
from training.train_config import TrainConfig


def _model(mode="amc", seed=0, **options) -> AMC:
    torch.manual_seed(seed)
    model = AMC(AMCConfig(region_dim=32, pca_dim=16, query_dim=24, hidden=20, mode=mode, **options))
    model.set_region_pca(torch.randn(32), torch.randn(32, 16) / 4)
    return model.eval()


def _unit(*shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, 384, generator=g), dim=-1)


def _inputs(b=3, n=5, r=7, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    query = _unit(b, g=g)
    regions = torch.randn(b, n, r, 32, generator=g)
    region_mask = torch.rand(b, n, r, generator=g) > 0.3
    region_mask[:, :, 0] = True
    keywords = _unit(b, n, k, g=g)
    keywords[:, :, -1] = 0  # the last keyword slot is padding everywhere
    lexical = torch.rand(b, n, k, 3, generator=g) * (keywords != 0).any(-1, keepdim=True)
    return query, regions, region_mask, keywords, lexical


def test_masked_softmax_sums_to_one_and_zeroes_padding():
    logits = torch.tensor([[3.0, 1.0, 100.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = masked_softmax(logits, mask)
    assert w[0, 2] == 0 and torch.isclose(w[0].sum(), torch.tensor(1.0))
    assert torch.equal(w[1], torch.zeros(3))  # nothing unmasked: zeros, not NaN


VARIANTS = [{}, {"lexical_pool": "attention", "gate_lexical": False, "visual_agreement": False, "tag_agreement": False, "lexical_monotone": False},
            {"query_skip": False, "lexical_axis": False, "gate_lexical": False, "visual_agreement": False, "tag_agreement": False, "mtn_guide": "separate"}]


@pytest.mark.parametrize("options", VARIANTS)
def test_region_and_keyword_attention_respect_masks(options):
    model = _model(**options)
    query, regions, region_mask, keywords, lexical = _inputs()
    out = model(query, regions, region_mask, keywords, lexical)
    ra, ka = out.region_attention, out.keyword_attention
    assert torch.allclose(ra.sum(-1), torch.ones(ra.shape[:2]), atol=1e-6)
    assert torch.all(ra[~region_mask] == 0)
    keyword_mask = (keywords != 0).any(-1)
    assert torch.all(ka[~keyword_mask] == 0)
    has_keywords = keyword_mask.any(-1)
    assert torch.allclose(ka.sum(-1)[has_keywords], torch.ones(int(has_keywords.sum())), atol=1e-6)
    assert torch.allclose(out.modality_weights.sum(-1), torch.ones(out.scores.shape), atol=1e-6)
    assert torch.all(out.scores.abs() <= 1 + 1e-6)


@pytest.mark.parametrize("options", VARIANTS)
def test_padding_does_not_change_real_outputs(options):
    model = _model(**options)
    query, regions, region_mask, keywords, lexical = _inputs(b=1, n=3)
    base = model(query, regions, region_mask, keywords, lexical)
    # Add padding: more regions (masked), more keywords (zeros), more candidates (all masked).
    regions2 = torch.cat([regions, torch.randn(1, 3, 2, 32)], 2)
    mask2 = torch.cat([region_mask, torch.zeros(1, 3, 2, dtype=torch.bool)], 2)
    keywords2 = torch.cat([keywords, torch.zeros(1, 3, 2, 384)], 2)
    lexical2 = torch.cat([lexical, torch.zeros(1, 3, 2, 3)], 2)
    regions2 = torch.cat([regions2, torch.randn(1, 2, 9, 32)], 1)
    mask2 = torch.cat([mask2, torch.zeros(1, 2, 9, dtype=torch.bool)], 1)
    keywords2 = torch.cat([keywords2, torch.zeros(1, 2, 6, 384)], 1)
    lexical2 = torch.cat([lexical2, torch.zeros(1, 2, 6, 3)], 1)
    padded = model(query, regions2, mask2, keywords2, lexical2)
    assert torch.allclose(padded.scores[:, :3], base.scores, atol=1e-6)
    assert torch.allclose(padded.region_attention[:, :3, :7], base.region_attention, atol=1e-6)
    assert torch.all(padded.scores[:, 3:] == 0)


def test_baseline_modes_fix_modality_weights():
    inputs = _inputs()
    for mode, expected in [("visual_only", (1, 0)), ("keywords_only", (0, 1)), ("equal_fusion", (0.5, 0.5))]:
        w = _model(mode)(*inputs).modality_weights
        assert torch.allclose(w, torch.tensor(expected, dtype=torch.float32).expand_as(w))
    with pytest.raises(ValueError, match="unknown mode"):
        AMCConfig(mode="text")


def test_ranking_loss_matches_hand_computation():
    scores = torch.tensor([[0.5, 0.4, 0.1, 0.6], [0.9, -0.2, 0.0, 0.1]])
    # margin 0.2: query 1: max(0,.2-.5+.4)=.1, max(0,.2-.5+.1)=0, max(0,.2-.5+.6)=.3 -> .4 ; query 2: all 0
    assert ranking_loss(scores, 0.2).item() == pytest.approx(0.2)


def test_ndcg_matches_hand_computation():
    relevance = np.array([0, 2, 1, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.0])  # ranking: 0, 2, 1, 0
    assert dcg([0, 2, 1], 3) == pytest.approx(3 / math.log2(3) + 1 / 2)
    ideal = 3 + 1 / math.log2(3)
    assert ndcg_at_k(scores, relevance, 3) == pytest.approx((3 / math.log2(3) + 1 / 2) / ideal)
    assert ndcg_at_k(scores, relevance, 1) == 0.0
    assert ndcg_at_k(np.array([0, 1, 0.5, 0]), relevance, 10) == pytest.approx(1.0)


def test_bm25_prefers_documents_with_rare_query_words():
    bm25 = BM25([["cat", "face"], ["dog", "face"], ["cat", "cat", "pet"], ["tree"]])
    assert bm25.score(["cat"], 2) > bm25.score(["cat"], 0) > 0
    assert bm25.score(["cat"], 1) == 0
    # By hand: n=4, df(cat)=2 -> idf=ln(1+2.5/2.5)=ln 2; tf=1, |d|=2=avgdl -> ln2 * 2.2/(1+1.2) = ln 2
    assert bm25.score(["cat"], 0) == pytest.approx(math.log(2))


def test_unknown_config_keys_are_rejected_with_the_key_named(tmp_path):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    cfg = config_from_args(TrainConfig, parser.parse_args(["--epochs", "3", "--corpus.seed", "7"]))
    assert cfg.epochs == 3 and cfg.corpus.seed == 7
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 2, "corpus": {"noise_levle": 0.5}}')
    with pytest.raises(ConfigError, match="noise_levle"):
        config_from_args(TrainConfig, parser.parse_args(["--config", str(bad)]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--learning-rate", "1"])


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = _model()
    weights = TermWeights.from_documents([["cat face"], ["dog"]]).to_json()
    ckpt = save_checkpoint(tmp_path / "c.pt", model, weights, train_config={"seed": 0})
    loaded = load_checkpoint(tmp_path / "c.pt", expect=model.config)
    assert loaded.fingerprint == ckpt.fingerprint and loaded.term_weights == weights
    rebuilt = loaded.build_model()
    inputs = _inputs()
    assert torch.equal(rebuilt(*inputs).scores, model(*inputs).scores)
    other = AMCConfig(region_dim=32, pca_dim=16, query_dim=24, hidden=64)
    with pytest.raises(CheckpointError, match="hidden"):
        load_checkpoint(tmp_path / "c.pt", expect=other)
    (tmp_path / "corrupt.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_the_old_glove_encoder_is_refused_naming_the_mismatch(tmp_path):
    old = {"format": "amc-checkpoint/1", "model_config": {"vocab_size": 10, "word_dim": 50}, "state_dict": {},
           "vocab": ["<pad>"], "fingerprint": "x"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="encoder mismatch") as info:
        load_checkpoint(tmp_path / "old.pt")
    assert "GloVe" in str(info.value) and "all-MiniLM-L6-v2" in str(info.value)
    model = _model()
    save_checkpoint(tmp_path / "c.pt", model, "{}", train_config={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    payload["model_config"]["encoder"] = "some-other-encoder"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="encoder mismatch.*some-other-encoder"):
        load_checkpoint(tmp_path / "other.pt")


def test_lexical_axis_raises_the_score_of_an_exact_informative_match():
    model = _model(query_skip=True, lexical_axis=True)
    with torch.no_grad():
        model.lan.lexical_score.weight.fill_(1.0)
    query, regions, region_mask, keywords, lexical = _inputs(b=1, n=2)
    lexical[:, 0] = 0.0
    lexical[:, 1] = 1.0 * (keywords[:, 1] != 0).any(-1, keepdim=True)
    keywords[:, 1] = keywords[:, 0]
    regions[:, 1] = regions[:, 0]
    region_mask[:, 1] = region_mask[:, 0]
    out = model(query, regions, region_mask, keywords, lexical)
    assert out.keyword_attention.shape == (1, 2, 4)
    assert out.scores[0, 1] > out.scores[0, 0]  # same image and keywords; only the lexical evidence differs


def test_lexical_max_pool_counts_an_exact_match_in_full_whatever_the_other_keywords():
    model = _model(lexical_pool="max")
    with torch.no_grad():
        model.lan.lexical_score.weight.fill_(1.0)
    query, _, _, keywords, lexical = _inputs(b=1, n=2, k=6)
    lexical.zero_()
    lexical[0, 0, 0] = 1.0  # candidate 0: one exact match among 5 keywords
    keywords[0, 1, 1:] = 0  # candidate 1: the same match as its only keyword
    lexical[0, 1, 0] = 1.0
    q = model.qen(query)
    with torch.no_grad():
        vector = model.mtn.split(model.lan(q, keywords, lexical)[0])[0]  # k^q, the lexical axis last
    assert vector[0, 0, -1].item() == pytest.approx(3.0) and vector[0, 1, -1].item() == pytest.approx(3.0)
    keywords[0, 0] = 0  # no keywords at all: no evidence
    with torch.no_grad():
        assert model.mtn.split(model.lan(q, keywords, lexical)[0])[0][0, 0, -1].item() == 0.0
    with pytest.raises(ValueError, match="gate_lexical needs lexical_axis"):
        AMCConfig(lexical_axis=False)
    with pytest.raises(ValueError, match="unknown lexical_pool 'sum'"):
        AMCConfig(lexical_pool="sum")


def test_lexical_gate_moves_weight_to_the_keywords_of_an_exact_match_only():
    """gate_lexical: the candidate's lexical evidence (k^q's last coordinate) adds trust(q) * evidence to MTN's
    language logit; a candidate without evidence keeps the weights of the model without the gate."""
    model = _model(lexical_pool="max", gate_lexical=True, visual_agreement=False, tag_agreement=False)
    with torch.no_grad():
        model.lan.lexical_vector.weight.zero_()  # the lexical features reach k^q only as its evidence axis
        model.lan.lexical_logit.weight.zero_()
        model.lan.lexical_score.weight.fill_(1.0)
        model.mtn.log_temperature.zero_()  # temperature 1: the cosines alone keep both weights near 0.5
        model.mtn.gate_lexical.weight.zero_()
        model.mtn.gate_lexical.bias.fill_(2.0)  # trust softplus(2) = 2.1 for every query
    query, regions, region_mask, keywords, lexical = _inputs(b=1, n=2)
    for tensor in (regions, region_mask, keywords):  # two identical candidates ...
        tensor[:, 1] = tensor[:, 0]
    lexical.zero_()
    lexical[0, 1, 0] = 1.0  # ... but the second has an exact match
    with torch.no_grad():
        weights = model(query, regions, region_mask, keywords, lexical).modality_weights
        plain = _model(lexical_pool="max", gate_lexical=False, visual_agreement=False, tag_agreement=False)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "gate_lexical" not in k})
        without_gate = plain(query, regions, region_mask, keywords, lexical).modality_weights
    moved = weights[0, 1, 1] - weights[0, 0, 1]
    moved_without = without_gate[0, 1, 1] - without_gate[0, 0, 1]  # the evidence only lengthens k^q there
    assert moved > moved_without + 0.2  # the gate moved weight to the keywords of the exact match
    assert torch.allclose(weights[0, 0], without_gate[0, 0])  # no evidence: as without the gate


def test_a_tag_match_on_a_picture_that_disagrees_moves_weight_to_the_picture():
    """visual_agreement: the gate's trust in a tag match is signed by whether the image agrees with the query; the
    same exact match on an image that matches the query moves weight to the keywords, on one that does not (tag
    spam), away from them; checkpoints from before the option (``visual_agreement`` absent) trust every match."""
    model = _model(lexical_pool="max")
    with torch.no_grad():
        model.lan.lexical_vector.weight.zero_()
        model.lan.lexical_logit.weight.zero_()
        model.lan.lexical_score.weight.fill_(1.0)
        model.mtn.log_temperature.zero_()
        model.mtn.gate_lexical.weight.zero_()
        model.mtn.gate_lexical.bias.fill_(2.0)
        model.mtn.agreement.copy_(torch.tensor([3.0, 0.0]))  # agree = sigmoid(softplus(3) * cos(q', v^q))
    q = model.qen(_inputs(b=1)[0])
    q_guide, _ = model.mtn.query_vectors(q)  # (1, H + 1)
    keyword = torch.rand(1, 2, q_guide.shape[1])
    keyword[..., -1] = 1.0  # both candidates: an exact tag match
    agreeing = q_guide[:, :-1]  # a picture along the query
    visual = torch.stack([agreeing, -agreeing], dim=1)  # candidate 0 agrees, candidate 1 points away
    with torch.no_grad():
        weights = model.mtn._weights(q, q_guide.unsqueeze(1), torch.nn.functional.pad(visual, (0, 1)), keyword, None)
        model.mtn.agreement = None  # the plain gate: every match trusted alike
        plain = model.mtn._weights(q, q_guide.unsqueeze(1), torch.nn.functional.pad(visual, (0, 1)), keyword, None)
    assert weights[0, 0, 1] > weights[0, 1, 1] + 0.1  # the disagreeing picture keeps more of the weight
    assert plain[0, 1, 1] > weights[0, 1, 1] + 0.3  # where the plain gate handed it to the tag
    assert plain[0, 0, 1] >= weights[0, 0, 1]  # agreement only ever takes trust away from the plain gate


def test_keyword_coherence_is_each_keywords_best_cosine_with_another_of_its_candidate():
    from amc_model.model import keyword_coherence

    e = torch.zeros(1, 2, 3, 4)
    e[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    e[0, 0, 1] = torch.tensor([1.0, 1.0, 0, 0])  # 45 degrees from keyword 0
    e[0, 0, 2] = torch.tensor([0, 0, 0, 2.0])  # an outsider
    e[0, 1, 0] = torch.tensor([0, 1.0, 0, 0])  # candidate 1: one keyword, nothing to agree with
    h = keyword_coherence(e)
    half = 2**-0.5
    assert torch.allclose(h[0, 0], torch.tensor([half, half, 0.0]), atol=1e-6)
    assert h[0, 1].tolist() == [0.5, 0.0, 0.0]  # a lone keyword (neither vouched for nor against) and the padding


def test_a_tag_match_among_kin_is_trusted_more_than_one_among_strangers():
    """tag_agreement: where the picture says nothing (cos(q', v^q) = 0, a concept the visual half never saw), an exact
    match on a tag that agrees with the image's other tags keeps the keywords' weight, one on an outsider (a wrong
    auto-tag) loses it."""
    model = _model(lexical_pool="max")
    with torch.no_grad():
        model.mtn.log_temperature.zero_()
        model.mtn.gate_lexical.weight.zero_()
        model.mtn.gate_lexical.bias.fill_(2.0)
    q = model.qen(_inputs(b=1)[0])
    q_guide, _ = model.mtn.query_vectors(q)
    keyword = torch.rand(1, 2, q_guide.shape[1])
    keyword[..., -1] = 1.0  # both: an exact tag match
    visual = torch.zeros(1, 2, q_guide.shape[1])  # a picture orthogonal to the query
    visual[..., 0] = 1.0
    visual = visual - (visual * q_guide.unsqueeze(1)).sum(-1, keepdim=True) * q_guide.unsqueeze(1) / q_guide.norm() ** 2
    coherence = torch.tensor([[0.7, 0.1]])  # candidate 0's matching tag has kin, candidate 1's is an outsider
    with torch.no_grad():
        weights = model.mtn._weights(q, q_guide.unsqueeze(1), visual, keyword, coherence)
    assert weights[0, 0, 1] > weights[0, 1, 1] + 0.1


def _as_older_checkpoint(tmp_path, model, *dropped: str):
    """``model`` saved, then loaded as a checkpoint written before the config fields ``dropped`` existed (fingerprinted
    as it was saved then)."""
    weights = TermWeights.from_documents([["cat"]]).to_json()
    save_checkpoint(tmp_path / "c.pt", model, weights, train_config={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    for name in dropped:
        del payload["model_config"][name]
    payload["fingerprint"] = fingerprint(payload["model_config"], weights, payload["state_dict"])
    torch.save(payload, tmp_path / "old.pt")
    return load_checkpoint(tmp_path / "old.pt")


def test_checkpoint_from_before_the_visual_agreement_loads_with_the_plain_gate(tmp_path):
    model = _model(visual_agreement=False, tag_agreement=False)
    loaded = _as_older_checkpoint(tmp_path, model, "visual_agreement")
    assert loaded.model_config.gate_lexical and not loaded.model_config.visual_agreement
    inputs = _inputs()
    assert torch.equal(loaded.build_model()(*inputs).scores, model(*inputs).scores)
    with pytest.raises(ValueError, match="visual_agreement needs gate_lexical"):
        AMCConfig(gate_lexical=False)


def test_lexical_evidence_never_falls_as_the_match_grows():
    """lexical_monotone: the evidence weighs the match features by |c|, so a learned c < 0 cannot make an exact,
    informative tag match count as less evidence than no match (one training seed learned that without it)."""
    query, _, _, keywords, lexical = _inputs(b=1, n=2)
    lexical.zero_()
    lexical[0, 1, :, 0] = (keywords[0, 1] != 0).any(-1).float()  # candidate 1: every keyword matches the query
    evidence = {}
    for monotone in (True, False):
        model = _model(lexical_pool="max", lexical_monotone=monotone)
        with torch.no_grad():
            model.lan.lexical_score.weight.fill_(-1.0)
            vector = model.mtn.split(model.lan(model.qen(query), keywords, lexical)[0])[0]
        evidence[monotone] = vector[0, :, -1]
    assert evidence[True][1] > evidence[True][0] == 0.0
    assert evidence[False][1] < evidence[False][0]  # what a free c allowed


def test_lexical_gate_starts_at_the_configured_trust():
    model = _model()
    model.mtn.start_gate_at(2.0)
    query = _inputs()[0]
    with torch.no_grad():
        trust = torch.nn.functional.softplus(model.mtn.gate_lexical(model.qen(query)))
    assert trust.mean().item() == pytest.approx(2.0, abs=0.3)  # its query-dependent part starts small
    for bad in (0.0, float("nan"), 1e4):
        with pytest.raises(ValueError, match="initial trust must be in"):
            model.mtn.start_gate_at(bad)
    _model(gate_lexical=False, visual_agreement=False, tag_agreement=False).mtn.start_gate_at(2.0)  # no gate: nothing to start


def test_checkpoint_from_before_the_mtn_guide_option_loads_with_the_papers_separate_guide(tmp_path):
    model = _model(mtn_guide="separate", lexical_pool="attention", gate_lexical=False, visual_agreement=False, tag_agreement=False, lexical_monotone=False)
    # what a checkpoint written before the options holds
    loaded = _as_older_checkpoint(tmp_path, model, "mtn_guide", "lexical_pool", "gate_lexical", "lexical_monotone")
    assert loaded.model_config.mtn_guide == "separate" and loaded.model_config.lexical_pool == "attention"
    assert not loaded.model_config.gate_lexical and not loaded.model_config.lexical_monotone
    inputs = _inputs()
    assert torch.equal(loaded.build_model()(*inputs).scores, model(*inputs).scores)


def test_checkpoint_with_the_gate_but_before_monotone_evidence_loads_with_a_free_c(tmp_path):
    model = _model(lexical_pool="max", gate_lexical=True, lexical_monotone=False)
    with torch.no_grad():
        model.lan.lexical_score.weight.fill_(-1.0)  # what a free c could learn; |c| would score otherwise
    loaded = _as_older_checkpoint(tmp_path, model, "lexical_monotone")
    assert loaded.model_config.gate_lexical and not loaded.model_config.lexical_monotone
    inputs = _inputs()
    assert torch.equal(loaded.build_model()(*inputs).scores, model(*inputs).scores)


def test_shared_mtn_guide_weighs_the_modality_that_matches_the_query():
    model = _model(mtn_guide="match")
    assert model.mtn.guide is None
    q = model.qen(_inputs()[0][:1])
    q_match = model.mtn.match_vector(q)  # (1, H)
    pad = model.config.keyword_vector_dim - model.config.hidden  # the lexical axis and the tags' coherence
    aligned = torch.nn.functional.pad(q_match, (0, pad))[:, None, :]  # a vector along q_m
    orthogonal = torch.nn.functional.pad(torch.where(q_match > 0, 0.0, 1.0), (0, pad))[:, None, :]
    with torch.no_grad():
        visual_first = model.mtn(q, aligned[..., :model.config.hidden], orthogonal)[1]
        keyword_first = model.mtn(q, orthogonal[..., :model.config.hidden], aligned)[1]
    # (w_v, w_k): the modality along q_m gets the larger weight, whichever it is.
    assert visual_first[0, 0, 0] > 0.6 and keyword_first[0, 0, 1] > 0.6


@pytest.mark.parametrize("options", VARIANTS)
def test_shared_candidates_score_as_per_query_lists(options):
    """training.retrieval.score_shared (LAN's forward_shared: the keys split into a shared and a low-rank lexical
    part) equals the full model over the same candidates repeated for every query."""
    from training.retrieval import score_shared

    model = _model(**options)
    query, regions, region_mask, keywords, lexical = _inputs(b=3, n=4)
    shared_regions, shared_keywords = regions[0], keywords[0]
    region_mask = torch.ones_like(region_mask)  # a store's images: every region real
    with torch.no_grad():
        expected = model(query, shared_regions.expand(3, *shared_regions.shape), region_mask,
                         shared_keywords.expand(3, *shared_keywords.shape), lexical).scores
        scores, _ = score_shared(model, query, model.van.reduce(shared_regions), shared_keywords, lexical)
    assert torch.allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["keywords_only", "visual_only", "equal_fusion"])
def test_the_tags_witness_changes_no_baseline(mode):
    """tag_agreement is read by MTN's learned weights only: a baseline (fixed weights) scores, and gets gradients,
    exactly as without it, from the same initialisation (its parameters are created in the same order and the
    witness draws no random numbers), so its training and figures are unchanged."""
    inputs = _inputs()
    results = []
    for tag in (True, False):
        model = _model(mode, tag_agreement=tag).train()
        out = model(*inputs)
        out.scores.sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((out.scores.detach(), grads, {k: v for k, v in model.state_dict().items()}))
    (with_scores, with_grads, with_state), (plain_scores, plain_grads, plain_state) = results
    assert torch.equal(with_scores, plain_scores)
    assert with_grads.keys() == plain_grads.keys() and all(torch.equal(with_grads[k], plain_grads[k]) for k in plain_grads)
    assert set(with_state) - set(plain_state) == {"mtn.tag_witness"}
    assert all(torch.equal(with_state[k], plain_state[k]) for k in plain_state)


def test_keywords_tied_for_the_strongest_evidence_pass_on_their_best_coherence():
    """Where two keywords' evidence is equal but for rounding, the coherence LAN passes on does not depend on which of
    them a max picks (PyTorch and onnxruntime round and break ties differently): the best among the tied."""
    model = _model(lexical_pool="max")
    with torch.no_grad():
        model.lan.lexical_score.weight.fill_(1.0)
    query, _, _, keywords, lexical = _inputs(b=1, n=1, k=4)
    lexical.zero_()
    lexical[0, 0, 0] = torch.tensor([0.5, 0.5, 0.0])
    lexical[0, 0, 1] = torch.tensor([0.5, 0.5 + 1e-7, 0.0])  # the same evidence, rounded otherwise
    coherence = torch.tensor([[[0.2, 0.6, 0.9, 0.0]]])  # keyword 2 coheres most but matches nothing
    projected = model.lan.project(keywords)
    mask = (keywords != 0).any(-1)
    with torch.no_grad():
        out = model.lan.forward_projected(model.qen(query), projected, mask, lexical, coherence)[0]
    assert out[0, 0, -1].item() == pytest.approx(0.6)
