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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from homoexport.config.recipe import NEIGHBOUR_GROUP_SIZE
from homoexport.distillation.data import DataError
from homoexport.distillation.sentence_targets import pooled_rows, rows_key

logger = logging.getLogger(__name__)

GROUP_SIZE = NEIGHBOUR_GROUP_SIZE  # the recipe checks that a batch holds whole groups
GROUPS_FORMAT = 1  # bump when grouping changes, so that cached groups are not reused


def neighbour_groups(embeddings: torch.Tensor, group_size: int = GROUP_SIZE, seed: int = 0) -> np.ndarray:
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


def groups_key(teacher: torch.nn.Module, rows: np.ndarray, precision: str, seed: int, pooling: str = "mean") -> str:
    """What the groups are a function of: the rows, the teacher's weights, the precision it embedded in, its pooling,
    the seed."""
    return rows_key(teacher, rows, {"format": GROUPS_FORMAT, "group_size": GROUP_SIZE, "precision": precision, "seed": seed,
                                    "pooling": pooling})


def teacher_neighbour_groups(teacher: torch.nn.Module, rows: np.ndarray, pad_id: int, precision: str, seed: int = 0,
                             cache_dir: str | Path | None = None, pooled: torch.Tensor | None = None,
                             pooling: str = "mean") -> np.ndarray:
    """Neighbour groups of ``rows`` under ``teacher``'s encoder (its base model when it carries a head), in ``precision``.

    With a ``cache_dir`` they are kept there (a small JSON file beside the packed rows), so a resumed run, or another
    run on the same rows from the same teacher, does not embed every row again. ``pooled``: the teacher's sentence
    embeddings of ``rows`` when the run has them already (:mod:`homoexport.distillation.sentence_targets`), pooled as
    ``pooling`` (the teacher's sentence-transformers pooling) says.
    """
    from homoexport.atomic import atomic_write_json
    from homoexport.distillation.precision import precision_context

    started = time.perf_counter()
    cached = Path(cache_dir) / f"groups-{groups_key(teacher, rows, precision, seed, pooling)}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        groups = np.asarray(json.loads(cached.read_text())["groups"], dtype=np.int64)
        logger.info("neighbour batches: %d groups of %d sentences from %s", len(groups), GROUP_SIZE, cached)
        return groups
    if pooled is None:
        logger.info("neighbour batches: embedding %s sentence rows with the teacher before the first step", f"{len(rows):,}")
        encoder = getattr(teacher, "base_model", teacher)
        pooled = pooled_rows(encoder, rows, pad_id, precision_context(precision, teacher.device.type), pooling)
    groups = neighbour_groups(F.normalize(pooled, dim=-1), GROUP_SIZE, seed)
    logger.info("neighbour batches: %d groups of %d sentences by the teacher's embedding in %.1f s", len(groups), GROUP_SIZE,
                time.perf_counter() - started)
    if cached is not None:
        atomic_write_json(cached, {"rows": len(rows), "group_size": GROUP_SIZE, "precision": precision, "seed": seed,
                                   "groups": groups.tolist()})
    return groups
