"""Budgets: choose the largest student shape whose *measured* cost fits a budget.

A budget is one or more comma-separated constraints, all of which must hold:

- ``latency=8ms``: p50 latency of the deployed ONNX file (int8 or fp32, exactly as ``homoexport export``
  writes it) through onnxruntime at the plan's batch / seq / threads. p50 is the statistic because it is
  what ``homoexport bench`` gates on and what is stable on a loaded machine; p90 is recorded as well.
- ``memory=30MB``: size of the deployed model file (MB = 2^20 bytes, as ``bench`` reports sizes).
- ``rss=120MB``: peak RSS an InferenceSession adds to a fresh process after one run at the plan's
  batch / seq (``bench.measure_footprint().session_rss_mb``: weights, pre-packed kernels, arena).
- ``params=20M``: parameter count of the student by closed form (embedding + backbone).

Candidates are the shapes reachable from the teacher by HomoDistil (uniform widths, hidden a multiple
of 16 or 8, the teacher's head_dim where it divides hidden, FFN = hidden x the teacher's FFN/hidden
ratio) at the teacher's depth, or at each of several depths (a shallower student starts from evenly
spaced teacher layers). At a fixed depth cost grows with width, so the search bisects each depth's
candidates (sorted by size) instead of timing every shape, then times the few shapes just above the
boundary to catch non-monotone steps (e.g. a change of head count). Across depths the fitting shape
with the most non-embedding parameters wins; the report keeps each depth's best and Pareto front. Measured figures must fit with a safety ``margin``
(timing noise), so the returned shape never violates the budget. Measurements are cached per machine
fingerprint, settings and shape.

Measuring on another machine: ``export_candidates`` writes every candidate's deployed file plus a
manifest; ``measure_candidates`` (onnxruntime + numpy only) times them there and writes
``measurements.json``; ``plan(..., source=FigureSource(measurements=FILE))`` chooses from that file.

This module imports neither torch nor transformers at import time: ``measure_candidates`` runs on boxes
that only have onnxruntime and numpy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from homoexport.atomic import atomic_write_json, staging_dir
from homoexport.deployment.bench import calibration_probe, same_speed
from homoexport.errors import EXIT_BUDGET, UsageError
from homoexport.machine import fingerprint, package_versions, physical_cores
from homoexport.progress import ProgressFn, Tracker

if TYPE_CHECKING:
    from homoexport.pruning.mask_groups import Widths

logger = logging.getLogger(__name__)

SCHEMA = "homoexport.plan/1"
MANIFEST_SCHEMA = "homoexport.plan-candidates/1"
MEASUREMENTS_SCHEMA = "homoexport.plan-measurements/1"
# /2: probes time bench.PROBE_WORKLOAD; /1 entries carry probes of a single MatMul, which compare with nothing now.
CACHE_SCHEMA = "homoexport.plan-cache/2"
MANIFEST_FILE = "manifest.json"
MEASUREMENTS_FILE = "measurements.json"

BUDGET_SYNTAX = (
    "KIND=VALUE[,KIND=VALUE...] with KIND latency (us|ms|s), memory or rss (KB|MB|GB, 2^10 steps) or params (K|M|B or a plain "
    "count), e.g. latency=8ms | memory=30MB | rss=120MB | params=20M | latency=8ms,memory=30MB"
)
_UNITS = {
    "latency": {"us": 1e-3, "ms": 1.0, "s": 1e3},  # -> milliseconds
    "memory": {"kb": 2**10, "mb": 2**20, "gb": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30},  # -> bytes
    "params": {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9},  # -> count
}
_UNITS["rss"] = _UNITS["memory"]
# Figures that come from timing/RSS and so carry noise: the safety margin applies to them only.
NOISY = ("latency", "rss")
PRECISIONS = ("int8", "fp32")
PLAN_TASKS = ("feature-extraction", "text-classification", "fill-mask")
MB = 2**20


class BudgetError(UsageError):
    """A budget, candidate list or plan input that cannot be used; the message says what is accepted."""


class NoFitError(BudgetError):
    """No candidate fits the budget; the message names the smallest achievable figure."""

    exit_code = EXIT_BUDGET


# --------------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Constraint:
    """One budget term: ``kind`` <= ``limit`` (ms for latency, bytes for memory/rss, count for params)."""

    kind: str
    limit: float
    text: str

    def describe(self, value: float) -> str:
        """A figure of this kind in the budget's own units, e.g. '7.41 ms', '28.3 MB', '18.2M'."""
        if self.kind == "latency":
            return f"{value:.2f} ms"
        if self.kind in ("memory", "rss"):
            return f"{value / MB:.1f} MB"
        return f"{value / 1e6:.2f}M"


def parse_budget(text: str) -> tuple[Constraint, ...]:
    """``"latency=8ms,memory=30MB"`` -> constraints; a clear error showing the syntax otherwise."""
    constraints: list[Constraint] = []
    for term in (t.strip() for t in (text or "").split(",")):
        kind, sep, value = term.partition("=")
        kind = kind.strip().lower()
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not sep or kind not in _UNITS or m is None or m.group(2).lower() not in _UNITS[kind]:
            raise BudgetError(f"bad budget {text!r} (term {term!r}): expected {BUDGET_SYNTAX}")
        limit = float(m.group(1)) * _UNITS[kind][m.group(2).lower()]
        if limit <= 0:
            raise BudgetError(f"bad budget {text!r}: {kind} must be > 0")
        if any(c.kind == kind for c in constraints):
            raise BudgetError(f"bad budget {text!r}: {kind} given twice")
        constraints.append(Constraint(kind, limit, term))
    return tuple(constraints)


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class TeacherShape:
    """What the candidates derive from: the teacher's widths, depth and embedding table sizes."""

    hidden: int
    heads: int
    ffn: int
    layers: int
    vocab: int
    max_positions: int
    type_vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True, order=True)
