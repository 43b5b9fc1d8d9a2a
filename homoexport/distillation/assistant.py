"""Teacher assistants for extreme compression: MiniDisc's λ-tradeoff in one extra run (Zhang et al., 2024).

At extreme compression (a student of 5-10% of the teacher) the usual remedy is a teacher assistant
of intermediate width: teacher -> assistant -> student. Choosing its width normally costs one trial
distillation per candidate; MiniDisc picks it after a single *sandwich* run instead:

1. **Order units once.** A copy of the teacher is prepared as a masked student and every unit is
   scored on a few batches (sensitivity of the distillation loss). A width ``w`` keeps the top-``w``
   units of every group: ``shrink(Masks.full(layout), scores, w)`` with the same fixed scores, so the
   masks of all widths are nested and all widths share one set of weights (prefix slicing of the
   importance-sorted units).
2. **Sandwich.** Every step runs the shared student at the largest candidate, at the target (the
   smallest width) and at a few sampled candidates against the same teacher outputs, and sums their
   losses. Widths are switched per forward with :func:`masked_call`, which multiplies the weights by
   the width's masks inside the forward and never writes to them (``MaskedModel.set_masks`` zeroes the
   pruned weights for good, which would destroy the other widths' shared weights).
3. **λ-tradeoff.** Each candidate gets a quality on held-out blocks (``representation``: cosine of the
   mean-pooled last hidden states to the teacher's; ``mlm``: minus the MLM loss) and the score
   ``quality + λ · sparsity`` with ``sparsity = 1 - params(w) / params(teacher)``; higher is better
   and the best candidate becomes the assistant.
4. **Two stages** of ordinary HomoDistil with :func:`homoexport.distillation.trainer.distill`: teacher -> assistant
   into ``OUT/stage1-assistant``, then assistant -> final widths into ``OUT/stage2-student``.
   ``training.steps`` is split by ``assistant.stage1_fraction``; the sandwich steps are the one extra
   run. ``OUT/student`` is the final student, ``OUT/report.json`` holds the candidates table, the
   choice and both stages' reports.

Resume: the sandwich phase is not checkpointed; it is short and deterministic (seeded scoring,
step-addressed batches, per-step seeded width sampling), so a kill inside it redoes it from the start
with the same result. Its outcome is written atomically to ``OUT/sandwich.json`` and reused on
``resume``; a finished stage (its ``report.json`` exists) is skipped and an unfinished one resumes
from its newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from homoexport import __version__
from homoexport.atomic import atomic_write_json, staging_dir
from homoexport.config.recipe import AssistantSpec, Recipe, validate_recipe
from homoexport.deployment.budget import round_to
from homoexport.distillation.checkpoint import check_run_dir
from homoexport.distillation.losses import DistillationLoss, pooled_cosine
from homoexport.distillation.models import encode
from homoexport.distillation.precision import precision_context, resolve_precision
from homoexport.distillation.setup import build_corpus_setup
from homoexport.distillation.trainer import (
    DistillModule,
    adamw,
    recipe_target,
    relation_layers,
    student_inputs,
    teacher_outputs,
)
from homoexport.errors import UsageError
from homoexport.pruning.importance import ImportanceTracker
from homoexport.pruning.mask_groups import (
    MaskedModel,
    Masks,
    UnitScores,
    Widths,
    config_widths,
    prepare,
    shrink,
    tensor_masks,
)
from homoexport.pruning.surgery import closed_form_parameters
from homoexport.reporting.report import plot_tradeoff

SANDWICH_FILE = "sandwich.json"
STAGE1_DIR, STAGE2_DIR = "stage1-assistant", "stage2-student"
PLOT_FILE = "assistant_tradeoff.png"


# --- widths -----------------------------------------------------------------------------------------


def _ffn_between(full: Widths, target: Widths, hidden: int, multiple: int) -> int:
    """FFN size at the same relative position between target and teacher as ``hidden``."""
    r = (hidden - target.hidden) / (full.hidden - target.hidden) if full.hidden != target.hidden else 0.0
    return min(full.ffn, max(target.ffn, round_to(target.ffn + (full.ffn - target.ffn) * r, multiple)))


def check_assistant(widths: Widths, full: Widths, target: Widths) -> None:
    """An assistant must be a stock shape between target and teacher in every group (stage 2 prunes
    the assistant down to the target, and masks only ever shrink)."""
    if not widths.is_stock:
        raise UsageError(f"assistant {widths}: heads x head_dim must equal hidden")
    for name in ("hidden", "heads", "head_dim", "ffn"):
        w, lo, hi = getattr(widths, name), getattr(target, name), getattr(full, name)
        if not lo <= w <= hi:
            raise UsageError(f"assistant {name}={w} must lie between the target's {lo} and the teacher's {hi}")
    if widths == target or widths == full:
        raise UsageError(f"assistant {widths} equals the {'target' if widths == target else 'teacher'}: it must lie strictly between")


def assistant_widths(hidden: int, full: Widths, target: Widths, heads: int | None = None, ffn: int | None = None,
                     multiple: int = 8) -> Widths:
    """A validated assistant shape from ``hidden``; heads default to keeping the target's head_dim and
    ffn to the same relative position between target and teacher as ``hidden``."""
    if heads is None:
        if hidden % target.head_dim:
            raise UsageError(f"assistant hidden {hidden} is not a multiple of the target head_dim {target.head_dim}: give heads explicitly")
        heads = hidden // target.head_dim
    if hidden % heads:
        raise UsageError(f"assistant hidden ({hidden}) must be divisible by its heads ({heads})")
    widths = Widths(hidden, heads, hidden // heads, ffn if ffn is not None else _ffn_between(full, target, hidden, multiple))
    check_assistant(widths, full, target)
    return widths


def auto_candidates(full: Widths, target: Widths, count: int, multiple: int = 8) -> list[Widths]:
    """``count`` shapes evenly spaced in head count between target and teacher (head_dim of the
    target, ffn interpolated alongside), widest first; duplicates and the endpoints are dropped."""
    if target.head_dim > full.head_dim:
        raise UsageError(f"target head_dim {target.head_dim} exceeds the teacher's {full.head_dim}")
    found: list[Widths] = []
    for i in range(count, 0, -1):
        heads = target.heads + round((full.heads - target.heads) * i / (count + 1))
        hidden = heads * target.head_dim
        w = Widths(hidden, heads, target.head_dim, _ffn_between(full, target, hidden, multiple))
        if w not in found and w != target and w != full and w.hidden > target.hidden:
            found.append(w)
    if not found:
        raise UsageError(f"no intermediate width between target ({target}) and teacher ({full}); list assistant.candidates explicitly")
    return found


def candidate_widths(spec: AssistantSpec, full: Widths, target: Widths, multiple: int) -> list[Widths]:
    """The recipe's candidates, validated and sorted widest first."""
    if isinstance(spec.candidates, int):
        return auto_candidates(full, target, spec.candidates, multiple)
    unique: dict[tuple[int, int, int, int], Widths] = {}
    for c in spec.candidates:
        w = assistant_widths(c.hidden, full, target, c.heads, c.ffn, multiple)
        unique[width_key(w)] = w
    return sorted(unique.values(), key=lambda w: (w.hidden, w.ffn, w.heads), reverse=True)


