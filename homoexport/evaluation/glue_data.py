"""GLUE tasks: their files, columns, label sets and metrics, read from the original TSVs or the hub.

Every task is normalised to the same three columns, ``text_a``, ``text_b`` (pair tasks only) and
``label`` (class id, or a float score for STS-B), with the class ids of the hub's ``nyu-mll/glue`` so a
model fine-tuned from either source predicts the same labels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value

from homoexport.errors import UsageError

HUB_DATASET = "nyu-mll/glue"


class GlueDataError(UsageError):
    """A GLUE file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class GlueTask:
    """Where a task's data lives and how it is scored.

    ``text_columns``/``label_column`` are header names, or 0-based positions for a file without a
    header (CoLA). ``labels`` are the raw TSV label values in class-id order; None means regression.
    ``metrics`` lists the reported metrics, the first one selects the best checkpoint.
    """

    name: str
    directory: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    labels: tuple[str, ...] | None
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    dev_files: Mapping[str, str]
    hub_text_columns: tuple[str, ...]
    n_columns: int | None = None  # fixed column count of a header-less file

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(self.dev_files)

    @property
    def test_files(self) -> dict[str, str]:
        """Its test files by split name, named as its dev files are (test.tsv; MNLI test_matched.tsv, ...)."""
        return {Path(f).stem.replace("dev", "test"): f.replace("dev", "test") for f in self.dev_files.values()}

    @property
    def primary_split(self) -> str:
        """The dev split that selects the best checkpoint (MNLI: matched)."""
        return self.dev_splits[0]


_DEV = {"validation": "dev.tsv"}

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", (3,), 1, ("0", "1"), ("unacceptable", "acceptable"), ("matthews_corr",), _DEV, ("sentence",), n_columns=4),
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"), ("accuracy",), _DEV, ("sentence",)),
        GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), _DEV, ("sentence1", "sentence2")),
        GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), _DEV, ("question1", "question2")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("score",), ("pearson", "spearman"), _DEV, ("sentence1", "sentence2")),
        GlueTask(
            "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}, ("premise", "hypothesis"),
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",), _DEV, ("question", "sentence")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",), _DEV, ("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("not_entailment", "entailment"), ("accuracy",), _DEV, ("sentence1", "sentence2")),
    )
}

# The GLUE paper's column order (WNLI, which the paper lists last, after RTE).
GLUE_ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive; "sst-2"/"sts-b" accepted)."""
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise UsageError(f"unknown GLUE task {name!r} (allowed: {', '.join(GLUE_ORDER)})")
    return TASKS[key]


def _tsv_rows(task: GlueTask, path: Path, columns: list[str | int], n_columns: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, the values of ``columns``) for every line of a GLUE TSV, strictly: every line has the header's
    column count (or ``n_columns`` for a file without a header, whose ``columns`` are then positions), else an error
    naming the file and the line. Quoting is off: GLUE files contain unbalanced quotes."""
    if not path.is_file():
        raise GlueDataError(f"{path}: file not found (expected the original GLUE layout: DATA_DIR/{task.directory}/{path.name})")
    found = False
    # utf-8-sig drops the byte-order mark that starts the MRPC header.
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = enumerate((line.rstrip("\r\n") for line in f), start=1)
        if n_columns is None:
            header = next(lines, (1, ""))[1].split("\t")
            n_columns, idx = len(header), [_column_index(header, c, path) for c in columns]
        else:
            idx = [int(c) for c in columns]
        for lineno, line in lines:
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != n_columns:
                raise GlueDataError(f"{path}:{lineno}: expected {n_columns} tab-separated columns, found {len(fields)}")
            found = True
            yield lineno, [fields[i] for i in idx]
    if not found:
        raise GlueDataError(f"{path}: no examples")


def read_tsv(task: GlueTask, path: str | os.PathLike) -> Dataset:
    """Read one labelled GLUE TSV into ``text_a``/``text_b``/``label`` columns.

    Parsed here rather than with the ``datasets`` csv builder because GLUE files contain unbalanced
    quotes (quoting must be off) and must be checked strictly: pandas pads a short row with NaN and
    reports a long one without the file name, while a wrong column count or an unknown label here
    fails naming the file and the line.
    """
    path = Path(path)
    texts: list[list[str]] = [[] for _ in task.text_columns]
    labels: list[int | float] = []
    label_ids = {value: i for i, value in enumerate(task.labels or ())}
    for lineno, (*values, label) in _tsv_rows(task, path, [*task.text_columns, task.label_column], task.n_columns):
        for column, value in zip(texts, values):
            column.append(value)
        labels.append(_parse_label(task, label, label_ids, path, lineno))
    columns: dict[str, list] = dict(zip(("text_a", "text_b"), texts)) | {"label": labels}
    return Dataset.from_dict(columns, features=_features(task))


