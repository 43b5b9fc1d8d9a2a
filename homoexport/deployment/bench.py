"""Latency, throughput, memory and load-time measurement of ONNX models through onnxruntime.

This is the measuring path shared by ``homoexport bench``, the planner, the export check and GLUE: it
imports only onnxruntime, numpy and the standard library (never torch/transformers), so it runs on an
edge box that has nothing else installed. Imported lazily, only where used: ``tokenizers`` (real token
ids), ``homoexport.reporting.report`` (tables, plots, glue reports).

Also here: the comparison of a bench report with a baseline (``compare_reports``) and the exit codes
that CI gates on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from homoexport.errors import EXIT_MACHINE, EXIT_MISSING, EXIT_REGRESSION, InputNotFoundError, UsageError
from homoexport.machine import physical_cores
from homoexport.progress import ProgressFn, Tracker

logger = logging.getLogger(__name__)

# Token ids drawn for random inputs stay in [LOW_ID, vocab): below ~1000 sit the special and unused
# tokens of BERT vocabularies, which make unrealistic inputs. Without a known vocabulary the ids stay
# in a range every real or test vocabulary has.
LOW_ID = 1000
SAFE_VOCAB = 100

_ORT_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency of one model at one (batch, seq, threads), in milliseconds."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    n: int
    batch: int
    seq: int
    threads: int
    throughput_per_s: float  # sequences per second at this batch: batch / mean latency

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(samples_ms: np.ndarray | list[float]) -> dict[str, float]:
    """Summary of latency samples: mean, p50/p90/p99 (linear interpolation, numpy's default), std, min, max.

    ``std`` is the sample standard deviation (ddof=1; 0 for a single sample).
    """
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D list of samples, got shape {x.shape}")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {
        "mean": float(x.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def session_options(threads: int | None = None, spinning: bool = True) -> "Any":
    """SessionOptions for a latency measurement: ``threads`` intra-op threads (None = all physical cores),
    one inter-op thread, sequential execution, all graph optimizations. ``spinning=False`` stops the pool's
    threads from busy-waiting between ops (onnxruntime's ``session.intra_op.allow_spinning``), for sessions
    timed in alternation in one process, where one idle pool's spinning would slow the other's run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def load_session(model_path: str | os.PathLike, threads: int | None = None, spinning: bool = True) -> "Any":
    """An onnxruntime CPU InferenceSession for ``model_path`` (clear error when the file is missing)."""
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise InputNotFoundError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads, spinning), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...) for unreadable files
        raise UsageError(f"cannot load ONNX model {path}: {str(err).strip().splitlines()[-1]}") from None


PROBE_TOLERANCE = 0.15  # a probe this much slower or faster than another means the machine's speed changed
# Names the probe's workload in every report and cache entry: figures of different workloads never compare.
PROBE_WORKLOAD = "ffn-chain-8x128x256x1024/1"