# --- weight-shared student --------------------------------------------------------------------------


def width_key(w: Widths) -> tuple[int, int, int, int]:
    """A hashable key of a shape (``Widths`` is a mutable dataclass)."""
    return (w.hidden, w.heads, w.head_dim, w.ffn)


def nested_masks(layout, scores: UnitScores, widths: Sequence[Widths]) -> dict[tuple[int, int, int, int], Masks]:
    """Masks of every width (keyed by :func:`width_key`) from the same fixed scores: the top-w units of
    each group, hence nested."""
    return {width_key(w): shrink(Masks.full(layout), scores, w) for w in widths}


def masked_overrides(masked: MaskedModel, masks: Masks, prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights and LayerNorm kept-index buffers that make ``masked.model`` compute the student at ``masks``.

    Each override is ``weight * mask`` (a new tensor, so gradients still reach the shared weight) and
    each hidden LayerNorm's ``kept_index`` becomes the kept dims of ``masks.hidden``. ``prefix`` names the model inside the
    module that :func:`masked_call` runs (e.g. ``"student."`` for a :class:`DistillModule`).
    """
    params = dict(masked.module().named_parameters())
    device = next(iter(params.values())).device
    out = {prefix + name: params[name] * m.to(device, params[name].dtype)
           for name, m in tensor_masks(masked.layout, masks).items() if name in params}
    kept_index = masks.hidden.nonzero().flatten().to(device)
    out.update({f"{prefix}{ln}.kept_index": kept_index for ln in masked.layout.layer_norms})
    return out


def masked_call(module: nn.Module, overrides: dict[str, torch.Tensor], *args, **kwargs):
    """``module(*args, **kwargs)`` with ``overrides`` in place of its parameters/buffers, leaving the
    stored weights untouched (``torch.func.functional_call``; tied weights such as the MLM decoder
    follow their embedding)."""
    return torch.func.functional_call(module, overrides, args, kwargs, tie_weights=True, strict=False)


class EncodeModule(nn.Module):
    """:func:`homoexport.distillation.models.encode` as a module forward, so :func:`masked_call` can run it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor], mlm_positions: torch.Tensor | None = None):
        return encode(self.model, inputs, mlm_positions=mlm_positions)


