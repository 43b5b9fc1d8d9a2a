"""Task-specific HomoDistil: compress a fine-tuned classifier (or regressor) on its own labelled data.

The student starts as an exact copy of the fine-tuned teacher, classifier included, and is width-pruned
on the cubic schedule while it learns from the teacher's predictions (KL at temperature T, scaled by T²,
for classes; MSE for a regression head), optionally the gold labels, and the hidden / attention /
embedding terms of HomoDistil (Liang et al., ICLR 2023), as in TinyBERT's task stage and CoFi. Once the
target width is reached for good, training continues on the materialised dense student, with optimizer
state and loss projections sliced the same way, so late steps cost what the small model costs.

Runs in one process or data-parallel under ``torchrun`` / ``accelerate launch`` (each process takes its rows
of every batch, gradients are all-reduced before importance scoring, so every process prunes the same units
and holds the same student). Checkpoints are atomic and resume is exact (batches are a function of the step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from datasets import concatenate_datasets
from torch import nn

from homoexport import __version__
from homoexport.atomic import atomic_write_json, atomic_write_text, staging_dir
from homoexport.config.recipe import LossSpec, Recipe, TaskSpec, steps_of
from homoexport.distillation.augment import WordNeighbours, augmented_rows
from homoexport.distillation.checkpoint import (
    TrainingClock,
    check_run_dir,
    check_same_precision,
    check_same_recipe,
    finished_keep_fp32,
    finished_report,
    resolved_header,
    resumable_fields,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from homoexport.distillation.dense import carry_optimizer_state
from homoexport.distillation.losses import DistillationLoss, EncoderOutputs
from homoexport.distillation.models import ModelLoadError, build_student, is_sequence_classifier, load_tokenizer
from homoexport.distillation.precision import precision_context, resolve_precision
from homoexport.distillation.task_data import (
    UNLABELLED,
    TaskBatcher,
    TaskData,
    dev_text,
    label_names,
    limit,
    load_files,
    load_glue,
    unlabelled_rows,
)
from homoexport.errors import UsageError
from homoexport.evaluation.glue_data import GlueTask, predictions, score
from homoexport.machine import fingerprint
from homoexport.pruning.mask_groups import KeptHeads, config_widths
from homoexport.pruning.pruner import HomoDistilPruner, stages
from homoexport.pruning.surgery import model_inputs, parameter_report, save_student

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "homoexport.task_distill/2"  # 2: family members carry int8 scores and latency; deployed["dev"]; plan


class Ranks:
    """This process's share of a data-parallel run (world 1 without a launcher).

    Each process computes the loss on its rows of the step's batch, weighted by its share of the rows, and
    the gradients are summed across processes: the full batch's gradient, identical everywhere, so the
    importance scores, masks, optimizer steps and the dense switch agree without further messages. Only the
    main process writes files.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")  # CPU tensors: the task loop trains on the CPU (launcher's env:// rendezvous)
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.is_main = self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This process's rows and their share of the batch (a batch with fewer rows than processes runs whole everywhere)."""
        rows = len(batch["input_ids"])
        if self.world == 1 or rows < self.world:
            return batch, 1.0 / self.world
        mine = {k: v[self.rank::self.world] for k, v in batch.items()}
        return mine, len(mine["input_ids"]) / rows

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class TaskLoss(nn.Module):
    """Prediction distillation + optional gold-label loss + HomoDistil's hidden/attention/embedding terms.

    ``losses.kl`` weighs the prediction term and ``losses.temperature`` is its T; the MLM term has no
    meaning on task data and is ignored.
    """

    def __init__(self, spec: LossSpec, hard_label: float, regression: bool, student_hidden: int, teacher_hidden: int,
                 student_layers: int, teacher_layers: int):
        super().__init__()
        self.spec, self.hard_label, self.regression = spec, hard_label, regression
        self.inner = DistillationLoss(spec, student_hidden, teacher_hidden, student_layers, teacher_layers, has_mlm=False)

    @property
    def active_terms(self) -> dict[str, float]:
        terms = dict(self.inner.active_terms)
        if self.spec.kl > 0:
            terms["prediction"] = self.spec.kl
        if self.hard_label > 0:
            terms["label"] = self.hard_label
        return terms

    def forward(self, student, teacher, token_mask: torch.Tensor, labels: torch.Tensor, kept_heads: KeptHeads | None):
        s = EncoderOutputs(hidden=student.hidden_states, attentions=student.attentions)
        t = EncoderOutputs(hidden=teacher.hidden_states, attentions=teacher.attentions)
        total, terms = self.inner(s, t, token_mask, None, kept_heads)
        s_logits, t_logits = student.logits.float(), teacher.logits.float()
        if self.spec.kl > 0:
            if self.regression:
                terms["prediction"] = F.mse_loss(s_logits, t_logits)
            else:
                T = self.spec.temperature
                terms["prediction"] = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                                               log_target=True, reduction="batchmean") * T * T
            total = total + self.spec.kl * terms["prediction"]
        if self.hard_label > 0:
            known = ~torch.isnan(labels) if self.regression else labels != UNLABELLED  # rows the teacher labels alone have no gold term
            if known.any():
                predicted, gold = s_logits[known], labels[known]
                terms["label"] = F.mse_loss(predicted.squeeze(-1), gold.float()) if self.regression else F.cross_entropy(predicted, gold)
            else:
                terms["label"] = s_logits.sum() * 0.0
            total = total + self.hard_label * terms["label"]
        return total, terms


