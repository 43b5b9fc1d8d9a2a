"""Neighbour batches: sentence rows grouped by the teacher's own embedding, so that a batch holds related sentences.

In-batch terms (``similarity``, ``contrastive``) learn only the structure a batch shows them. Sentences drawn at
random are almost all unrelated, while STS and retrieval rank *related* sentences. Grouping each row with its
nearest neighbours under the teacher (mined once, before training, as hard negatives are mined for sentence
encoders) puts related sentences side by side without any labelled pairs: any unlabelled text will do.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from homoexport.distillation.data import DataError, mixed_seed
from homoexport.distillation.sentence_targets import pooled_rows, rows_key

logger = logging.getLogger(__name__)

GROUPS_FORMAT = 1  # bump when grouping changes, so that cached groups are not reused
_REGROUP = 3  # a seed stream of its own (data.py uses 1 for shuffling, 2 for masking)


@dataclass(frozen=True)
class Grouping:
    """How rows are grouped (``data.group_size``, ``training.seed``) and how the teacher embeds them (its precision and
    sentence-transformers pooling): with the rows and the teacher's weights, what the groups are a function of."""

    size: int = 8
    seed: int = 0
    precision: str = "fp32"
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"a neighbour group holds at least 2 rows, got size={self.size}")


def neighbour_groups(embeddings: torch.Tensor, group_size: int, seed: int = 0) -> np.ndarray:
    """[n // group_size, group_size] row indices: each group a random unused anchor and its nearest unused rows.

    Greedy and deterministic for a seed; the last ``n % group_size`` rows (the least related leftovers) are dropped.
    """
    n = len(embeddings)
    if n < group_size:
        raise DataError(f"neighbour batches need at least {group_size} sentence rows, got {n}")
    generator = torch.Generator().manual_seed(seed)
    free = torch.ones(n, dtype=torch.bool)
    groups = []
    for anchor in torch.randperm(n, generator=generator).tolist():
        if len(groups) == n // group_size:
            break
        if not free[anchor]:
            continue
        free[anchor] = False
        sims = embeddings @ embeddings[anchor]
        sims[~free] = -torch.inf
        members = sims.topk(group_size - 1).indices
        free[members] = False
        groups.append([anchor, *members.tolist()])
    return np.asarray(groups, dtype=np.int64)


def groups_key(teacher: torch.nn.Module, rows: np.ndarray, grouping: Grouping) -> str:
    """What the groups are a function of: the rows, the teacher's weights and ``grouping``."""
    return rows_key(teacher, rows, {"format": GROUPS_FORMAT, "group_size": grouping.size, "precision": grouping.precision,
                                    "seed": grouping.seed, "pooling": grouping.pooling})


def teacher_neighbour_groups(teacher: torch.nn.Module, rows: np.ndarray, pad_id: int, grouping: Grouping,
                             cache_dir: str | Path | None = None, pooled: torch.Tensor | None = None) -> np.ndarray:
    """Neighbour groups of ``rows`` under ``teacher``'s encoder (its base model when it carries a head).

    With a ``cache_dir`` they are kept there (a small JSON file beside the packed rows), so a resumed run, or another
    run on the same rows from the same teacher, does not embed every row again. ``pooled``: the teacher's sentence
    embeddings of ``rows`` when the run has them already (:mod:`homoexport.distillation.sentence_targets`), pooled as
    ``grouping.pooling`` (the teacher's sentence-transformers pooling) says.
    """
    from homoexport.atomic import atomic_write_json
    from homoexport.distillation.precision import precision_context

    started = time.perf_counter()
    cached = Path(cache_dir) / f"groups-{groups_key(teacher, rows, grouping)}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        groups = np.asarray(json.loads(cached.read_text())["groups"], dtype=np.int64)
        logger.info("neighbour batches: %d groups of %d sentences from %s", len(groups), grouping.size, cached)
        return groups
    if pooled is None:
        logger.info("neighbour batches: embedding %s sentence rows with the teacher before the first step", f"{len(rows):,}")
        encoder = getattr(teacher, "base_model", teacher)
        pooled = pooled_rows(encoder, rows, pad_id, precision_context(grouping.precision, teacher.device.type), grouping.pooling)
    groups = neighbour_groups(F.normalize(pooled, dim=-1), grouping.size, grouping.seed)
    logger.info("neighbour batches: %d groups of %d sentences by the teacher's embedding in %.1f s", len(groups), grouping.size,
                time.perf_counter() - started)
    if cached is not None:
        atomic_write_json(cached, {"rows": len(rows), "group_size": grouping.size, "precision": grouping.precision,
                                   "seed": grouping.seed, "pooling": grouping.pooling, "groups": groups.tolist()})
    return groups


class EpochGroups:
    """The neighbour groups each epoch's batches are drawn from.

    Fixed groups (``embeddings`` None) serve every epoch. With the teacher's normalized sentence embeddings
    (``data.regroup``) epoch 0 keeps ``first`` (the cached groups) and each later epoch mines fresh groups from anchors
    drawn with a seed of ``(seed, epoch)``: over many epochs a row is ranked against more of its neighbours than one
    group holds, and the greedy leftovers (the least coherent groups) are different rows each time. A pure function of
    the epoch, so a resumed run sees the same batches.
    """

    def __init__(self, first: np.ndarray, embeddings: torch.Tensor | None = None, seed: int = 0):
        self.first = first
        self.embeddings = embeddings
        self.seed = seed
        self._last: tuple[int, np.ndarray] = (0, first)

    @property
    def shape(self) -> tuple[int, int]:
        """[groups, group size], the same at every epoch."""
        return self.first.shape[0], self.first.shape[1]

    def at(self, epoch: int) -> np.ndarray:
        """[groups, group size] row indices of ``epoch``'s groups (the last epoch's are kept)."""
        if self.embeddings is None or epoch == 0:
            return self.first
        if self._last[0] != epoch:
            started = time.perf_counter()
            groups = neighbour_groups(self.embeddings, self.shape[1], mixed_seed(self.seed, _REGROUP, epoch))
            logger.info("neighbour batches: epoch %d regrouped in %.1f s", epoch, time.perf_counter() - started)
            self._last = (epoch, groups)
        return self._last[1]