# --- the λ-tradeoff ---------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One row of the candidates table."""

    widths: Widths
    parameters: int
    sparsity: float  # 1 - parameters / teacher parameters
    role: str  # "candidate" (eligible as assistant) or "target" (the final student, for reference)
    quality: float | None = None  # higher is better (cosine to the teacher, or -MLM loss)
    score: float | None = None  # quality + λ · sparsity

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "widths": self.widths.as_dict()}


def tradeoff_score(quality: float, sparsity: float, lam: float) -> float:
    """MiniDisc's λ-tradeoff: higher is better; λ = 0 picks the best quality, large λ the sparsest."""
    return quality + lam * sparsity


def choose(candidates: Sequence[Candidate], lam: float) -> int:
    """Score every candidate in place and return the index of the best eligible one (ties: the
    earlier, i.e. wider, candidate)."""
    best = None
    for i, c in enumerate(candidates):
        c.score = tradeoff_score(c.quality, c.sparsity, lam)
        if c.role == "candidate" and (best is None or c.score > candidates[best].score):
            best = i
    if best is None:
        raise UsageError("no eligible candidate to choose from")
    return best


def parameters_of(widths: Widths, config, pooler: bool, mlm_head: bool) -> int:
    c = config
    return closed_form_parameters(widths, c.num_hidden_layers, c.vocab_size, c.max_position_embeddings, c.type_vocab_size,
                                  pooler=pooler, mlm_head=mlm_head)["total"]


# --- the sandwich run -------------------------------------------------------------------------------


def _sampled(pool: Sequence[Widths], k: int, seed: int, step: int) -> list[Widths]:
    """``k`` widths drawn without replacement from ``pool``, a pure function of (seed, step)."""
    if k <= 0 or not pool:
        return []
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 7, step]).generate_state(1)[0]))
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]


@torch.no_grad()
def _quality(metric: str, encoder: EncodeModule, overrides: dict[str, torch.Tensor], teacher: nn.Module, projection: nn.Module,
             batch: dict[str, torch.Tensor]) -> float:
    """Quality of one held-out batch at one width, higher is better: -MLM loss at the masked positions,
    or the cosine of the mean-pooled (projected) last hidden states to the teacher's."""
    if metric == "mlm":
        inputs, positions = student_inputs(batch, True)
        out = masked_call(encoder, overrides, inputs, positions)
        return -float(torch.nn.functional.cross_entropy(out.mlm_logits.float(), batch["mlm_labels"][positions]))
    inputs, _ = student_inputs(batch, False)
    s_last = projection(masked_call(encoder, overrides, inputs).hidden[-1])  # [B, T, H_teacher]
    return float(pooled_cosine(s_last, encode(teacher, inputs).hidden[-1], inputs["attention_mask"]))


