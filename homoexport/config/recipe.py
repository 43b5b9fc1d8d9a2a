"""Recipes: the YAML that fully describes a distillation run, validated by pydantic.

Unknown keys and bad values are errors that name the file:line, the key path and what is allowed, because a
typo in a 3-hour run's recipe should cost seconds, not the run. ``--set a.b=c`` overrides apply before
validation. The resolved recipe (defaults filled in) is saved next to every run's outputs.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from homoexport.errors import UsageError

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StudentSpec(_Strict):
    """Target shape. Widths are uniform across layers, so the student is a stock BertConfig."""

    hidden: Optional[int] = Field(None, gt=0, description="hidden size (residual stream width)")
    heads: Optional[int] = Field(None, gt=0, description="attention heads; head_dim = hidden / heads")
    ffn: Optional[int] = Field(None, gt=0, description="FFN (intermediate) size")
    layers: Optional[int] = Field(None, gt=0, description="student depth; None keeps the teacher's (HomoDistil)")

    @model_validator(mode="after")
    def _divisible(self) -> "StudentSpec":
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise UsageError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class DataSpec(_Strict):
    train: list[str] = Field(default_factory=list, description="text/jsonl/parquet/WikiExtractor .txt.gz files, globs or dirs, or a hub dataset name")
    eval: list[str] = Field(default_factory=list, description="held-out text; empty = take eval_blocks from the training data")
    block_size: int = Field(128, ge=8, le=4096, description="tokens per block; with unit sentence, the longest sentence row")
    unit: Literal["block", "sentence"] = Field("block", description="block: text packed into full blocks; sentence: one padded row per "
                                                "sentence split from each document (for sentence-embedding objectives)")
    batching: Literal["random", "neighbours"] = Field("random", description="random: rows in a shuffled order; neighbours (unit "
                                                       "sentence): groups of group_size rows that are nearest neighbours by the "
                                                       "teacher's sentence embedding share a batch, so in-batch terms see related "
                                                       "sentences")
    group_size: int = Field(8, ge=2, description="with batching neighbours: rows per group, an anchor and its group_size - 1 "
                                                  "nearest unused rows; training.batch_size must be a multiple of it")
    regroup: bool = Field(False, description="with batching neighbours: mine fresh groups from new random anchors at each epoch, so "
                                             "a row meets other neighbours each time and the leftover groups change")
    eval_blocks: int = Field(256, ge=0)
    max_blocks: Optional[int] = Field(None, gt=0, description="cap on training blocks (for quick runs)")
    cache_dir: Optional[str] = None

    @field_validator("batching")
    @classmethod
    def _neighbours_need_sentences(cls, batching: str, info: ValidationInfo) -> str:
        # A field validator (unit is validated before it), so the error names data.batching and its value alone.
        if batching == "neighbours" and info.data.get("unit") != "sentence":
            raise ValueError("neighbours groups sentence rows: set data.unit to sentence")
        return batching

    @field_validator("group_size")
    @classmethod
    def _groups_need_neighbours(cls, group_size: int, info: ValidationInfo) -> int:
        # Runs only when the key is written: a size other than the default without neighbour batches would be ignored
        # silently. The default passes, since every resolved recipe (recipe.resolved.yaml) writes it and loads again.
        # batching is absent when its own value was bad: that error alone names the fix.
        batching = info.data.get("batching", "neighbours")
        if batching != "neighbours" and group_size != cls.model_fields["group_size"].default:
            raise ValueError("group_size sizes neighbour groups: set data.batching to neighbours, or remove data.group_size")
        return group_size

    @field_validator("regroup")
    @classmethod
    def _regroup_needs_neighbours(cls, regroup: bool, info: ValidationInfo) -> bool:
        # As for group_size: resolved recipes write false, which passes.
        if regroup and info.data.get("batching", "neighbours") != "neighbours":
            raise ValueError("regroup re-mines neighbour groups: set data.batching to neighbours, or remove data.regroup")
        return regroup


class LossSpec(_Strict):
    """Weights of the HomoDistil objective and of the related knowledge types (KL, hidden, attention, MiniLMv2 relations)."""

    mlm: float = Field(1.0, ge=0)
    kl: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    hidden: float = Field(1.0, ge=0)
    attention: float = Field(1.0, ge=0)
    embedding: float = Field(1.0, ge=0)
    relation: float = Field(0.0, ge=0, description="MiniLMv2 Q-Q/K-K/V-V relation transfer")
    sentence: float = Field(0.0, ge=0, description="MSE of the mean-pooled sentence embedding (through the last hidden projection) "
                            "to the teacher's: what a sentence-embedding model is used for")
    similarity: float = Field(0.0, ge=0, description="MSE between the in-batch cosine-similarity matrices of student and teacher "
                              "sentence embeddings (their similarity structure, at any width)")
    contrastive: float = Field(0.0, ge=0, description="KL from the teacher's to the student's softmax over each sentence's cosine "
                               "similarities to the rest of the batch: weighs each sentence's nearest rows, as a ranking does "
                               "(pair it with data.batching neighbours; on random batches it lowered STS-B)")
    contrastive_temperature: float = Field(0.05, gt=0, description="softmax temperature of the contrastive term")
    relation_heads: int = Field(12, gt=0)
    relation_teacher_layer: int = Field(-1, description="teacher layer for relation transfer (negative counts from the end)")
    layer_mapping: Literal["one_to_one", "uniform", "uniform_consecutive", "uniform_last", "last", "last_k"] = "one_to_one"


class PruningSpec(_Strict):
    schedule: Literal["homotopic", "one_shot", "none"] = "homotopic"
    importance: Literal["platon", "ema", "sensitivity"] = "platon"
    beta1: float = Field(0.85, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    t_i: float = Field(0.0, ge=0, description="steps at full width before pruning (<1: fraction of steps)")
    t_f: float = Field(0.3, ge=0, description="steps at the final width after pruning (<1: fraction of steps)")
    interval: int = Field(10, ge=1, description="update masks every this many steps (ΔT)")
    multiple: int = Field(8, ge=1, description="round intermediate widths to this multiple")
    score_batches: int = Field(8, ge=1, description="batches used to score importance for one-shot pruning")
    materialize: bool = Field(True, description="continue on the dense student once the target width is reached for good "
                              "(late steps cost what the small model costs)")
    materialize_at: Optional[float] = Field(0.9, gt=0, lt=1, description="with materialize: while pruning, also continue on the "
                                            "materialised student whenever its kept widths hold at most this share of the weights "
                                            "per layer of the model it runs on; null: only at the target width")

    @model_validator(mode="before")
    @classmethod
    def _materialize_at_needs_materialize(cls, data: Any) -> Any:
        """A student that stays masked to the end is never materialised on the way down either: the resolved recipe says so."""
        if isinstance(data, dict) and data.get("materialize") is False:
            data = {**data, "materialize_at": None}
        return data


class OptimizerSpec(_Strict):
    lr: float = Field(6e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, description="warm-up steps (<1: fraction of steps)")
    scheduler: Literal["linear", "constant", "cosine"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)


class CandidateWidths(_Strict):
    """One teacher-assistant shape to consider; heads defaults to keeping the target's head_dim."""

    hidden: int = Field(..., gt=0)
    heads: Optional[int] = Field(None, gt=0)
    ffn: Optional[int] = Field(None, gt=0, description="default: interpolated between the target and the teacher like hidden")


