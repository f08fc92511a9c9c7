"""Unlabeled text -> self-supervised cloze classification tasks (SMLMT, Bansal et al., EMNLP 2020).

Pick a word, take sentences that contain it, replace every occurrence of the word with the tokenizer's mask
token: the class of such a sentence is "which word was masked". N words make an N-way task, and a text
collection makes as many tasks as it has words in the frequency band.

The tasks are materialised as a labelled set (class `mask:<word>`, one row per (word, sentence)), so every
meta-learner and the episode sampler use them unchanged: an N-way K-shot episode drawn from it is an SMLMT
task. Deterministic for a seed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from metanlp.data.load import DataError, LabelledTexts

WORD = re.compile(r"[a-z][a-z'-]+")
CLASS_PREFIX = "mask:"


@dataclass(frozen=True)
class SMLMTConfig:
    min_sentences: int = 10  # a word needs K + Q sentences to fill a class
    max_fraction: float = 0.05  # words in more than this share of sentences are too common (the, of, ...)
    max_words: int = 500  # classes kept, drawn at random from the band
    sentences_per_word: int = 20  # rows per class
    min_word_length: int = 3
    seed: int = 0


def words_of(sentence: str) -> set[str]:
    return set(WORD.findall(sentence.lower()))


def mask_word(sentence: str, word: str, mask_token: str) -> str:
    """Every occurrence of `word` (whole word, any case) replaced by `mask_token`."""
    return re.sub(rf"(?<![A-Za-z']){re.escape(word)}(?![A-Za-z'])", mask_token, sentence, flags=re.IGNORECASE)


def frequency_band(sentences: list[str], config: SMLMTConfig) -> list[str]:
    """Words that occur in enough sentences to make a class but are not so common they carry no meaning."""
    counts = Counter(w for s in sentences for w in words_of(s) if len(w) >= config.min_word_length)
    ceiling = max(config.min_sentences, int(config.max_fraction * len(sentences)))
    return sorted(w for w, c in counts.items() if config.min_sentences <= c <= ceiling)


def build_smlmt(sentences: list[str], mask_token: str, config: SMLMTConfig = SMLMTConfig(),
                source: str = "<unlabeled>") -> LabelledTexts:
    """One class per selected word, `sentences_per_word` masked sentences each."""
    sentences = sorted({s.strip() for s in sentences if s.strip()})  # sorted: the result depends on the seed only
    band = frequency_band(sentences, config)
    if len(band) < 2:
        raise DataError(f"{source}: only {len(band)} words occur in {config.min_sentences}+ sentences and in at "
                        f"most {config.max_fraction:.1%} of them; give more text or lower min_sentences")
    rng = np.random.default_rng(config.seed)
    chosen = sorted(rng.choice(band, size=min(config.max_words, len(band)), replace=False).tolist())
    containing: dict[str, list[int]] = {w: [] for w in chosen}
    wanted = set(chosen)
    for i, sentence in enumerate(sentences):
        for word in words_of(sentence) & wanted:
            containing[word].append(i)
    texts, labels = [], []
    for word in chosen:
        rows = containing[word]
        picked = rng.choice(rows, size=min(config.sentences_per_word, len(rows)), replace=False)
        for i in sorted(picked.tolist()):
            texts.append(mask_word(sentences[i], word, mask_token))
            labels.append(CLASS_PREFIX + word)
    return LabelledTexts(texts=texts, labels=labels, source=f"smlmt({source})")


def split_sentences(texts: list[str], min_words: int = 5) -> list[str]:
    """Lines of running text (e.g. WikiText) -> sentences long enough to be a classification input."""
    out = []
    for text in texts:
        if text.lstrip().startswith("="):  # WikiText headings
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
            if len(sentence.split()) >= min_words:
                out.append(sentence)
    return out