def probe_graph(blocks: int = 8, rows: int = 128, width: int = 256, inner: int = 1024) -> tuple[bytes, dict[str, np.ndarray]]:
    """The calibration workload: ``blocks`` encoder-like blocks (MatMul, Relu, MatMul, residual Add,
    LayerNormalization) on a [rows, width] fp32 input, as a serialized ONNX model and its feed.

    Not a single large GEMM: one GEMM finishes within a scheduler time slice and its median stays at the
    quiet figure while another process spins on a core, and it varies by up to a fifth on a quiet
    machine (benchmarks/probe_fidelity.py). A chain of forty small ops, with a thread-pool barrier
    after each, is slowed by a spinning neighbour and by memory traffic as an encoder is.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights, nodes, x = [], [], "x"
    for i in range(blocks):
        weights += [numpy_helper.from_array((rng.standard_normal((width, inner)) / np.sqrt(width)).astype(np.float32), f"w_in{i}"),
                    numpy_helper.from_array((rng.standard_normal((inner, width)) / np.sqrt(inner)).astype(np.float32), f"w_out{i}"),
                    numpy_helper.from_array(np.ones(width, np.float32), f"gamma{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"beta{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w_in{i}"], [f"up{i}"]), helper.make_node("Relu", [f"up{i}"], [f"act{i}"]),
                  helper.make_node("MatMul", [f"act{i}", f"w_out{i}"], [f"down{i}"]), helper.make_node("Add", [x, f"down{i}"], [f"sum{i}"]),
                  helper.make_node("LayerNormalization", [f"sum{i}", f"gamma{i}", f"beta{i}"], [f"x{i}"], axis=-1)]
        x = f"x{i}"
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [rows, width])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {"x": rng.standard_normal((rows, width)).astype(np.float32)}


@functools.lru_cache(maxsize=4)
def _probe_session(threads: int | None) -> tuple[Any, dict[str, np.ndarray]]:
    """The probe's session and input, built once per thread count (a planner probes twice per candidate)."""
    import onnxruntime as ort

    model, feed = probe_graph()
    session = ort.InferenceSession(model, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    return session, feed


def calibration_probe(threads: int | None = None, repeats: int = 30) -> float:
    """Median ms of a fixed onnxruntime workload (``probe_graph``) with ``threads`` threads.

    Taken beside a measurement, it tells what speed the machine had at that moment: figures whose probes
    differ by more than ``PROBE_TOLERANCE`` were taken on a machine running at different speeds (another
    process competing for the cores) and are not comparable.
    """
    session, x = _probe_session(threads)
    return median_call_ms(session, x, repeats)


def median_call_ms(session: Any, feed: Mapping[str, np.ndarray], repeats: int, warmup: int = 3) -> float:
    """Median wall ms of ``repeats`` calls of ``session`` on ``feed``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def same_speed(a_ms: float | None, b_ms: float | None, tolerance: float = PROBE_TOLERANCE) -> bool:
    """True when two probe figures say the machine ran at the same speed (within ``tolerance``)."""
    if a_ms is None or b_ms is None:
        return False
    return abs(a_ms / b_ms - 1) <= tolerance


def vocab_size_near(model_path: str | os.PathLike) -> int | None:
    """``vocab_size`` from the config.json next to the model (an export dir has one), else None."""
    config = Path(model_path).parent / "config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def random_token_ids(batch: int, seq: int, vocab_size: int | None, rng: np.random.Generator) -> np.ndarray:
    """Random ids, shape [batch, seq], in [LOW_ID, vocab) when the vocabulary is large enough, else in a
    small range that any vocabulary contains."""
    if vocab_size and vocab_size > 2 * LOW_ID:
        low, high = LOW_ID, vocab_size
    else:
        low, high = 1, min(vocab_size or SAFE_VOCAB, SAFE_VOCAB)
    return rng.integers(low, high, size=(batch, seq), dtype=np.int64)


def feeds_for(session: Any, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Session feeds built from ids [batch, seq]: attention_mask (ones unless given), token_type_ids zeros,
    cast to each input's declared integer type. Raises on inputs a BERT encoder does not have."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    by_name = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in by_name:
            raise UsageError(f"unsupported model input {inp.name!r}: expected a subset of {sorted(by_name)}")
        dtype = _ORT_INT_TYPES.get(inp.type)
        if dtype is None:
            raise UsageError(f"unsupported type {inp.type} for input {inp.name!r}: expected one of {sorted(_ORT_INT_TYPES)}")
        feeds[inp.name] = by_name[inp.name].astype(dtype, copy=False)
    return feeds


def measure_latency(
    model_path: str | os.PathLike,
    batch: int = 1,
    seq: int = 128,
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    duration_s: float | None = None,
    inputs: Mapping[str, np.ndarray] | list[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    session: Any | None = None,
) -> LatencyStats:
    """Time ``session.run`` of an ONNX encoder at (batch, seq) with ``threads`` intra-op threads.

    ``warmup`` untimed calls, then ``repeats`` timed calls, or, with ``duration_s``, timed calls until that
    many seconds have passed (at least one). ``inputs`` is one feed dict or a list cycled through (e.g.
    real sentences of varying length); when None, random ids [batch, seq] are generated (see
    ``random_token_ids``) with a full attention mask and zero token types. ``session`` reuses an
    already-loaded session (its thread setting then wins over ``threads``).
    """
    if batch < 1 or seq < 1:
        raise UsageError(f"batch and seq must be >= 1, got batch={batch} seq={seq}")
    if duration_s is None and repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    threads = threads or physical_cores()
    sess = session if session is not None else load_session(model_path, threads)
    if inputs is None:
        ids = random_token_ids(batch, seq, vocab_size_near(model_path), np.random.default_rng(seed))
        feed_list = [feeds_for(sess, ids)]
    elif isinstance(inputs, Mapping):
        feed_list = [dict(inputs)]
    else:
        feed_list = [dict(f) for f in inputs]
        if not feed_list:
            raise ValueError("inputs is an empty list")

    for i in range(warmup):
        sess.run(None, feed_list[i % len(feed_list)])
    samples: list[float] = []
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    def more() -> bool:
        return len(samples) < repeats if deadline is None else not samples or time.perf_counter() < deadline

    while more():
        feed = feed_list[len(samples) % len(feed_list)]
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    s = percentiles(samples)
    return LatencyStats(
        mean_ms=s["mean"],
        p50_ms=s["p50"],
        p90_ms=s["p90"],
        p99_ms=s["p99"],
        std_ms=s["std"],
        min_ms=s["min"],
        max_ms=s["max"],
        n=len(samples),
        batch=batch,
        seq=seq,
        threads=threads,
        throughput_per_s=batch * 1000.0 / s["mean"],
    )


# --------------------------------------------------------------------------------------------------
# Memory and load time: measured in a fresh subprocess per model, so one session's arenas and the
# parent's own allocations never pollute another model's figure.


@dataclass(frozen=True)
class Footprint:
    """Load time and memory of one InferenceSession, measured in a fresh Python process."""

    load_ms: float  # InferenceSession construction (graph load + optimization), cold process
    peak_rss_mb: float  # peak RSS of the whole process: interpreter + onnxruntime + session + one run
    session_rss_mb: float  # what the session adds: peak RSS minus the peak before it was created
    batch: int  # the shape of the one run whose activations are included
    seq: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this reads VmHWM, the high-water mark of this process's own address space: getrusage's
    ru_maxrss would also carry the parent's peak across fork+exec and inflate a small child's figure.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: psutil exposes the peak working set there
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # bytes on macOS


def _footprint_main() -> None:
    """Subprocess entry point of ``measure_footprint``: argv = model_path batch seq threads."""
    model_path, batch, seq, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    before = _peak_rss_bytes()
    t0 = time.perf_counter()
    sess = load_session(model_path, threads)
    load_ms = (time.perf_counter() - t0) * 1000
    ids = random_token_ids(batch, seq, vocab_size_near(model_path), np.random.default_rng(0))
    sess.run(None, feeds_for(sess, ids))
    peak = _peak_rss_bytes()
    mb = 1024 * 1024
    # The measuring child's result goes to its parent on stdout (measure_footprint reads the last line).
    sys.stdout.write(json.dumps(Footprint(load_ms, peak / mb, (peak - before) / mb, batch, seq, threads).to_dict()) + "\n")


def measure_footprint(model_path: str | os.PathLike, batch: int = 1, seq: int = 128, threads: int | None = None) -> Footprint:
    """Load time and peak RSS of an InferenceSession of ``model_path`` after one run at (batch, seq).

    Runs in a fresh interpreter (importing only onnxruntime + numpy) so the figure is the session's own.
    """
    path = Path(model_path)
    load_session(path, 1)  # a file onnxruntime cannot load is named here, not in the child's traceback
    code = "from homoexport.deployment.bench import _footprint_main; _footprint_main()"
    args = [sys.executable, "-c", code, str(path), str(batch), str(seq), str(threads or physical_cores())]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the memory of {path} failed:\n{proc.stderr.strip()[-2000:]}")
    return Footprint(**json.loads(proc.stdout.strip().splitlines()[-1]))


def file_size_bytes(model_path: str | os.PathLike) -> int:
    """Size of an ONNX model including its external-data file (``model.onnx_data`` / ``model.onnx.data``)."""
    path = Path(model_path)
    extra = [path.with_name(path.name + "_data"), path.with_name(path.name + ".data")]
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


# --------------------------------------------------------------------------------------------------
# Realistic inputs: real token ids (from the tokenizer.json next to the model and, optionally, a text
# file) and, with a non-fixed sequence-length distribution, batches padded to their longest sequence
# as a serving system with dynamic padding would send them.

SEQ_DISTS = ("fixed", "uniform", "text")
INPUT_VARIANTS = 16  # distinct batches cycled through while timing


@dataclass
class TokenSource:
    """Token ids to build inputs from: the special tokens framing a sequence and the content ids."""

    prefix: list[int]  # e.g. [CLS]
    suffix: list[int]  # e.g. [SEP]
    pad_id: int
    stream: np.ndarray  # content ids: a text's tokens concatenated, or the tokenizer's whole-word ids
    lines: list[list[int]] = field(default_factory=list)  # per text line, content ids (for seq_dist="text")
    origin: str = ""


def load_token_source(tokenizer_json: str | os.PathLike, text_path: str | os.PathLike | None = None) -> TokenSource:
    """Token ids from a ``tokenizer.json`` (HF ``tokenizers`` format, imported lazily).

    With ``text_path`` (plain text, one sentence or paragraph per line) the content is that text's
    tokens; without, whole-word vocabulary entries drawn at random (real words, no subword pieces).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.no_truncation()
    specials = tok.encode("").ids  # what the post-processor puts around a sequence, e.g. [CLS] [SEP]
    prefix, suffix = specials[:1], specials[1:]
    pad = tok.token_to_id("[PAD]") if tok.token_to_id("[PAD]") is not None else tok.token_to_id("<pad>")
    added = set(tok.get_added_tokens_decoder())
    if text_path is not None:
        text = Path(text_path)
        lines = [ln.strip() for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise UsageError(f"text file has no non-empty lines: {text}")
        encoded = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
        encoded = [ids for ids in encoded if ids]
        if not encoded:
            raise UsageError(f"text file {text} gives no tokens with {tokenizer_json}")
        stream = np.asarray([i for ids in encoded for i in ids], dtype=np.int64)
        return TokenSource(prefix, suffix, pad or 0, stream, encoded, origin=f"{Path(tokenizer_json).name} + {text.name}")
    vocab = tok.get_vocab()
    words = [i for t, i in vocab.items() if t.isalpha() and i not in added]
    pool = words or [i for i in vocab.values() if i not in added]
    return TokenSource(prefix, suffix, pad or 0, np.asarray(sorted(pool), dtype=np.int64), origin=f"{Path(tokenizer_json).name} (random words)")


def _sequence_lengths(batch: int, seq: int, seq_dist: str, n_special: int, rng: np.random.Generator, source: TokenSource | None) -> np.ndarray:
    """Lengths [batch] (special tokens included) under ``seq_dist``."""
    if seq_dist == "fixed":
        return np.full(batch, seq)
    if seq_dist == "uniform":
        return rng.integers(min(seq, n_special + 1), seq + 1, size=batch)
    if seq_dist == "text":
        if source is None or not source.lines:
            raise UsageError("seq_dist='text' needs a tokenizer.json next to the model and a text file (--text)")
        picks = rng.integers(0, len(source.lines), size=batch)
        return np.minimum([len(source.lines[i]) + n_special for i in picks], seq)
    raise UsageError(f"unknown seq_dist {seq_dist!r}: expected one of {SEQ_DISTS}")


def make_batches(
    session: Any,
    batch: int,
    seq: int,
    seq_dist: str = "fixed",
    source: TokenSource | None = None,
    vocab_size: int | None = None,
    n: int = INPUT_VARIANTS,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """``n`` feed dicts of ``batch`` sequences of at most ``seq`` tokens, each padded to its longest row.

    Content ids come from ``source`` (real tokens framed by its special tokens) or, without one, from
    ``random_token_ids`` (no special tokens; ``vocab_size`` bounds the ids).
    """
    rng = np.random.default_rng(seed)
    prefix, suffix = (source.prefix, source.suffix) if source else ([], [])
    n_special = len(prefix) + len(suffix)
    if seq <= n_special:
        raise UsageError(f"seq={seq} leaves no room for content after {n_special} special tokens")
    feeds = []
    for _ in range(n):
        lengths = _sequence_lengths(batch, seq, seq_dist, n_special, rng, source)
        width = int(lengths.max())
        ids = np.full((batch, width), source.pad_id if source else 0, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, length in enumerate(lengths):
            k = int(length) - n_special
            if source is None:
                content = random_token_ids(1, k, vocab_size, rng)[0]
            elif seq_dist == "text":
                line = source.lines[int(rng.integers(0, len(source.lines)))]
                content = np.resize(np.asarray(line, dtype=np.int64), k)
            elif source.lines:  # a window of the real text
                start = int(rng.integers(0, max(1, source.stream.size - k)))
                content = np.resize(source.stream[start : start + k], k)
            else:
                content = rng.choice(source.stream, size=k)
            ids[row, : int(length)] = np.concatenate([prefix, content, suffix]).astype(np.int64)
            mask[row, : int(length)] = 1
        feeds.append(feeds_for(session, ids, mask))
    return feeds


# --------------------------------------------------------------------------------------------------
# The benchmark grid over models x threads x batch x seq, and its report (bench.json).

SCHEMA = "homoexport.bench/1"


@dataclass(frozen=True)
class BenchTarget:
    """One ONNX file to measure, under the name that identifies it across runs (compare key)."""

    name: str
    path: Path


@dataclass(frozen=True)
class BenchSettings:
    """What to measure: the grid and how long each point is timed."""

    batches: tuple[int, ...] = (1,)
    seqs: tuple[int, ...] = (128,)
    threads: tuple[int, ...] = ()  # empty = all physical cores
    warmup: int = 10
    repeats: int = 50
    duration_s: float | None = None
    seq_dist: str = "fixed"
    text: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batches or not self.seqs or min(self.batches) < 1 or min(self.seqs) < 1:
            raise UsageError(f"batches and seqs must be non-empty lists of positive integers, got {self.batches} and {self.seqs}")
        if self.threads and min(self.threads) < 1:
            raise UsageError(f"threads must be positive, got {self.threads}")
        if self.seq_dist not in SEQ_DISTS:
            raise UsageError(f"unknown --seq-dist {self.seq_dist!r}: expected one of {', '.join(SEQ_DISTS)}")
        if self.seq_dist == "text" and self.text is None:
            raise UsageError("--seq-dist text needs --text FILE (one sentence per line)")
        if self.text is not None and not Path(self.text).is_file():
            raise InputNotFoundError(f"text file not found: {self.text}")
        if self.warmup < 0 or (self.duration_s is None and self.repeats < 1) or (self.duration_s is not None and self.duration_s <= 0):
            raise UsageError(f"need warmup >= 0 and repeats >= 1 (or duration > 0), got warmup={self.warmup} repeats={self.repeats} duration={self.duration_s}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def resolve_targets(specs: Sequence[str]) -> list[BenchTarget]:
    """``PATH`` or ``NAME=PATH`` specs to named ONNX files.

    A directory (an export dir) contributes every ``*.onnx`` in it, named ``<dir or NAME>/<file stem>``;
    a file is named ``<parent dir>/<stem>`` (or ``NAME``). Names are the compare keys, so they stay the
    same when the same export is benchmarked again; give ``NAME=`` to compare files at other paths.
    """
    targets: list[BenchTarget] = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or Path(spec).exists():
            name, raw = "", spec
        path = Path(raw)
        if path.is_dir():
            files = sorted(path.glob("*.onnx"))
            if not files:
                raise InputNotFoundError(f"no *.onnx file in directory {path}")
            targets += [BenchTarget(f"{name or path.resolve().name}/{f.stem}", f) for f in files]
        elif path.is_file() and path.suffix == ".onnx":
            targets.append(BenchTarget(name or f"{path.resolve().parent.name}/{path.stem}", path))
        else:
            raise InputNotFoundError(f"not an .onnx file or a directory containing one: {raw}")
    seen: dict[str, Path] = {}
    for t in targets:
        if t.name in seen:
            raise UsageError(f"two models named {t.name!r} ({seen[t.name]} and {t.path}): name them with NAME=PATH")
        seen[t.name] = t.path
    return targets


def _token_source_for(model_path: Path, text: Path | None) -> TokenSource | None:
    """The tokenizer.json next to the model, when present and the ``tokenizers`` package is installed."""
    tokenizer_json = model_path.parent / "tokenizer.json"
    if not tokenizer_json.is_file():
        return None
    try:
        return load_token_source(tokenizer_json, text)
    except ImportError:
        return None


def bench(targets: Sequence[BenchTarget], settings: BenchSettings, glue_reports: Sequence[tuple[str, Path]] = (), on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Measure every target over the settings' grid; return the bench report (what bench.json holds).

    Per model: file size, load time and peak RSS (fresh subprocess, at the largest grid point), then
    latency at each (threads, batch, seq). ``glue_reports`` (label, glue_report.json) are read into the
    report's ``accuracy`` section so that one file carries everything CI gates on.
    """
    from homoexport.machine import fingerprint
    from homoexport.reporting.report import read_glue

    threads_list = settings.threads or (physical_cores(),)
    grid = [(t, b, s) for t in threads_list for b in settings.batches for s in settings.seqs]
    models: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    probe_start = calibration_probe(max(threads_list))
    bar = Tracker(on_progress, "bench", len(targets) * (len(grid) + 1))
    for target in targets:
        bar.note(f"{target.name}: memory")
        source = _token_source_for(target.path, settings.text)
        if settings.seq_dist == "text" and source is None:
            raise InputNotFoundError(f"--seq-dist text needs a tokenizer.json next to {target.path} (and the `tokenizers` package)")
        fp = measure_footprint(target.path, max(settings.batches), max(settings.seqs), max(threads_list))
        size = file_size_bytes(target.path)
        vocab = vocab_size_near(target.path)
        models[target.name] = {
            "path": str(target.path),
            "file_bytes": size,
            "file_mb": size / 1024 / 1024,
            **fp.to_dict(),
            "inputs": source.origin if source else "random ids",
        }
        bar.advance()
        for threads in threads_list:
            session = load_session(target.path, threads)
            for batch in settings.batches:
                for seq in settings.seqs:
                    bar.note(f"{target.name}: t={threads} b={batch} s={seq}")
                    feeds = make_batches(session, batch, seq, settings.seq_dist, source, vocab, seed=settings.seed)
                    stats = measure_latency(
                        target.path, batch, seq, threads, settings.warmup, settings.repeats, settings.duration_s, feeds, session=session
                    )
                    results.append({"model": target.name, "seq_dist": settings.seq_dist, **stats.to_dict()})
                    bar.advance()
            del session
    accuracy = [{"source": label, **row} for label, path in glue_reports for row in read_glue(path)]
    probe_end = calibration_probe(max(threads_list))
    return {
        "schema": SCHEMA,
        # the machine's speed before and after (``calibration_probe``): figures of a run whose probes differ by
        # more than PROBE_TOLERANCE were taken while something else competed for the cores
        "probe_ms": {"start": probe_start, "end": probe_end, "steady": same_speed(probe_start, probe_end), "workload": PROBE_WORKLOAD},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": fingerprint(),
        "settings": settings.to_dict(),
        "models": models,
        "results": results,
        "accuracy": accuracy,
    }


# --------------------------------------------------------------------------------------------------
# Gating: compare a bench report with a baseline one (latency per matching entry, accuracy per GLUE
# task/metric/variant) and turn the result into an exit code for CI.

EXIT_OK = 0

GATE_METRICS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
# Fields of the fingerprint that make latencies incomparable when they differ (its "id" hashes these).
MACHINE_FIELDS = ("cpu_model", "arch", "isa", "physical_cores")


@dataclass(frozen=True)
class Diff:
    """One compared entry. ``change``: latency, relative (+0.12 = 12% slower); accuracy, points lost."""

    kind: str  # "latency" | "accuracy"
    key: str
    baseline: float | None
    current: float | None
    change: float | None
    status: str  # "ok" | "regressed" | "improved" | "missing" | "new" | "unscored"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """The outcome of ``compare_reports``: every diff, any machine mismatch, and the exit code."""

    diffs: list[Diff]
    machine_differences: list[str]
    latency_compared: bool
    metric: str
    max_regression: float
    max_accuracy_drop: float | None
    mode: str = "stored"  # side-by-side[, single-threaded (machine busy)] | stored, probe-normalized | stored

    @property
    def exit_code(self) -> int:
        """1 on any regression, else 3 on a missing entry, else 4 when the machine differs, else 0."""
        statuses = {d.status for d in self.diffs}
        if "regressed" in statuses:
            return EXIT_REGRESSION
        if "missing" in statuses:
            return EXIT_MISSING
        if not self.latency_compared:
            return EXIT_MACHINE
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "metric": self.metric,
            "max_regression": self.max_regression,
            "max_accuracy_drop": self.max_accuracy_drop,
            "machine_differences": self.machine_differences,
            "latency_compared": self.latency_compared,
            "mode": self.mode,
            "diffs": [d.to_dict() for d in self.diffs],
        }

    def to_markdown(self) -> str:
        """A readable diff: verdict first, then only the entries that matter (all when few)."""
        code = self.exit_code
        verdict = {
            EXIT_OK: "PASS",
            EXIT_REGRESSION: "FAIL: regression",
            EXIT_MISSING: "FAIL: missing entries",
            EXIT_MACHINE: "FAIL: baseline from another machine",
        }[code]
        limit = f"{self.metric} may grow at most {self.max_regression:.0%}"
        if self.max_accuracy_drop is not None:
            limit += f", accuracy may drop at most {self.max_accuracy_drop:g} points"
        how = {"side-by-side": "baseline and current files timed interleaved in this run; the ratio is gated",
               "side-by-side, single-threaded (machine busy)": "baseline and current files timed interleaved in this run, one thread "
               "each because the calibration probes showed another process on the cores; the ratio is gated",
               "stored, probe-normalized": "stored baseline figures, current figures scaled by the calibration probes' ratio",
               "stored": "stored baseline figures"}[self.mode]
        lines = [f"### Compare with baseline: {verdict} (exit {code})", "", f"{limit} ({how})", ""]
        if self.machine_differences:
            note = "latencies compared anyway (--allow-machine-mismatch)" if self.latency_compared else "latencies NOT compared"
            lines += [f"Machine differs from the baseline's ({note}):", ""] + [f"- {d}" for d in self.machine_differences] + [""]
        shown = [d for d in self.diffs if d.status != "ok"] if len(self.diffs) > 20 else self.diffs
        if shown:
            lines += ["| status | kind | entry | baseline | current | change |", "|---|---|---|---:|---:|---:|"]
            for d in sorted(shown, key=lambda d: (_STATUS_ORDER.index(d.status), d.kind, d.key)):
                lines.append(f"| {d.status.upper() if d.status in ('regressed', 'missing') else d.status} | {d.kind} | {d.key} | {_fmt(d.baseline)} | {_fmt(d.current)} | {_fmt_change(d)} |")
        if any(d.status == "unscored" for d in self.diffs):
            lines += ["", "unscored: a PyTorch score of the baseline's; this run scored the ONNX files only, which the gate compares"]
        hidden = len(self.diffs) - len(shown)
        if hidden:
            lines += ["", f"({hidden} entries within limits not shown)"]
        return "\n".join(lines) + "\n"


_STATUS_ORDER = ("regressed", "missing", "improved", "new", "unscored", "ok")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}"


def _fmt_change(d: Diff) -> str:
    if d.change is None:
        return "-"
    return f"{d.change:+.1%}" if d.kind == "latency" else f"{-d.change:+.2f} pts"


def latency_key(entry: Mapping[str, Any]) -> str:
    """The identity of a latency entry across runs: model, batch, seq, threads and input distribution."""
    return f"{entry['model']} b={entry['batch']} s={entry['seq']} t={entry['threads']} {entry.get('seq_dist', 'fixed')}"


def accuracy_key(row: Mapping[str, Any]) -> str:
    """The identity of an accuracy entry across runs: glue report label, task, split, metric, variant."""
    split = f"[{row['split']}]" if row.get("split") else ""
    return f"{row.get('source', '')}:{row['task']}{split}/{row['metric']}/{row['variant']}"


def machine_differences(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints in the fields latency depends on."""
    out = []
    for key in MACHINE_FIELDS:
        if current.get(key) != baseline.get(key):
            out.append(f"{key}: {baseline.get(key)} -> {current.get(key)}")
    ort_now, ort_base = (m.get("versions", {}).get("onnxruntime") for m in (current, baseline))
    if ort_now != ort_base:
        out.append(f"onnxruntime: {ort_base} -> {ort_now}")
    return out


def compare_reports(
    current: Mapping[str, Any],
    baseline: Mapping[str, Any],
    max_regression: float = 0.10,
    metric: str = "p50_ms",
    max_accuracy_drop: float | None = None,
    allow_machine_mismatch: bool = False,
    side_by_side: Mapping[str, float] | None = None,
) -> Comparison:
    """Compare two bench reports entry by entry.

    ``side_by_side`` (latency key -> current / baseline ratio, from ``interleaved_ratios``) replaces the
    stored baseline figures: both files were timed in this run on the same machine state. Otherwise,
    when both reports carry calibration probes, the current figures are scaled by baseline probe /
    current probe, so a machine that runs 2x slower this minute does not read as a 2x regression.

    Latency: each baseline entry (model, batch, seq, threads, seq_dist) must be present in ``current``
    and its ``metric`` may grow by at most ``max_regression`` (0.10 = 10%). Only when both were measured
    on the same machine (CPU model, arch, ISA, cores, onnxruntime), unless ``allow_machine_mismatch``.
    Accuracy (only when ``max_accuracy_drop`` is given, in metric points on a 0-100 scale): each baseline
    (source, task, metric, variant) may lose at most that many points. A baseline ``pytorch`` entry is
    ``unscored`` (not a failure) when the current report holds no PyTorch score at all, as ``homoexport score
    EXPORT_DIR`` writes on a target without the training stack, and an ONNX score of that metric is compared: the
    files that ship are what the gate compares.
    """
    if metric not in GATE_METRICS:
        raise UsageError(f"unknown metric {metric!r}: expected one of {', '.join(GATE_METRICS)}")
    if max_regression < 0 or (max_accuracy_drop is not None and max_accuracy_drop < 0):
        raise UsageError("max_regression and max_accuracy_drop must be >= 0")
    differences = machine_differences(current.get("machine", {}), baseline.get("machine", {}))
    latency_compared = side_by_side is not None or not differences or allow_machine_mismatch
    scale, mode = 1.0, "side-by-side" if side_by_side is not None else "stored"
    c_probe, b_probe = comparable_probes(current, baseline)
    if side_by_side is None and current.get("probe_ms") and baseline.get("probe_ms") and not b_probe:
        logger.warning("the baseline's calibration probe timed another workload (%s, now %s): its figures are compared as stored, "
                       "not scaled by the machine's speed", baseline["probe_ms"].get("workload", "a single MatMul"), PROBE_WORKLOAD)
    if side_by_side is None and c_probe and b_probe:
        scale = ((b_probe["start"] + b_probe["end"]) / 2) / ((c_probe["start"] + c_probe["end"]) / 2)
        mode = "stored, probe-normalized"
    diffs: list[Diff] = []
    if latency_compared:
        now = {latency_key(e): e for e in current.get("results", [])}
        base = {latency_key(e): e for e in baseline.get("results", [])}
        for key, b in base.items():
            c = now.get(key)
            if c is None or (side_by_side is not None and key not in side_by_side):
                diffs.append(Diff("latency", key, b[metric], None, None, "missing"))
                continue
            change = side_by_side[key] - 1.0 if side_by_side is not None else c[metric] * scale / b[metric] - 1.0
            status = "regressed" if change > max_regression else "improved" if change < -max_regression else "ok"
            diffs.append(Diff("latency", key, b[metric], c[metric], change, status))
        diffs += [Diff("latency", k, None, e[metric], None, "new") for k, e in now.items() if k not in base]
    if max_accuracy_drop is not None:
        now_acc = {accuracy_key(r): r["value"] for r in current.get("accuracy", [])}
        base_acc = {accuracy_key(r): r["value"] for r in baseline.get("accuracy", [])}
        onnx_only = _unscored_pytorch(current.get("accuracy", []), baseline.get("accuracy", []))
        for key, b in base_acc.items():
            c = now_acc.get(key)
            if c is None:
                diffs.append(Diff("accuracy", key, b, None, None, "unscored" if key in onnx_only else "missing"))
                continue
            drop = b - c
            status = "regressed" if drop > max_accuracy_drop else "improved" if drop < -max_accuracy_drop else "ok"
            diffs.append(Diff("accuracy", key, b, c, drop, status))
        diffs += [Diff("accuracy", k, None, v, None, "new") for k, v in now_acc.items() if k not in base_acc]
    return Comparison(diffs, [] if side_by_side is not None else differences, latency_compared, metric, max_regression, max_accuracy_drop, mode)


def _unscored_pytorch(current: list[Mapping[str, Any]], baseline: list[Mapping[str, Any]]) -> set[str]:
    """Keys of the baseline's ``pytorch`` accuracy entries that a run scoring ONNX files alone cannot have: the run's
    report (``source``) holds no PyTorch score at all, and an ONNX score of the same metric is compared in both."""
    with_pytorch = {r.get("source", "") for r in current if r["variant"] == "pytorch"}
    now = {accuracy_key(r) for r in current}
    compared = {accuracy_key({**r, "variant": "pytorch"}) for r in baseline if r["variant"] != "pytorch" and accuracy_key(r) in now}
    return {accuracy_key(r) for r in baseline
            if r["variant"] == "pytorch" and r.get("source", "") not in with_pytorch and accuracy_key(r) in compared}


def interleaved_ratios(pairs: Mapping[str, tuple[Path, Path]], settings: "BenchSettings", rounds: int = 5,
                       metric: str = "p50_ms", busy: bool = False) -> dict[str, float]:
    """Current / baseline latency ratio per entry, both files timed in alternation on the same inputs.

    ``pairs`` maps a model name to (current file, baseline file). For each grid point the two sessions
    alternate call by call (ABBA order, so drift hits both alike) for ``rounds`` rounds of
    ``settings.repeats / rounds`` calls each; the ratio is the median of the per-round ratios. Neither
    session's threads spin between calls. ``busy`` (another process competes for the cores) times both
    files single-threaded under the entry's key: with fewer free cores than threads, a multi-threaded call
    waits on whichever of its threads the scheduler preempts, and the ratio measures the scheduler more
    than the model (benchmarks/compare_gate.py measures the gate this way with one core busy).
    """
    threads_list = settings.threads or (physical_cores(),)
    statistic = metric.removesuffix("_ms")
    per_round = max(2, settings.repeats // rounds)
    out: dict[str, float] = {}
    for name, (current, base) in pairs.items():
        for threads in threads_list:
            timing_threads = 1 if busy else threads
            sessions = (load_session(current, timing_threads, spinning=False), load_session(base, timing_threads, spinning=False))
            for batch in settings.batches:
                for seq in settings.seqs:
                    feeds = make_batches(sessions[0], batch, seq, settings.seq_dist, None, vocab_size_near(current), seed=settings.seed)
                    for i in range(settings.warmup):
                        for session in sessions:
                            session.run(None, feeds[i % len(feeds)])
                    ratios = []
                    for _ in range(rounds):
                        samples: tuple[list[float], list[float]] = ([], [])
                        for i in range(per_round):
                            feed = feeds[i % len(feeds)]
                            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                                t0 = time.perf_counter_ns()
                                sessions[k].run(None, feed)
                                samples[k].append((time.perf_counter_ns() - t0) / 1e6)
                        now, then = (percentiles(x)[statistic] for x in samples)
                        ratios.append(now / then)
                    key = latency_key({"model": name, "batch": batch, "seq": seq, "threads": threads, "seq_dist": settings.seq_dist})
                    out[key] = float(np.median(ratios))
    return out


def comparable_probes(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two reports' calibration probes, or empty ones where they timed different workloads (a report
    written before the probe changed): their ratio would say nothing about the machine."""
    now, then = current.get("probe_ms") or {}, baseline.get("probe_ms") or {}
    if now and then and now.get("workload") != then.get("workload"):
        return {}, {}
    return dict(now), dict(then)


def machine_busy(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> bool:
    """True when the current report's calibration probes say another process competes for the cores: they
    moved during the run, or ran slower than the baseline report's fastest probe by more than PROBE_TOLERANCE."""
    now = current.get("probe_ms") or {}
    if not now:
        return False
    if not now.get("steady", True):
        return True
    then = comparable_probes(current, baseline)[1]
    quiet = min((v for v in (then.get("start"), then.get("end")) if v), default=None)
    slowest = max(now["start"], now["end"])
    return quiet is not None and slowest > quiet and not same_speed(slowest, quiet)


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a bench.json, with a clear error when it is missing or not a bench report."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"baseline not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a homoexport bench report (expected \"schema\": \"{SCHEMA}\")")
    return data


# --------------------------------------------------------------------------------------------------
# Option parsing shared by the CLI and scripts (pure, tested).


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32); clear error naming ``what`` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got {text!r}")
    return values


def parse_threads(text: str) -> tuple[int, ...]:
    """``"1,all"`` -> (1, physical cores)."""
    n = physical_cores()
    return parse_int_list(",".join(str(n) if v.strip().lower() == "all" else v for v in text.split(",")), "--threads")


def parse_fraction(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. A bare number above 1 is refused as ambiguous."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--max-regression must look like 10% or 0.1, got {text!r}") from None
    if value < 0 or (not raw.endswith("%") and value > 1):
        raise UsageError(f"--max-regression must look like 10% or 0.1 (a fraction in [0, 1]), got {text!r}")
    return value


# --------------------------------------------------------------------------------------------------
# The `homoexport bench` command as one call.


@dataclass
class BenchOutcome:
    report: dict[str, Any]
    comparison: Comparison | None
    markdown: str
    plots: list[Path]

    @property
    def exit_code(self) -> int:
        return self.comparison.exit_code if self.comparison else EXIT_OK


def run_bench(
    paths: Sequence[str],
    settings: BenchSettings,
    out: Path | None = None,
    plot_dir: Path | None = None,
    glue: Sequence[str] = (),
    baseline: Path | None = None,
    max_regression: float = 0.10,
    metric: str = "p50_ms",
    max_accuracy_drop: float | None = None,
    allow_machine_mismatch: bool = False,
    on_progress: ProgressFn | None = None,
) -> BenchOutcome:
    """Measure ``paths``, optionally compare with ``baseline``, write ``out`` (JSON) and plots.

    ``glue`` entries are glue_report.json files or directories holding one, optionally ``NAME=PATH``;
    a glue_report.json inside a benchmarked directory is picked up too. Inputs are checked before any
    measuring starts, so a typo fails in a second, not after the benchmark.
    """
    from homoexport.atomic import atomic_write_json
    from homoexport.reporting.report import bench_markdown, find_glue_reports, plot_latency

    targets = resolve_targets(paths)
    base = load_report(baseline) if baseline is not None else None
    if max_accuracy_drop is not None and base is not None and not base.get("accuracy"):
        raise UsageError(f"--max-accuracy-drop given but the baseline {baseline} has no accuracy entries (bench it with --glue)")
    glue_reports = find_glue_reports(glue, dict.fromkeys(t.path.parent for t in targets))
    if max_accuracy_drop is not None and not glue_reports:
        raise UsageError("--max-accuracy-drop given but no glue_report.json found: pass --glue PATH")
    report = bench(targets, settings, glue_reports, on_progress)
    comparison = None
    if base is not None:
        current_paths = {t.name: t.path for t in targets}
        pairs = {name: (current_paths[name], Path(m["path"])) for name, m in base.get("models", {}).items()
                 if name in current_paths and Path(m["path"]).is_file() and settings.seq_dist != "text"}
        busy = machine_busy(report, base)
        side = interleaved_ratios(pairs, settings, metric=metric, busy=busy) if pairs and len(pairs) == len(base.get("models", {})) else None
        comparison = compare_reports(report, base, max_regression, metric, max_accuracy_drop, allow_machine_mismatch, side)
        if side is not None and busy:
            comparison.mode = "side-by-side, single-threaded (machine busy)"
        report["comparison"] = {"baseline": str(baseline), **comparison.to_dict()}
    plots = plot_latency(report, plot_dir) if plot_dir is not None else []
    if out is not None:
        atomic_write_json(out, report)
    markdown = bench_markdown(report) + ("\n" + comparison.to_markdown() if comparison else "")
    return BenchOutcome(report, comparison, markdown, plots)