def run_sandwich(recipe: Recipe, on_log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Order units, train the weight-shared student at all candidate widths, score and choose.

    Returns the selection record written to ``OUT/sandwich.json``: the candidates table (width,
    parameters, sparsity, quality, score), the chosen assistant, λ, the metric and the run's settings.
    """
    spec = recipe.assistant
    if spec.metric == "mlm" and recipe.losses.mlm == 0 and recipe.losses.kl == 0:
        raise UsageError("assistant.metric=mlm needs the MLM head, which this recipe does not train (losses.mlm and losses.kl are 0)")
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed = recipe.training.seed
    torch.manual_seed(seed)
    setup = build_corpus_setup(recipe, note=False)
    teacher, has_mlm, batcher, eval_batcher = setup.teacher, setup.has_mlm, setup.batcher, setup.eval_batcher
    if spec.metric == "mlm" and not has_mlm:
        raise UsageError(f"assistant.metric=mlm needs a teacher with an MLM head; {recipe.teacher} has none (use metric=representation)")
    if eval_batcher is None:
        raise UsageError("the assistant choice needs held-out blocks: set data.eval or data.eval_blocks > 0")
    teacher.to(device)
    autocast = precision_context(resolve_precision(recipe.training.precision, device), device.type)

    full = config_widths(teacher.config)
    target = recipe_target(recipe, full)
    candidates = candidate_widths(spec, full, target, recipe.pruning.multiple)

    student = copy.deepcopy(teacher).requires_grad_(True).train()
    masked = prepare(student)
    s_rel, t_rel = relation_layers(recipe, teacher.config.num_hidden_layers)
    c = teacher.config
    loss_fn = DistillationLoss(recipe.losses, c.hidden_size, c.hidden_size, c.num_hidden_layers, c.num_hidden_layers, has_mlm,
                               setup.pooling)
    module = DistillModule(student, loss_fn, s_rel).to(device).train()

    # 1. Order units once. Sensitivity (a plain mean) rather than PLATON: a few batches give PLATON's
    # uncertainty EMA nothing to smooth. The student equals the teacher here, so the gradients come from
    # dropout (train mode) and the MLM term, as in one-shot pruning.
    tracker = ImportanceTracker(student, masked.layout, "sensitivity")
    for step in range(spec.score_batches):
        batch = {k: v.to(device) for k, v in batcher.batch_at(step).items()}
        with autocast():
            loss, _ = module(batch, teacher_outputs(teacher, batch, loss_fn, t_rel), None)
        loss.backward()
        tracker.update()
        module.zero_grad(set_to_none=True)
    masks = nested_masks(masked.layout, tracker.unit_scores(), [*candidates, target])

    # 2. Sandwich: largest candidate + target + sampled candidates, losses summed (one backward each).
    o = recipe.optimizer
    optimizer = adamw(module.parameters(), o, device)
    largest, middle = candidates[0], candidates[1:]
    last_loss = float("nan")
    for step in range(spec.sandwich_steps):
        batch = {k: v.to(device) for k, v in batcher.batch_at(spec.score_batches + step).items()}
        with torch.no_grad(), autocast():
            t_out = teacher_outputs(teacher, batch, loss_fn, t_rel)
        total = 0.0
        for w in [largest, target, *_sampled(middle, spec.sampled_widths, seed, step)]:
            with autocast():
                loss, _ = masked_call(module, masked_overrides(masked, masks[width_key(w)], "student."), batch, t_out, masks[width_key(w)].kept_heads())
            loss.backward()
            total += float(loss.detach())
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = total
        if on_log is not None:
            on_log({"stage": "sandwich", "step": step + 1, "total": spec.sandwich_steps, "loss": total})

    # 3. Held-out quality and the λ-tradeoff.
    pooler = getattr(getattr(teacher, "base_model", teacher), "pooler", None) is not None
    teacher_params = parameters_of(full, c, pooler, has_mlm)

    def row(w: Widths, role: str) -> Candidate:
        params = parameters_of(w, c, pooler, has_mlm)
        return Candidate(w, params, 1 - params / teacher_params, role)

    rows = [row(w, "candidate") for w in candidates] + [row(target, "target")]
    encoder = EncodeModule(student)
    module.eval()
    n_eval = min(spec.eval_batches, setup.eval_steps)
    sums = [0.0] * len(rows)
    for step in range(n_eval):
        batch = {k: v.to(device) for k, v in eval_batcher.batch_at(step).items()}
        for i, r in enumerate(rows):
            overrides = masked_overrides(masked, masks[width_key(r.widths)], "model.")
            sums[i] += _quality(spec.metric, encoder, overrides, teacher, loss_fn.hidden_proj[-1], batch)
    for r, s in zip(rows, sums):
        r.quality = s / n_eval
    best = choose(rows, spec.lambda_)
    return {
        "schema": "homoexport.assistant_selection/1",
        "spec": spec.model_dump(mode="json", by_alias=True),
        "teacher": {"path": recipe.teacher, "widths": full.as_dict(), "parameters": teacher_params},
        "target": target.as_dict(),
        "metric": spec.metric,
        "lambda": spec.lambda_,
        "candidates": [r.as_dict() for r in rows],
        "chosen": rows[best].as_dict(),
        "sandwich": {"steps": spec.sandwich_steps, "score_batches": spec.score_batches, "eval_batches": n_eval,
                     "final_loss_sum": last_loss, "wall_time_s": round(time.time() - started, 2), "device": str(device)},
    }


# --- two-stage orchestration ------------------------------------------------------------------------


def split_steps(total: int, stage1_fraction: float) -> tuple[int, int]:
    """Steps of (teacher -> assistant, assistant -> student); both at least 1."""
    if total < 2:
        raise UsageError(f"a two-stage run needs training.steps >= 2, got {total}")
    first = min(total - 1, max(1, round(total * stage1_fraction)))
    return first, total - first


def stage_recipe(recipe: Recipe, name: str, teacher: str, widths: Widths, steps: int, out: Path) -> Recipe:
    """The recipe of one stage: ordinary HomoDistil to ``widths`` in ``steps`` steps, no assistant."""
    data = recipe.model_dump(mode="json", by_alias=True)
    data.update(name=f"{recipe.name}-{name}", teacher=teacher, tokenizer=recipe.tokenizer or recipe.teacher, budget=None, output=str(out))
    data["student"].update(hidden=widths.hidden, heads=widths.heads, ffn=widths.ffn)
    data["training"]["steps"] = steps
    data["assistant"] = {"mode": "off"}
    return validate_recipe(data)


def _run_stage(recipe: Recipe, out: Path, resume: bool, overwrite: bool, on_log: Callable[[dict], None] | None, plan: dict | None) -> dict[str, Any]:
    """A finished stage (report.json present) is reused on resume; otherwise distill, resuming if asked."""
    from homoexport.distillation import trainer

    done = out / "report.json"
    if resume and done.is_file():
        return json.loads(done.read_text())
    return trainer.distill(recipe, out_dir=out, resume=resume, overwrite=overwrite, plan=plan,
                           on_log=None if on_log is None else (lambda r: on_log({**r, "stage": out.name})))


def _selection(recipe: Recipe, out: Path, full: Widths, target: Widths, resume: bool, on_log: Callable[[dict], None] | None) -> dict[str, Any]:
    """The assistant choice: fixed from the recipe, or from the sandwich run (reused on resume)."""
    spec = recipe.assistant
    if spec.mode == "fixed":
        w = assistant_widths(spec.hidden, full, target, spec.heads, spec.ffn, recipe.pruning.multiple)
        return {"schema": "homoexport.assistant_selection/1", "spec": spec.model_dump(mode="json", by_alias=True), "target": target.as_dict(),
                "chosen": {"widths": w.as_dict(), "role": "candidate"}, "candidates": []}
    from accelerate import PartialState

    path = out / SANDWICH_FILE
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved["spec"] != spec.model_dump(mode="json", by_alias=True) or saved["target"] != target.as_dict():
            raise UsageError(f"{path} was made with other assistant settings or target; start over with --overwrite")
        return saved
    # Under data parallelism the main process alone runs the sandwich, so every rank uses the same choice.
    state = PartialState()
    if state.is_main_process:
        atomic_write_json(path, run_sandwich(recipe, on_log))
    state.wait_for_everyone()
    return json.loads(path.read_text())


def distill_with_assistant(recipe: Recipe, out_dir: Path | None = None, resume: bool = False, overwrite: bool = False,
                           on_log: Callable[[dict], None] | None = None, plan: dict | None = None) -> dict[str, Any]:
    """Choose a teacher assistant (sandwich + λ-tradeoff, or the recipe's fixed one), then distill
    teacher -> assistant -> student with HomoDistil; returns the report written to ``OUT/report.json``.

    Outputs: ``OUT/sandwich.json`` (auto), ``OUT/stage1-assistant/``, ``OUT/stage2-student/`` (each a
    complete ``distill`` run directory), ``OUT/student`` (the final student), ``OUT/report.json`` and
    ``OUT/assistant_tradeoff.png`` (auto). ``resume`` skips finished parts and resumes the unfinished
    stage from its checkpoint.
    """
    from transformers import AutoConfig

    if recipe.assistant.mode == "off":
        raise UsageError("assistant.mode is off: use homoexport.distillation.trainer.distill, or set assistant.mode to auto or fixed")
    out = Path(out_dir) if out_dir else recipe.output_dir()
    check_run_dir(out, resume, overwrite)
    started = time.time()
    config = AutoConfig.from_pretrained(recipe.teacher)
    full = config_widths(config)
    target = recipe_target(recipe, full)
    selection = _selection(recipe, out, full, target, resume, on_log)
    assistant = Widths(**selection["chosen"]["widths"])
    steps1, steps2 = split_steps(recipe.training.steps, recipe.assistant.stage1_fraction)

    r1 = _run_stage(stage_recipe(recipe, "assistant", recipe.teacher, assistant, steps1, out / STAGE1_DIR),
                    out / STAGE1_DIR, resume, overwrite, on_log, None)
    r2 = _run_stage(stage_recipe(recipe, "student", str(out / STAGE1_DIR / "student"), target, steps2, out / STAGE2_DIR),
                    out / STAGE2_DIR, resume, overwrite, on_log, plan)
    if not r2:  # not the main process: distill() reports there only
        return {}
    with staging_dir(out / "student", overwrite=True) as tmp:
        shutil.copytree(out / STAGE2_DIR / "student", tmp, dirs_exist_ok=True)
    plot = plot_tradeoff(selection, out / PLOT_FILE) if selection["candidates"] else None
    sandwich_s = selection.get("sandwich", {}).get("wall_time_s", 0.0)
    report = {
        "schema": "homoexport.assistant_report/1",
        "homoexport_version": __version__,
        "recipe": recipe.name,
        "teacher": r1["teacher"],
        "assistant": {**r1["student"], "chosen_by": recipe.assistant.mode},
        "student": {**r2["student"], "path": str(out / "student")},
        "selection": selection,
        "steps": steps1 + steps2,
        "stage_steps": {"stage1": steps1, "stage2": steps2, "sandwich": selection.get("sandwich", {}).get("steps", 0)},
        "wall_time_s": round(r1["wall_time_s"] + r2["wall_time_s"] + sandwich_s, 2),
        "orchestration_wall_time_s": round(time.time() - started, 2),
        "parity_max_abs_diff": r2["parity_max_abs_diff"],
        "mlm_kl_note": r1.get("mlm_kl_note"),
        "evaluation": r2.get("evaluation"),
        "stages": {"stage1": r1, "stage2": r2},
        "plot": str(plot) if plot else None,
        "plan": plan,
    }
    atomic_write_json(out / "report.json", report)
    return report