class Shape:
    """A planner candidate: the student's ``Widths`` (stock: heads x head_dim == hidden) and its depth."""

    hidden: int
    heads: int
    ffn: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def widths(self) -> "Widths":
        from homoexport.pruning.mask_groups import Widths  # lazy: `homoexport measure` runs where torch is absent

        return Widths(self.hidden, self.heads, self.head_dim, self.ffn)

    @property
    def name(self) -> str:
        return f"h{self.hidden}-a{self.heads}-f{self.ffn}-l{self.layers}"

    def to_dict(self) -> dict[str, int]:
        return {"hidden": self.hidden, "heads": self.heads, "head_dim": self.head_dim, "ffn": self.ffn, "layers": self.layers}


def teacher_shape(teacher: str | os.PathLike) -> TeacherShape:
    """Read the teacher's config (a local model directory, or a hub name through transformers' cache)."""
    path = Path(teacher) / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
    elif Path(teacher).is_absolute() or str(teacher).startswith(".") or Path(teacher).exists():
        raise BudgetError(f"teacher model directory not found or has no config.json: {teacher}")
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(teacher)).to_dict()
        except Exception as e:  # transformers raises OSError/ValueError/HF errors for unknown names
            raise BudgetError(f"cannot read the teacher's config from {teacher}: {type(e).__name__}: {e}") from e
    if cfg.get("model_type") != "bert":
        raise BudgetError(f"teacher {teacher} has model_type {cfg.get('model_type')!r}: the planner supports bert")
    return TeacherShape(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                        cfg["vocab_size"], cfg["max_position_embeddings"], cfg.get("type_vocab_size", 2))


