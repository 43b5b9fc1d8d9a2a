"""The recipe -> (teacher, tokenizer, training and held-out batches) setup of task-agnostic runs, shared
by the trainer and the teacher-assistant sandwich run so the two cannot drift apart."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F

from homoexport.config.recipe import Recipe
from homoexport.distillation.data import BlockBatcher, CorpusSpec, build_blocks
from homoexport.distillation.grouping import EpochGroups, Grouping, teacher_neighbour_groups
from homoexport.distillation.losses import SENTENCE_TERMS, active_terms
from homoexport.distillation.models import load_model, load_tokenizer
from homoexport.distillation.precision import resolve_precision
from homoexport.distillation.sentence_targets import teacher_sentence_targets
from homoexport.evaluation.sts import Pooling, read_pooling

logger = logging.getLogger(__name__)

NO_MLM_NOTE = "teacher has no MLM head: MLM and KL terms are off (hidden/attention/embedding only)"
MLM_PROBABILITY = 0.15


@dataclass
class CorpusSetup:
    """What a task-agnostic run trains from; ``eval_batcher`` is None without held-out blocks."""

    teacher: Any
    has_mlm: bool
    use_mlm: bool  # the teacher has an MLM head and the recipe weighs MLM or KL
    tokenizer: Any
    batcher: BlockBatcher
    eval_batcher: BlockBatcher | None
    eval_steps: int
    grouping_s: float | None = None  # seconds spent grouping rows into neighbour batches (data.batching neighbours)
    sentences: torch.Tensor | None = None  # [rows, H] the teacher's sentence embedding of every training row
    sentences_s: float | None = None  # seconds spent embedding (or reading) them
    pooling: str = "mean"  # how the teacher pools its sentence embedding (its sentence-transformers Pooling; mean without one)


def build_corpus_setup(recipe: Recipe, first: Callable[[], ContextManager] = contextlib.nullcontext, note: bool = True,
                       device: torch.device | None = None, precision: str | None = None, sentence_targets: bool = False) -> CorpusSetup:
    """Load the teacher onto ``device`` (eager attention when attention maps are distilled) and pack the recipe's text.

    ``first`` wraps the packing (accelerate's ``main_process_first``, so one rank fills the cache);
    ``note`` logs that MLM/KL are off for a teacher without an MLM head. ``precision``: the run's resolved
    ``training.precision``, which the teacher embeds rows in (resolved here when not given). With ``sentence_targets``, a recipe whose
    every term reads only the teacher's pooled sentence embedding gets those embedded once for all rows
    (:mod:`homoexport.distillation.sentence_targets`), and neighbour grouping reuses them. Sentence embeddings are
    pooled as the teacher's sentence-transformers files say (mean pooling without them).
    """
    device = device or torch.device("cpu")
    teacher, has_mlm = load_model(recipe.teacher, attention="eager" if recipe.losses.attention > 0 else "sdpa")
    teacher.requires_grad_(False).eval().to(device)
    tokenizer = load_tokenizer(recipe.tokenizer or recipe.teacher)
    spec = CorpusSpec(sources=recipe.data.train, eval_sources=recipe.data.eval, block_size=recipe.data.block_size,
                      eval_blocks=recipe.data.eval_blocks, max_blocks=recipe.data.max_blocks, cache_dir=recipe.data.cache_dir,
                      unit=recipe.data.unit)
    with first():
        train_blocks, eval_blocks = build_blocks(spec, tokenizer)
    wants_mlm = recipe.losses.mlm > 0 or recipe.losses.kl > 0
    use_mlm = has_mlm and wants_mlm
    if wants_mlm and not has_mlm and note:
        logger.warning("note: %s", NO_MLM_NOTE)
    mlm_prob = MLM_PROBABILITY if use_mlm else None
    seed = recipe.training.seed
    padded = recipe.data.unit == "sentence"
    precision = precision or resolve_precision(recipe.training.precision, device)
    terms = set(active_terms(recipe.losses, has_mlm))
    reads_sentences = bool(terms & SENTENCE_TERMS) or recipe.data.batching == "neighbours"
    pooling = read_pooling(recipe.teacher) if reads_sentences else Pooling()  # a run that never pools does not read the files
    if note and reads_sentences:
        logger.info("sentence embedding: %s pooling [%s]", pooling.mode, pooling.source)
    sentences, sentences_s = None, None
    if sentence_targets and terms <= SENTENCE_TERMS:
        started = time.perf_counter()
        with first():  # one process embeds and caches, the others read the cache
            sentences = teacher_sentence_targets(teacher, train_blocks, tokenizer.pad_token_id, precision, recipe.data.cache_dir,
                                                 pooling.mode)
        sentences_s = round(time.perf_counter() - started, 2)
    groups: Any = None  # np.ndarray, or EpochGroups with data.regroup
    grouping_s = None
    if recipe.data.batching == "neighbours":
        started = time.perf_counter()
        with first():  # one process groups and caches, the others read the cache
            groups = teacher_neighbour_groups(teacher, train_blocks, tokenizer.pad_token_id,
                                              Grouping(recipe.data.group_size, seed, precision, pooling.mode), recipe.data.cache_dir,
                                              pooled=sentences)
            if recipe.data.regroup:  # later epochs mine their groups from the teacher's vectors (cached like the targets)
                vectors = sentences if sentences is not None else teacher_sentence_targets(
                    teacher, train_blocks, tokenizer.pad_token_id, precision, recipe.data.cache_dir, pooling.mode)
                groups = EpochGroups(groups, F.normalize(vectors, dim=-1), seed)
        grouping_s = round(time.perf_counter() - started, 2)
    batcher = BlockBatcher(train_blocks, tokenizer, recipe.training.batch_size, seed=seed, mlm_probability=mlm_prob, padded=padded,
                           groups=groups)
    eval_bs = min(recipe.training.micro_batch_size or recipe.training.batch_size, max(1, len(eval_blocks)))
    eval_batcher = (BlockBatcher(eval_blocks, tokenizer, eval_bs, seed=seed + 1, mlm_probability=mlm_prob, shuffle=False, padded=padded)
                    if len(eval_blocks) else None)
    eval_steps = max(1, len(eval_blocks) // eval_bs) if eval_batcher else 0
    return CorpusSetup(teacher, has_mlm, use_mlm, tokenizer, batcher, eval_batcher, eval_steps, grouping_s, sentences, sentences_s,
                       pooling.mode)
