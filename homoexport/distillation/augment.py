"""In-domain augmentation for task distillation: copies of the training text with words swapped for neighbours.

TinyBERT (Jiao et al., 2020, §3.3 and Table 6) found its task-specific stage needs more text than a small GLUE
training set holds: it swaps words of each training example for BERT masked-LM predictions or GloVe
neighbours, and the teacher labels the copies. homoexport has neither an MLM head (a fine-tuned classifier
has none) nor GloVe offline, so the neighbours come from the teacher's own input word-embedding table
(cosine similarity among whole-word vocabulary entries), which ranks synonyms, inflections and antonyms
as close as GloVe does. Words the tokenizer splits into several pieces are kept as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np
import torch
from datasets import Dataset

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # contractions (won't, I'm) stay whole, so they are kept


class WordNeighbours:
    """The nearest whole-word vocabulary entries of a word in an input embedding table (lower-cased words)."""

    def __init__(self, tokenizer, embeddings: torch.Tensor, k: int):
        self._table = embeddings.detach().float()
        # A word is swapped when it is one vocabulary entry with an embedding row.
        self._vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < len(self._table)}
        special = set(tokenizer.all_special_tokens)
        # Replacements are whole words: no continuation pieces (##...), [unused] or special entries, digits or
        # punctuation, and no single letters (mostly fragments, like the s of "it's").
        candidates = {t: i for t, i in self._vocab.items() if t.isalpha() and t.isascii() and len(t) > 1 and t not in special}
        self._words = list(candidates)
        self._unit = torch.nn.functional.normalize(self._table[list(candidates.values())], dim=1)
        self._k = k
        self._lower = bool(getattr(tokenizer, "do_lower_case", True))
        self._cache: dict[str, list[str]] = {}

    def key(self, word: str) -> str:
        return word.lower() if self._lower else word

    def prepare(self, words: Iterable[str], chunk: int = 2048) -> None:
        """Compute the neighbours of every word in ``words`` at once (one matrix product per chunk)."""
        todo = sorted({self.key(w) for w in words} - self._cache.keys())
        known = [w for w in todo if w in self._vocab]
        for w in todo:
            self._cache[w] = []
        top_k = min(self._k + 1, len(self._words))
        for start in range(0, len(known), chunk):
            part = known[start:start + chunk]
            rows = torch.nn.functional.normalize(self._table[[self._vocab[w] for w in part]], dim=1)
            top = (rows @ self._unit.T).topk(top_k, dim=1).indices
            for word, idx in zip(part, top.tolist()):
                self._cache[word] = [self._words[j] for j in idx if self._words[j] != word][: self._k]

    def of(self, word: str) -> list[str]:
        key = self.key(word)
        if key not in self._cache:
            self.prepare([word])
        return self._cache[key]


def _cased_like(word: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return word.upper()
    return word.capitalize() if original[0].isupper() else word


def swap_words(text: str, neighbours: WordNeighbours, replace_prob: float, rng: np.random.Generator) -> str:
    """``text`` with each word that has neighbours replaced by a random one of them with probability ``replace_prob``."""

    def one(match: re.Match) -> str:
        word = match.group(0)
        options = neighbours.of(word)
        if not options or rng.random() >= replace_prob:
            return word
        return _cased_like(options[int(rng.integers(len(options)))], word)

    return _WORD.sub(one, text)


def augmented_rows(rows: Dataset, neighbours: WordNeighbours, copies: int, replace_prob: float, label, seed: int = 0,
                   exclude: Iterable = ()) -> Dataset:
    """``copies`` word-swapped versions of every row of ``rows`` (``text_a``, optional ``text_b``), labelled ``label``.

    Each text of a pair is swapped on its own. Copies that equal their original, repeat another copy or a key
    of ``exclude`` (the dev set's text or pairs) are dropped, so the count can fall short of ``copies`` per row.
    """
    pair = "text_b" in rows.column_names
    texts_a = list(rows["text_a"])
    texts_b = list(rows["text_b"]) if pair else []
    neighbours.prepare(w for t in texts_a + texts_b for w in _WORD.findall(t))
    rng = np.random.default_rng(seed)
    seen = set(exclude) | set(zip(texts_a, texts_b) if pair else texts_a)
    out_a: list[str] = []
    out_b: list[str] = []
    for _ in range(copies):
        for i, text in enumerate(texts_a):
            a = swap_words(text, neighbours, replace_prob, rng)
            b = swap_words(texts_b[i], neighbours, replace_prob, rng) if pair else ""
            key = (a, b) if pair else a
            if key in seen:
                continue
            seen.add(key)
            out_a.append(a)
            if pair:
                out_b.append(b)
    logger.info("%d word-swapped copies of %d training rows (%d asked for)", len(out_a), len(texts_a), copies * len(texts_a))
    if not out_a:
        logger.warning("task.augment made no copies: no word of the training text is a whole word of the teacher's vocabulary")
    columns: dict[str, list] = {"text_a": out_a, **({"text_b": out_b} if pair else {})}
    return Dataset.from_dict(columns | {"label": [label] * len(out_a)}, features=rows.features)
