"""Fine-tune an encoder on a GLUE task, then score it in PyTorch and in its exported ONNX fp32/int8 files.

A student is only worth what it scores after fine-tuning, and a deployment only what the exported,
quantized file scores: every run reports the three side by side, on the same dev examples, with the
dev-set latency and throughput of each backend and the exact settings. Several seeds give mean ± std.

Layout of a run directory::

    OUT/glue_report.json     report (schema: see ``run_glue``)
    OUT/glue_report.md       the printed table, as markdown
    OUT/seed-S/model/        best fine-tuned checkpoint on the dev set (PyTorch, with tokenizer)
    OUT/seed-S/onnx/         ``homoexport.deployment.export.export_model`` output: model.onnx, model_quantized.onnx, ...

Exported files can also be scored as they are (``given_onnx``: an export directory or a .onnx file), as CI on
the target machine scores the file it ships: no PyTorch row, no seed directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from homoexport.atomic import atomic_write_json, atomic_write_text, staging_dir
from homoexport.deployment.bench import load_session, percentiles
from homoexport.deployment.export import FP32_FILE, FP32_GROUPS, OPTIMIZED_FILE, QUANTIZED_FILE, VALIDATION_ROWS, ExportSettings, export_model
from homoexport.deployment.export import REPORT_FILE as EXPORT_REPORT_FILE
from homoexport.errors import InputNotFoundError, UsageError
from homoexport.evaluation.glue_data import (
    GLUE_ORDER,
    HUB_DATASET,
    GlueTask,
    get_task,
    input_texts,
    load_hub,
    load_tsv,
    predictions,
    score,
    subsample,
)
from homoexport.machine import fingerprint, physical_cores
from homoexport.progress import ProgressFn, Tracker

logger = logging.getLogger(__name__)


REPORT_SCHEMA = "homoexport.glue_report/1"
SUITE_SCHEMA = "homoexport.glue_suite/1"
BACKENDS = ("pytorch", "onnx_fp32", "onnx_int8")
BACKEND_TITLES = {"pytorch": "PyTorch", "onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8"}
# Files of the export (homoexport.deployment.export.export_model) scored as each ONNX backend.
ONNX_FILES = {"onnx_fp32": FP32_FILE, "onnx_int8": QUANTIZED_FILE}
QUANTIZE_MODES = ("dynamic", "static")
CALIBRATION_ROWS = 200  # training rows that calibrate static int8 activation ranges
METRIC_TITLES = {"accuracy": "acc", "f1": "F1", "matthews_corr": "MCC", "pearson": "Pearson", "spearman": "Spearman"}
TASK_TITLES = {"mnli": "MNLI-m/mm", "qqp": "QQP", "qnli": "QNLI", "sst2": "SST-2", "cola": "CoLA", "stsb": "STS-B", "mrpc": "MRPC", "rte": "RTE", "wnli": "WNLI"}


@dataclass(frozen=True)
class GlueSettings:
    """Everything that changes a GLUE score or timing; recorded verbatim in the report."""

    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (42,)
    eval_steps: int | None = None  # evaluate and checkpoint every N steps; None: once per epoch
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    export: bool = True
    quantize: str = "dynamic"
    keep_fp32: tuple[str, ...] = ()  # export.FP32_GROUPS left fp32 in the int8 file
    optimize: str = "O2"
    threads: int | None = None  # inference threads for the dev-set evaluation; None: all physical cores
    train: bool = True  # False: score the model as given (a finished classifier), no fine-tuning

    def __post_init__(self) -> None:
        if not self.train and len(self.seeds) != 1:
            raise UsageError("scoring a finished classifier (--no-train) takes one seed: there is no training to repeat")
        if self.quantize not in QUANTIZE_MODES:
            raise UsageError(f"unknown quantize mode {self.quantize!r} (allowed: {', '.join(QUANTIZE_MODES)})")
        if not self.seeds:
            raise UsageError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds repeat: {', '.join(map(str, self.seeds))}")
        for name in ("batch_size", "eval_batch_size", "max_length", "eval_steps", "max_train_samples", "max_eval_samples", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if self.epochs <= 0 or self.learning_rate <= 0:
            raise UsageError(f"epochs and learning_rate must be positive, got {self.epochs} and {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        unknown = [g for g in self.keep_fp32 if g not in FP32_GROUPS]
        if unknown:
            raise UsageError(f"unknown keep-fp32 group {', '.join(map(repr, unknown))} (allowed: {', '.join(FP32_GROUPS)})")

    @property
    def inference_threads(self) -> int:
        return self.threads or physical_cores()


@dataclass
class EvalResult:
    """Metrics per dev split (fractions, not points) and the forward-pass latency on each split."""

    metrics: dict[str, dict[str, float]]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- data


def load_data(task: GlueTask, data_dir: str | os.PathLike | None = None, hub: bool = False, train: bool = True) -> DatasetDict:
    """Train (unless ``train`` is False) + dev splits from the original TSV layout under ``data_dir`` or, with ``hub``, from nyu-mll/glue."""
    if (data_dir is None) == (not hub):
        raise UsageError("give exactly one data source: a GLUE data directory or the hub")
    return load_hub(task, train) if hub else load_tsv(task, data_dir, train)


def _tokenized(tokenizer, ds: Dataset, max_length: int) -> Dataset:
    """Unpadded token ids and the label per row (pairs truncated longest-first), for a padding collator."""
    pair = list(ds["text_b"]) if "text_b" in ds.column_names else None
    encoded = tokenizer(list(ds["text_a"]), pair, truncation=True, max_length=max_length)
    return Dataset.from_dict(dict(encoded) | {"label": list(ds["label"])})


# ------------------------------------------------------------------------------------------ training


def load_classifier(model_dir: str | os.PathLike, task: GlueTask):
    """``model_dir`` with a sequence-classification head for ``task`` (regression head for STS-B).

    An encoder-only directory (a sentence encoder, a pruned student) has no head: transformers warns
    that ``classifier.*`` is newly initialised. That is expected here, so the warning is replaced by
    one line naming the new weights; a head of another size is replaced the same way.
    """
    names = task.label_names
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=task.num_labels,
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            problem_type="regression" if task.is_regression else "single_label_classification",
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = sorted(set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]})
    if fresh:
        logger.info("new %s head: initialised %s (expected: fine-tuning trains them)", task.name, ", ".join(fresh))
    return model


def load_finished_classifier(model_dir: str | os.PathLike, task: GlueTask):
    """A classifier that is already trained for ``task`` (its head has the task's outputs); no new weights."""
    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != task.num_labels:
        raise UsageError(f"{model_dir} is not a classifier for {task.name} ({task.num_labels} outputs; found {', '.join(archs) or 'no architecture'} "
                         f"with {config.num_labels}): --no-train scores a finished classifier, drop it to fine-tune")
    return AutoModelForSequenceClassification.from_pretrained(model_dir).eval()


class ProgressCallback(TrainerCallback):
    """Reports a Trainer run (instead of tqdm) as progress records: every step with its last logged loss,
    and each dev evaluation as a message."""

    def __init__(self, stage: str, metric: str, on_progress: ProgressFn | None) -> None:
        self.stage, self.metric, self.on_progress = stage, metric, on_progress
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker = Tracker(self.on_progress, self.stage, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.tracker.advance(**({"loss": self.loss} if self.loss is not None else {}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is not None:
            self.tracker.note(f"step {state.global_step}: dev {self.metric} {100 * value:.2f}")
            logger.info("%s step %d: dev %s %.2f", self.stage, state.global_step, self.metric, 100 * value)


class EvaluateAtLastStep(TrainerCallback):
    """With step-wise evaluation, also evaluate the final step so that it can be chosen as the best."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


def fine_tune(model, tokenizer, task: GlueTask, train: Dataset, dev: Dataset, settings: GlueSettings, seed: int, work_dir: Path,
              on_progress: ProgressFn | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` with AdamW, linear warm-up/decay and dynamic padding; keep the best dev checkpoint.

    ``train``/``dev`` are raw task rows (text_a, text_b, label). Checkpoints go to ``work_dir``; the best
    one (by the task's first metric on ``dev``) is loaded back. Returns that model and the training
    record: steps, best step and its dev metric, mean train loss, wall time, dev-metric history.
    """
    strategy = "steps" if settings.eval_steps else "epoch"
    args = TrainingArguments(
        output_dir=str(work_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        lr_scheduler_type="linear",
        warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=settings.eval_steps,
        save_steps=settings.eval_steps,
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=task.primary_metric,
        greater_is_better=True,
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callbacks = [ProgressCallback(f"fine-tune {task.name} seed {seed}", task.primary_metric, on_progress)]
    if settings.eval_steps:
        callbacks.append(EvaluateAtLastStep())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_tokenized(tokenizer, train, settings.max_length),
        eval_dataset=_tokenized(tokenizer, dev, settings.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: score(task, predictions(task, p.predictions), p.label_ids),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Checkpoint rotation warns on file systems with coarse mtimes; it then orders by step, which is right.
        warnings.filterwarnings("ignore", message="mtime may not be reliable")
        output = trainer.train()
    train_s = time.perf_counter() - start
    state = trainer.state
    key = f"eval_{task.primary_metric}"
    history = [{"step": log["step"], task.primary_metric: log[key]} for log in state.log_history if key in log]
    best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1]) if state.best_model_checkpoint else state.global_step
    return trainer.model, {
        "steps": state.global_step,
        "best_step": best_step,
        "best_dev": state.best_metric,
        "train_loss": output.training_loss,
        "train_s": train_s,
        "eval_history": history,
    }


# ---------------------------------------------------------------------------------------- evaluation


def _batches(tokenizer, ds: Dataset, max_length: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Tokenized int64 batches [batch, longest in batch] (dynamic padding), in dataset order."""
    pair = "text_b" in ds.column_names
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        encoded = tokenizer(rows["text_a"], rows["text_b"] if pair else None, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
        yield {k: v.astype(np.int64) for k, v in encoded.items()}


def _latency(times_s: Sequence[float], n_samples: int, batch_size: int, threads: int) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    stats = percentiles(ms)  # the same statistics as `homoexport bench`
    return {
        "n_samples": n_samples,
        "batch_size": batch_size,
        "threads": threads,
        "n_batches": len(ms),
        "mean_batch_ms": stats["mean"],
        "p50_batch_ms": stats["p50"],
        "p90_batch_ms": stats["p90"],
        "forward_total_s": float(ms.sum() / 1e3),
        "throughput_samples_per_s": float(n_samples / (ms.sum() / 1e3)),
    }


def _evaluate(forward: Callable[[dict[str, np.ndarray]], np.ndarray], tokenizer, task: GlueTask, dev: DatasetDict, max_length: int, batch_size: int, threads: int, name: str) -> EvalResult:
    """Score ``forward`` (padded batch -> logits [batch, num_labels]) on every dev split, timing each forward.

    The first batch is run once untimed (allocations, lazy init), then every batch is timed alone:
    tokenization and padding are excluded, so the figures compare backends, not tokenizers.
    """
    result = EvalResult(metrics={})
    for split, ds in dev.items():
        logger.info("scoring %s on %s (%d examples)", name, split, len(ds))
        batches = list(_batches(tokenizer, ds, max_length, batch_size))
        forward(batches[0])
        logits, times = [], []
        for batch in batches:
            start = time.perf_counter()
            logits.append(np.asarray(forward(batch), dtype=np.float32))
            times.append(time.perf_counter() - start)
        result.metrics[split] = score(task, predictions(task, np.concatenate(logits)), np.asarray(ds["label"]))
        result.latency[split] = _latency(times, len(ds), batch_size, threads)
    return result


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_pytorch(model, tokenizer, task: GlueTask, dev: DatasetDict, max_length: int = 128, batch_size: int = 64, threads: int | None = None) -> EvalResult:
    """Score a PyTorch sequence-classification model (fp32, eval mode) on every dev split, with latency."""
    threads = threads or physical_cores()
    model.eval()

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    with _torch_threads(threads):
        return _evaluate(forward, tokenizer, task, dev, max_length, batch_size, threads, "pytorch")


def evaluate_onnx(onnx_path: str | os.PathLike, task: GlueTask, dev: DatasetDict, tokenizer_dir: str | os.PathLike | None = None, max_length: int = 128, batch_size: int = 64, threads: int | None = None) -> EvalResult:
    """Score an exported classification ONNX file with onnxruntime (CPU) on every dev split, with latency.

    Tokenizes with the tokenizer saved next to the file (or in ``tokenizer_dir``), as a deployment
    would, and feeds exactly the inputs the graph declares (a graph without ``token_type_ids`` is fine).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputNotFoundError(f"ONNX file not found: {onnx_path}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or onnx_path.parent)
    threads = threads or physical_cores()
    session = load_session(onnx_path, threads)  # the session options `homoexport bench` times with
    inputs = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name

    def forward(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: batch.get(name, np.zeros_like(batch["input_ids"])) for name in inputs}
        return session.run([output], feed)[0]

    return _evaluate(forward, tokenizer, task, dev, max_length, batch_size, threads, onnx_path.name)


# Operators that only a quantized graph holds (onnxruntime.quantization's dynamic and QDQ/QOperator formats).
INT8_OPERATORS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                            "MatMulIntegerToFloat", "QAttention", "QGemm"})
# Files that make a directory a PyTorch (transformers) model, sharded or not.
PYTORCH_WEIGHTS = ("*.safetensors", "*.bin", "*.index.json", "tf_model.h5")
# The export's file names (homoexport.deployment.export): fp32 is scored from the fused file when there is one (what
# ships without int8), else the plain one; other names are told apart by their operators.
KNOWN_ONNX = {QUANTIZED_FILE: "onnx_int8", OPTIMIZED_FILE: "onnx_fp32", FP32_FILE: "onnx_fp32"}


@dataclass(frozen=True)
class GivenOnnx:
    """Exported files scored as they are, without a PyTorch model or a new export: backend -> file. ``directory`` holds
    the config.json and tokenizer that ``homoexport export`` writes beside them."""

    files: dict[str, Path]
    directory: Path


def given_onnx(path: str | os.PathLike) -> GivenOnnx | None:
    """The ONNX files ``path`` names, or None for a PyTorch model directory: a ``.onnx`` file (fp32 or int8 by its
    operators), or an export directory's int8 file and its fused (else plain) fp32 file."""
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise InputNotFoundError(f"ONNX file not found: {path}")
        return GivenOnnx({_onnx_backend(path): path}, path.parent)
    if not path.is_dir():
        return None
    onnx_files = sorted(p.name for p in path.glob("*.onnx"))
    if any(next(path.glob(pattern), None) for pattern in PYTORCH_WEIGHTS):
        if onnx_files:
            logger.info("%s holds PyTorch weights: scoring that model and exporting it again (give a .onnx file to score it as it is)", path)
        return None
    files: dict[str, Path] = {}
    for name, backend in KNOWN_ONNX.items():
        if name in onnx_files:
            files.setdefault(backend, path / name)
    if files:
        return GivenOnnx(dict(sorted(files.items(), key=lambda kv: BACKENDS.index(kv[0]))), path)
    if onnx_files:
        raise UsageError(f"{path} holds {', '.join(onnx_files)} but none of {', '.join(KNOWN_ONNX)}: give the file to score, "
                         f"e.g. {path / onnx_files[0]}")
    return None


def _onnx_backend(path: Path) -> str:
    if path.name in KNOWN_ONNX:
        return KNOWN_ONNX[path.name]
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return "onnx_int8" if any(node.op_type in INT8_OPERATORS for node in graph.node) else "onnx_fp32"


def check_given_onnx(given: GivenOnnx, task: GlueTask | None = None) -> None:
    """Fail before any scoring unless the files carry what scoring them needs: the config of a classifier (for ``task``'s
    outputs when given) and the tokenizer, as ``homoexport export`` writes them beside the files."""
    where, files = given.directory, ", ".join(p.name for p in given.files.values())
    if not (where / "config.json").is_file():
        raise InputNotFoundError(f"{files}: no config.json beside them in {where} (`homoexport export` writes it, with the tokenizer)")
    config = AutoConfig.from_pretrained(where)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(f"{files} in {where} were not exported from a classifier (config: {', '.join(archs) or 'no architecture'}): "
                         "score scores a classifier's predictions")
    if task is not None and config.num_labels != task.num_labels:
        raise UsageError(f"{files} in {where} were exported from a classifier with {config.num_labels} outputs; {task.name} needs {task.num_labels}")
    try:
        AutoTokenizer.from_pretrained(where)
    except (OSError, TypeError, ValueError) as e:
        raise InputNotFoundError(f"{files}: no tokenizer beside them in {where} (`homoexport export` writes tokenizer.json and its "
                                 f"config there): {e}") from None


def _score_given(given: GivenOnnx, task: GlueTask, data: DatasetDict, settings: GlueSettings, seed: int) -> dict[str, Any]:
    """One run's record for ONNX files scored as they are (the shape ``_run_seed`` returns, without PyTorch)."""
    dev = DatasetDict({split: data[split] for split in task.dev_splits})
    evals: dict[str, EvalResult] = {}
    wall = {"train_s": 0.0}
    for backend, path in given.files.items():
        start = time.perf_counter()
        evals[backend] = evaluate_onnx(path, task, dev, given.directory, settings.max_length, settings.eval_batch_size, settings.inference_threads)
        wall[f"eval_{backend}_s"] = time.perf_counter() - start
    return {
        "seed": seed,
        "training": {"steps": 0, "scored_as_given": True},
        "metrics": {backend: result.metrics for backend, result in evals.items()},
        "latency": {backend: result.latency for backend, result in evals.items()},
        "wall_s": wall,
        "paths": {backend: str(path.resolve()) for backend, path in given.files.items()},
        "export": None,
    }


# --------------------------------------------------------------------------------------------- export


def _export(model_dir: Path, onnx_dir: Path, settings: GlueSettings, train: Dataset, dev: Dataset) -> dict[str, Any]:
    """Export the fine-tuned classifier with the project's exporter (ONNX fp32, fusion, int8); returns its report.

    Static quantization calibrates on the first ``CALIBRATION_ROWS`` training rows (never on dev), written
    next to the export as a headed TSV, the format ``export_model`` reads. The int8 gate compares int8 with
    fp32 predictions on the dev inputs (it changes no weight, so dev is not fitted to).
    """
    calibration = None
    if settings.quantize == "static":
        calibration = onnx_dir.parent / "calibration.tsv"
        rows = train.select(range(min(CALIBRATION_ROWS, len(train))))
        columns = ["text_a", "text_b"][: len(rows.column_names) - 1]
        header = ["sentence"] if len(columns) == 1 else ["sentence1", "sentence2"]
        lines = ["\t".join(header)] + ["\t".join(row[c].replace("\t", " ") for c in columns) for row in rows]
        atomic_write_text(calibration, "\n".join(lines) + "\n")
    return export_model(model_dir, onnx_dir, ExportSettings(
        task="text-classification", optimize=settings.optimize, quantize=settings.quantize, keep_fp32=settings.keep_fp32,
        calibration_data=calibration, calibration_samples=CALIBRATION_ROWS, validation_texts=input_texts(dev, VALIDATION_ROWS)
    ))


# ------------------------------------------------------------------------------------------ one seed


def _run_seed(model_dir: Path, task: GlueTask, data: DatasetDict, settings: GlueSettings, seed: int, seed_dir: Path,
              on_progress: ProgressFn | None) -> dict[str, Any]:
    """Fine-tune, save, evaluate in PyTorch, export and evaluate the ONNX files, for one seed."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dev = DatasetDict({split: data[split] for split in task.dev_splits})
    if settings.train:
        model = load_classifier(model_dir, task)
        model, record = fine_tune(model, tokenizer, task, data["train"], dev[task.primary_split], settings, seed, seed_dir / "checkpoints",
                                  on_progress)
    else:
        model, record = load_finished_classifier(model_dir, task), {"steps": 0, "train_s": 0.0, "scored_as_given": True}
    model.save_pretrained(seed_dir / "model")
    tokenizer.save_pretrained(seed_dir / "model")
    shutil.rmtree(seed_dir / "checkpoints", ignore_errors=True)
    threads, wall = settings.inference_threads, {"train_s": record.pop("train_s")}

    evals: dict[str, EvalResult] = {}
    start = time.perf_counter()
    evals["pytorch"] = evaluate_pytorch(model, tokenizer, task, dev, settings.max_length, settings.eval_batch_size, threads)
    wall["eval_pytorch_s"] = time.perf_counter() - start
    export_info = None
    if settings.export:
        start = time.perf_counter()
        export_info = _export(seed_dir / "model", seed_dir / "onnx", settings, data["train"], dev[task.primary_split])
        wall["export_s"] = time.perf_counter() - start
        for backend, filename in ONNX_FILES.items():
            start = time.perf_counter()
            evals[backend] = evaluate_onnx(seed_dir / "onnx" / filename, task, dev, seed_dir / "onnx", settings.max_length, settings.eval_batch_size, threads)
            wall[f"eval_{backend}_s"] = time.perf_counter() - start
    return {
        "seed": seed,
        "training": record,
        "metrics": {backend: result.metrics for backend, result in evals.items()},
        "latency": {backend: result.latency for backend, result in evals.items()},
        "wall_s": wall,
        "paths": {"model": f"seed-{seed}/model"} | ({"onnx": f"seed-{seed}/onnx"} if settings.export else {}),
        "export": None if export_info is None else _export_summary(export_info, seed),
    }


def _export_summary(export_report: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a GLUE report needs from the export (the full report stays next to the ONNX files)."""
    quantization = export_report.get("quantization", {})
    return {
        "report": f"seed-{seed}/onnx/{EXPORT_REPORT_FILE}",
        "files": export_report.get("files"),
        "parity": export_report.get("parity"),
        "quantization": {k: quantization.get(k) for k in ("mode", "target", "schema", "order", "operators", "kept_fp32")},
        "validation_inputs": {k: export_report.get("validation_inputs", {}).get(k) for k in ("texts", "source")},
        "elapsed_s": export_report.get("elapsed_s"),
    }


# -------------------------------------------------------------------------------------------- report


def _points(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else 100.0 * value


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate_results(task: GlueTask, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dev split, metric): each backend's mean ± std over seeds, in points, and int8 − PyTorch."""
    rows = []
    for split in task.dev_splits:
        for metric in task.metrics:
            row: dict[str, Any] = {
                "task": task.name,
                "split": split,
                "metric": metric,
                "primary": split == task.primary_split and metric == task.primary_metric,
                "seeds": [run["seed"] for run in runs],
            }
            per_seed = {b: [_points(run["metrics"][b][split][metric]) for run in runs] for b in BACKENDS if b in runs[0]["metrics"]}
            for backend in BACKENDS:
                values = [v for v in per_seed.get(backend, []) if v is not None]
                row[backend], row[f"{backend}_std"] = _mean_std(values)
            deltas = [i - p for i, p in zip(per_seed.get("onnx_int8", []), per_seed.get("pytorch", [])) if i is not None and p is not None]
            row["int8_delta"], row["int8_delta_std"] = _mean_std(deltas)
            row["int8_delta_max_abs"] = max((abs(d) for d in deltas), default=None)
            row["per_seed"] = per_seed
            rows.append(row)
    return rows


def _mean_latency(runs: Sequence[dict[str, Any]], split: str) -> dict[str, dict[str, float]]:
    out = {}
    for backend in runs[0]["latency"]:
        stats = [run["latency"][backend][split] for run in runs]
        out[backend] = {key: (statistics.fmean(s[key] for s in stats) if isinstance(stats[0][key], float) else stats[0][key]) for key in stats[0]}
    return out


def run_glue(
    model_dir: str | os.PathLike,
    task: str,
    out_dir: str | os.PathLike,
    settings: GlueSettings = GlueSettings(),
    data_dir: str | os.PathLike | None = None,
    hub: bool = False,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_dir`` on ``task`` for every seed, export, score each backend; write and return the report.
    With ``settings.train`` False, score the finished classifier instead; given ONNX files (``given_onnx``), score
    those files as they are (the report then has ``scored_files`` and no PyTorch values).

    ``out_dir/glue_report.json`` (``schema`` "homoexport.glue_report/1") holds:

    - ``results``: one row per (dev split, metric) with keys ``task``, ``split``, ``metric``, ``primary``
      (the checkpoint-selection metric on the main dev split), ``pytorch``, ``onnx_fp32``, ``onnx_int8``
      (mean over seeds, in points = metric × 100; None when not exported), ``<backend>_std`` (sample
      std over seeds, None for one seed), ``int8_delta`` (onnx_int8 − pytorch, points), ``int8_delta_std``,
      ``int8_delta_max_abs`` (largest |delta| of any seed), ``seeds`` and ``per_seed`` values;
    - ``latency``: per backend, forward-pass figures on the main dev split (mean over seeds);
    - ``settings``, ``data``, ``runs`` (per-seed training record, metrics, latency, wall times, export
      record), ``wall_s``, ``load_average_1m`` (start/end), ``machine``, ``created``.

    The directory appears whole or not at all (see ``staging_dir``).
    """
    spec = get_task(task)
    given = _check_model(Path(model_dir), settings, spec)
    data = load_data(spec, data_dir, hub, train=given is None)  # given ONNX files: nothing is trained or calibrated
    source = {"source": "hub", "dataset": HUB_DATASET} if hub else {"source": "tsv", "path": str(Path(data_dir).resolve())}
    return _run_task(Path(model_dir), spec, data, source, out_dir, settings, overwrite, on_progress, given)


@dataclass(frozen=True)
class DevFile:
    """A labelled dev set of the user's own: a CSV / TSV / JSON-lines file and its columns, named as a task recipe names
    them (``task.text_column``, ``task.text_pair_column``, ``task.label_column``)."""

    path: Path
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"


def score_dev_file(model_dir: str | os.PathLike, dev: DevFile, out_dir: str | os.PathLike, settings: GlueSettings = GlueSettings(train=False),
                   overwrite: bool = False, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Score a finished classifier on ``dev`` in PyTorch, ONNX fp32 and ONNX int8 (exported here), without training it:
    ``run_glue --no-train`` for a task that is not GLUE; given ONNX files (``given_onnx``), only those files, as they
    are. Labels are the model's class names (``id2label``) or ids; the report has run_glue's schema, its task ``custom``."""
    from homoexport.distillation.task_data import label_names, load_files

    if settings.train:
        raise UsageError("score_dev_file scores a finished classifier: give settings with train=False")
    model_dir = Path(model_dir)
    given = _check_model(model_dir, settings)
    config = AutoConfig.from_pretrained(given.directory if given else model_dir)
    regression = config.num_labels == 1
    names = None if regression else label_names(config) or [str(i) for i in range(config.num_labels)]
    rows = load_files(dev.path, dev.path, dev.text_column, dev.text_pair_column, dev.label_column, names, regression)
    # Nothing is trained; an export here checks its int8 file on "train" too.
    data = DatasetDict({"dev": rows.dev} if given else {"train": rows.dev, "dev": rows.dev})
    return _run_task(model_dir, rows.task, data, {"source": "file", "path": str(Path(dev.path).resolve())}, out_dir, settings, overwrite,
                     on_progress, given)


def _check_model(model_dir: Path, settings: GlueSettings, task: GlueTask | None = None) -> GivenOnnx | None:
    """Check what is to be scored before any data is read: a PyTorch model directory (None), or ONNX files to score as
    they are (returned), with their config and tokenizer beside them."""
    given = given_onnx(model_dir)
    if given is None:
        if not (model_dir / "config.json").is_file():
            raise InputNotFoundError(f"not a model directory (no config.json): {model_dir}")
        _check_max_length(model_dir, settings.max_length)
        return None
    if settings.train:
        raise UsageError(f"{model_dir} holds ONNX files: fine-tuning needs a PyTorch model directory")
    if settings.quantize != GlueSettings.quantize or settings.keep_fp32:
        raise UsageError("--quantize and --keep-fp32 choose how a model is exported: ONNX files are scored as they are")
    check_given_onnx(given, task)
    _check_max_length(given.directory, settings.max_length)
    return given


def _run_task(model_dir: Path, spec: GlueTask, data: DatasetDict, source: dict[str, Any], out_dir: str | os.PathLike, settings: GlueSettings,
              overwrite: bool, on_progress: ProgressFn | None, given: GivenOnnx | None = None) -> dict[str, Any]:
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    data = DatasetDict(
        {split: subsample(ds, settings.max_train_samples if split == "train" else settings.max_eval_samples) for split, ds in data.items()}
    )
    if given is not None:  # nothing is exported: the export settings do not apply
        settings = replace(settings, export=False)
    with staging_dir(out_dir, overwrite=overwrite) as stage:
        if given is not None:  # scored as they are: no training, no export, and no seeds to vary
            runs = [_score_given(given, spec, data, settings, settings.seeds[0])]
        else:
            runs = [_run_seed(model_dir, spec, data, settings, seed, stage / f"seed-{seed}", on_progress) for seed in settings.seeds]
        report = {
            "schema": REPORT_SCHEMA,
            "task": spec.name,
            "model_dir": str(model_dir.resolve()),
            **({"scored_files": {backend: str(path.resolve()) for backend, path in given.files.items()}} if given else {}),
            "data": source,
            "n_examples": {split: len(ds) for split, ds in data.items()},
            "settings": asdict(settings) | {"inference_threads": settings.inference_threads} | ({} if given else {"onnx_files": ONNX_FILES}),
            "units": "metric values are points (metric x 100); int8_delta = onnx_int8 - pytorch in points",
            "results": aggregate_results(spec, runs),
            "latency": _mean_latency(runs, spec.primary_split),
            "runs": runs,
            "wall_s": time.perf_counter() - start,
            # Timings on a shared machine are only comparable at similar load: record it.
            "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
            "machine": fingerprint(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(stage / "glue_report.json", report)
        atomic_write_text(stage / "glue_report.md", report_markdown(report))
    return report


def _check_max_length(model_dir: Path, max_length: int) -> None:
    limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise UsageError(f"max_length {max_length} exceeds the model's max_position_embeddings {limit} ({model_dir})")


def _cell(value: float | None, std: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if std is None else f"{value:.2f} ± {std:.2f}"


def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-run table: one row per backend, metrics, delta (when PyTorch was scored), latency."""
    results = report["results"]
    multi_split = len({r["split"] for r in results}) > 1
    titles = [(f"{r['split'].removeprefix('validation_')} " if multi_split else "") + METRIC_TITLES[r["metric"]] for r in results]
    primary = next(r for r in results if r["primary"])
    with_delta = "pytorch" in report["latency"]
    delta_title = [f"Δ {METRIC_TITLES[primary['metric']]} vs PyTorch"] if with_delta else []
    header = ["backend", *titles, *delta_title, "batch ms (mean)", "batch ms (p90)", "samples/s"]
    rows = []
    for backend, latency in report["latency"].items():
        delta = None if backend == "pytorch" or primary[backend] is None or primary["pytorch"] is None else primary[backend] - primary["pytorch"]
        rows.append(
            [
                BACKEND_TITLES[backend],
                *(_cell(r[backend], r[f"{backend}_std"]) for r in results),
                *((["-" if delta is None else f"{delta:+.2f}"]) if with_delta else []),
                f"{latency['mean_batch_ms']:.1f}",
                f"{latency['p90_batch_ms']:.1f}",
                f"{latency['throughput_samples_per_s']:.1f}",
            ]
        )
    return header, rows


def _kept_fp32(settings: dict[str, Any]) -> str:
    kept = settings.get("keep_fp32") or []
    return f" ({', '.join(kept)} kept fp32)" if kept and settings["export"] else ""


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    n = report["n_examples"]
    dev = ", ".join(str(v) for k, v in n.items() if k != "train")
    if report.get("scored_files"):  # nothing was trained or exported here
        names = ", ".join(Path(f).name for f in report["scored_files"].values())
        run = f"{names} scored as given (no training, no export), max_length {s['max_length']}, dev {dev} examples"
    elif s.get("train", True):
        run = (f"epochs {s['epochs']}, lr {s['learning_rate']}, batch {s['batch_size']}, max_length {s['max_length']}, warmup "
               f"{s['warmup_ratio']}, weight decay {s['weight_decay']}, seeds {','.join(map(str, s['seeds']))}, train {n['train']} / dev {dev} "
               f"examples, quantize {s['quantize'] if s['export'] else 'off'}{_kept_fp32(s)}")
    else:  # scored as given: the training settings were not used
        run = f"scored as given (no training), max_length {s['max_length']}, dev {dev} examples, quantize {s['quantize'] if s['export'] else 'off'}{_kept_fp32(s)}"
    return (f"{report['task']} on {report['model_dir']}: {run}, eval batch {s['eval_batch_size']} on {s['inference_threads']} threads, "
            f"wall {report['wall_s']:.0f} s at load {report['load_average_1m']['start']:.1f}-{report['load_average_1m']['end']:.1f}")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    """The run's table as markdown, followed by its settings."""
    header, rows = report_rows(report)
    return f"## GLUE {report['task']} (dev)\n\n" + _markdown(header, rows) + f"\n{settings_line(report)}\n"


# --------------------------------------------------------------------------------------------- suite


def task_score(results: Sequence[dict[str, Any]], backend: str) -> float | None:
    """A task's single GLUE score: the mean of all its metrics on all its dev splits (MNLI: m and mm)."""
    values = [r[backend] for r in results]
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def _suite_cell(results: Sequence[dict[str, Any]], backend: str) -> str:
    if any(r[backend] is None for r in results):
        return "-"
    return "/".join(f"{r[backend]:.1f}" + (f"±{r[f'{backend}_std']:.1f}" if r[f"{backend}_std"] is not None else "") for r in results)


def run_glue_suite(
    model_dir: str | os.PathLike,
    tasks: Sequence[str],
    out_dir: str | os.PathLike,
    settings: GlueSettings = GlueSettings(),
    data_dir: str | os.PathLike | None = None,
    hub: bool = False,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """``run_glue`` for each task into ``out_dir/<task>/``, then one table in the GLUE paper's column order.

    ``out_dir/glue_suite.json`` (``schema`` "homoexport.glue_suite/1") holds ``tasks`` (GLUE order),
    ``columns`` (titles), ``scores[backend][task]`` (the task's mean metric, points) plus
    ``scores[backend]["average"]`` over the tasks run, ``cells`` (the table's text), every task's
    ``results`` rows (same schema as glue_report.json), ``reports`` (relative paths) and ``wall_s``;
    ``out_dir/glue_suite.md`` is the table.
    """
    specs = sorted({get_task(t).name: get_task(t) for t in tasks}.values(), key=lambda t: GLUE_ORDER.index(t.name))
    if not specs:
        raise UsageError(f"no tasks given (allowed: {', '.join(GLUE_ORDER)})")
    start = time.perf_counter()
    with staging_dir(out_dir, overwrite=overwrite) as stage:
        reports = {}
        for spec in specs:
            logger.info("GLUE %s", spec.name)
            reports[spec.name] = run_glue(model_dir, spec.name, stage / spec.name, settings, data_dir, hub, on_progress=on_progress)
        backends = [b for b in BACKENDS if all(b in r["latency"] for r in reports.values())]
        scores = {b: {name: task_score(r["results"], b) for name, r in reports.items()} for b in backends}
        for b in backends:
            values = list(scores[b].values())
            scores[b]["average"] = None if any(v is None for v in values) else statistics.fmean(values)
        suite = {
            "schema": SUITE_SCHEMA,
            "model_dir": str(Path(model_dir).resolve()),
            "tasks": [s.name for s in specs],
            "columns": [_suite_title(s) for s in specs] + ["Avg"],
            "scores": scores,
            "cells": {b: [_suite_cell(reports[s.name]["results"], b) for s in specs] + [_cell(scores[b]["average"], None)] for b in backends},
            "results": [row for r in reports.values() for row in r["results"]],
            "reports": {name: f"{name}/glue_report.json" for name in reports},
            "settings": next(iter(reports.values()))["settings"],
            "units": "points (metric x 100); a task's score is the mean of its metrics; Avg is the mean over the tasks run",
            "wall_s": time.perf_counter() - start,
            "machine": fingerprint(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(stage / "glue_suite.json", suite)
        atomic_write_text(stage / "glue_suite.md", suite_markdown(suite))
    return suite


def _suite_title(task: GlueTask) -> str:
    metrics = "/".join(METRIC_TITLES[m] for m in task.metrics) if len(task.metrics) > 1 else METRIC_TITLES[task.metrics[0]]
    return f"{TASK_TITLES[task.name]} ({metrics})"


def suite_rows(suite: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["backend", *suite["columns"]], [[BACKEND_TITLES[b], *cells] for b, cells in suite["cells"].items()]


def suite_markdown(suite: dict[str, Any]) -> str:
    """The suite table as markdown, with the units and settings."""
    header, rows = suite_rows(suite)
    s = suite["settings"]
    return (
        f"## GLUE dev: {suite['model_dir']}\n\n" + _markdown(header, rows)
        + f"\n{suite['units']}. Seeds {','.join(map(str, s['seeds']))}; epochs {s['epochs']}, lr {s['learning_rate']}, "
        f"batch {s['batch_size']}, max_length {s['max_length']}, max train samples {s['max_train_samples']}, "
        f"max eval samples {s['max_eval_samples']}, quantize {s['quantize'] if s['export'] else 'off'}. Wall {suite['wall_s']:.0f} s.\n"
    )
