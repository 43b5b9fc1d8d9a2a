"""The teacher's sentence embedding of every training row, computed once before step 1.

When every weighed term reads only the teacher's mean-pooled sentence embedding of the clean rows (``sentence``,
``similarity``, ``contrastive``), a step's teacher forward pass recomputes vectors that do not change: the teacher
is frozen and a row is the same row every epoch. Embedding each row once and reading the vectors back by row index
(as sentence-transformers' embedding distillation, Reimers & Gurevych 2020, stores the teacher's embeddings of its
training sentences) leaves a step the student's forward and backward passes only. The embeddings are the ones
neighbour batches are grouped by, so a run with both embeds its rows once.

Such a step needs only the student's pooled embedding too, so the student encodes a batch in runs of rows of
similar length, each cut to its longest row (:func:`pooled_by_length`): sentence rows are padded to the block size,
and a batch of sentences of mixed lengths is otherwise mostly padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch

from homoexport.distillation.losses import pool_hidden

logger = logging.getLogger(__name__)

TARGETS_FORMAT = 1  # bump when how rows are embedded changes, so that cached embeddings are not reused
LENGTH_BUCKETS = 4  # runs per batch: on 64 mixed sentences (21.6 tokens of 64 on average) 29 tokens a row instead of 58


@torch.no_grad()
def pooled_rows(encoder: torch.nn.Module, rows: np.ndarray, pad_id: int, autocast: Callable[[], ContextManager],
                mode: str = "mean", batch_size: int = 256) -> torch.Tensor:
    """[n, H] float32 pooled (``mode``: mean, cls, max) last hidden states of padded sentence rows [n, T], in row order.

    Rows are encoded shortest first, each batch cut to its longest row: sentences vary in length far more than a
    batch of 256 random ones shows, so this spends the teacher's time on tokens instead of padding. A row's vector
    does not depend on the rows beside it (up to float rounding), nor on the order the rows come in.
    """
    lengths = (np.asarray(rows) != pad_id).sum(1)
    order = np.argsort(lengths, kind="stable")
    out = torch.empty(len(rows), encoder.config.hidden_size)
    for i in range(0, len(rows), batch_size):
        index = order[i:i + batch_size]
        width = max(1, int(lengths[index].max()))
        ids = torch.from_numpy(np.asarray(rows[index, :width], dtype=np.int64)).to(encoder.device)
        mask = (ids != pad_id).long()
        with autocast():
            hidden = encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        out[torch.from_numpy(index)] = pool_hidden(hidden.float(), mask, mode).cpu()
    return out


def pooled_by_length(encoder: torch.nn.Module, inputs: dict[str, torch.Tensor], buckets: int = LENGTH_BUCKETS,
                     mode: str = "mean") -> torch.Tensor:
    """[B, H] pooled (``mode``: mean, cls, max) last hidden states of a padded batch, differentiable, in the batch's row order.

    The rows are sorted by length and encoded in ``buckets`` runs, each cut to its longest row. A row's vector is
    the one the whole batch gives (its padding is masked either way, up to float rounding); the cost follows the
    tokens instead of the padded width.
    """
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    pieces = []
    for index in order.tensor_split(min(buckets, len(order))):
        width = max(1, int(lengths[index].max()))
        run = {k: v[index, :width] for k, v in inputs.items()}
        pieces.append(pool_hidden(encoder(**run).last_hidden_state, run["attention_mask"], mode))
    return torch.cat(pieces)[torch.argsort(order)]


def rows_key(teacher: torch.nn.Module, rows: np.ndarray, settings: dict) -> str:
    """A short hash of what a product of the teacher on these rows is a function of: the rows, the teacher's
    weights, and ``settings`` (the precision it ran in and whatever else the caller names)."""
    h = hashlib.sha256(json.dumps({**settings, "rows": list(rows.shape)}).encode())
    h.update(np.ascontiguousarray(rows).tobytes())
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def teacher_sentence_targets(teacher: torch.nn.Module, rows: np.ndarray, pad_id: int, precision: str,
                             cache_dir: str | Path | None = None, pooling: str = "mean") -> torch.Tensor:
    """[n, H] float32 teacher sentence embeddings (pooled as ``pooling`` says, not normalised) of ``rows``, in ``precision``.

    The encoder is the teacher's base model when it carries a head. With a ``cache_dir`` the array is kept there
    (``sentences-<key>.npy``), so a resumed run, or another run on the same rows from the same teacher, reads it
    back instead of embedding every row again; a resume then sees exactly the vectors the first run saw.
    """
    from homoexport.atomic import atomic_write_array
    from homoexport.distillation.precision import precision_context

    started = time.perf_counter()
    key = rows_key(teacher, rows, {"format": TARGETS_FORMAT, "precision": precision, "pooling": pooling})
    cached = Path(cache_dir) / f"sentences-{key}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        targets = torch.from_numpy(np.load(cached, allow_pickle=False))
        logger.info("teacher sentence embeddings of %s rows from %s", f"{len(targets):,}", cached)
        return targets
    logger.info("teacher sentence embeddings: embedding %s rows once, before the first step", f"{len(rows):,}")
    targets = pooled_rows(getattr(teacher, "base_model", teacher), rows, pad_id, precision_context(precision, teacher.device.type), pooling)
    logger.info("teacher sentence embeddings: %s rows x %d in %.1f s (%.1f MB kept in memory)", f"{len(rows):,}",
                targets.shape[1], time.perf_counter() - started, targets.numel() * 4 / 1e6)
    if cached is not None:
        atomic_write_array(cached, targets.numpy())
    return targets
