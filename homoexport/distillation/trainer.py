"""HomoDistil training on accelerate: distill while pruning, checkpoint atomically, resume exactly.

One step, for every micro-batch of this rank's share of the global batch:
teacher forward (no grad) -> student forward -> loss -> backward; then importance update from the
final (all-reduced) gradients, a mask update on schedule steps, the optimizer step, and re-zeroing of
pruned weights. The same code runs on one CPU process, several gloo processes, or GPUs and nodes under
``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from homoexport import __version__
from homoexport.atomic import atomic_write_json, atomic_write_text, staging_dir
from homoexport.config.recipe import OptimizerSpec, Recipe, steps_of
from homoexport.distillation.checkpoint import (
    TrainingClock,
    check_run_dir,
    check_same_precision,
    check_same_recipe,
    finished_report,
    latest_checkpoint,
    resolved_header,
    resumable_fields,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from homoexport.distillation.data import BlockBatcher
from homoexport.distillation.dense import carry_optimizer_state
from homoexport.distillation.losses import SENTENCE_TERMS, DistillationLoss, EncoderOutputs, pooled_cosine
from homoexport.distillation.models import base_and_head, build_student, encode
from homoexport.distillation.precision import precision_context, resolve_precision
from homoexport.distillation.sentence_targets import pooled_by_length
from homoexport.distillation.setup import NO_MLM_NOTE, CorpusSetup, build_corpus_setup
from homoexport.errors import UsageError
from homoexport.evaluation.sts import carry_pooling
from homoexport.machine import fingerprint
from homoexport.pruning.mask_groups import (
    KeptHeads,
    MaskedModel,
    Masks,
    Widths,
    config_widths,
    target_widths,
)
from homoexport.pruning.pruner import HomoDistilPruner, PrunerSettings, stages
from homoexport.pruning.surgery import materialize, model_inputs, parameter_report, save_student

logger = logging.getLogger(__name__)

class DistillModule(nn.Module):
    """Student + loss projections as one module, so data parallelism syncs both in one all-reduce."""

    def __init__(self, student: nn.Module, loss: DistillationLoss, relation_layer: int | None):
        super().__init__()
        self.student = student
        self.loss = loss
        self.relation_layer = relation_layer

    def forward(self, batch: dict[str, torch.Tensor], teacher_out, kept_heads: torch.Tensor | None):
        inputs, mlm_positions = student_inputs(batch, self.loss.uses_mlm)
        if self.loss.sentence_only:  # nothing but the pooled embedding is read: encode rows of like length together
            out = EncoderOutputs(hidden=(), sentence=pooled_by_length(base_and_head(self.student)[0], inputs, mode=self.loss.pooling))
            return self.loss(out, teacher_out, inputs["attention_mask"], None, kept_heads)
        out = encode(self.student, inputs, attentions="attention" in self.loss.active_terms,
                     mlm_positions=mlm_positions, relation_layer=self.relation_layer)
        labels = batch["mlm_labels"][mlm_positions] if mlm_positions is not None else None
        return self.loss(out, teacher_out, inputs["attention_mask"], labels, kept_heads)


def student_inputs(batch: dict[str, torch.Tensor], use_mlm: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Model inputs and the [B, T] masked-position mask: MLM-corrupted ids when MLM/KL are on."""
    ids = batch["mlm_input_ids"] if use_mlm else batch["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"]}
    return inputs, (batch["mlm_labels"] != -100) if use_mlm else None


