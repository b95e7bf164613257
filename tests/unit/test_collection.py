"""Training against the whole collection: negatives are never relevant, the clicked image is each query's target,
and the whole-collection scorer agrees with the full model."""

import numpy as np
import torch

from amc_model.model import AMC, AMCConfig
from training.collection import CollectionNegatives, visual_neighbours
from training.data import corpus_tensors, fit_region_pca, term_weights
from training.retrieval import CollectionScorer
from training.sampling import training_pairs


def _setup(corpus):
    model = AMC(AMCConfig(pca_dim=32))
    model.set_region_pca(*fit_region_pca(corpus.regions, 32))
    data = corpus_tensors(corpus, model, term_weights(corpus))
    return model, data, CollectionNegatives(corpus, data, corpus.queries["train"], seed=0)


def test_sampled_negatives_are_never_relevant_and_the_clicked_image_is_the_target(small_corpus):
    model, data, negatives = _setup(small_corpus)
    pairs = training_pairs(small_corpus.queries["train"], dwell=True)
    qids = np.array([q for q, _, _ in pairs[:16]])
    positives = np.array([p[0] for _, p, _ in pairs[:16]])
    negatives.mine(model, queries=8)
    for _ in range(3):
        sample = negatives.sample(qids, positives, hard=4, random=8)
        assert (sample.shared[sample.positive_slot] == positives).all()
        relevant = negatives.relevant[negatives.row[qids]][:, sample.shared]  # (B, P)
        own = np.zeros_like(relevant)
        own[np.arange(len(qids)), sample.positive_slot] = True
        # Every relevant image is masked out of the softmax except the query's own clicked image.
        assert np.array_equal(sample.excluded, relevant & ~own)
    for row, mined in enumerate(negatives.mined):
        assert not negatives.relevant[row, mined].any()


def test_tag_pool_holds_irrelevant_images_carrying_the_query_words(small_corpus):
    _, data, negatives = _setup(small_corpus)
    from amc_contract.text import content_words

    checked = 0
    for row, text in enumerate(negatives.distinct):
        for image in negatives.tag[row]:
            assert not negatives.relevant[row, image]
            tag_words = {w for k in small_corpus.keywords[image] for w in content_words(k)}
            assert tag_words & set(content_words(text))
            checked += 1
    assert checked > 0


def test_visual_neighbours_are_other_images_nearest_first():
    reduced = torch.tensor([[[1.0, 0.0]], [[0.9, 0.1]], [[0.0, 1.0]], [[0.1, 0.9]]])
    near = visual_neighbours(reduced, k=2)
    assert near[:, 0].tolist() == [1, 0, 3, 2] and (near != np.arange(4)[:, None]).all()


def test_collection_scorer_equals_the_full_model_on_every_image(small_corpus):
    model, data, _ = _setup(small_corpus)
    texts = ["cat face", "🐱", "red heart"]
    scores = CollectionScorer(model, data, batch=2).scores(texts)
    everything = torch.arange(len(small_corpus.chars)).expand(len(texts), -1)
    with torch.no_grad():
        expected = model(data.query_text(texts), *data.candidates(texts, everything), reduced=True).scores
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    assert np.allclose(scores[0], scores[1], atol=1e-6)  # "🐱" is read as "cat face"
