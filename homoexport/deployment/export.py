"""ONNX export of a BERT-class model through optimum, with ORT fusion, int8 quantization and built-in
validation, so that the file a user deploys is provably the model that was trained.

Pipeline (everything is written into a staging directory that only becomes EXPORT_DIR when every check
passed, see ``atomic.staging_dir``):

1. load the PyTorch model for the task and its tokenizer; refuse missing head weights, a tokenizer whose
   vocabulary does not fit the embedding matrix, and weights that give non-finite outputs;
2. ``onnx_export_from_model`` (optimum) -> ``model.onnx`` (fp32); max-abs-diff to PyTorch <= atol;
3. ``ORTOptimizer`` (O1/O2/O3) -> ``model_optimized.onnx``; fused ``Attention`` nodes counted against
   the layer count (the report says why when they differ); parity to PyTorch checked again;
4. ``ORTQuantizer`` with the ``AutoQuantizationConfig`` of the target ISA -> ``model_quantized.onnx``,
   built in the order (fuse-then-quantize or quantize-then-fuse) that is fastest here, and compared to
   fp32 (cosine of pooled embeddings / agreement of predicted classes or tokens);
5. latency of every file at batch 1 / seq 128 (``bench.measure_latency``) and ``export_report.json``.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from homoexport.atomic import atomic_write_json, staging_dir
from homoexport.deployment.bench import load_session, measure_latency
from homoexport.errors import (
    EXIT_USAGE,
    CheckError,
    InputNotFoundError,
    UsageError,
)
from homoexport.machine import cpu_info, fingerprint
from homoexport.progress import ProgressFn, Tracker

if TYPE_CHECKING:  # sts imports datasets (seconds); export imports it only when a model has a sentence embedding
    from homoexport.evaluation.sts import Pooling

TASKS = ("feature-extraction", "fill-mask", "text-classification")
OPTIMIZE_LEVELS = ("none", "O1", "O2", "O3")
QUANTIZE_MODES = ("none", "dynamic", "static")
TARGETS = ("auto", "avx2", "avx512", "avx512_vnni", "arm64")
ORDERS = ("auto", "fuse-first", "quantize-first")

FP32_FILE = "model.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
QUANTIZED_FILE = "model_quantized.onnx"
REPORT_FILE = "export_report.json"

# Architecture-name suffix -> export task (config.architectures[0], e.g. "BertForMaskedLM").
_TASK_BY_ARCH_SUFFIX = (
    ("ForSequenceClassification", "text-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("Model", "feature-extraction"),
)
# Weights a task may legitimately lack in the checkpoint: feature-extraction exports only
# last_hidden_state, so a pooler that was never trained (an MLM checkpoint has none) is not in the graph.
_OPTIONAL_MISSING_PREFIXES = {"feature-extraction": ("pooler.",)}
# Static (QDQ) quantization touches only MatMul: LayerNorm, GELU, Softmax and the residual Adds stay fp32,
# which is what keeps BERT accuracy (their inputs have outlier ranges that 8 bits clip).
STATIC_OPERATORS = ["MatMul"]
# Layers that can be left in fp32 inside the int8 file (``keep_fp32``), by ONNX node name; the names are
# the same in the plain and the fused graph. "ffn-output" is each layer's FFN down-projection
# (intermediate -> hidden): its input is the GELU output, whose long tail dynamic 8-bit activation scales
# clip; on CoLA it carries most of the int8 loss (benchmarks/results/int8_keep_fp32.json).
FP32_GROUPS = {"ffn-output": re.compile(r"layer\.\d+/output/dense/MatMul$")}
# O3 replaces GELU by its tanh approximation (FastGelu), so its outputs legitimately move more than fp32
# rounding; this is the stated tolerance for that level.
O3_ATOL = 1e-2

# Built-in validation text: varied length, punctuation, numbers and casing, so parity is checked on
# realistic ids and padding; used when the caller gives none. For a task classifier these are out of
# domain: many sit near its decision boundary, where int8 rounding may flip a class that no real input
# would flip, so callers that hold the task's inputs pass them (``ExportSettings.validation_texts``).
VALIDATION_TEXTS = (
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "I loved this movie: the plot was clever, the actors were great and the music stayed with me for days.",
    "Terrible service, cold food, and we waited forty-five minutes for a table.",
    "Is it going to rain in Paris tomorrow afternoon?",
    "The committee approved the 2024 budget by a vote of 7 to 2 after a long debate.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He said he would come, but he never did.",
    "Stocks fell sharply on Monday as investors worried about rising interest rates and slowing growth "
    "in the largest economies, while bond yields climbed to their highest level in more than a decade.",
    "The river flows north through the valley and reaches the sea near the old harbour town.",
    "She wrote three books and a song about the city she grew up in.",
    "Not bad at all.",
    "What is the capital of Australia, and why is it not Sydney?",
    "The new model is smaller, faster and almost as accurate as the original one.",
    "After the storm, volunteers cleared the roads and repaired the roofs of the damaged houses.",
    "Why do birds sing at dawn?",
)
# At most this many caller-given validation inputs are read (agreement then moves in steps of <1%),
# checked in batches of ``VALIDATION_BATCH`` rows.
VALIDATION_ROWS = 256
VALIDATION_BATCH = 32


class ExportError(CheckError):
    """An export that cannot produce a correct model; the message names the input and what to change."""


class Int8GateError(ExportError):
    """No int8 build agrees closely enough with the fp32 model."""


def int8_advice(quantize: str, per_channel: bool, keep_fp32: Sequence[str], builtin_texts: bool = False) -> str:
    """What to try next after the int8 gate failed, given what was just tried."""
    tries = []
    if builtin_texts:
        tries.append("--validation-data (the task's own inputs: the built-in texts are out of domain for a classifier)")
    if not per_channel:
        tries.append("--per-channel")
    if "ffn-output" not in keep_fp32:
        tries.append("--keep-fp32 ffn-output (the FFN down-projections stay fp32)")
    if quantize == "dynamic":
        tries.append("--quantize static with --calibration-data (in-domain text)")
    else:
        tries.append("more or more representative --calibration-data")
    tries.append("--quantize none (fp32 ONNX, no int8)")
    return "Try " + ", or ".join(tries) + "."


class ExportInputError(ExportError, UsageError):
    """An export asked for with inputs or options that cannot work (a usage error, exit code 2)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Int8Build:
    """One way of building the int8 file: ``order`` and the resulting path (or why it failed)."""

    order: str
    path: Path | None
    error: str | None = None


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ExportInputError(f"invalid {name} {value!r}: expected one of {', '.join(allowed)}")