def forward(model: nn.Module, batch: dict[str, torch.Tensor], attentions: bool):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"),
                 output_hidden_states=True, output_attentions=attentions, return_dict=True)


@torch.no_grad()
def evaluate(model: nn.Module, batcher: TaskBatcher, task: GlueTask) -> dict[str, float]:
    """Every metric of ``task`` on ``batcher``'s rows, in points (metric x 100)."""
    was_training = model.training
    model.eval()
    logits = []
    for step in range(batcher.steps_per_epoch):
        batch = batcher.batch_at(step)
        logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids")).logits.float().numpy())
    model.train(was_training)
    order = np.concatenate(batcher.batches(0))
    values = score(task, predictions(task, np.concatenate(logits)), batcher.labels[order])
    return {k: 100 * v for k, v in values.items()}


def load_task_data(recipe: Recipe, label_names: list[str] | None, regression: bool, tokenizer=None,
                   word_embeddings: torch.Tensor | None = None) -> TaskData:
    """The recipe's training and dev rows, then its unlabelled rows and word-swapped copies (``task.augment``:
    needs the tokenizer and the teacher's input word embeddings) appended for the teacher to label."""
    t = recipe.task
    assert t is not None
    if t.glue:
        data = load_glue(t.glue, t.data_dir)
        if data.task.is_regression != regression:
            kind = "a regression" if regression else "a classification"
            raise ModelLoadError(f"teacher {recipe.teacher} has {kind} head but GLUE {data.task.name} is not {kind} task")
    else:
        data = load_files(t.train_file, t.dev_file, t.text_column, t.text_pair_column, t.label_column, label_names, regression)
    data = limit(data, t.max_train_samples, t.max_dev_samples, recipe.training.seed)
    extra, sources, swapped = [], [], 0
    if t.unlabelled:
        rows = unlabelled_rows(t.unlabelled, data, t.data_dir, t.text_column, t.text_pair_column, t.max_unlabelled_samples, recipe.training.seed)
        extra.append(rows)
        sources.append(f"{len(rows)} unlabelled rows from {', '.join(t.unlabelled)}")
    if t.augment is not None:
        assert tokenizer is not None and word_embeddings is not None, "task.augment needs the tokenizer and the word embeddings"
        a = t.augment
        rows = augmented_rows(data.train, WordNeighbours(tokenizer, word_embeddings, a.neighbours), a.copies, a.replace_prob,
                              math.nan if data.task.is_regression else UNLABELLED, recipe.training.seed, exclude=dev_text(data))
        extra.append(rows)
        swapped = len(rows)
        sources.append(f"{len(rows)} word-swapped copies (replace_prob {a.replace_prob}, {a.neighbours} neighbours)")
    if not extra:
        return data
    unlabelled = sum(len(r) for r in extra)
    logger.info("%d rows for the teacher to label, beside %d labelled ones", unlabelled, len(data.train))
    return TaskData(data.task, concatenate_datasets([data.train, *extra]), data.dev, f"{data.source} + {' + '.join(sources)}",
                    unlabelled=unlabelled, word_swapped=swapped)


def check_task_inputs(recipe: Recipe) -> None:
    """Read the teacher's config and the recipe's labelled and unlabelled data, so that a missing teacher, a bad column
    or an unknown label is named before a budget plan spends minutes measuring (the run reads them again)."""
    from transformers import AutoConfig

    assert recipe.task is not None
    _check_teacher(recipe.teacher)
    config = AutoConfig.from_pretrained(recipe.teacher)
    without_copies = recipe.model_copy(update={"task": recipe.task.model_copy(update={"augment": None})})  # copies need the model
    load_task_data(without_copies, label_names(config), config.num_labels == 1)


def _check_teacher(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"teacher directory not found or has no config.json: {path}")
    if not is_sequence_classifier(path):
        raise ModelLoadError(f"{path} is not a *ForSequenceClassification model: a task recipe needs a fine-tuned teacher "
                             "(`homoexport glue MODEL --task T` fine-tunes one and saves it under OUT/seed-S/model)")


