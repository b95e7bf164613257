"""The simulated auto-tagger: CLDR keywords with some dropped and wrong tags added."""

from __future__ import annotations

import numpy as np

from training.corpus.datatypes import CorpusConfig


def auto_tag(
    true_keywords: list[list[str]], pool: list[str], config: CorpusConfig
) -> tuple[list[list[str]], np.ndarray]:
    """Noisy auto-tagger keywords and the noisy-image mask (see CorpusConfig for the knobs)."""
    rng = np.random.default_rng([config.seed, 2])
    n = len(true_keywords)
    noisy = np.zeros(n, dtype=bool)
    # An exact count (not a Bernoulli per image) so the noisy share is what the config says.
    noisy[rng.permutation(n)[: round(config.noisy_image_share * n)]] = True
    out = []
    for i, truth in enumerate(true_keywords):
        if noisy[i]:
            keep_n = min(config.noisy_true_keywords_kept, len(truth))
            kept = [truth[j] for j in sorted(rng.choice(len(truth), size=keep_n, replace=False))]
            n_wrong = config.noisy_distractors
        else:
            mask = rng.random(len(truth)) >= config.keyword_drop_rate
            if not mask.any():
                mask[rng.integers(len(truth))] = True  # a normal image keeps at least one true tag
            kept = [k for k, m in zip(truth, mask, strict=True) if m]
            n_wrong = config.distractors_per_image
        wrong: list[str] = []
        own = set(truth)
        # Rejection sampling: the pool (~3,500 tags) is far larger than any image's keyword set.
        while len(wrong) < n_wrong and len(wrong) + len(own) < len(pool):
            tag = pool[int(rng.integers(len(pool)))]
            if tag not in own and tag not in wrong:
                wrong.append(tag)
        tags = kept + wrong
        out.append([tags[j] for j in rng.permutation(len(tags))])
    return out, noisy