def infer_task(architectures: Sequence[str] | None) -> str:
    """Export task from ``config.architectures``: *Model -> feature-extraction, *ForMaskedLM -> fill-mask,
    *ForSequenceClassification -> text-classification."""
    if not architectures:
        raise ExportInputError(f"config.json has no 'architectures': pass --task explicitly ({', '.join(TASKS)})")
    arch = architectures[0]
    for suffix, task in _TASK_BY_ARCH_SUFFIX:
        if arch.endswith(suffix):
            return task
    raise ExportInputError(f"cannot infer the export task from architecture {arch!r}: pass --task ({', '.join(TASKS)})")


def detect_target(cpu: dict[str, Any]) -> str:
    """The int8 kernel family of a CPU (``machine.cpu_info()``): avx512_vnni > avx512 > avx2 on x86, arm64."""
    if cpu["arch"].lower() in ("aarch64", "arm64"):
        return "arm64"
    isa = set(cpu["isa"])
    if "avx512_vnni" in isa:
        return "avx512_vnni"
    if "avx512f" in isa:
        return "avx512"
    if "avx2" in isa:
        return "avx2"
    raise ExportInputError(
        f"no int8 kernel family for this CPU ({cpu['cpu_model']}, {cpu['arch']}, ISA {sorted(isa)}): "
        f"pass --target {'|'.join(TARGETS[1:])} or --quantize none"
    )


def quantization_config(mode: str, target: str, per_channel: bool, nodes_to_exclude: Sequence[str] = ()) -> Any:
    """optimum's ``AutoQuantizationConfig`` for ``target`` (dynamic, or static QDQ on MatMul only)."""
    from optimum.onnxruntime import AutoQuantizationConfig

    factory = getattr(AutoQuantizationConfig, target)
    static = mode == "static"
    return factory(is_static=static, per_channel=per_channel, nodes_to_exclude=list(nodes_to_exclude),
                   operators_to_quantize=STATIC_OPERATORS if static else None)


def fp32_nodes(path: Path, groups: Sequence[str]) -> list[str]:
    """Names of the MatMul nodes of ``path`` that belong to the ``FP32_GROUPS`` named in ``groups``."""
    if not groups:
        return []
    import onnx

    patterns = [FP32_GROUPS[g] for g in groups]
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(p.search(n.name) for p in patterns)]


def read_texts(path: Path, limit: int, what: str = "calibration data") -> list[str | tuple[str, str]]:
    """Up to ``limit`` texts from ``path``: a .txt/.txt.gz file (one text per line) or a GLUE-style .tsv
    whose header names the text column(s) (sentence, sentence1/sentence2, question/sentence, ...)."""
    if not path.is_file():
        raise ExportInputError(f"{what} not found: {path}")
    if path.suffix == ".tsv":
        return _read_tsv_texts(path, limit)
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str | tuple[str, str]] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(line.strip())
            if len(texts) >= limit:
                break
    if not texts:
        raise ExportInputError(f"no text lines in {path}")
    return texts


_TSV_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("#1 String", "#2 String"), ("question1", "question2"), ("sentence",))