@torch.no_grad()
def adamw(params: Any, o: OptimizerSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the device has one (CPU and CUDA): one pass per parameter
    instead of the default CPU loop of seven elementwise ops, a tenth of a CPU distillation step."""
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=device.type in ("cpu", "cuda"))


def teacher_outputs(teacher: nn.Module, batch: dict[str, torch.Tensor], loss: DistillationLoss, relation_layer: int | None,
                    sentences: torch.Tensor | None = None):
    """The teacher's view of the same (possibly corrupted) inputs the student sees; read from ``sentences`` (the
    teacher's embedding of every training row, by the batch's ``rows``) instead when they were computed beforehand."""
    if sentences is not None:
        return EncoderOutputs(hidden=(), sentence=sentences[batch["rows"]])
    use_mlm = loss.uses_mlm
    inputs, positions = student_inputs(batch, use_mlm)
    return encode(teacher, inputs, attentions="attention" in loss.active_terms,
                  mlm_positions=positions if "kl" in loss.active_terms else None, relation_layer=relation_layer)


def relation_layers(recipe: Recipe, teacher_layers: int) -> tuple[int | None, int | None]:
    """(student layer, teacher layer) for MiniLMv2 relation transfer, or (None, None) when off."""
    if recipe.losses.relation <= 0:
        return None, None
    return -1, recipe.losses.relation_teacher_layer % teacher_layers


def recipe_target(recipe: Recipe, full: Widths) -> Widths:
    """The recipe's student shape, defaulting unspecified widths to the teacher's."""
    return target_widths(full, recipe.student.hidden, recipe.student.heads, recipe.student.ffn)


@dataclass
class Optimized:
    """What the loop steps and the dense switch replaces: the prepared (possibly data-parallel) student + loss module,
    its unwrapped view, the optimizer and the schedule; and, once the student is dense, from which step and at what parity."""

    module: Any
    unwrapped: DistillModule
    optimizer: Any
    lr_scheduler: Any
    dense_from: int | None = None
    parity: float | None = None

    @property
    def dense(self) -> bool:
        return self.dense_from is not None


def _optimizer(module: DistillModule, o: OptimizerSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW over student and projections; no decay for biases, LayerNorms and embeddings."""
    named = list(module.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embeddings" not in n)]
    return adamw([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], o, device)


def _scheduler(optimizer, o: OptimizerSpec, total: int):
    from transformers import get_scheduler

    return get_scheduler(o.scheduler, optimizer, num_warmup_steps=steps_of(o.warmup, total), num_training_steps=total)


def _to_dense(opt: Optimized, pruner: HomoDistilPruner, recipe: Recipe, accelerator, step: int, probe: dict[str, torch.Tensor],
              final: bool = True) -> None:
    """Continue on the materialised student (parity-checked on ``probe``), with the loss projections and the optimizer
    state cut to the kept units and the schedule where it was: from here a step costs what the smaller model costs.
    ``final``: the target is reached for good; else pruning goes on over the smaller model (``pruning.materialize_at``)."""
    raw = getattr(opt.optimizer, "optimizer", opt.optimizer)  # accelerate wraps the torch optimizer
    old_state = {n: raw.state.get(p, {}) for n, p in opt.unwrapped.named_parameters()}
    old_lrs = [g["lr"] for g in raw.param_groups]
    sched_state = opt.lr_scheduler.state_dict()
    dense, parity = pruner.materialize_checked(probe)
    opt.parity = max(parity, opt.parity or 0.0)
    loss = opt.unwrapped.loss
    loss.keep_student_dims(pruner.masks.hidden.nonzero().flatten())
    module = DistillModule(dense.to(accelerator.device).train().requires_grad_(True), loss, opt.unwrapped.relation_layer)
    optimizer = _optimizer(module, recipe.optimizer, accelerator.device)
    carry_optimizer_state(pruner, old_state, optimizer, dict(module.named_parameters()))
    pruner.rebase(module.student, final)
    opt.lr_scheduler = _scheduler(optimizer, recipe.optimizer, recipe.training.steps)
    opt.lr_scheduler.load_state_dict(sched_state)
    for group, lr in zip(optimizer.param_groups, old_lrs):
        group["lr"] = lr
    # accelerate keeps every prepared model and optimizer; without this the full-width student and its Adam moments
    # stay in memory for the rest of the run. Nothing else is prepared (the teacher and the data are not).
    accelerator.free_memory()
    opt.module, opt.optimizer = accelerator.prepare(module, optimizer)
    opt.unwrapped = accelerator.unwrap_model(opt.module)
    if final:
        opt.dense_from = step
    logger.info("continuing on the %s student %s from step %d", "dense" if final else "materialised", pruner.widths(), step)


@dataclass
class AgnosticRun:
    """What the task-agnostic loop trains and reports on: the student + loss module and its optimizer, its pruner,
    the data setup, the relation layer, and where the run stands."""

    opt: Optimized
    pruner: HomoDistilPruner | None
    setup: CorpusSetup
    teacher_relation_layer: int | None
    start: int
    total: int
    last_terms: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # of the forward passes and losses (training.precision resolved); weights stay fp32

    def kept_heads(self) -> KeptHeads | None:
        return self.pruner.kept_heads() if self.pruner is not None else None


@dataclass
class RunPaths:
    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def log(self) -> Path:
        return self.out / "train_log.jsonl"


def _evaluate(module: DistillModule, teacher: nn.Module, batcher: BlockBatcher | None, steps: int, kept_heads,
              teacher_relation_layer: int | None) -> dict[str, float]:
    """Held-out loss terms, cosine of mean-pooled (projected) last hidden states to the teacher's, and
    MLM accuracy when the student predicts masked tokens. Uses the unwrapped module: no collectives."""
    if batcher is None:
        return {}
    student, loss_fn = module.student, module.loss
    device = next(student.parameters()).device
    use_mlm = loss_fn.uses_mlm
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    correct = total = 0
    with torch.no_grad():
        for step in range(steps):
            batch = {k: v.to(device) for k, v in batcher.batch_at(step).items()}
            inputs, positions = student_inputs(batch, use_mlm)
            t_out = teacher_outputs(teacher, batch, loss_fn, teacher_relation_layer)
            s_out = encode(student, inputs, attentions="attention" in loss_fn.active_terms, mlm_positions=positions,
                           relation_layer=module.relation_layer)
            labels = batch["mlm_labels"][positions] if positions is not None else None
            loss, terms = loss_fn(s_out, t_out, inputs["attention_mask"], labels, kept_heads)
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if positions is not None and s_out.mlm_logits is not None:
                correct += int((s_out.mlm_logits.argmax(-1) == labels).sum())
                total += int(positions.sum())
            cos = pooled_cosine(loss_fn.hidden_proj[-1](s_out.hidden[-1]), t_out.hidden[-1], inputs["attention_mask"], loss_fn.pooling)
            sums["cosine_to_teacher"] = sums.get("cosine_to_teacher", 0.0) + float(cos)
    student.train(was_training)
    out = {f"eval_{k}": v / steps for k, v in sums.items()}
    if total:
        out["eval_mlm_accuracy"] = correct / total
    return out


def distill(
    recipe: Recipe,
    out_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plan: dict | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Run a recipe end to end; returns the report (also written to ``out_dir/report.json``).

    ``on_log`` receives every logged record (``step``, ``total``, loss terms, widths, evaluation) after
    that step's checkpoint, if any, was written. The student appears in ``out_dir/student`` only once it
    passed the parity check, via a staging directory.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    out = RunPaths(Path(out_dir) if out_dir else recipe.output_dir())
    check_run_dir(out.out, resume, overwrite)
    # Some parameters get no gradient by design (the pooler; the MLM head or projections of inactive terms).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # Precision is the recipe's, applied by precision_context as in the task loop, not by accelerate's mixed_precision:
    # accelerate keeps that setting in a process-wide singleton that refuses a second run at another precision.
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    precision = resolve_precision(recipe.training.precision, accelerator.device)
    autocast = precision_context(precision, accelerator.device.type)
    world, rank = accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    if overwrite and is_main and out.out.exists():
        # Replace the old run entirely: its checkpoints would otherwise be picked up by a later --resume.
        shutil.rmtree(out.out)
    accelerator.wait_for_everyone()
    set_seed(recipe.training.seed)

    # Teacher, tokenizer, data.
    setup = build_corpus_setup(recipe, accelerator.main_process_first, note=is_main, device=accelerator.device, precision=precision,
                               sentence_targets=True)
    teacher, has_mlm = setup.teacher, setup.has_mlm
    sentences = setup.sentences.to(accelerator.device) if setup.sentences is not None else None
    batcher, eval_batcher, eval_steps = setup.batcher, setup.eval_batcher, setup.eval_steps

    # Student and schedule.
    c, t = teacher.config, recipe.student
    random_widths = {"hidden": t.hidden or c.hidden_size, "heads": t.heads or c.num_attention_heads, "ffn": t.ffn or c.intermediate_size}
    student = build_student(teacher, recipe.init, t.layers, recipe.truncate_layers,
                            widths=random_widths if recipe.init == "random" else None, seed=recipe.training.seed)
    pruner: HomoDistilPruner | None = None
    total = recipe.training.steps
    if recipe.pruning.schedule != "none" and recipe.init != "random":
        pruner = HomoDistilPruner(student, recipe_target(recipe, config_widths(student.config)), pruner_settings(recipe, total),
                                  verify=lambda masks: _check_same_on_all_ranks(accelerator, masks))
    student.requires_grad_(True).train()
    s_rel, t_rel = relation_layers(recipe, teacher.config.num_hidden_layers)
    loss_fn = DistillationLoss(recipe.losses, student.config.hidden_size, teacher.config.hidden_size,
                               student.config.num_hidden_layers, teacher.config.num_hidden_layers, has_mlm, setup.pooling)
    module = DistillModule(student, loss_fn, s_rel)

    o = recipe.optimizer
    optimizer = _optimizer(module, o, accelerator.device)
    lr_scheduler = _scheduler(optimizer, o, total)
    module, optimizer = accelerator.prepare(module, optimizer)
    opt = Optimized(module, accelerator.unwrap_model(module), optimizer, lr_scheduler)
    del student, module, optimizer, lr_scheduler  # opt holds them, and the dense switch replaces them there
    probe = model_inputs((setup.eval_batcher or batcher).batch_at(0), accelerator.device)  # where masked and dense must agree

    micro = recipe.training.micro_batch_size or recipe.training.batch_size // world
    if recipe.training.batch_size % (world * micro):
        raise UsageError(f"training.batch_size {recipe.training.batch_size} is not a multiple of {world} processes x micro_batch_size {micro}")
    n_micro = recipe.training.batch_size // (world * micro)

    # Resume.
    start = 0
    before: float | None = 0.0  # training seconds up to the checkpoint resumed from (TrainingClock)
    if resume:
        finished = finished_report(out.out, recipe)
        if finished is not None:
            logger.info("%s already finished all %d steps: nothing to do (use --overwrite to train it again)", out.out, total)
            return finished
    ckpt = latest_checkpoint(out.checkpoints) if resume else None
    if resume and ckpt is None:
        logger.warning("--resume: no checkpoint under %s; starting a new run", out.checkpoints)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        check_same_recipe(state["recipe"], recipe, ckpt)
        check_same_precision(state.get("precision"), precision, recipe.training.precision, ckpt)
        if pruner is not None:
            dense = state.get("dense_from") is not None
            saved = {k: state[k] for k in ("stages", "masks", "importance") if k in state}
            replay = stages(saved, dense)
            for i, masks in enumerate(replay):  # the smaller students the run went on over, in order
                pruner.masked.set_masks(masks)
                final = dense and i == len(replay) - 1
                _to_dense(opt, pruner, recipe, accelerator, state["dense_from"] if final else state["step"], probe, final)
            pruner.load_state_dict(saved, dense)
            opt.parity = state["parity"]
        opt.unwrapped.load_state_dict(state["module"])
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start, before = state["step"], state.get("elapsed_s")
    elif pruner is not None and recipe.pruning.schedule == "one_shot":
        _score_and_prune_once(opt.module, opt.unwrapped, teacher, batcher, pruner, recipe, (n_micro, world, rank), accelerator, t_rel,
                              autocast, sentences)
    if is_main:
        out.out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            out.log.unlink(missing_ok=True)
        elif out.log.exists():  # drop records of steps after the checkpoint: they are about to be redone
            kept = [line for line in out.log.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            atomic_write_text(out.log, "".join(line + "\n" for line in kept))
        atomic_write_text(out.out / "recipe.resolved.yaml", resolved_header() + recipe.resolved_yaml())

    def kept_heads() -> KeptHeads | None:
        return pruner.kept_heads() if pruner is not None else None

    tokens_per_step = round(recipe.training.batch_size * batcher.tokens_per_row)  # sentence rows: padding not counted
    clock = TrainingClock(before, start)
    last_terms: dict[str, float] = {}
    if start:
        logger.info("resumed from %s at step %d of %d", ckpt, start, total)
    for step in range(start, total):
        t0 = time.time()
        module = opt.module
        module.train()
        batches = batcher.micro_batches(step, n_micro, rank, world)
        terms_sum: dict[str, float] = {}
        for i, mb in enumerate(batches):
            mb = {k: v.to(accelerator.device) for k, v in mb.items()}
            with torch.no_grad(), autocast():
                t_out = teacher_outputs(teacher, mb, opt.unwrapped.loss, t_rel, sentences)
            ctx = accelerator.no_sync(module) if i < n_micro - 1 else contextlib.nullcontext()
            with ctx:
                with autocast():  # the backward stays outside autocast, as torch.amp prescribes
                    loss, terms = module(mb, t_out, kept_heads())
                accelerator.backward(loss / n_micro)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / n_micro
        masking = pruner is not None and not opt.dense
        changed = pruner.after_backward(step) if masking else False
        if o.max_grad_norm > 0:
            accelerator.clip_grad_norm_(module.parameters(), o.max_grad_norm)
        opt.optimizer.step()
        opt.lr_scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if masking:
            pruner.after_optimizer_step()
            if recipe.pruning.materialize and pruner.reached_target(step):
                _to_dense(opt, pruner, recipe, accelerator, done, probe)
            elif changed and recipe.pruning.materialize_at is not None and pruner.worth_rebasing(recipe.pruning.materialize_at):
                _to_dense(opt, pruner, recipe, accelerator, done, probe, final=False)
        last_terms = _all_reduce_mean(accelerator, terms_sum)
        record = {"step": done, "total": total, "loss": sum(last_terms.get(k, 0) * w for k, w in opt.unwrapped.loss.active_terms.items()),
                  **{f"loss_{k}": v for k, v in last_terms.items()}, "lr": opt.lr_scheduler.get_last_lr()[0],
                  "tokens_per_s": tokens_per_step / max(time.time() - t0, 1e-9), "step_s": time.time() - t0,
                  "elapsed_s": round(clock.since_start(), 1),
                  **({"widths": pruner.widths().as_dict(), "dense": opt.dense} if pruner is not None else {})}
        ev = recipe.training.eval_every
        if ev and done % ev == 0 and done < total and is_main:
            record.update(_evaluate(opt.unwrapped, teacher, eval_batcher, eval_steps, kept_heads(), t_rel))
        ce = recipe.training.checkpoint_every
        if (ce and done % ce == 0) or done == total:
            _checkpoint(accelerator, out, done, recipe, opt, pruner, precision, clock.elapsed())
        se = recipe.training.snapshot_every
        if se and done % se == 0 and done < total and is_main and (pruner is None or pruner.widths().is_stock):
            _snapshot(out.out / "snapshots" / f"step-{done:08d}", opt.unwrapped.student, None if pruner is None or opt.dense else pruner.masked,
                      setup.tokenizer, recipe)
        if is_main and (done % recipe.training.log_every == 0 or done == total or "eval_loss" in record):
            with open(out.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if on_log:
                on_log(record)

    run = AgnosticRun(opt, pruner, setup, t_rel, start, total, last_terms, precision)
    return _finish(recipe, out, accelerator, run, clock, tokens_per_step, plan)


def _snapshot(path: Path, student: nn.Module, masked: MaskedModel | None, tokenizer, recipe: Recipe) -> None:
    """The student as it is at this step, materialised and saved like the final one (pooling files included)."""
    was_training = student.training
    dense = (materialize(masked) if masked is not None else copy.deepcopy(student)).cpu().eval()
    with staging_dir(path, overwrite=True) as tmp:
        save_student(dense, tmp, tokenizer)
        carry_pooling(recipe.teacher, tmp, dense.config.hidden_size, recipe.data.block_size)
    student.train(was_training)


def _check_same_on_all_ranks(accelerator, masks: Masks) -> None:
    """Scores come from all-reduced gradients, so every rank must choose the same units; verify it."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([m.flatten().to(torch.uint8) for m in masks.tensors()]).to(accelerator.device)
    gathered = accelerator.gather(flat).view(accelerator.num_processes, -1)
    if not (gathered == gathered[0]).all():
        raise RuntimeError("data-parallel ranks chose different units to prune: importance scores diverged")


def _all_reduce_mean(accelerator, terms: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not terms:
        return terms
    keys = sorted(terms)
    t = torch.tensor([terms[k] for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def _checkpoint(accelerator, out: RunPaths, step: int, recipe: Recipe, opt: Optimized, pruner: HomoDistilPruner | None, precision: str,
                elapsed_s: float | None) -> None:
    """Save everything needed to continue exactly: weights, projections, optimizer, schedule, masks,
    importance state, every rank's RNG. Data position is the step (batches are a function of it)."""
    rngs = [rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state()])
    if accelerator.is_main_process:
        state = {"step": step, "recipe": resumable_fields(recipe), "precision": precision, "module": opt.unwrapped.state_dict(),
                 "optimizer": opt.optimizer.state_dict(), "lr_scheduler": opt.lr_scheduler.state_dict(), "rng": rngs,
                 "dense_from": opt.dense_from, "parity": opt.parity, "elapsed_s": elapsed_s,
                 "stages": [m.state_dict() for m in pruner.stages] if pruner is not None else None,
                 "masks": pruner.masks.state_dict() if pruner is not None else None,
                 "importance": pruner.importance.state_dict() if pruner is not None else None}
        save_checkpoint(out.checkpoints / f"step-{step:08d}.pt", state)
        for old in sorted(out.checkpoints.glob("step-*.pt"))[:-1]:  # resume needs only the newest
            old.unlink()
    accelerator.wait_for_everyone()


def _score_and_prune_once(module, unwrapped, teacher, batcher, pruner: HomoDistilPruner, recipe, shards: tuple[int, int, int], accelerator, t_rel,
                          autocast, sentences: torch.Tensor | None) -> None:
    """One-shot pruning: score importance on ``score_batches`` batches (no update), prune to target.
    ``shards`` is (micro-batches per step, processes, this rank)."""
    n_micro, world, rank = shards
    for step in range(recipe.pruning.score_batches):
        for mb in batcher.micro_batches(step, n_micro, rank, world):
            mb = {k: v.to(accelerator.device) for k, v in mb.items()}
            with torch.no_grad(), autocast():
                t_out = teacher_outputs(teacher, mb, unwrapped.loss, t_rel, sentences)
            with autocast():
                loss, _ = module(mb, t_out, pruner.kept_heads())
            accelerator.backward(loss / n_micro)
        pruner.importance.update()
        module.zero_grad(set_to_none=True)
    pruner.prune_to_target()


def pruner_settings(recipe: Recipe, total: int) -> PrunerSettings:
    """The recipe's pruning section as pruner settings over ``total`` steps."""
    p = recipe.pruning
    t_i, t_f = steps_of(p.t_i, total), steps_of(p.t_f, total)
    if p.schedule == "homotopic" and t_i + t_f > total:
        # Checked here, not only in the schedule, so that the message names the recipe's keys and values.
        raise UsageError(f"pruning.t_i ({p.t_i:g}: {t_i} steps) + pruning.t_f ({p.t_f:g}: {t_f} steps) exceed the run's {total} steps; "
                         "lower one of them (a value below 1 is a share of the steps)")
    return PrunerSettings(total_steps=total, schedule="one_shot" if p.schedule == "one_shot" else "homotopic", importance=p.importance,
                          beta1=p.beta1, beta2=p.beta2, t_i=t_i, t_f=t_f, interval=p.interval, multiple=p.multiple)


def _finish(recipe: Recipe, out: RunPaths, accelerator, run: AgnosticRun, clock: TrainingClock, tokens_per_step: int,
            plan: dict | None) -> dict[str, Any]:
    """Evaluate, materialise, check parity, save the student and the report (main process only)."""
    report: dict[str, Any] = {}
    setup, unwrapped = run.setup, run.opt.unwrapped
    teacher, has_mlm, start, total = setup.teacher, setup.has_mlm, run.start, run.total
    if accelerator.is_main_process:
        student = unwrapped.student
        student.eval()
        evaluation = _evaluate(unwrapped, teacher, setup.eval_batcher, setup.eval_steps, run.kept_heads(), run.teacher_relation_layer)
        if run.pruner is None:
            dense, parity = student, None
        elif run.opt.dense:
            dense, parity = student, run.opt.parity  # checked when the loop switched to it
        else:
            dense, parity = run.pruner.materialize_checked(model_inputs((setup.eval_batcher or setup.batcher).batch_at(0), accelerator.device))
            parity = max(parity, run.opt.parity or 0.0)  # and the loop's switches to a materialised student on the way down
        widths = run.pruner.widths() if run.pruner is not None else config_widths(student.config)
        dense = dense.cpu()
        with staging_dir(out.out / "student", overwrite=True) as tmp:
            save_student(dense, tmp, setup.tokenizer)
            carry_pooling(recipe.teacher, tmp, widths.hidden, recipe.data.block_size)
        active = unwrapped.loss.active_terms
        report = {
            "schema": "homoexport.distill/1",
            "homoexport_version": __version__,
            "recipe": recipe.name,
            "teacher": {"path": recipe.teacher, "has_mlm_head": has_mlm, **parameter_report(teacher, config_widths(teacher.config))},
            "student": {"path": str(out.out / "student"), **parameter_report(dense, widths)},
            "steps": total, "resumed_from_step": start or None,
            "tokens": total * tokens_per_step,
            **clock.report(),
            "grouping_s": setup.grouping_s,  # before step 1, not in wall_time_s
            "teacher_sentences_s": setup.sentences_s,  # the teacher's embedding of every row, before step 1, not in wall_time_s
            "sentence_pooling": setup.pooling if SENTENCE_TERMS & set(active) else None,  # what the sentence terms pooled
            "precision": run.precision,
            "processes": accelerator.num_processes,
            "final_loss_terms": run.last_terms,
            "active_loss_terms": active,
            "mlm_kl_active": "mlm" in active or "kl" in active,
            "mlm_kl_note": None if has_mlm else NO_MLM_NOTE,
            "parity_max_abs_diff": parity,
            "dense_from_step": run.opt.dense_from,  # steps after it trained the materialised student (pruning.materialize)
            "evaluation": evaluation,
            "plan": plan,
            "machine": fingerprint(),
        }
        atomic_write_json(out.out / "report.json", report)
        if not recipe.training.keep_checkpoints:
            shutil.rmtree(out.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report
