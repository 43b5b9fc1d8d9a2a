"""Neighbour batches: sentence rows grouped by the teacher's own embedding, so that a batch holds related sentences.

In-batch terms (``similarity``, ``contrastive``) learn only the structure a batch shows them. Sentences drawn at
random are almost all unrelated, while STS and retrieval rank *related* sentences. Grouping each row with its
nearest neighbours under the teacher (mined once, before training, as hard negatives are mined for sentence
encoders) puts related sentences side by side without any labelled pairs: any unlabelled text will do.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F

from homoexport.distillation.data import DataError
from homoexport.distillation.losses import mean_pool

logger = logging.getLogger(__name__)

GROUP_SIZE = 8


@torch.no_grad()
def row_embeddings(encoder: torch.nn.Module, rows: np.ndarray, pad_id: int, autocast: Callable[[], ContextManager],
                   batch_size: int = 256) -> torch.Tensor:
    """[n, H] L2-normalised mean-pooled last hidden states of padded sentence rows [n, T] (float32)."""
    out = []
    for i in range(0, len(rows), batch_size):
        ids = torch.from_numpy(np.asarray(rows[i:i + batch_size], dtype=np.int64))
        mask = (ids != pad_id).long()
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        with autocast():
            hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        out.append(F.normalize(mean_pool(hidden.float(), mask), dim=-1))
    return torch.cat(out)


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


def teacher_neighbour_groups(teacher: torch.nn.Module, rows: np.ndarray, pad_id: int, autocast: Callable[[], ContextManager],
                             seed: int = 0) -> np.ndarray:
    """Neighbour groups of ``rows`` under ``teacher``'s encoder (its base model when it carries a head)."""
    started = time.perf_counter()
    logger.info("neighbour batches: embedding %s sentence rows with the teacher before the first step",
                f"{len(rows):,}")
    encoder = getattr(teacher, "base_model", teacher)
    groups = neighbour_groups(row_embeddings(encoder, rows, pad_id, autocast), GROUP_SIZE, seed)
    logger.info("neighbour batches: %d groups of %d sentences by the teacher's embedding in %.1f s", len(groups), GROUP_SIZE,
                time.perf_counter() - started)
    return groups