class AssistantSpec(_Strict):
    """Teacher assistant for extreme compression (MiniDisc): teacher -> assistant -> student.

    ``auto`` trains one weight-shared student at every candidate width (sandwich rule), scores each by
    ``quality + lambda * sparsity`` on held-out text and takes the best; ``fixed`` uses ``hidden``
    (and optionally ``heads``/``ffn``) as the assistant. ``training.steps`` is split between the two
    stages by ``stage1_fraction``; the sandwich steps are extra.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    mode: Literal["off", "auto", "fixed"] = "off"
    hidden: Optional[int] = Field(None, gt=0, description="mode=fixed: assistant hidden size")
    heads: Optional[int] = Field(None, gt=0, description="mode=fixed: assistant heads (default: keep the target's head_dim)")
    ffn: Optional[int] = Field(None, gt=0, description="mode=fixed: assistant FFN size (default: interpolated)")
    candidates: Union[int, list[CandidateWidths]] = Field(4, description="mode=auto: how many evenly spaced widths between "
                                                          "target and teacher, or an explicit list")
    lambda_: float = Field(1.0, alias="lambda", ge=0, description="weight of sparsity (1 - params/teacher params) in the tradeoff score")
    metric: Literal["representation", "mlm"] = Field("representation", description="representation: cosine of mean-pooled last "
                                                     "hidden states to the teacher's; mlm: -MLM loss (teacher needs an MLM head)")
    sandwich_steps: int = Field(100, gt=0, description="optimizer steps of the weight-shared sandwich run")
    sampled_widths: int = Field(2, ge=0, description="candidate widths sampled per sandwich step besides the largest and the smallest")
    score_batches: int = Field(4, gt=0, description="batches that score unit importance once, before the sandwich run")
    eval_batches: int = Field(4, gt=0, description="held-out batches that score every candidate")
    stage1_fraction: float = Field(0.5, gt=0, lt=1, description="share of training.steps for teacher -> assistant")

    @model_validator(mode="after")
    def _complete(self) -> "AssistantSpec":
        if self.mode == "fixed" and self.hidden is None:
            raise UsageError("assistant.mode=fixed needs assistant.hidden")
        if isinstance(self.candidates, int) and self.candidates < 1:
            raise UsageError("assistant.candidates must be at least 1 (or a list of widths)")
        return self


class AugmentSpec(_Strict):
    """Word-swapped copies of the training rows for the teacher to label (TinyBERT's augmentation; neighbours
    from the teacher's input word embeddings). Trained on with the distillation terms only."""

    copies: int = Field(gt=0, description="copies of each training row (TinyBERT used 20)")
    replace_prob: float = Field(0.4, gt=0, le=1, description="chance that a word with neighbours is swapped (TinyBERT: 0.4)")
    neighbours: int = Field(15, gt=0, description="nearest vocabulary words a swap draws from (TinyBERT: 15)")


class TaskSpec(_Strict):
    """Task-specific HomoDistil: the teacher is a fine-tuned ``*ForSequenceClassification`` model and the
    data its labelled training set. Give ``glue`` + ``data_dir`` (original TSV layout) or ``train_file`` +
    ``dev_file`` (CSV / TSV / JSON lines) with their column names. Classification or regression follows
    the teacher's head (one output: regression). The step count is ``epochs`` over the training rows
    (``training.steps`` is not used); ``training.eval_every`` 0 scores the dev set once per epoch."""

    glue: Optional[str] = Field(None, description="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    data_dir: Optional[str] = Field(None, description="GLUE data directory (DATA_DIR/SST-2/train.tsv, ...)")
    train_file: Optional[str] = Field(None, description="labelled training file (.csv, .tsv, .jsonl)")
    dev_file: Optional[str] = Field(None, description="labelled dev file, scored during and after training")
    text_column: str = "sentence"
    text_pair_column: Optional[str] = Field(None, description="second text of pair tasks")
    label_column: str = "label"
    epochs: float = Field(3.0, gt=0)
    max_length: int = Field(128, ge=8, le=4096, description="tokens per example (pairs truncated longest-first)")
    hard_label: float = Field(0.0, ge=0, description="weight of the loss to the gold labels (cross-entropy / MSE)")
    max_train_samples: Optional[int] = Field(None, gt=0, description="fixed random subset of the training rows")
    unlabelled: list[str] = Field(default_factory=list, description="more text for the teacher to label, trained on beside the "
                                  "training rows with the distillation terms only (the hard-label term skips it): CSV / TSV / JSONL "
                                  "files with the task's text columns, or glue:TASK[/SPLIT] for a GLUE file's text (labels not read; SPLIT "
                                  "is the file's name: train, dev, test, or MNLI's dev_matched, test_matched, ...); "
                                  "rows that repeat a dev row are dropped; epochs count passes over both")
    max_unlabelled_samples: Optional[int] = Field(None, gt=0, description="fixed random subset of the unlabelled rows")
    augment: Optional[AugmentSpec] = Field(None, description="word-swapped copies of the training rows for the teacher to label "
                                           "(copies, replace_prob, neighbours); epochs count passes over originals and copies")
    max_dev_samples: Optional[int] = Field(None, gt=0, description="fixed random subset of the dev rows")
    eval_batch_size: int = Field(64, gt=0)
    export: bool = Field(True, description="export the student to OUT/export (optimum ONNX, O2 fusion, dynamic int8 for this "
                         "CPU) and score the int8 file on the dev set with onnxruntime")
    keep_fp32: list[Literal["ffn-output"]] = Field(default_factory=list, description="layer groups whose MatMuls stay fp32 in "
                                                   "the int8 file (as `homoexport export --keep-fp32`): dev accuracy for some speed; a finished run resumed "
                                                   "under another value is exported again, not trained again")
    family: list[int] = Field(default_factory=list, description="hidden sizes, wider than the final student's, at which to keep a student on the way down "
                              "(OUT/family/...), each scored on dev and, with export, exported to its own export/, scored as int8 "
                              "and timed beside the others: one run gives the width-vs-score-vs-latency curve")
    max_drop: Optional[float] = Field(None, gt=0, description="deploy the narrowest student of the family within this many dev "
                                      "points of the teacher, scored as int8 when exported (`--budget accuracy-drop=1`); under a "
                                      "latency or memory budget, only students that fit it")
    keep_best: bool = Field(False, description="deploy the student of the dev evaluation with the best score once the final width "
                            "is reached, not the last step's, as the teacher's fine-tuning kept its best dev checkpoint "
                            "(transformers' load_best_model_at_end); the report gives both")

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSpec":
        if self.glue is not None:
            if self.train_file or self.dev_file:
                raise UsageError("give task.glue (with task.data_dir) or task.train_file + task.dev_file, not both")
            if not self.data_dir:
                raise UsageError("task.glue needs task.data_dir (the GLUE directory, e.g. ../shared/data/glue)")
        elif not (self.train_file and self.dev_file):
            raise UsageError("task needs glue + data_dir, or train_file + dev_file")
        return self


class TrainingSpec(_Strict):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0, description="global batch size (sequences per optimizer step)")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="per-process micro-batch; gradient accumulation fills the global batch")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="of the forward passes and losses (weights, gradients and "
                                                       "optimizer state stay fp32): bf16 autocast, or auto = bf16 where the device "
                                                       "multiplies it natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX), else fp32")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    checkpoint_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_checkpoints: bool = Field(False, description="keep the newest checkpoint after a finished run (to train it further); "
                                   "by default it is removed once the student is saved, since resume then has nothing left to do")
    snapshot_every: int = Field(0, ge=0, description="task-agnostic runs: also save the materialised student every N steps under "
                                "snapshots/step-N whenever its widths are a stock BERT shape (always once the target is reached): quality against "
                                "distillation time from one run; 0 = none")