def load_teacher(path: str, attention: bool) -> nn.Module:
    """The fine-tuned ``*ForSequenceClassification`` teacher (eager attention when attention maps are distilled)."""
    from transformers import AutoModelForSequenceClassification

    _check_teacher(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager" if attention else "sdpa")
    return model.eval().requires_grad_(False)


@dataclass
class TaskRun:
    """Everything the loop changes: the student (masked, then dense), its loss, optimizer and schedule."""

    student: nn.Module
    loss: TaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pruner: HomoDistilPruner | None
    dense: bool = False
    parity: float | None = None  # the largest max |masked - dense| of the loop's switches to a materialised student
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    family: list[dict[str, Any]] = field(default_factory=list)  # students kept on the way down (task.family)
    best: dict[str, Any] | None = None  # task.keep_best: step and dev scores of the best student at the final width so far
    processes: int = 1  # data-parallel processes (Ranks.world)
    precision: str = "fp32"  # of the forward passes and losses (training.precision resolved); weights stay fp32
    clock: TrainingClock = field(default_factory=TrainingClock)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return {**{f"student.{n}": p for n, p in self.student.named_parameters()}, **{f"loss.{n}": p for n, p in self.loss.named_parameters()}}

    def kept_heads(self) -> KeptHeads | None:
        return self.pruner.kept_heads() if self.pruner is not None else None


@dataclass(frozen=True)
class TaskSetting:
    """What a task run reads and never changes: the recipe, where it writes, the teacher and its dev scores, the data."""

    recipe: Recipe
    out: Path
    teacher: nn.Module
    tokenizer: Any
    data: TaskData
    dev: TaskBatcher
    teacher_dev: dict[str, float]
    plan: dict[str, Any] | None  # the budget plan that chose the widths, if any


def _new_run(recipe: Recipe, teacher: nn.Module, regression: bool, total: int, processes: int) -> TaskRun:
    """The student as a copy of the teacher, its pruner, loss, optimizer and schedule, held by the run alone: at the
    dense switch the full-width student and its optimizer state must have no other reference, or they stay in memory."""
    student = build_student(teacher, recipe.init, recipe.student.layers, recipe.truncate_layers).train().requires_grad_(True)
    pruner = None
    if recipe.pruning.schedule != "none":
        from homoexport.distillation.trainer import pruner_settings
        from homoexport.pruning.mask_groups import target_widths

        target = target_widths(config_widths(teacher.config), recipe.student.hidden, recipe.student.heads, recipe.student.ffn)
        pruner = HomoDistilPruner(student, target, pruner_settings(recipe, total))
    assert recipe.task is not None
    hidden = teacher.config.hidden_size
    loss = TaskLoss(recipe.losses, recipe.task.hard_label, regression, hidden, hidden, student.config.num_hidden_layers,
                    teacher.config.num_hidden_layers)
    params = {**{f"student.{n}": p for n, p in student.named_parameters()}, **{f"loss.{n}": p for n, p in loss.named_parameters()}}
    optimizer = _optimizer(params, recipe)
    return TaskRun(student, loss, optimizer, _scheduler(optimizer, recipe, total), pruner, processes=processes,
                   precision=resolve_precision(recipe.training.precision, torch.device("cpu")))


def _optimizer(params: dict[str, nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    o = recipe.optimizer
    decay = [p for n, p in params.items() if p.ndim >= 2 and "embeddings" not in n]
    rest = [p for n, p in params.items() if not (p.ndim >= 2 and "embeddings" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=o.lr, betas=o.betas, eps=o.eps, fused=True)


def _scheduler(optimizer, recipe: Recipe, total: int):
    from transformers import get_scheduler

    o = recipe.optimizer
    return get_scheduler(o.scheduler, optimizer, num_warmup_steps=steps_of(o.warmup, total), num_training_steps=total)


def to_dense(run: TaskRun, recipe: Recipe, total: int, probe: dict[str, torch.Tensor], final: bool = True) -> None:
    """Continue on the materialised student (parity-checked on ``probe``): slice weights, loss projections and Adam state
    to the kept units. ``final``: the target is reached for good; else pruning goes on over the smaller model
    (``pruning.materialize_at``)."""
    assert run.pruner is not None and not run.dense
    old = run.named_parameters()
    old_state = {n: run.optimizer.state.get(p, {}) for n, p in old.items()}
    old_lrs = [g["lr"] for g in run.optimizer.param_groups]
    sched_state = run.scheduler.state_dict()
    dense, parity = run.pruner.materialize_checked(probe)
    run.parity = max(parity, run.parity or 0.0)
    run.student = dense.train().requires_grad_(True)
    run.loss.inner.keep_student_dims(run.pruner.masks.hidden.nonzero().flatten())
    new = run.named_parameters()
    run.optimizer = _optimizer(new, recipe)
    carry_optimizer_state(run.pruner, old_state, run.optimizer, new)
    run.pruner.rebase(run.student, final)
    run.scheduler = _scheduler(run.optimizer, recipe, total)
    run.scheduler.load_state_dict(sched_state)
    for group, lr in zip(run.optimizer.param_groups, old_lrs):
        group["lr"] = lr
    run.dense = final
    logger.info("continuing on the %s student %s from step %d", "dense" if final else "materialised", run.pruner.widths(), run.step)


def _save_checkpoint(directory: Path, run: TaskRun, recipe: Recipe, ranks: Ranks) -> None:
    rngs = ranks.gather(rng_state())  # every process's dropout stream, so that resume is exact for each
    if ranks.is_main:
        state = {"step": run.step, "recipe": resumable_fields(recipe), "precision": run.precision, "dense": run.dense, "parity": run.parity,
                 "student": run.student.state_dict(), "loss": run.loss.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "pruner": run.pruner.state_dict() if run.pruner else None,
                 "curve": run.curve, "family": run.family, "best": run.best, "rng": rngs[0], "rng_ranks": rngs, "elapsed_s": run.clock.elapsed()}
        save_checkpoint(directory / f"step-{run.step:08d}.pt", state)
        for stale in sorted(directory.glob("step-*.pt"))[:-1]:  # resume needs only the newest
            stale.unlink()
    ranks.barrier()


def _load_checkpoint(path: Path, run: TaskRun, recipe: Recipe, total: int, probe: dict[str, torch.Tensor], rank: int = 0) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_same_recipe(state["recipe"], recipe, path)
    check_same_precision(state.get("precision"), run.precision, recipe.training.precision, path)
    if run.pruner is not None:
        replay = stages(state["pruner"], state["dense"])
        for i, masks in enumerate(replay):  # the smaller students the run went on over, in order
            run.pruner.masked.set_masks(masks)
            to_dense(run, recipe, total, probe, final=state["dense"] and i == len(replay) - 1)
        run.pruner.load_state_dict(state["pruner"], state["dense"])
    run.parity = state.get("parity")
    run.student.load_state_dict(state["student"])
    run.loss.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.curve, run.family, run.best = state["step"], state["curve"], state["family"], state.get("best")
    run.clock = TrainingClock(state.get("elapsed_s"), run.step)
    per_rank = state.get("rng_ranks") or [state["rng"]]
    set_rng_state(per_rank[rank] if rank < len(per_rank) else state["rng"])


def distill_task(recipe: Recipe, out_dir: Path | None = None, resume: bool = False, overwrite: bool = False,
                 on_log: Callable[[dict], None] | None = None, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a task recipe end to end; returns the report (also ``out_dir/report.json``).

    ``plan``: the budget plan that chose the recipe's widths (``homoexport plan``), recorded in the report; under it
    ``task.max_drop`` may only choose a student that fits the budget.

    ``on_log`` receives every logged record (``step``, ``total``, loss terms, widths, and the dev
    metrics at evaluation steps): the CLI draws its progress from it.
    """
    if recipe.task is None:
        raise UsageError("not a task recipe: it has no task section")
    if recipe.task.family and recipe.student.hidden is None:
        raise UsageError("task.family keeps students while the hidden size shrinks: set student.hidden or give a budget")
    out = Path(out_dir) if out_dir else recipe.output_dir()
    check_run_dir(out, resume, overwrite)
    ranks = Ranks()
    if overwrite and out.exists() and ranks.is_main:
        shutil.rmtree(out)
    ranks.barrier()
    if resume:
        finished = finished_report(out, recipe)
        if finished is not None:
            exported_with = finished_keep_fp32(out)
            if not recipe.task.export or exported_with == recipe.task.keep_fp32:
                logger.info("%s already finished: nothing to do (use --overwrite to train it again)", out)
                return finished
            logger.info("%s already finished; exporting it again: task.keep_fp32 was %s, now %s", out, exported_with, recipe.task.keep_fp32)
            finished = export_again(finished, recipe, out) if ranks.is_main else {}
            ranks.barrier()
            return finished
    seed = recipe.training.seed + ranks.rank  # a process's own dropout stream; the data order comes from the recipe's seed
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    ts = recipe.task
    need_attn = recipe.losses.attention > 0
    teacher = load_teacher(recipe.teacher, need_attn)
    tokenizer = load_tokenizer(recipe.tokenizer or recipe.teacher)
    regression = teacher.config.num_labels == 1
    data = load_task_data(recipe, label_names(teacher.config), regression, tokenizer, teacher.get_input_embeddings().weight)
    train = TaskBatcher(data.train, tokenizer, recipe.training.batch_size, ts.max_length, seed=recipe.training.seed)
    dev = TaskBatcher(data.dev, tokenizer, ts.eval_batch_size, ts.max_length, shuffle=False)
    probe = model_inputs(dev.batch_at(0))  # where the masked and the dense student must agree
    total = max(1, round(ts.epochs * train.steps_per_epoch))

    run = _new_run(recipe, teacher, regression, total, ranks.world)
    autocast = precision_context(run.precision)

    checkpoints = out / "checkpoints"
    found = sorted(checkpoints.glob("step-*.pt")) if resume else []
    if resume and not found:
        logger.warning("--resume: no checkpoint under %s; starting a new run", checkpoints)
    if found:
        _load_checkpoint(found[-1], run, recipe, total, probe, ranks.rank)
        logger.info("resumed from %s (step %d of %d)", found[-1], run.step, total)
    elif run.pruner is not None and recipe.pruning.schedule == "one_shot":
        _score_once(run, teacher, train, recipe, need_attn, ranks, autocast)
    resumed_from = run.step
    log_path = out / "train_log.jsonl"
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not found:
            log_path.unlink(missing_ok=True)
        else:  # records after the checkpoint are about to be redone
            kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= run.step] if log_path.exists() else []
            atomic_write_text(log_path, "".join(line + "\n" for line in kept))
        atomic_write_text(out / "recipe.resolved.yaml", resolved_header() + recipe.resolved_yaml())

    teacher_dev = evaluate(teacher, dev, data.task)
    logger.info("teacher dev %s", teacher_dev)
    setting = TaskSetting(recipe, out, teacher, tokenizer, data, dev, teacher_dev, plan)
    eval_every = recipe.training.eval_every or train.steps_per_epoch
    run.clock = TrainingClock(run.clock.before, run.step)  # counts from here: setup and the teacher's dev scores are not training
    while run.step < total:
        step = run.step
        t0 = time.time()
        batch, share = ranks.shard(train.batch_at(step))
        with torch.no_grad(), autocast():
            t_out = forward(teacher, batch, need_attn)
        with autocast():
            value, terms = run.loss(forward(run.student, batch, need_attn), t_out, batch["attention_mask"], batch["labels"], run.kept_heads())
        (value * share).backward()
        ranks.sum_gradients(list(run.named_parameters().values()))
        changed = run.pruner.after_backward(step) if run.pruner is not None and not run.dense else False
        if recipe.optimizer.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(run.named_parameters().values()), recipe.optimizer.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.pruner is not None and not run.dense:
            run.pruner.after_optimizer_step()
            if changed and ts.family:
                keep_family_member(run, setting, step + 1, ranks)
            if recipe.pruning.materialize and run.pruner.reached_target(step):
                run.step = step + 1
                to_dense(run, recipe, total, probe)
            elif changed and recipe.pruning.materialize_at is not None and run.pruner.worth_rebasing(recipe.pruning.materialize_at):
                run.step = step + 1
                to_dense(run, recipe, total, probe, final=False)
        run.step = done = step + 1
        figures = ranks.sum_values({"loss": float(value.detach()) * share, **{f"loss_{k}": float(v.detach()) * share for k, v in terms.items()}})
        record: dict[str, Any] = {"step": done, "total": total, **figures, "lr": run.scheduler.get_last_lr()[0], "step_s": time.time() - t0,
                                  "dense": run.dense}
        if run.pruner is not None:
            record["widths"] = run.pruner.widths().as_dict()
        if done % eval_every == 0 or done == total:
            metrics = evaluate(run.student, dev, data.task)
            record["dev"] = metrics
            run.curve.append({"step": done, "widths": record.get("widths"), "dev": metrics})
            if ts.keep_best:
                keep_if_best(run, setting, done, metrics, ranks)
        ce = recipe.training.checkpoint_every
        if (ce and done % ce == 0) or done == total:
            _save_checkpoint(checkpoints, run, recipe, ranks)
        if ranks.is_main and (done % recipe.training.log_every == 0 or done == total or "dev" in record):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if on_log is not None:
                on_log(record)
    report = _finish(run, setting, total, resumed_from) if ranks.is_main else {}
    ranks.barrier()
    return report


def keep_family_member(run: TaskRun, setting: TaskSetting, step: int, ranks: Ranks) -> None:
    """Keep the current (masked) student as a dense model under ``OUT/family`` once it is at or below a requested
    hidden size (``task.family``).

    The schedule passes through every width, so one run leaves a family of students. A width that a stock
    config cannot express (heads x head_dim != hidden) waits for the next mask update.
    """
    assert run.pruner is not None and setting.recipe.task is not None
    widths = run.pruner.widths()
    served = {r for member in run.family for r in member["requested_hidden"]}
    due = [h for h in setting.recipe.task.family if h not in served and widths.hidden <= h]
    if not due or not widths.is_stock or widths == run.pruner.target:
        return
    dense = run.pruner.materialize()
    metrics = evaluate(dense, setting.dev, setting.data.task)
    path = setting.out / "family" / f"h{widths.hidden}-a{widths.heads}-f{widths.ffn}"
    if ranks.is_main:  # every process keeps the record (identical students); one writes the files
        with staging_dir(path, overwrite=True) as tmp:
            save_student(dense, tmp, setting.tokenizer)
    run.family.append({"requested_hidden": sorted(due), "step": step, "path": str(path), "dev": metrics,
                       **parameter_report(dense, widths)})
    logger.info("kept %s at step %d: dev %s", widths, step, metrics)


BEST_DIR = "best-student"  # task.keep_best: the best student so far, under OUT until the run finishes


def keep_if_best(run: TaskRun, setting: TaskSetting, step: int, metrics: dict[str, float], ranks: Ranks) -> None:
    """With ``task.keep_best``: save the student under ``OUT/best-student`` when it is at the final width and scores
    above every earlier evaluation there (the first of equal scores stays; ``_finish`` ships the last step's student
    when it ties the best, as it needs no copy)."""
    at_final = run.pruner is None or run.dense or run.pruner.widths() == run.pruner.target
    primary = setting.data.task.primary_metric
    if not at_final or (run.best is not None and metrics[primary] <= run.best["dev"][primary]):
        return
    dense = run.student if run.pruner is None or run.dense else run.pruner.materialize()
    if ranks.is_main:
        with staging_dir(setting.out / BEST_DIR, overwrite=True) as tmp:
            save_student(dense, tmp, setting.tokenizer)
    run.best = {"step": step, "dev": metrics}
    logger.info("best dev %s at the final width so far: step %d", metrics, step)


def deployed_score(member: dict[str, Any], metric: str) -> float:
    """A family member's dev score as it ships: its int8 ONNX file's when it was exported, else PyTorch's."""
    return (member.get("int8") or member)["dev"][metric]


def select_within_drop(members: list[dict[str, Any]], teacher_dev: float, metric: str, max_drop: float,
                       fits: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The narrowest member whose dev score (:func:`deployed_score`) is within ``max_drop`` points of the teacher's
    and, under a budget, that ``fits`` it (None when none is). ``over_budget`` names the narrowest member within the
    drop that the budget ruled out, if that is why none was chosen."""
    within = [m for m in members if teacher_dev - deployed_score(m, metric) <= max_drop]
    allowed = [m for m in within if fits is None or fits(m)]
    chosen = min(allowed, key=lambda m: m["parameters"]) if allowed else None
    over = min(within, key=lambda m: m["parameters"]) if within and not allowed else None
    return {"max_drop": max_drop, "metric": metric, "scored": "int8 ONNX" if all(m.get("int8") for m in members) else "PyTorch",
            "chosen": chosen["path"] if chosen else None, "met": chosen is not None,
            "best_drop": min(teacher_dev - deployed_score(m, metric) for m in members),
            "over_budget": over["path"] if over else None}


def latency_check(plan: dict[str, Any] | None, deployed: dict[str, Any] | None, seq: int) -> dict[str, Any] | None:
    """The deployed int8 file's p50 (timed after training at batch 1 / ``seq`` tokens) against the plan's latency
    limit: the plan chose the shape from measurements of untrained candidates, this times the file that ships. None
    without a latency budget or a timed export."""
    if not plan or not plan.get("budget") or not deployed or deployed.get("p50_ms") is None:
        return None
    from homoexport.deployment.budget import parse_budget

    latency = next((c for c in parse_budget(plan["budget"]) if c.kind == "latency"), None)
    if latency is None:
        return None
    met = deployed["p50_ms"] <= latency.limit
    predicted = (plan.get("chosen") or {}).get("predicted", {}).get("p50_ms")
    if not met:
        logger.warning("the deployed int8 file times %.2f ms at batch 1 / seq %d, over the budget %s (the plan predicted %s ms)",
                       deployed["p50_ms"], seq, latency.text, predicted)
    return {"budget": latency.text, "limit_ms": latency.limit, "p50_ms": deployed["p50_ms"], "predicted_p50_ms": predicted, "seq": seq,
            "met": met}


def within_plan(plan: dict[str, Any] | None) -> Callable[[dict[str, Any]], bool] | None:
    """Under a measured budget, whether a member fits it: the plan chose the largest shape that fits, so a member
    fits when no width (or depth) exceeds the chosen shape's. None without a plan."""
    if not plan or not plan.get("chosen"):
        return None
    chosen = plan["chosen"]
    return lambda m: m["layers"] <= chosen["layers"] and all(m["widths"][k] <= chosen[k] for k in ("hidden", "heads", "ffn"))


def _score_once(run: TaskRun, teacher: nn.Module, train: TaskBatcher, recipe: Recipe, need_attn: bool, ranks: Ranks,
                autocast: Callable[[], ContextManager]) -> None:
    """One-shot pruning: importance from ``score_batches`` batches of the objective, then the target at once."""
    assert run.pruner is not None
    for step in range(recipe.pruning.score_batches):
        batch, share = ranks.shard(train.batch_at(step))
        with torch.no_grad(), autocast():
            t_out = forward(teacher, batch, need_attn)
        with autocast():
            value, _ = run.loss(forward(run.student, batch, need_attn), t_out, batch["attention_mask"], batch["labels"], run.kept_heads())
        (value * share).backward()
        ranks.sum_gradients(list(run.named_parameters().values()))
        run.pruner.importance.update()
        run.student.zero_grad(set_to_none=True)
        run.loss.zero_grad(set_to_none=True)
    run.pruner.prune_to_target()


def _export_and_score(student: Path, export_dir: Path, data: TaskData, spec: TaskSpec) -> dict[str, Any]:
    """Export ``student`` as a deployment would (optimum ONNX, O2, dynamic int8; the int8 gate on the dev inputs) to
    ``export_dir`` and score the int8 file on dev."""
    from datasets import DatasetDict

    from homoexport.deployment.bench import file_size_bytes
    from homoexport.deployment.budget import MB
    from homoexport.deployment.export import QUANTIZED_FILE, VALIDATION_ROWS, ExportSettings, export_model
    from homoexport.evaluation.glue import evaluate_onnx
    from homoexport.evaluation.glue_data import input_texts

    logger.info("exporting %s to %s and scoring the int8 file on dev", student, export_dir)
    settings = ExportSettings(task="text-classification", validation_texts=input_texts(data.dev, VALIDATION_ROWS), keep_fp32=tuple(spec.keep_fp32))
    export = export_model(student, export_dir, settings, overwrite=True)
    path = export_dir / QUANTIZED_FILE
    result = evaluate_onnx(path, data.task, DatasetDict({data.task.primary_split: data.dev}), max_length=spec.max_length)
    metrics = {k: 100 * v for k, v in result.metrics[data.task.primary_split].items()}
    return {"student": str(student), "path": str(path), "dev": metrics, "file_mb": round(file_size_bytes(path) / MB, 2),
            "dev_latency": result.latency.get(data.task.primary_split), "int8_build": export.get("quantization", {}).get("order")}


def export_family(members: list[dict[str, Any]], out: Path, data: TaskData, spec: TaskSpec) -> None:
    """Export every member to int8 ONNX (the final student to OUT/export, a kept one to its own ``export/``), score
    each file on dev, and time them side by side (batch 1, ``max_length`` tokens): the width-vs-score-vs-latency curve."""
    from homoexport.deployment.export import interleaved_p50

    for m in members:
        final = m["path"] == str(out / "student")
        m["int8"] = _export_and_score(Path(m["path"]), out / "export" if final else Path(m["path"]) / "export", data, spec)
    p50 = interleaved_p50({m["path"]: Path(m["int8"]["path"]) for m in members}, seq=spec.max_length, threads=None)
    for m in members:
        m["int8"]["p50_ms"] = round(p50[m["path"]], 3)


def deploy(members: list[dict[str, Any]], out: Path, data: TaskData, spec: TaskSpec, teacher_score: float,
           plan: dict[str, Any] | None) -> dict[str, Any]:
    """Export the students (``task.export``), choose the one that ships (``task.max_drop``, within the plan) and time
    it against the budget: the report's ``family``, ``selection``, ``deployed`` and ``latency_check``."""
    if spec.export:
        export_family(members, out, data, spec)
    primary = data.task.primary_metric
    selection = select_within_drop(members, teacher_score, primary, spec.max_drop, within_plan(plan)) if spec.max_drop else None
    if selection is not None and not selection["met"]:
        if selection["over_budget"]:
            logger.warning("no student within the budget %s is within %.2f points of the teacher (%s is, but it is over the budget): "
                           "deploying the final one", plan and plan.get("budget"), selection["max_drop"], selection["over_budget"])
        else:
            logger.warning("no student is within %.2f points of the teacher (best drop %.2f): deploying the final one",
                           selection["max_drop"], selection["best_drop"])
    deployed_path = selection["chosen"] if selection and selection["met"] else str(out / "student")
    deployed = next((m.get("int8") for m in members if m["path"] == deployed_path), None)
    return {"family": members, "selection": selection, "deployed": deployed, "latency_check": latency_check(plan, deployed, spec.max_length)}


def export_again(report: dict[str, Any], recipe: Recipe, out: Path) -> dict[str, Any]:
    """A finished run whose ``task.keep_fp32`` is not the one its files were exported with: export and score its
    students again and choose the one that ships again (nothing trained changes), then rewrite the report and the
    resolved recipe."""
    from transformers import AutoConfig

    assert recipe.task is not None
    config = AutoConfig.from_pretrained(out / "student")
    dev_only = recipe.model_copy(update={"task": recipe.task.model_copy(update={"unlabelled": [], "augment": None})})
    data = load_task_data(dev_only, label_names(config), config.num_labels == 1)
    was = Path(report["student"]["path"]).parent  # where the run was written: it may have moved, or be spelled otherwise now

    def here(path: str) -> str:
        return str(out / Path(path).relative_to(was)) if Path(path).is_relative_to(was) else path

    members = [{**{k: v for k, v in m.items() if k != "int8"}, "path": here(m["path"])} for m in report["family"]]
    teacher_score = report["teacher"]["dev"][report["primary_metric"]]
    report = {**report, "homoexport_version": __version__, "student": {**report["student"], "path": str(out / "student")},
              **deploy(members, out, data, recipe.task, teacher_score, report.get("plan")), "machine": fingerprint()}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "recipe.resolved.yaml", resolved_header() + recipe.resolved_yaml())
    return report


def _finish(run: TaskRun, setting: TaskSetting, total: int, resumed_from: int) -> dict[str, Any]:
    """Materialise (if still masked), check parity, score, save the student and the report."""
    recipe, out, data, dev, teacher_dev, plan = setting.recipe, setting.out, setting.data, setting.dev, setting.teacher_dev, setting.plan
    assert recipe.task is not None
    parity = run.parity  # the largest at the loop's switches to a materialised student
    if run.pruner is not None and not run.dense:
        dense, last = run.pruner.materialize_checked(model_inputs(dev.batch_at(0)))
        parity = max(last, parity or 0.0)
    else:
        dense = run.student
    dense = dense.eval()
    # The loop scored the last step already; the dense student computes what was scored (parity above).
    last = run.curve[-1] if run.curve else None
    student_dev = last["dev"] if last is not None and last["step"] == total else evaluate(dense, dev, data.task)
    primary = data.task.primary_metric
    best = out / BEST_DIR
    keep = run.best is not None and run.best["step"] != total and run.best["dev"][primary] > student_dev[primary]
    selected = {"rule": "best dev at the final width", "step": run.best["step"] if keep else total, "last_step_dev": student_dev} \
        if recipe.task.keep_best and run.best is not None else None
    with staging_dir(out / "student", overwrite=True) as tmp:
        if keep:
            shutil.copytree(best, tmp, dirs_exist_ok=True)
        else:
            save_student(dense, tmp, setting.tokenizer)
    shutil.rmtree(best, ignore_errors=True)
    if keep:
        assert run.best is not None
        student_dev = run.best["dev"]
        logger.info("deploying the best student at the final width (step %d, dev %s) over the last one (dev %s)", run.best["step"],
                    student_dev, selected and selected["last_step_dev"])
    members = [*run.family, {"requested_hidden": [], "step": selected["step"] if selected else total, "path": str(out / "student"),
                             "dev": student_dev, **parameter_report(dense, config_widths(dense.config))}]
    served = {h for m in members for h in m["requested_hidden"]}
    skipped = sorted(h for h in recipe.task.family if h not in served and h > dense.config.hidden_size)
    if skipped:
        logger.warning("task.family: no student was kept at hidden <= %s: the schedule passed those widths in one mask update "
                       "(a smaller pruning.interval or more steps make more stops)", ", ".join(map(str, skipped)))
    deployment = deploy(members, out, data, recipe.task, teacher_dev[primary], plan)
    report = {
        "schema": REPORT_SCHEMA,
        "homoexport_version": __version__,
        "recipe": recipe.name,
        "task": data.task.name if data.task.name != "custom" else "custom",
        "data": {"source": data.source, "train_rows": len(data.train), "unlabelled_rows": data.unlabelled - data.word_swapped,
                 "word_swapped_rows": data.word_swapped, "dev_rows": len(data.dev)},
        "teacher": {"path": recipe.teacher, "dev": teacher_dev, **parameter_report(setting.teacher, config_widths(setting.teacher.config))},
        "student": {"path": str(out / "student"), "dev": student_dev, **parameter_report(dense, config_widths(dense.config))},
        "primary_metric": primary,
        "dev_drop": teacher_dev[primary] - student_dev[primary],
        "deployed": deployment["deployed"],
        "curve": run.curve,
        "family": deployment["family"],
        "family_skipped": skipped,
        "keep_best": selected,
        "selection": deployment["selection"],
        "latency_check": deployment["latency_check"],
        "plan": plan,
        "steps": total,
        "epochs": recipe.task.epochs,
        "resumed_from_step": resumed_from or None,
        **run.clock.report(),
        "processes": run.processes,
        "precision": run.precision,
        "active_loss_terms": run.loss.active_terms,
        "parity_max_abs_diff": parity,
        "machine": fingerprint(),
    }
    atomic_write_json(out / "report.json", report)
    if not recipe.training.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return report