def choose_heads(hidden: int, teacher: TeacherShape) -> int | None:
    """Heads for ``hidden`` reachable by dropping heads and/or shrinking head_dim uniformly.

    Prefers the teacher's head_dim, else the largest head_dim that is a multiple of 8 (GEMM-friendly).
    None when neither gives at most the teacher's head count (e.g. 208 = 8 x 26 under 12 heads of 32).
    """
    dims = [d for d in range(teacher.head_dim, 0, -1) if hidden % d == 0 and hidden // d <= teacher.heads]
    d = next((d for d in dims if d == teacher.head_dim or d % 8 == 0), None)
    return None if d is None else hidden // d


def round_to(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple`` (hardware-friendly GEMM sizes)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def resolve_depths(teacher: TeacherShape, depths: Sequence[int] | None) -> list[int]:
    """The student depths to search, deepest first (default: the teacher's own, as HomoDistil keeps it)."""
    chosen = sorted(set(depths or [teacher.layers]), reverse=True)
    bad = [d for d in chosen if not 1 <= d <= teacher.layers]
    if bad:
        raise BudgetError(f"depth {bad[0]} is not reachable from a {teacher.layers}-layer teacher: give layers between 1 and {teacher.layers}")
    return chosen


def parse_depths(text: str | None) -> list[int] | None:
    """``"6,4,3"`` -> [6, 4, 3]; None or empty -> None (the teacher's depth)."""
    if not text or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise BudgetError(f"bad --layers {text!r}: expected positive layer counts, comma-separated, e.g. 6 or 6,4,3")
    return [int(p) for p in parts]


def enumerate_candidates(teacher: TeacherShape, multiple: int = 16, ffn_ratio: float | None = None, depths: Sequence[int] | None = None) -> list[Shape]:
    """Every reachable shape with hidden a multiple of ``multiple`` (plus the teacher's own) at each of
    ``depths`` (default: the teacher's), sorted by size."""
    if multiple not in (8, 16, 32, 64):
        raise BudgetError(f"multiple must be one of 8, 16, 32, 64, got {multiple}")
    ratio = ffn_ratio if ffn_ratio is not None else teacher.ffn / teacher.hidden
    if ratio <= 0:
        raise BudgetError(f"ffn ratio must be > 0, got {ratio}")
    shapes = []
    for depth in resolve_depths(teacher, depths):
        for hidden in sorted(set(range(multiple, teacher.hidden + 1, multiple)) | {teacher.hidden}):
            heads = choose_heads(hidden, teacher)
            if heads is not None:
                shapes.append(Shape(hidden, heads, min(teacher.ffn, round_to(hidden * ratio, multiple)), depth))
    return sorted(shapes)


def parse_candidates(text: str, teacher: TeacherShape, multiple: int = 16, ffn_ratio: float | None = None,
                     depths: Sequence[int] | None = None) -> list[Shape]:
    """``"128,256:8:1024"``: hidden sizes (heads and FFN derived as in ``enumerate_candidates``) or
    HIDDEN:HEADS:FFN triples, each at every one of ``depths``; each must be reachable from the teacher."""
    ratio = ffn_ratio if ffn_ratio is not None else teacher.ffn / teacher.hidden
    levels = resolve_depths(teacher, depths)
    shapes = set()
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        parts = spec.split(":")
        if len(parts) not in (1, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BudgetError(f"bad candidate {spec!r}: expected HIDDEN or HIDDEN:HEADS:FFN (positive integers), comma-separated")
        hidden = int(parts[0])
        heads = int(parts[1]) if len(parts) == 3 else choose_heads(hidden, teacher)
        ffn = int(parts[2]) if len(parts) == 3 else min(teacher.ffn, round_to(hidden * ratio, multiple))
        if heads is None or hidden > teacher.hidden or heads > teacher.heads or hidden % heads or hidden // heads > teacher.head_dim or ffn > teacher.ffn:
            raise BudgetError(
                f"candidate {spec!r} is not reachable from the teacher (hidden {teacher.hidden}, {teacher.heads} heads x {teacher.head_dim}, "
                f"ffn {teacher.ffn}): need hidden <= {teacher.hidden}, heads <= {teacher.heads} dividing hidden, head_dim <= {teacher.head_dim}, "
                f"ffn <= {teacher.ffn}"
            )
        shapes.update(Shape(hidden, heads, ffn, depth) for depth in levels)
    if not shapes:
        raise BudgetError(f"--candidates {text!r} names no shape")
    return sorted(shapes)


def parameters(shape: Shape, teacher: TeacherShape) -> int:
    """Parameter count of the student (encoder with pooler, no task head), by closed form."""
    from homoexport.pruning.surgery import closed_form_parameters

    return closed_form_parameters(shape.widths, shape.layers, teacher.vocab, teacher.max_positions, teacher.type_vocab)["total"]


def backbone_parameters(shape: Shape, teacher: TeacherShape) -> int:
    """Parameters outside the embedding tables: the capacity measure that decides between depths.

    Total parameters would favour wide, shallow students only because the vocabulary table grows with
    hidden; non-embedding parameters are what predicts quality in Kaplan et al. (2020), "Scaling Laws for
    Neural Language Models".
    """
    from homoexport.pruning.surgery import closed_form_parameters

    return closed_form_parameters(shape.widths, shape.layers, teacher.vocab, teacher.max_positions, teacher.type_vocab)["backbone"]


# --------------------------------------------------------------------------------------------------
# Settings, measurements, cache


@dataclass(frozen=True)
class PlanSettings:
    """How candidates are exported and measured. ``threads`` None = all physical cores of the measuring machine."""

    batch: int = 1
    seq: int = 128
    threads: Optional[int] = None
    precision: str = "int8"
    task: str = "feature-extraction"
    optimize: str = "O2"
    target: str = "auto"
    per_channel: bool = True
    warmup: int = 10
    repeats: int = 50
    rounds: int = 3

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BudgetError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.task not in PLAN_TASKS:
            raise BudgetError(f"task must be one of {', '.join(PLAN_TASKS)}, got {self.task!r}")
        if self.batch < 1 or self.seq < 1 or (self.threads is not None and self.threads < 1) or self.repeats < 1 or self.rounds < 1 or self.warmup < 0:
            raise BudgetError(f"batch, seq, threads, repeats and rounds must be >= 1 and warmup >= 0: {self}")

    @property
    def quantize(self) -> str:
        return "dynamic" if self.precision == "int8" else "none"

    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """A candidate's measured cost. ``rss_mb`` is None until an rss budget needed it."""

    p50_ms: float
    p90_ms: float
    file_bytes: int
    rss_mb: Optional[float] = None
    source: str = "measured"  # measured | cache | file
    probe_ms: Optional[float] = None  # the calibration probe beside the measurement (the machine's speed then)
    contended: bool = False  # the probe moved, or stayed slower than the machine's quiet speed: the figure is unreliable
    load_avg_1m: Optional[float] = None  # the OS load average when it was taken (None where the OS has none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_average() -> float | None:
    """The 1-minute OS load average (None on systems without one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def figure(kind: str, m: Measurement | None, params: int) -> float | None:
    """The value a constraint of ``kind`` compares (ms, bytes or count); None when not measured."""
    if kind == "params":
        return float(params)
    if m is None:
        return None
    return {"latency": m.p50_ms, "memory": float(m.file_bytes), "rss": None if m.rss_mb is None else m.rss_mb * MB}[kind]


def fits(constraints: Sequence[Constraint], m: Measurement | None, params: int, margin: float) -> bool:
    """True when every constraint holds; noisy figures (latency, rss) must stay under limit x (1 - margin)."""
    for c in constraints:
        value = figure(c.kind, m, params)
        if value is None or value > c.limit * ((1 - margin) if c.kind in NOISY else 1.0):
            return False
    return True


def settings_key(settings: PlanSettings, teacher: TeacherShape) -> str:
    """What, besides the machine and the shape, changes a measurement: settings, embedding sizes and the
    versions of the exporter stack (the graph it writes)."""
    v = package_versions()
    exporter = ",".join(f"{k}={v.get(k)}" for k in ("optimum", "optimum-onnx", "transformers", "onnx", "onnxruntime"))
    s = settings
    return (f"b{s.batch}-s{s.seq}-t{s.resolved_threads()}-{s.precision}-{s.task}-{s.optimize}-{s.target}-pc{int(s.per_channel)}"
            f"-w{s.warmup}-r{s.repeats}x{s.rounds}-v{teacher.vocab}-p{teacher.max_positions}-tt{teacher.type_vocab}|{exporter}")


def default_cache_path() -> Path:
    """``$HOMOEXPORT_CACHE/plan_cache.json``, else ``~/.cache/homoexport/plan_cache.json``."""
    root = os.environ.get("HOMOEXPORT_CACHE") or Path.home() / ".cache" / "homoexport"
    return Path(root) / "plan_cache.json"


class MeasurementCache:
    """Measurements keyed by machine fingerprint id | settings key | shape, in one JSON file.

    Each ``put`` re-reads the file before writing it atomically, so concurrent planners lose nothing
    but a simultaneous write of the same key.
    """

    def __init__(self, path: Path | None, machine_id: str, settings: str):
        self.path, self.machine_id, self.prefix = path, machine_id, f"{machine_id}|{settings}|"

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {"entries": {}, "references": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}  # an unreadable cache is only a slower plan
        if data.get("schema") != CACHE_SCHEMA:
            data = {}
        return {"entries": data.get("entries", {}), "references": data.get("references", {})}

    def _write(self, data: dict[str, Any]) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"schema": CACHE_SCHEMA, **data})

    def get(self, shape: Shape) -> Measurement | None:
        entry = self._read()["entries"].get(self.prefix + shape.name)
        return Measurement(**{**entry, "source": "cache"}) if entry else None

    def put(self, shape: Shape, m: Measurement) -> None:
        data = self._read()
        data["entries"][self.prefix + shape.name] = {**m.to_dict(), "source": "measured"}
        self._write(data)

    def quiet_probe(self, threads: int) -> float | None:
        """The fastest calibration probe ever seen on this machine at ``threads`` threads: its quiet speed."""
        return self._read()["references"].get(f"{self.machine_id}|t{threads}")

    def note_probe(self, threads: int, ms: float) -> None:
        data = self._read()
        key = f"{self.machine_id}|t{threads}"
        if ms < data["references"].get(key, float("inf")):
            data["references"][key] = ms
            self._write(data)


# --------------------------------------------------------------------------------------------------
# Building, exporting and measuring one candidate


class CandidateExporter:
    """Builds random-weight students of the teacher's config and exports them exactly as
    ``homoexport export`` does (same optimize level, quantization, target, per-channel and int8 order).

    Random weights time like trained ones, but their int8-vs-fp32 agreement means nothing, so only that
    accuracy threshold is relaxed; every structural check of the export still runs.
    """

    def __init__(self, teacher: str | os.PathLike, settings: PlanSettings):
        from transformers import AutoConfig, AutoTokenizer

        self.teacher, self.settings = str(teacher), settings
        self.config = AutoConfig.from_pretrained(self.teacher)
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher)

    def build(self, shape: Shape, model_dir: Path) -> Path:
        """Save a random-weight student of ``shape`` with the teacher's tokenizer to ``model_dir``."""
        import torch
        from transformers import (
            AutoModel,
            AutoModelForMaskedLM,
            AutoModelForSequenceClassification,
        )

        config = self.config.__class__.from_dict({**self.config.to_dict(), "hidden_size": shape.hidden, "num_attention_heads": shape.heads,
                                                  "intermediate_size": shape.ffn, "num_hidden_layers": shape.layers})
        cls = {"feature-extraction": AutoModel, "fill-mask": AutoModelForMaskedLM, "text-classification": AutoModelForSequenceClassification}
        torch.manual_seed(0)
        cls[self.settings.task].from_config(config).eval().save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        return model_dir

    def export(self, shape: Shape, work: Path) -> Path:
        """Build and export ``shape`` under ``work``; returns the deployed file (int8, or fp32 optimized)."""
        from homoexport.deployment.export import ExportSettings, deployed_model_path, export_model
        from homoexport.distillation.models import quiet_transformers

        quiet_transformers()
        s = self.settings
        model_dir = self.build(shape, work / "model")
        export_dir = work / "export"
        export_model(model_dir, export_dir, ExportSettings(
            task=s.task, optimize=s.optimize, quantize=s.quantize, target=s.target, per_channel=s.per_channel, int8_min_cosine=0.0,
            int8_min_agreement=0.0, latency_threads=s.resolved_threads(), latency_repeats=1
        ), overwrite=True)
        return deployed_model_path(export_dir)


def measure_file(path: Path, settings: PlanSettings, with_rss: bool) -> Measurement:
    """Latency and file size of an ONNX file, and the session RSS when asked (in a fresh process).

    Latency: ``rounds`` passes of warm-up + repeats on one session; p50/p90 are the medians of the
    per-round figures, so one burst of load from other processes moves the figure less. onnxruntime +
    numpy only.
    """
    import numpy as np

    from homoexport.deployment.bench import (
        file_size_bytes,
        load_session,
        measure_footprint,
        measure_latency,
    )

    threads = settings.resolved_threads()
    session = load_session(path, threads)
    stats = [measure_latency(path, batch=settings.batch, seq=settings.seq, threads=threads, warmup=settings.warmup, repeats=settings.repeats,
                             session=session) for _ in range(settings.rounds)]
    rss = measure_footprint(path, settings.batch, settings.seq, threads).session_rss_mb if with_rss else None
    return Measurement(float(np.median([s.p50_ms for s in stats])), float(np.median([s.p90_ms for s in stats])), file_size_bytes(path), rss)


def export_and_measure(exporter: CandidateExporter, shape: Shape, with_rss: bool) -> Measurement:
    """Export ``shape`` into a temporary directory, measure its deployed file, clean up."""
    with tempfile.TemporaryDirectory(prefix=f"homoexport-plan-{shape.name}-") as tmp:
        return measure_file(exporter.export(shape, Path(tmp)), exporter.settings, with_rss)


# --------------------------------------------------------------------------------------------------
# Search

MeasureFn = Callable[[Shape, bool], Measurement]


@dataclass
class SearchResult:
    chosen: Shape | None
    measured: dict[Shape, Measurement] = field(default_factory=dict)


def search(
    candidates: Sequence[Shape],
    constraints: Sequence[Constraint],
    params: Mapping[Shape, int],
    measure: MeasureFn,
    margin: float = 0.05,
    refine: int = 2,
    on_measure: Callable[[Shape], None] | None = None,
) -> SearchResult:
    """The largest candidate (by size order) that fits every constraint.

    Bisection over ``candidates`` (sorted ascending; cost is assumed to grow with size), then the
    ``refine`` shapes just above the boundary are measured too, so one non-monotone step does not hide a
    larger fitting shape. Only shapes that were measured (or need no measurement) can be chosen.
    """
    order = sorted(candidates)
    needs = any(c.kind != "params" for c in constraints)
    with_rss = any(c.kind == "rss" for c in constraints)
    measured: dict[Shape, Measurement] = {}

    def ok(i: int) -> bool:
        shape = order[i]
        if needs and shape not in measured:
            if on_measure:
                on_measure(shape)
            measured[shape] = measure(shape, with_rss)
        return fits(constraints, measured.get(shape), params[shape], margin)

    lo, hi = -1, len(order)  # invariant: order[lo] fits (or lo == -1), order[hi] does not (or hi == len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    best = lo
    for i in range(lo + 1, min(lo + 1 + refine, len(order))):
        if ok(i):
            best = i
    return SearchResult(order[best] if best >= 0 else None, measured)


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the measured candidates no other candidate beats on both counts: at least as many
    parameters at no more p50 latency (one strictly better)."""
    timed = [(r["params"], r["measurement"]["p50_ms"], r["name"]) for r in rows if (r.get("measurement") or {}).get("p50_ms") is not None]
    return [name for p, ms, name in sorted(timed)
            if not any(q >= p and t <= ms and (q > p or t < ms) for q, t, _ in timed)]


def no_fit_message(constraints: Sequence[Constraint], smallest: Shape, m: Measurement | None, params: int, margin: float, settings: PlanSettings) -> str:
    """Why nothing fits: the smallest candidate's figure for each violated constraint."""
    parts = []
    for c in constraints:
        value = figure(c.kind, m, params)
        if value is not None:
            limit = c.limit * ((1 - margin) if c.kind in NOISY else 1.0)
            if value > limit:
                room = f" (limit {c.describe(limit)} after the {margin:.0%} safety margin)" if c.kind in NOISY and margin else ""
                parts.append(f"{c.kind} {c.describe(value)} > {c.text}{room}")
    where = f"batch {settings.batch}, seq {settings.seq}, {settings.resolved_threads()} threads, {settings.precision}"
    return (f"no candidate fits the budget: the smallest achievable, {smallest.name} ({params / 1e6:.2f}M params), measures "
            f"{'; '.join(parts)} at {where}; raise the budget, lower --multiple, or search shallower depths (--layers)")


# --------------------------------------------------------------------------------------------------
# The plan


def load_measurements(path: Path) -> dict[str, Any]:
    """A measurements.json written by ``measure_candidates``, checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BudgetError(f"measurements file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise BudgetError(f"{path} is not valid JSON: {e}") from None
    if data.get("schema") != MEASUREMENTS_SCHEMA:
        raise BudgetError(f"{path} is not a `homoexport measure` output (expected \"schema\": \"{MEASUREMENTS_SCHEMA}\")")
    return data


@dataclass(frozen=True)
class SearchSpace:
    """The shapes a plan chooses among and how it searches them.

    ``candidates`` (e.g. from ``parse_candidates``) when given, else every reachable shape with hidden a multiple
    of ``multiple`` and FFN = hidden x ``ffn_ratio`` (default: the teacher's ratio) at each of ``depths`` (default:
    the teacher's). A noisy figure (latency, rss) fits when it is at most budget x (1 - ``margin``); after
    bisection the ``refine`` shapes just above the boundary are measured too.
    """

    candidates: Optional[tuple[Shape, ...]] = None
    multiple: int = 16
    ffn_ratio: Optional[float] = None
    depths: Optional[tuple[int, ...]] = None
    margin: float = 0.05
    refine: int = 2

    def __post_init__(self) -> None:
        for name in ("candidates", "depths"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)) or None)
        if self.multiple not in (8, 16, 32, 64):
            raise BudgetError(f"multiple must be one of 8, 16, 32, 64, got {self.multiple}")
        if self.ffn_ratio is not None and self.ffn_ratio <= 0:
            raise BudgetError(f"ffn ratio must be > 0, got {self.ffn_ratio}")
        if not 0 <= self.margin < 1:
            raise BudgetError(f"margin must be in [0, 1), got {self.margin}")
        if self.refine < 0:
            raise BudgetError(f"refine must be >= 0, got {self.refine}")

    def shapes(self, teacher: TeacherShape) -> list[Shape]:
        """The candidate shapes for ``teacher``, sorted by size."""
        return sorted(self.candidates) if self.candidates else enumerate_candidates(teacher, self.multiple, self.ffn_ratio, self.depths)


@dataclass(frozen=True)
class FigureSource:
    """Where a plan's figures come from.

    ``measurements`` (a ``homoexport measure`` file from the target machine), else ``measure`` (tests inject one),
    else exporting and timing candidates here; live figures are cached in ``cache_path`` per machine fingerprint,
    settings and shape (None: no cache), and ``fresh`` measures every visited shape again. ``machine`` replaces
    this machine's fingerprint (tests).
    """

    cache_path: Optional[Path] = None
    measurements: Optional[Path] = None
    fresh: bool = False
    measure: Optional[MeasureFn] = None
    machine: Optional[Mapping[str, Any]] = None


def plan(
    teacher: str | os.PathLike,
    budget: str,
    settings: PlanSettings = PlanSettings(),
    space: SearchSpace = SearchSpace(),
    source: FigureSource = FigureSource(),
    out: Path | None = None,
    plot: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Choose the largest student shape of ``teacher`` in ``space`` that fits ``budget``, from the figures of
    ``source``; returns the plan (written to ``out`` and plotted to ``plot`` when given). Raises ``NoFitError``
    when even the smallest does not fit.

    A live figure over the latency budget is measured a second time and the faster kept (``rechecked`` in the
    report): one slow figure would otherwise end the search below shapes that fit.
    """
    started = time.perf_counter()
    constraints = parse_budget(budget)
    margin, measurements, measure, fresh = space.margin, source.measurements, source.measure, source.fresh
    t = teacher_shape(teacher)
    if settings.seq > t.max_positions:
        raise BudgetError(f"seq {settings.seq} exceeds the teacher's max_position_embeddings {t.max_positions}")
    shapes = space.shapes(t)
    params = {s: parameters(s, t) for s in shapes}
    machine = dict(source.machine or fingerprint())
    cache = MeasurementCache(source.cache_path, machine["id"], settings_key(settings, t))
    hits: list[str] = []
    stale: list[str] = []
    rechecked: list[dict[str, Any]] = []

    def over_latency(m: Measurement) -> bool:
        return any(c.kind == "latency" and m.p50_ms > c.limit * (1 - margin) for c in constraints)

    quiet: list[float | None] = [None]  # the machine's quiet speed: the fastest probe known (cache, then this run)
    now: list[float] = []  # this run's probe, taken once, for judging cache entries
    if measurements is not None:
        data = load_measurements(measurements)
        if data["teacher_shape"] != asdict(t):
            raise BudgetError(f"{measurements} was measured for a teacher of shape {data['teacher_shape']}, not {teacher} ({asdict(t)})")
        settings = PlanSettings(**data["settings"])
        machine = data["machine"]
        by_name = {e["name"]: Measurement(**{**e["measurement"], "source": "file"}) for e in data["candidates"]}

        def measure_one(shape: Shape, with_rss: bool) -> Measurement:
            if shape.name not in by_name:
                raise BudgetError(f"{measurements} has no measurement of {shape.name}: export the same candidates (same teacher, "
                                  f"--multiple, --ffn-ratio, --candidates) with --export-candidates and measure them again")
            return by_name[shape.name]
    else:
        exporter: list[CandidateExporter] = []
        threads = settings.resolved_threads()
        quiet[0] = cache.quiet_probe(threads)

        def probe() -> float:  # every measurement is bracketed by the calibration probe (the machine's speed)
            ms = calibration_probe(threads)
            if quiet[0] is None or ms < quiet[0]:
                quiet[0] = ms
                cache.note_probe(threads, ms)
            return ms

        def slowed(ms: float) -> bool:
            """Slower than the machine's quiet speed: steady load that a before/after comparison cannot see."""
            return quiet[0] is not None and ms > quiet[0] and not same_speed(ms, quiet[0])

        def measure_live(shape: Shape, with_rss: bool) -> Measurement:
            for attempt in range(3):
                before = probe()
                if measure is not None:
                    m = measure(shape, with_rss)
                else:
                    if not exporter:
                        exporter.append(CandidateExporter(teacher, settings))
                    m = export_and_measure(exporter[0], shape, with_rss)
                after = probe()
                m = replace(m, probe_ms=(before + after) / 2, load_avg_1m=load_average())
                if same_speed(before, after) and not slowed(m.probe_ms):
                    return m
                logger.info("the machine's speed moved or stayed below its quiet speed while measuring %s (probe %.2f -> %.2f ms, "
                            "quiet %.2f ms): measuring again", shape.name, before, after, quiet[0])
            logger.warning("%s measured on a contended machine (probe %.2f -> %.2f ms, quiet %.2f ms): its figure is unreliable",
                           shape.name, before, after, quiet[0])
            return replace(m, contended=True)

        def measure_one(shape: Shape, with_rss: bool) -> Measurement:
            hit = None if fresh else cache.get(shape)
            if hit is not None and (hit.rss_mb is not None or not with_rss):
                if not now:
                    now.append(probe())
                # A figure taken at the machine's quiet speed stays true while the machine is busy now; one taken at
                # another speed (under load, or before the machine got faster) is never reused silently.
                if not same_speed(hit.probe_ms, quiet[0]):
                    stale.append(shape.name)
                    hit = None
                if hit is not None:
                    hits.append(shape.name)
                    return hit
            m = measure_live(shape, with_rss)
            if not m.contended and over_latency(m):
                # A figure over the latency budget ends the search above it, so it gets a second measurement: load from
                # other processes only ever slows a run down, and the faster of two figures is the nearer the machine's own.
                again = measure_live(shape, with_rss)
                rechecked.append({"name": shape.name, "p50_ms": [m.p50_ms, again.p50_ms]})
                if not again.contended and again.p50_ms < m.p50_ms:
                    m = again
            if not m.contended:
                cache.put(shape, m)
            return m

    bar = Tracker(on_progress, "plan")
    result = SearchResult(None)
    per_depth: dict[int, Shape | None] = {}
    for depth in sorted({s.layers for s in shapes}, reverse=True):
        # Cost grows with width only at a fixed depth: bisect each depth on its own.
        found = search([s for s in shapes if s.layers == depth], constraints, params, measure_one, margin, space.refine,
                       on_measure=lambda s: bar.advance(message=f"measuring {s.name} (export + time)"))
        result.measured.update(found.measured)
        per_depth[depth] = found.chosen
    winners = [s for s in per_depth.values() if s is not None]
    result.chosen = max(winners, key=lambda s: (backbone_parameters(s, t), s.layers)) if winners else None
    needs = any(c.kind != "params" for c in constraints)
    rows = []
    for s in sorted(shapes, key=lambda s: (-s.layers, s)):
        m = result.measured.get(s)
        rows.append({"name": s.name, **s.to_dict(), "params": params[s], "backbone_params": backbone_parameters(s, t),
                     "measurement": m.to_dict() if m else None, "fits": fits(constraints, m, params[s], margin) if (m or not needs) else None})
    report = {
        "schema": SCHEMA,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher": str(teacher),
        "teacher_shape": asdict(t),
        "budget": budget,
        "constraints": [asdict(c) for c in constraints],
        "statistic": "p50_ms",
        "margin": margin,
        "settings": {**settings.to_dict(), "threads_resolved": settings.resolved_threads()},
        "machine": machine,
        "measurements_file": str(measurements) if measurements else None,
        "chosen": None,
        "candidates": rows,
        "depths": [{"layers": d, "best": w.name if w else None, "best_backbone_params": backbone_parameters(w, t) if w else None,
                    "pareto": pareto_front([r for r in rows if r["layers"] == d])} for d, w in per_depth.items()],
        "depth_rule": "the fitting shape with the most non-embedding parameters over all searched depths (ties: the deeper)",
        "measured": sum(1 for m in result.measured.values() if m.source == "measured"),
        "cache_hits": len(hits),
        "rechecked": rechecked,
        "cache": {"reused": hits, "stale_remeasured": stale, "fresh": fresh,
                  "note": "cache entries are reused only when they were taken at the machine's quiet speed (the fastest calibration "
                          "probe known for it)"},
        "machine_speed": {"probe_ms": now[0] if now else None, "quiet_probe_ms": quiet[0], "load_avg_1m": load_average()},
        "contended": [r["name"] for r in rows if (r["measurement"] or {}).get("contended")],
        "elapsed_s": None,
    }
    if result.chosen is None:
        smallest = min(shapes, key=lambda s: (params[s], s))
        raise NoFitError(no_fit_message(constraints, smallest, result.measured.get(smallest), params[smallest], margin, settings))
    m = result.measured.get(result.chosen)
    report["chosen"] = {"name": result.chosen.name, **result.chosen.to_dict(), "params": params[result.chosen],
                        "predicted": m.to_dict() if m else None}
    report["elapsed_s"] = round(time.perf_counter() - started, 2)
    if plot is not None:
        plot_plan(report, plot)
    if out is not None:
        atomic_write_json(out, report)
    return report


def apply_plan(recipe: Any, plan_report: Mapping[str, Any]) -> Any:
    """A copy of ``recipe`` (homoexport.config.recipe.Recipe) whose student widths are the plan's chosen shape."""
    from homoexport.config.recipe import validate_recipe

    chosen = plan_report.get("chosen")
    if not chosen:
        raise BudgetError("the plan has no chosen shape")
    data = recipe.model_dump(mode="json", by_alias=True)
    data["student"] = {**data["student"], "hidden": chosen["hidden"], "heads": chosen["heads"], "ffn": chosen["ffn"]}
    teacher_layers = plan_report["teacher_shape"]["layers"]
    if chosen["layers"] != (data["student"].get("layers") or teacher_layers):
        # A shallower student starts from evenly spaced teacher layers (DistilBERT's initialisation), and its
        # layer-to-layer terms need a mapping between unequal depths.
        data["student"]["layers"] = chosen["layers"] if chosen["layers"] != teacher_layers else None
        if data["student"]["layers"] is not None:
            data["init"] = "truncate" if data["init"] == "copy" else data["init"]
            data["truncate_layers"] = None
            if data["losses"]["layer_mapping"] == "one_to_one":
                data["losses"]["layer_mapping"] = "uniform"
            logger.info("the plan chose %d layers: the student starts from teacher layers %s with the uniform layer mapping",
                        chosen["layers"], data["init"])
    return validate_recipe(data)


def split_accuracy_drop(budget: str | None) -> tuple[str | None, float | None]:
    """Separate ``accuracy-drop=N`` (points of the primary dev metric) from the measured constraints:
    ``"latency=8ms,accuracy-drop=1"`` -> ``("latency=8ms", 1.0)``."""
    if not budget:
        return budget, None
    rest, drop = [], None
    for term in (t.strip() for t in budget.split(",")):
        kind, _, value = term.partition("=")
        if kind.strip().lower() != "accuracy-drop":
            rest.append(term)
            continue
        try:
            drop = float(value.strip().removesuffix("pt").removesuffix("points"))
        except ValueError:
            raise BudgetError(f"bad budget {budget!r} (term {term!r}): accuracy-drop takes points, e.g. accuracy-drop=1") from None
        if drop <= 0:
            raise BudgetError(f"bad budget {budget!r}: accuracy-drop must be > 0")
    return (",".join(rest) or None), drop


def plan_for_recipe(recipe: Any, budget: str | None = None, plan_file: Path | None = None, cache_path: Path | None = None,
                    on_progress: ProgressFn | None = None, depths: Sequence[int] | None = None) -> tuple[Any, dict[str, Any] | None]:
    """The recipe to train and its plan: from ``plan_file`` (a plan.json), else by planning ``budget`` (or
    the recipe's own ``budget``) for the recipe's teacher at ``depths`` (default: the recipe's depth) at
    the default settings. Without a budget, the recipe unchanged and None."""
    if plan_file is not None and budget is not None:
        raise BudgetError("give --budget or --plan, not both")
    from_command_line = budget is not None or plan_file is not None
    budget, drop = split_accuracy_drop(budget or recipe.budget)
    if drop is not None:
        if getattr(recipe, "task", None) is None:
            raise BudgetError("accuracy-drop needs a task recipe (a fine-tuned teacher and its dev set to measure the drop on)")
        if not recipe.task.family:
            logger.warning("accuracy-drop without task.family: only the final student is scored against it, with no wider one to fall "
                           "back to (task.family keeps students on the way down)")
        from homoexport.config.recipe import validate_recipe

        data = recipe.model_dump(mode="json", by_alias=True)
        data["task"]["max_drop"] = drop
        data["budget"] = budget
        recipe = validate_recipe(data)
    if depths and (plan_file is not None or budget is None):
        raise BudgetError("student depths to choose from (--layers) need a budget to plan, not a finished plan: give --budget")
    if plan_file is None and budget is None:
        return recipe, None
    if budget is not None:
        parse_budget(budget)  # a malformed budget is named before anything else is said about it
    s = recipe.student
    if s.hidden or s.heads or s.ffn:
        if not from_command_line:
            raise BudgetError("the recipe sets student widths and a budget: give one (remove student.hidden/heads/ffn or the budget)")
        logger.info("the command line's budget replaces the recipe's student widths (hidden %s, heads %s, ffn %s)", s.hidden, s.heads, s.ffn)
        data = recipe.model_dump(mode="json", by_alias=True)
        data["student"] = {**data["student"], "hidden": None, "heads": None, "ffn": None}
        from homoexport.config.recipe import validate_recipe

        recipe = validate_recipe(data)
        s = recipe.student
    if plan_file is not None:
        try:
            report = json.loads(Path(plan_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise BudgetError(f"cannot read the plan {plan_file}: {e}") from None
        if report.get("schema") != SCHEMA:
            raise BudgetError(f"{plan_file} is not a `homoexport plan` output (expected \"schema\": \"{SCHEMA}\")")
    else:
        # A task recipe deploys a classifier: time candidates with its head, as `homoexport export` will export it.
        settings = PlanSettings(task="text-classification" if getattr(recipe, "task", None) is not None else "feature-extraction")
        report = plan(recipe.teacher, budget, settings, SearchSpace(depths=depths or ([s.layers] if s.layers else None)),
                      FigureSource(cache_path=cache_path), on_progress=on_progress)
    task = getattr(recipe, "task", None)
    warn_if_narrow(report, suggest_drop=task is not None and task.max_drop is None)
    return apply_plan(recipe, report), report


# At a third of the teacher's hidden width task students already lost about 7 GLUE points
# (benchmarks/task_distill.py, arm (a128)); nothing narrower was measured.
NARROW_FRACTION = 1 / 3


def warn_if_narrow(plan_report: Mapping[str, Any], suggest_drop: bool = False) -> None:
    """Warn when the budget leaves the student under ``NARROW_FRACTION`` of the teacher's hidden width: the run
    will train, but such a student may sit near chance."""
    chosen, teacher = plan_report.get("chosen") or {}, plan_report.get("teacher_shape") or {}
    if not chosen or not teacher.get("hidden") or chosen["hidden"] >= teacher["hidden"] * NARROW_FRACTION:
        return
    check = "; add accuracy-drop=N to the budget to have the run check the loss" if suggest_drop else ""
    logger.warning("the budget leaves the student %d of the teacher's %d hidden units (%.0f%%): expect a large accuracy loss, "
                   "possibly to chance level%s", chosen["hidden"], teacher["hidden"], 100 * chosen["hidden"] / teacher["hidden"], check)


# --------------------------------------------------------------------------------------------------
# Measuring on another machine


def export_candidates(
    teacher: str | os.PathLike,
    out_dir: Path,
    settings: PlanSettings = PlanSettings(),
    space: SearchSpace = SearchSpace(),
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write the deployed ONNX file (+ config.json, which ``bench`` reads the vocabulary from) of every shape in
    ``space`` to ``out_dir/<name>/`` and a manifest, for ``measure_candidates`` on the target machine."""
    t = teacher_shape(teacher)
    shapes = space.shapes(t)
    exporter = CandidateExporter(teacher, settings)
    entries = []
    bar = Tracker(on_progress, "export candidates", len(shapes))
    with staging_dir(out_dir, overwrite=overwrite) as stage:
        for s in shapes:
            bar.note(f"exporting {s.name}")
            with tempfile.TemporaryDirectory(prefix=f"homoexport-cand-{s.name}-") as tmp:
                deployed = exporter.export(s, Path(tmp))
                (stage / s.name).mkdir()
                shutil.copy2(deployed, stage / s.name / deployed.name)
                shutil.copy2(deployed.parent / "config.json", stage / s.name / "config.json")
            entries.append({"name": s.name, **s.to_dict(), "params": parameters(s, t), "file": f"{s.name}/{deployed.name}"})
            bar.advance()
        manifest = {"schema": MANIFEST_SCHEMA, "teacher": str(teacher), "teacher_shape": asdict(t), "settings": settings.to_dict(),
                    "exported_on": fingerprint(), "candidates": entries}
        atomic_write_json(stage / MANIFEST_FILE, manifest)
    return manifest


def measure_candidates(directory: Path, threads: int | None = None, rss: bool = True, out: Path | None = None,
                       on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Time every candidate of an ``export_candidates`` directory on this machine (onnxruntime + numpy
    only) and write ``measurements.json`` (default: inside ``directory``). ``threads`` overrides the
    manifest's (None there = all physical cores here)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BudgetError(f"{directory} has no readable {MANIFEST_FILE} (write one with `homoexport plan --export-candidates`): {e}") from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise BudgetError(f"{directory / MANIFEST_FILE} is not a candidates manifest (expected \"schema\": \"{MANIFEST_SCHEMA}\")")
    settings = PlanSettings(**{**manifest["settings"], **({"threads": threads} if threads else {})})
    settings = replace(settings, threads=settings.resolved_threads())
    rows = []
    bar = Tracker(on_progress, "measure", len(manifest["candidates"]))
    for entry in manifest["candidates"]:
        bar.note(f"measuring {entry['name']}")
        m = measure_file(directory / entry["file"], settings, with_rss=rss)
        rows.append({**entry, "measurement": m.to_dict()})
        bar.advance()
    data = {"schema": MEASUREMENTS_SCHEMA, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "teacher": manifest["teacher"], "teacher_shape": manifest["teacher_shape"], "settings": settings.to_dict(),
            "machine": fingerprint(), "candidates": rows}
    atomic_write_json(out or directory / MEASUREMENTS_FILE, data)
    return data


# --------------------------------------------------------------------------------------------------
# Presentation


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot_plan(report: Mapping[str, Any], path: Path) -> Path:
    """PNG of the measured candidates' budgeted figure (latency unless only memory/rss is budgeted) vs
    parameters, with the budget line and the chosen shape marked."""
    from homoexport.reporting.report import figure

    kinds = [c["kind"] for c in report["constraints"]]
    kind = next((k for k in ("latency", "memory", "rss") if k in kinds), "latency")
    key, scale, label = {"latency": ("p50_ms", 1.0, "p50 latency (ms)"), "memory": ("file_bytes", 1 / MB, "file size (MB)"),
                         "rss": ("rss_mb", 1.0, "session RSS (MB)")}[kind]
    rows = [r for r in report["candidates"] if r["measurement"] and r["measurement"].get(key) is not None]
    fig, (ax,) = figure(1)
    for depth in sorted({r["layers"] for r in rows}, reverse=True):
        at = [r for r in rows if r["layers"] == depth]
        ax.plot([r["params"] / 1e6 for r in at], [r["measurement"][key] * scale for r in at], "o", label=f"measured, {depth} layers")
    limit = next((c["limit"] for c in report["constraints"] if c["kind"] == kind), None)
    if limit is not None:
        ax.axhline(limit / MB if kind in ("memory", "rss") else limit, color="red", linestyle="--", label=f"budget {report['budget']}")
    params_limit = next((c["limit"] for c in report["constraints"] if c["kind"] == "params"), None)
    if params_limit is not None:
        ax.axvline(params_limit / 1e6, color="purple", linestyle=":", label="params budget")
    chosen = report.get("chosen")
    if chosen and chosen.get("predicted"):
        ax.plot([chosen["params"] / 1e6], [chosen["predicted"][key] * scale], "*", markersize=16, color="green", label=f"chosen {chosen['name']}")
    s = report["settings"]
    ax.set(xlabel="parameters (M)", ylabel=label, title=f"batch {s['batch']}, seq {s['seq']}, {s['threads_resolved']} threads, {s['precision']}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