class Recipe(_Strict):
    """A HomoDistil run: teacher, data, target (widths or a budget), losses, schedule, optimizer."""

    name: str = "homodistil"
    teacher: str = Field(..., description="local model directory or hub name of the teacher")
    tokenizer: Optional[str] = Field(None, description="defaults to the teacher's")
    init: Literal["copy", "truncate", "random"] = "copy"
    truncate_layers: Optional[list[int]] = Field(None, description="teacher layers copied by init=truncate (default: evenly spaced)")
    student: StudentSpec = Field(default_factory=StudentSpec)
    budget: Optional[str] = Field(None, description="latency=8ms | memory=30MB | params=20M; chooses the student widths")
    data: DataSpec = Field(default_factory=DataSpec)
    losses: LossSpec = Field(default_factory=LossSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    assistant: AssistantSpec = Field(default_factory=AssistantSpec)
    task: Optional[TaskSpec] = Field(None, description="task-specific distillation from a fine-tuned classifier")
    output: str = Field("runs/{name}", description="output directory; {name} is replaced")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """``task.materialize`` became ``pruning.materialize`` when the task-agnostic loop learnt it too; recipes and
        resolved runs written before still load, with the value where it now lives."""
        task = data.get("task") if isinstance(data, dict) else None
        if isinstance(task, dict) and "materialize" in task:
            logger.warning("recipe key task.materialize is now pruning.materialize; read it as that")
            task = dict(task)
            pruning = dict(data.get("pruning") or {})
            pruning.setdefault("materialize", task.pop("materialize"))
            data = {**data, "task": task, "pruning": pruning}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.init == "copy" and self.student.layers is not None:
            raise UsageError("init=copy keeps the teacher's depth: leave student.layers unset or use init=truncate|random")
        if self.init == "truncate" and self.truncate_layers and self.student.layers and len(self.truncate_layers) != self.student.layers:
            raise UsageError(f"truncate_layers has {len(self.truncate_layers)} entries but student.layers is {self.student.layers}")
        if self.task is not None and (self.init == "random" or self.assistant.mode != "off"):
            raise UsageError("a task recipe starts from the fine-tuned teacher's own weights: init must be copy (or truncate, for a "
                             "shallower student) and assistant off")
        if self.data.batching == "neighbours" and self.training.batch_size % self.data.group_size:
            raise UsageError(f"training.batch_size {self.training.batch_size} is not a multiple of data.group_size "
                             f"{self.data.group_size}: with data.batching neighbours a batch holds whole groups of sentences")
        if self.task is not None and self.task.family:
            if self.pruning.schedule != "homotopic":
                raise UsageError(f"task.family keeps students on the way down, which pruning.schedule {self.pruning.schedule} does not "
                                 "pass through: use homotopic or remove task.family")
            final = self.student.hidden
            narrow = sorted(h for h in self.task.family if final is not None and h <= final)
            if narrow:
                raise UsageError(f"task.family {', '.join(map(str, narrow))}: not wider than the final student's hidden size {final} "
                                 "(student.hidden, or the plan's choice under a budget); a family member is kept on the way down to it")
        default_steps = TrainingSpec.model_fields["steps"].default  # resolved task recipes carry it: they still load
        if self.task is not None and "steps" in self.training.model_fields_set and self.training.steps != default_steps:
            raise UsageError(f"training.steps {self.training.steps}: a task recipe's length is task.epochs (passes over the training "
                             "rows), not training.steps; set task.epochs (fractions allowed) instead")
        if self.task is not None and self.losses.relation > 0:
            raise UsageError("losses.relation (MiniLMv2 relations) is not available in task recipes: use hidden/attention/embedding")
        return self

    def output_dir(self) -> Path:
        return Path(self.output.replace("{name}", self.name))

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


class RecipeError(UsageError):
    """A recipe that cannot be used, with messages that name the key path and what is allowed."""


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that ``loc`` (minus its last element) points into."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        for candidate in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                current = candidate
                break
        else:
            return []
    return [f.alias or name for name, f in getattr(current, "model_fields", {}).items()]  # YAML spelling (assistant.lambda)


@dataclass(frozen=True)
class RecipeSource:
    """Where a recipe's keys were written: the YAML file with each key path's line, and the ``--set`` overrides, so an
    error points at the line (or the option) to fix."""

    path: Path
    lines: dict[tuple, int]
    overridden: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, path: Path, text: str, overrides: list[str]) -> "RecipeSource":
        lines: dict[tuple, int] = {}

        def walk(node: yaml.Node, at: tuple) -> None:
            if isinstance(node, yaml.MappingNode):
                children = [(k.value, k, v) for k, v in node.value]  # a key's line is its own, not its value's
            elif isinstance(node, yaml.SequenceNode):
                children = [(i, v, v) for i, v in enumerate(node.value)]
            else:
                return
            for key, marked, value in children:
                lines[at + (key,)] = marked.start_mark.line + 1
                walk(value, at + (key,))

        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            walk(root, ())
        return cls(path, lines, tuple(tuple(o.partition("=")[0].split(".")) for o in overrides))

    def locate(self, loc: tuple) -> str:
        """``file:line`` of the deepest written key on ``loc``'s path, ``--set KEY`` for an overridden one, else the file."""
        for key in reversed(self.overridden):
            at = tuple(map(str, loc))
            if at[:len(key)] == key or (at and key[:len(at)] == at):  # the override's key, or a section it created (a misspelt one)
                return f"--set {'.'.join(key)}"
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return f"{self.path}:{self.lines[loc[:n]]}"
        return str(self.path)

    def locate_check(self, loc: tuple, message: str) -> str:
        """Where a check across keys (under section ``loc``) points: among the keys its message names (dotted paths, or
        keys of the section), a ``--set`` one first, then the first the file gives a value, then the first section it
        opens; else what ``locate`` gives for the section."""
        words = re.findall(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?![\w']|\.\w)", message)  # whole words, not "teacher's"
        named = [key for word in words for key in (tuple(word.split(".")), loc + (word,))]
        sections = {key[:n] for key in self.lines for n in range(1, len(key))}
        for found in ([k for k in named if k in self.overridden], [k for k in named if k in self.lines and k not in sections],
                      [k for k in named if k in self.lines]):
            if found:
                return self.locate(found[0])
        return self.locate(loc)


def _format_errors(err: ValidationError, source: RecipeSource | None) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        path = ".".join(str(p) for p in loc)
        across = isinstance(e.get("input"), dict) and e["type"] not in ("extra_forbidden", "missing")
        origin = "" if source is None else source.locate_check(loc, e["msg"]) if across else source.locate(loc)
        where = ": ".join(w for w in (origin, "" if origin == f"--set {path}" else path) if w)
        where = f"{where}: " if where else ""
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}unknown key{hint}; allowed keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"{where}required key is missing")
        else:
            # A check across keys (a section or the whole recipe) names its keys itself: echoing the input dict buries it.
            got = "" if across else f" (got {e.get('input')!r})"
            lines.append(f"{where}{e['msg'].removeprefix('Value error, ')}{got}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. training.steps=200")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def validate_recipe(data: dict, source: RecipeSource | None = None) -> Recipe:
    """Validate a recipe dict; raise :class:`RecipeError` naming every bad key (and its line, given the ``source``)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, RecipeSource.of(path, text, overrides or []))


def steps_of(value: float, total: int) -> int:
    """Interpret a recipe step count: values below 1 are fractions of ``total``."""
    return int(round(value * total)) if 0 < value < 1 else int(value)


def with_assistant_option(recipe: Recipe, option: str | None) -> Recipe:
    """Apply ``--assistant auto|off|HIDDEN`` to a recipe (None leaves it as it is)."""
    if option is None:
        return recipe
    data = recipe.model_dump(mode="json", by_alias=True)
    if option in ("auto", "off"):
        data["assistant"]["mode"] = option
    elif option.isdigit() and int(option) > 0:
        data["assistant"].update(mode="fixed", hidden=int(option), heads=None, ffn=None)
    else:
        raise UsageError(f"--assistant {option!r}: expected auto, off or a hidden size such as 192")
    return validate_recipe(data)