def _read_tsv_texts(path: Path, limit: int) -> list[str | tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, [])
        columns = next((cols for cols in _TSV_TEXT_COLUMNS if all(c in header for c in cols)), None)
        if columns is None:
            raise ExportInputError(
                f"{path}: no text column in the header {header}; expected one of {[list(c) for c in _TSV_TEXT_COLUMNS]} "
                "(or give a .txt file with one text per line)"
            )
        idx = [header.index(c) for c in columns]
        texts: list[str | tuple[str, str]] = []
        for row in rows:
            if len(row) <= max(idx):
                continue
            texts.append(row[idx[0]] if len(idx) == 1 else (row[idx[0]], row[idx[1]]))
            if len(texts) >= limit:
                break
    if not texts:
        raise ExportInputError(f"no rows with text in {path}")
    return texts


def tokenize_texts(tokenizer: Any, texts: Sequence[str | tuple[str, str]], max_length: int) -> dict[str, np.ndarray]:
    """Tokenize to int64 arrays [batch, seq] padded to the longest text (pairs become segment A/B)."""
    firsts = [t[0] if isinstance(t, tuple) else t for t in texts]
    seconds = [t[1] for t in texts if isinstance(t, tuple)]
    if seconds and len(seconds) != len(texts):
        raise ExportError("mixed single texts and text pairs in one batch")
    enc = tokenizer(firsts, seconds or None, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def validation_batches(tokenizer: Any, texts: Sequence[str | tuple[str, str]], max_length: int) -> list[dict[str, np.ndarray]]:
    """Batches of at most ``VALIDATION_BATCH`` rows: text pairs as given, or single texts alone and then
    consecutive ones as pairs (so token_type_ids 1 is exercised either way)."""
    groups: list[list[Any]] = [list(texts)]
    if not isinstance(texts[0], tuple):
        groups.append([(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)])
    return [tokenize_texts(tokenizer, group[i:i + VALIDATION_BATCH], max_length) for group in groups for i in range(0, len(group), VALIDATION_BATCH)]


def _load_model_class(task: str) -> Any:
    from transformers import (
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    return {"feature-extraction": AutoModel, "fill-mask": AutoModelForMaskedLM, "text-classification": AutoModelForSequenceClassification}[task]


def load_for_export(model_dir: Path, task: str) -> Any:
    """The PyTorch model for ``task`` in eval mode; refuses weights the checkpoint does not contain
    (a classifier head initialised at random would export a model that was never trained)."""
    try:
        model, info = _load_model_class(task).from_pretrained(model_dir, output_loading_info=True)
    except Exception as e:  # transformers/safetensors raise many types for unreadable checkpoints
        raise ExportInputError(f"cannot load a {task} model from {model_dir}: {type(e).__name__}: {e}") from e
    allowed = _OPTIONAL_MISSING_PREFIXES.get(task, ())
    missing = [k for k in info["missing_keys"] if not k.startswith(allowed)]
    if missing or info.get("mismatched_keys"):
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ExportInputError(
            f"{model_dir} lacks weights for task {task!r} (missing: {shown or '-'}; "
            f"shape-mismatched: {len(info.get('mismatched_keys') or [])}): they would be random in the export; "
            f"check --task (config.architectures = {model.config.architectures})"
        )
    return model.eval()


def load_export_tokenizer(model_dir: Path, vocab_size: int) -> Any:
    """The tokenizer saved with the model; refuses one whose ids do not fit the embedding matrix."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # missing/corrupt tokenizer files surface as OSError, ValueError, TypeError...
        raise ExportInputError(f"cannot load the tokenizer from {model_dir} (the export ships it for ORTModel users): {type(e).__name__}: {e}") from e
    # The largest id, not len(): a vocab file with duplicate entries has holes, so ids reach past len().
    needed = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    if needed > vocab_size:
        raise ExportInputError(
            f"tokenizer in {model_dir} produces ids up to {needed - 1} but the model's vocab_size is {vocab_size}: "
            "ids past the embedding matrix would fail or read garbage; save the tokenizer the model was trained with"
        )
    return tokenizer


def torch_outputs(model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The task's primary output (last_hidden_state [B,S,H] or logits [B,S,V] / [B,C]) as float32 numpy."""
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    primary = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    return primary.float().numpy()


def onnx_outputs(session: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of an ORT session (optimum exports the primary output first)."""
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    return np.asarray(session.run(None, feeds)[0], dtype=np.float32)


def real_token_values(x: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Per-token outputs [B,S,...] restricted to real tokens (padding positions are unspecified);
    per-sequence outputs [B,C] are returned as is."""
    if x.ndim >= 3:
        return x[attention_mask.astype(bool)]
    return x


def max_abs_diff(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Largest |ref - got| over all batches, real tokens only."""
    return max(float(np.max(np.abs(real_token_values(r, m) - real_token_values(g, m)))) for r, g, m in zip(ref, got, masks))


def int8_agreement(task: str, fp32: Sequence[np.ndarray], int8: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   pooling: Pooling | None = None) -> dict[str, float]:
    """How far int8 is from fp32: cosine of the sentence embeddings, pooled as ``pooling`` says (the model's declared
    pooling; mean when None), for feature-extraction; agreement of predicted classes (text-classification) or top-1
    tokens on real positions (fill-mask); plus max-abs-diff."""
    out: dict[str, float] = {"max_abs_diff": max_abs_diff(fp32, int8, masks)}
    if task == "feature-extraction":
        from homoexport.evaluation.sts import Pooling, pool

        pooling = pooling or Pooling()
        a = np.concatenate([pool(x.astype(np.float64), m, pooling) for x, m in zip(fp32, masks)])
        b = np.concatenate([pool(x.astype(np.float64), m, pooling) for x, m in zip(int8, masks)])
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        out |= {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    else:
        a = np.concatenate([real_token_values(x, m).argmax(-1) for x, m in zip(fp32, masks)])
        b = np.concatenate([real_token_values(x, m).argmax(-1) for x, m in zip(int8, masks)])
        out["agreement"] = float((a == b).mean())
    return out


def int8_passes(task: str, metrics: dict[str, float], min_cosine: float, min_agreement: float) -> bool:
    """Whether int8 metrics meet the stated tolerance for ``task``."""
    if task == "feature-extraction":
        return metrics["cosine_min"] >= min_cosine
    return metrics["agreement"] >= min_agreement


def op_counts(path: Path) -> dict[str, int]:
    """Node count per operator type of an ONNX file (top-level graph)."""
    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


@contextlib.contextmanager
def _captured_fusion_log() -> Iterator[list[str]]:
    """Collect ORT's attention-fusion debug messages (they say which subgraph failed to match)."""
    lines: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = _Handler(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("fusion_attention", "onnxruntime.transformers.fusion_attention")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield lines
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def attention_fusion_check(level: str, counts: dict[str, int], layers: int, fusion_log: Sequence[str]) -> dict[str, Any]:
    """Compare fused ``Attention`` nodes with the layer count and explain a difference."""
    fused = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
    result: dict[str, Any] = {"attention_nodes": fused, "layers": layers, "all_layers_fused": fused == layers}
    if fused == layers:
        return result
    if level == "O1":
        reason = "O1 runs only ONNX Runtime's generic graph optimizations; attention fusion is a transformers-specific fusion enabled from O2"
    else:
        unfused = counts.get("Softmax", 0)
        messages = sorted(set(fusion_log))
        reason = (
            f"ONNX Runtime's attention pattern matcher fused {fused} of {layers} layers ({unfused} Softmax nodes remain "
            f"unfused, each running as separate MatMul/Softmax kernels)"
            + (f"; fusion log: {'; '.join(messages[:5])}" if messages else "")
        )
    result["reason"] = reason
    return result


# ORT's transformers optimizer warns about every int8 graph (producer "onnx.quantize", no symbolic shapes
# for the integer ops) although the fusions it can apply there are applied: silenced for that pass only.
_INT8_PASS_LOGGERS = ("onnxruntime.transformers.optimizer", "onnx_model", "fusion_skiplayernorm")


def _optimize(src: Path, work: Path, level: str, config: Any, int8: bool = False) -> tuple[Path, list[str]]:
    """ORTOptimizer at ``level`` on ``src``; returns the optimized file (in ``work``) and the fusion log."""
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    work.mkdir(parents=True, exist_ok=True)
    loggers = [logging.getLogger(name) for name in (_INT8_PASS_LOGGERS if int8 else ())]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with _captured_fusion_log() as log:
            ORTOptimizer([src], config=config).optimize(AutoOptimizationConfig.with_optimization_level(level), work, file_suffix="optimized")
    finally:
        for lg, level_ in zip(loggers, levels):
            lg.setLevel(level_)
    return work / f"{src.stem}_optimized.onnx", log


def annotate_types(src: Path, dst: Path) -> Path:
    """Write ``src`` with value_info from ORT's symbolic shape inference, which knows the com.microsoft
    fused ops (Attention, SkipLayerNormalization, BiasGelu).

    Why: onnx's own shape inference does not know those ops, so after fusion the quantizer cannot type
    the MatMuls that follow them and stops with "Unable to find data type for weight_name ..."; optimum's
    ORTQuantizer does not forward the ``DefaultTensorType`` extra option, so the types are supplied here.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def _quantize(src: Path, work: Path, qconfig: Any, model_config: Any, ranges: dict | None) -> Path:
    from optimum.onnxruntime import ORTQuantizer

    work.mkdir(parents=True, exist_ok=True)
    ORTQuantizer(src, config=model_config).quantize(qconfig, work, file_suffix="quantized", calibration_tensors_range=ranges)
    return work / f"{src.stem}_quantized.onnx"


def _calibrate(src: Path, work: Path, model_config: Any, tokenizer: Any, texts: Sequence[str | tuple[str, str]], max_length: int) -> dict:
    """Activation ranges (min-max) of ``src`` over the calibration texts, one text per ORT run."""
    import onnx
    from datasets import Dataset
    from optimum.onnxruntime import AutoCalibrationConfig, ORTQuantizer

    input_names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    rows = [tokenize_texts(tokenizer, [t], max_length) for t in texts]
    dataset = Dataset.from_dict({name: [r[name][0].tolist() for r in rows] for name in input_names})
    work.mkdir(parents=True, exist_ok=True)
    quantizer = ORTQuantizer(src, config=model_config)
    return quantizer.fit(dataset, AutoCalibrationConfig.minmax(dataset), onnx_augmented_model_name=work / "augmented.onnx", operators_to_quantize=STATIC_OPERATORS)


def interleaved_p50(paths: dict[str, Path], seq: int, threads: int | None, rounds: int = 3, repeats: int = 15) -> dict[str, float]:
    """p50 ms of each of ``paths`` at batch 1 / ``seq``: the median of per-round p50s, rounds interleaved so
    that load from other processes hits every file alike (figures of one call compare; separate calls may not)."""
    sessions = {name: load_session(p, threads) for name, p in paths.items()}
    p50s: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, p in paths.items():
            p50s[name].append(measure_latency(p, batch=1, seq=seq, session=sessions[name], warmup=3, repeats=repeats).p50_ms)
    return {name: float(np.median(v)) for name, v in p50s.items()}


def file_sizes(directory: Path) -> dict[str, int]:
    """Bytes of every ONNX file in ``directory``."""
    return {p.name: p.stat().st_size for p in sorted(directory.glob("*.onnx"))}


def deployed_model_path(export_dir: str | Path) -> Path:
    """The file to deploy from an export dir: int8 if present, else optimized, else fp32."""
    export_dir = Path(export_dir)
    for name in (QUANTIZED_FILE, OPTIMIZED_FILE, FP32_FILE):
        if (export_dir / name).is_file():
            return export_dir / name
    raise InputNotFoundError(f"no {FP32_FILE}, {OPTIMIZED_FILE} or {QUANTIZED_FILE} in {export_dir}")


class _Steps:
    """The export's named steps as progress records (``stage`` "export"): start names a step, done counts it."""

    def __init__(self, total: int, on_progress: ProgressFn | None):
        self.tracker = Tracker(on_progress, "export", total)

    def start(self, description: str) -> None:
        self.tracker.note(description)

    def done(self) -> None:
        self.tracker.advance()


@dataclass(frozen=True)
class ExportSettings:
    """How a model is exported, fused, quantized and checked; validated on creation, recorded in the report.

    ``keep_fp32`` names ``FP32_GROUPS`` whose MatMuls stay fp32 in the int8 file (accuracy for some speed).
    ``order`` builds the int8 file from the fused graph ("fuse-first"), from the plain graph then fuses
    what ORT can ("quantize-first"), or tries both and keeps the faster at batch 1 / seq 128 ("auto").
    """

    task: str = "auto"
    optimize: str = "O2"
    quantize: str = "dynamic"
    target: str = "auto"
    per_channel: bool = True
    keep_fp32: tuple[str, ...] = ()
    calibration_data: Path | None = None
    calibration_samples: int = 200
    opset: int | None = None
    order: str = "auto"
    atol: float = 1e-4
    int8_min_cosine: float = 0.97
    int8_min_agreement: float = 0.9
    validation_texts: tuple[str | tuple[str, str], ...] = VALIDATION_TEXTS
    latency_threads: int | None = None
    latency_repeats: int = 50
    sentence_embedding: bool = False  # feature-extraction: add the pooled (normalised) sentence embedding as a graph output

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        object.__setattr__(self, "validation_texts", tuple(self.validation_texts))
        for name, value, allowed in (("task", self.task, ("auto", *TASKS)), ("optimize level", self.optimize, OPTIMIZE_LEVELS),
                                     ("quantize mode", self.quantize, QUANTIZE_MODES), ("target", self.target, TARGETS),
                                     ("order", self.order, ORDERS)):
            _check_choice(name, value, allowed)
        for group in self.keep_fp32:
            _check_choice("keep-fp32 group", group, tuple(FP32_GROUPS))
        if self.keep_fp32 and self.quantize == "none":
            raise ExportInputError("--keep-fp32 only applies to an int8 export (got --quantize none)")
        if self.quantize == "static" and self.calibration_data is None:
            raise ExportInputError("--quantize static needs --calibration-data (a .txt file, one text per line, or a GLUE .tsv)")
        if self.quantize != "static" and self.calibration_data is not None:
            raise ExportInputError(f"--calibration-data is only used by --quantize static (got --quantize {self.quantize})")
        if self.order == "fuse-first" and self.optimize == "none":
            raise ExportInputError("--order fuse-first needs an --optimize level other than none")
        if self.sentence_embedding and self.task not in ("auto", "feature-extraction"):
            raise ExportInputError(f"--sentence-embedding needs a feature-extraction export (got --task {self.task})")
        if len({isinstance(t, tuple) for t in self.validation_texts}) > 1:
            raise ExportInputError("validation texts mix single texts and text pairs: give one kind")
        if len(self.validation_texts) < 2:
            raise ExportInputError(f"validation needs at least 2 texts (got {len(self.validation_texts)}): they are also paired to check token types")


def export_model(model_dir: Path, out_dir: Path, settings: ExportSettings = ExportSettings(), overwrite: bool = False,
                 on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Export ``model_dir`` to ONNX in ``out_dir`` (fp32, optimized, int8), validate, and return the report.

    Raises ``ExportError`` (out_dir untouched) when the model, tokenizer or any parity check is wrong.
    """
    s = settings
    task, optimize, quantize, target, per_channel, keep_fp32 = s.task, s.optimize, s.quantize, s.target, s.per_channel, s.keep_fp32
    calibration_data, opset, order, atol = s.calibration_data, s.opset, s.order, s.atol
    int8_min_cosine, int8_min_agreement, calibration_samples = s.int8_min_cosine, s.int8_min_agreement, s.calibration_samples
    validation_texts, latency_threads, latency_repeats = s.validation_texts, s.latency_threads, s.latency_repeats
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportInputError(f"not a model directory (no config.json): {model_dir}")
    if out_dir.exists() and not overwrite:
        raise ExportInputError(f"output directory already exists: {out_dir} (pass --overwrite to replace it)")

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # a malformed config.json surfaces as OSError/ValueError/JSONDecodeError
        raise ExportInputError(f"cannot read {model_dir / 'config.json'}: {type(e).__name__}: {e}") from e
    task_source = "given"
    if task == "auto":
        task, task_source = infer_task(config.architectures), f"config.architectures[0] = {config.architectures[0]}"
    resolved_target = detect_target(cpu_info()) if target == "auto" and quantize != "none" else target
    max_length = min(128, int(config.max_position_embeddings))
    started = time.perf_counter()
    n_steps = 4 + (optimize != "none") + 2 * (quantize != "none")

    steps = _Steps(n_steps, on_progress)
    with staging_dir(out_dir, overwrite=overwrite) as stage:
        work = stage / ".work"
        steps.start("loading model and tokenizer")
        model = load_for_export(model_dir, task)
        # An embedding model's int8 gate and in-graph pooling use the pooling its sentence-transformers files declare.
        pooling = None
        if task == "feature-extraction":
            from homoexport.evaluation.sts import read_pooling, write_pooling

            pooling = read_pooling(model_dir)
        tokenizer = load_export_tokenizer(model_dir, int(config.vocab_size))
        batches = validation_batches(tokenizer, list(validation_texts), max_length)
        masks = [b["attention_mask"] for b in batches]
        reference = [torch_outputs(model, b) for b in batches]
        if not all(np.isfinite(r).all() for r in reference):
            raise ExportInputError(f"the PyTorch model in {model_dir} gives NaN/inf outputs: its weights are corrupted")
        steps.done()

        steps.start("exporting fp32 ONNX (optimum)")
        _export_fp32(model, tokenizer, stage, task, opset)
        parity: dict[str, Any] = {}
        parity["onnx_fp32_vs_pytorch"] = _check_parity(stage / FP32_FILE, batches, reference, masks, atol, "fp32 ONNX")
        steps.done()

        fusion: dict[str, Any] = {"level": optimize}
        if optimize != "none":
            steps.start(f"optimizing ({optimize})")
            optimized, fusion_log = _optimize(stage / FP32_FILE, work / "opt", optimize, config)
            shutil.move(optimized, stage / OPTIMIZED_FILE)
            counts = op_counts(stage / OPTIMIZED_FILE)
            from optimum.onnxruntime import ORTOptimizer

            fusion["fused_operators"] = ORTOptimizer.get_fused_operators(stage / OPTIMIZED_FILE)
            fusion |= attention_fusion_check(optimize, counts, int(config.num_hidden_layers), fusion_log)
            opt_atol = O3_ATOL if optimize == "O3" else atol
            parity["onnx_optimized_vs_pytorch"] = _check_parity(stage / OPTIMIZED_FILE, batches, reference, masks, opt_atol, f"{optimize}-optimized ONNX")
            steps.done()

        quant_report: dict[str, Any] = {"mode": quantize}
        if quantize != "none":
            steps.start(f"quantizing ({quantize}, {resolved_target})")
            excluded = fp32_nodes(stage / FP32_FILE, keep_fp32)
            if keep_fp32 and not excluded:
                raise ExportInputError(f"--keep-fp32 {','.join(keep_fp32)} matched no MatMul node of the exported graph")
            qconfig = quantization_config(quantize, resolved_target, per_channel, excluded)
            calib_texts = read_texts(Path(calibration_data), calibration_samples) if calibration_data is not None else None
            candidates = _build_candidates(stage, work, optimize, order, qconfig, config, tokenizer, calib_texts, max_length)
            steps.done()
            steps.start("validating int8")
            try:
                chosen, quant_report = _choose_candidate(candidates, s, task, batches, stage, max_length, pooling)
            except Int8GateError as err:
                builtin = validation_texts == VALIDATION_TEXTS and task == "text-classification"
                raise Int8GateError(f"{err} {int8_advice(quantize, per_channel, keep_fp32, builtin)}") from None
            shutil.move(chosen.path, stage / QUANTIZED_FILE)
            quant_report |= _describe_qconfig(quantize, resolved_target, target, per_channel, qconfig, calibration_data, calib_texts)
            quant_report["kept_fp32"] = {"groups": list(keep_fp32), "nodes": excluded}
            parity["int8_vs_fp32"] = quant_report.pop("int8_vs_fp32")
            steps.done()

        steps.start("measuring latency (batch 1, seq 128)")
        shutil.rmtree(work, ignore_errors=True)
        tokenizer.save_pretrained(stage)
        config.save_pretrained(stage)
        if pooling is not None:  # the export says how its sentence embedding is pooled (sentence-transformers files)
            write_pooling(stage, pooling, int(config.hidden_size), max_length)
            if settings.sentence_embedding:
                parity["sentence_embedding_vs_pytorch"] = _add_sentence_embedding(stage, pooling, batches, reference, atol)
        elif settings.sentence_embedding:
            raise ExportInputError(f"--sentence-embedding needs a feature-extraction model, and {model_dir} exports as {task}")
        latency = {name: measure_latency(stage / name, batch=1, seq=max_length, threads=latency_threads, repeats=latency_repeats).to_dict()
                   for name in (FP32_FILE, OPTIMIZED_FILE, QUANTIZED_FILE) if (stage / name).is_file()}
        steps.done()

        steps.start("writing report")
        report = {
            "schema": "homoexport.export/1",
            "model_dir": str(model_dir),
            "export_dir": str(out_dir),
            "task": task,
            "task_source": task_source,
            "options": {"optimize": optimize, "quantize": quantize, "target": target, "per_channel": per_channel,
                        "keep_fp32": list(keep_fp32), "calibration_data": str(calibration_data) if calibration_data else None, "opset": opset, "order": order,
                        "atol": atol, "int8_min_cosine": int8_min_cosine, "int8_min_agreement": int8_min_agreement},
            "model": _describe_model(config, model),
            "machine": fingerprint(),
            "files": file_sizes(stage),
            "deployed_file": deployed_model_path(stage).name,
            "parity": parity,
            "fusion": fusion,
            "quantization": quant_report,
            "latency_ms": {"batch": 1, "seq": max_length, "by_file": latency},
            "validation_inputs": {"texts": len(validation_texts), "source": "built-in" if validation_texts == VALIDATION_TEXTS else "given",
                                  "batches": [list(b["input_ids"].shape) for b in batches]},
            "elapsed_s": round(time.perf_counter() - started, 2),
        }
        atomic_write_json(stage / REPORT_FILE, report)
        steps.done()
    return report


def _export_fp32(model: Any, tokenizer: Any, stage: Path, task: str, opset: int | None) -> None:
    """optimum's exporter -> stage/model.onnx (its own validation is skipped: ours is stricter and fails)."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch tracer warnings about data-dependent shapes in the mask code
            onnx_export_from_model(model, stage, opset=opset, task=task, do_validation=False, preprocessors=[tokenizer])
    except Exception as e:  # exporter failures come as ValueError/RuntimeError/torch.onnx errors
        raise ExportError(f"optimum could not export the {task} model: {type(e).__name__}: {e}") from e
    if not (stage / FP32_FILE).is_file():
        raise ExportError(f"optimum produced no {FP32_FILE} for task {task}")


def _add_sentence_embedding(stage: Path, pooling: Any, batches: list, reference: list, atol: float) -> dict[str, Any]:
    """Append the pooling to every exported file and check the fp32 file's sentence embedding against PyTorch's."""
    from homoexport.deployment.pooling_graph import OUTPUT, add_pooling
    from homoexport.evaluation.sts import pool

    for name in (FP32_FILE, OPTIMIZED_FILE, QUANTIZED_FILE):
        if (stage / name).is_file():
            add_pooling(stage / name, pooling)
    session = load_session(stage / FP32_FILE)
    diff = 0.0
    for batch, ref in zip(batches, reference):
        got = session.run([OUTPUT], {i.name: batch[i.name] for i in session.get_inputs()})[0]
        diff = max(diff, float(np.max(np.abs(got - pool(ref, batch["attention_mask"], pooling)))))
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(f"the in-graph sentence embedding differs from PyTorch's pooled one by {diff:.3g} > atol {atol:g}; nothing was written")
    return {"max_abs_diff": diff, "atol": atol, "pooling": pooling.mode, "normalize": pooling.normalize, "passed": True}


def _check_parity(path: Path, batches: list, reference: list, masks: list, atol: float, what: str) -> dict[str, Any]:
    session = load_session(path)
    got = [onnx_outputs(session, b) for b in batches]
    diff = max_abs_diff(reference, got, masks)
    if not np.isfinite(diff) or diff > atol:
        raise ExportError(f"{what} differs from PyTorch: max abs diff {diff:.3g} > atol {atol:g} ({path.name}); the export is wrong, nothing was written")
    return {"max_abs_diff": diff, "atol": atol, "passed": True}


def _build_candidates(stage: Path, work: Path, optimize: str, order: str, qconfig: Any, config: Any, tokenizer: Any,
                      calib_texts: Sequence | None, max_length: int) -> list[Int8Build]:
    """Build the int8 file in each requested order; a failing order is recorded, not raised."""
    orders = ["fuse-first", "quantize-first"] if order == "auto" else [order]
    if optimize == "none":
        orders = ["quantize-first"]
    out: list[Int8Build] = []
    for o in orders:
        try:
            if o == "fuse-first":
                src = annotate_types(stage / OPTIMIZED_FILE, work / "ff" / "model_fused.onnx")
                ranges = _calibrate(src, work / "ff", config, tokenizer, calib_texts, max_length) if calib_texts else None
                out.append(Int8Build(o, _quantize(src, work / "ff", qconfig, config, ranges)))
            else:
                src = stage / FP32_FILE
                ranges = _calibrate(src, work / "qf", config, tokenizer, calib_texts, max_length) if calib_texts else None
                q = _quantize(src, work / "qf", qconfig, config, ranges)
                out.append(Int8Build(o, _optimize(q, work / "qf" / "opt", optimize, config, int8=True)[0] if optimize != "none" else q))
        except Exception as e:  # ORT quantizer/optimizer raise RuntimeError, ValueError, onnx errors...
            out.append(Int8Build(o, None, f"{type(e).__name__}: {e}"))
    return out


def _choose_candidate(candidates: list[Int8Build], settings: ExportSettings, task: str, batches: list, stage: Path, seq: int,
                      pooling: Pooling | None) -> tuple[Int8Build, dict[str, Any]]:
    """Validate every built candidate against fp32 ONNX (tolerances and order from ``settings``; ``task`` resolved) and
    keep the fastest one that passes."""
    order, threads = settings.order, settings.latency_threads
    min_cosine, min_agreement = settings.int8_min_cosine, settings.int8_min_agreement
    masks = [b["attention_mask"] for b in batches]
    fp32_session = load_session(stage / FP32_FILE)
    fp32 = [onnx_outputs(fp32_session, b) for b in batches]
    report: dict[str, Any] = {"order_candidates": {}}
    passing: dict[str, Int8Build] = {}
    metrics_by: dict[str, dict[str, float]] = {}
    for c in candidates:
        entry: dict[str, Any] = {"built": c.path is not None}
        if c.path is None:
            entry["error"] = c.error
        else:
            session = load_session(c.path)
            metrics = int8_agreement(task, fp32, [onnx_outputs(session, b) for b in batches], masks, pooling)
            entry |= {"metrics": metrics, "passed": int8_passes(task, metrics, min_cosine, min_agreement), "operators": _int8_ops(c.path)}
            metrics_by[c.order] = metrics
            if entry["passed"]:
                passing[c.order] = c
        report["order_candidates"][c.order] = entry
    if not passing:
        details = "; ".join(f"{o}: {e.get('error') or e.get('metrics')}" for o, e in report["order_candidates"].items())
        raise Int8GateError(f"no int8 model met the tolerance (cosine >= {min_cosine} / agreement >= {min_agreement}): {details}.")
    if len(passing) > 1:
        medians = interleaved_p50({o: c.path for o, c in passing.items()}, seq, threads)
        winner = min(medians, key=medians.__getitem__)
        for o, ms in medians.items():
            report["order_candidates"][o]["p50_ms_b1"] = ms
        report["order_reason"] = f"fastest at batch 1 / seq {seq} (median of interleaved p50s)"
    else:
        winner = next(iter(passing))
        if order != "auto":
            report["order_reason"] = "requested"
        elif len(candidates) == 1:
            report["order_reason"] = "without an optimize level only quantize-first applies"
        else:
            report["order_reason"] = "the only order that built and passed (see order_candidates)"
    chosen = passing[winner]
    report["order"] = winner
    tolerance = {"cosine_min >=": min_cosine} if task == "feature-extraction" else {"agreement >=": min_agreement}
    report["int8_vs_fp32"] = metrics_by[winner] | {"tolerance": tolerance, "passed": True}
    return chosen, report


def _int8_ops(path: Path) -> dict[str, int]:
    keep = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "Attention", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear",
            "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "Gelu", "FastGelu", "MatMul")
    return {k: v for k, v in sorted(op_counts(path).items()) if k in keep}


def _describe_qconfig(mode: str, target: str, requested: str, per_channel: bool, qconfig: Any, calibration_data: Path | None,
                      calib_texts: Sequence | None) -> dict[str, Any]:
    return {
        "target": target,
        "target_source": "CPU flags (machine.cpu_info)" if requested == "auto" else "given",
        "per_channel": per_channel,
        "format": qconfig.format.name,
        "mode": mode,
        "schema": qconfig.quantization_type_str(qconfig.activations_dtype, qconfig.weights_dtype),
        "operators": [getattr(op, "value", op) for op in qconfig.operators_to_quantize],
        "calibration": None if calibration_data is None else {"data": str(calibration_data), "samples": len(calib_texts or []), "method": "minmax"},
    }


def _describe_model(config: Any, model: Any) -> dict[str, Any]:
    return {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "exported_class": type(model).__name__,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "params": int(sum(p.numel() for p in model.parameters())),
    }