def read_test_texts(task: GlueTask, path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """The inputs of a GLUE test file, which holds no labels (GLUE keeps them): its text (and pair) column by
    header name, the training files' names (CoLA's other files have no header; its test file names ``sentence``).
    Checked as :func:`read_tsv` checks a labelled file."""
    names: list[str | int] = list(task.text_columns if all(isinstance(c, str) for c in task.text_columns) else task.hub_text_columns)
    texts: list[list[str]] = [[] for _ in names]
    for _, values in _tsv_rows(task, Path(path), names):
        for column, value in zip(texts, values):
            column.append(value)
    return texts[0], texts[1] if len(texts) > 1 else None


def _features(task: GlueTask) -> Features:
    """String text columns and an int64 class id, or a float32 score (the dtype of a regression head)."""
    label = Value("float32") if task.is_regression else Value("int64")
    return Features({name: Value("string") for name in ("text_a", "text_b")[: len(task.text_columns)]} | {"label": label})


def _column_index(header: list[str], column: str | int, path: Path) -> int:
    if column not in header:
        raise GlueDataError(f"{path}:1: header has no column {column!r} (found: {', '.join(header) or 'an empty line'})")
    return header.index(column)


def _parse_label(task: GlueTask, raw: str, label_ids: dict[str, int], path: Path, lineno: int) -> int | float:
    if task.is_regression:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise GlueDataError(f"{path}:{lineno}: score {raw!r} is not a number")
        return score
    if raw not in label_ids:
        raise GlueDataError(f"{path}:{lineno}: unknown label {raw!r} for {task.name} (allowed: {', '.join(task.labels)})")
    return label_ids[raw]


def load_tsv(task: GlueTask, data_dir: str | os.PathLike, train: bool = True) -> DatasetDict:
    """The train split (unless ``train`` is False) and every dev split of ``task`` from ``data_dir/<Task>/*.tsv``."""
    root = Path(data_dir) / task.directory
    if not root.is_dir():
        raise GlueDataError(f"{root}: directory not found (expected the original GLUE layout, e.g. {Path(data_dir) / 'SST-2' / 'train.tsv'})")
    files = {**({"train": "train.tsv"} if train else {}), **task.dev_files}
    return DatasetDict({split: read_tsv(task, root / name) for split, name in files.items()})


def load_hub(task: GlueTask, train: bool = True) -> DatasetDict:
    """The train (unless ``train`` is False) and dev splits of ``task`` from the hub's ``nyu-mll/glue`` (needs network or a cache)."""
    from datasets import load_dataset

    raw = load_dataset(HUB_DATASET, task.name)
    out = {}
    for split in (*(("train",) if train else ()), *task.dev_splits):
        ds = raw[split]
        keep = dict(zip(task.hub_text_columns, ("text_a", "text_b")))
        ds = ds.select_columns([*task.hub_text_columns, "label"]).rename_columns(keep)
        out[split] = ds.cast(_features(task))
    return DatasetDict(out)


def input_texts(rows: Dataset, limit: int) -> tuple[str | tuple[str, str], ...]:
    """The model inputs of the first ``limit`` rows: ``text_a``, or (``text_a``, ``text_b``) where the task has pairs."""
    rows = rows.select(range(min(limit, len(rows))))
    if "text_b" in rows.column_names:
        return tuple(zip(rows["text_a"], rows["text_b"]))
    return tuple(rows["text_a"])


def subsample(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of ``n`` rows (all rows when n is None or ≥ len), the same for every run seed."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise UsageError(f"sample count must be positive, got {n}")
    return ds.shuffle(seed=seed).select(range(n))


def predictions(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    """Class ids from logits [n, num_labels], or scores [n] from a regression head [n, 1]."""
    logits = np.asarray(logits)
    if task.is_regression:
        return logits.reshape(len(logits))
    return logits.argmax(axis=-1)


def score(task: GlueTask, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Every metric of ``task`` (fractions in [0, 1], correlations in [-1, 1]) for predictions vs labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    functions = {
        "accuracy": lambda: accuracy_score(labels, preds),
        "f1": lambda: f1_score(labels, preds, pos_label=1, average="binary"),
        "matthews_corr": lambda: matthews_corrcoef(labels, preds),
        "pearson": lambda: pearsonr(preds, labels)[0],
        "spearman": lambda: spearmanr(preds, labels)[0],
    }
    return {name: float(functions[name]()) for name in task.metrics}
