"""Labelled task data for task-specific distillation: GLUE TSVs or a user's CSV / TSV / JSON-lines file.

Every source is normalised to the columns of :mod:`homoexport.evaluation.glue_data` (``text_a``, optional
``text_b``, ``label``) and described by a :class:`~homoexport.evaluation.glue_data.GlueTask` (labels, metrics),
so GLUE and user data are scored by the same code. Batches are a function of the step (a per-epoch
permutation from the seed), which makes resume exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from homoexport.evaluation.glue_data import GlueDataError, GlueTask, get_task, load_tsv, read_test_texts, read_tsv, subsample

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
MIN_ROWS = {"train": 1, "dev": 2}


class TaskDataError(GlueDataError):
    """A task data file that cannot be used; the message names the file and the column."""


@dataclass(frozen=True)
class TaskData:
    """Train and dev rows of one task and how they are scored."""

    task: GlueTask
    train: Dataset
    dev: Dataset
    source: str
    unlabelled: int = 0  # how many of the training rows (the last ones) only the teacher labels
    word_swapped: int = 0  # how many of those are word-swapped copies of labelled rows (the rest: unlabelled text)


def load_glue(name: str, data_dir: str | Path) -> TaskData:
    """A GLUE task from the original TSV layout (its first dev split is the dev set)."""
    task = get_task(name)
    splits = load_tsv(task, data_dir)
    return TaskData(task, splits["train"], splits[task.primary_split], f"GLUE {task.name} from {Path(data_dir) / task.directory}")


def _read(path: Path, *columns: str | None) -> Dataset:
    """``path`` as a dataset, failing naming the file when it lacks one of ``columns`` (None: not needed)."""
    from datasets import load_dataset

    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TaskDataError(f"{path}: unknown file type {path.suffix!r} (allowed: {', '.join(_FORMATS)})")
    kwargs = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}  # TSVs: no quoting (GLUE convention)
    try:
        ds = load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several types; the cause is what the user needs
        if _data_lines(path, fmt) == 0:  # datasets reports an empty file as a split with "no data"
            raise TaskDataError(f"{path}: 0 rows") from None
        raise TaskDataError(f"{path}: cannot be read as {fmt}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    for column in columns:
        if column is not None and column not in ds.column_names:
            raise TaskDataError(f"{path}: no column {column!r} (found: {', '.join(ds.column_names)})")
    return ds


def _data_lines(path: Path, fmt: str) -> int:
    """Non-blank lines after the header (CSV / TSV) or in all (JSON lines)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = sum(1 for line in f if line.strip())
    return max(lines - (fmt == "csv"), 0)


def label_names(config) -> list[str] | None:
    """A classifier's class names when its config declares real ones (not transformers' LABEL_0 placeholders)."""
    names = [config.id2label[i] for i in range(config.num_labels)] if getattr(config, "id2label", None) else []
    return None if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def load_files(train_file: str | Path, dev_file: str | Path, text_column: str, text_pair_column: str | None,
               label_column: str, label_names: list[str] | None, regression: bool) -> TaskData:
    """A user's task from two files with named columns.

    Classification labels are the class names in ``label_names`` (the teacher's ``id2label``) or class
    ids 0..n-1; regression labels are numbers. A missing column or an unknown label fails naming the file,
    the column and (for labels) the row.
    """
    splits = {}
    for split, path in (("train", Path(train_file)), ("dev", Path(dev_file))):
        ds = _read(path, text_column, text_pair_column, label_column)
        if len(ds) < MIN_ROWS[split]:  # checked here, not after hours of training when the export gate needs two dev inputs
            raise TaskDataError(f"{path}: {len(ds)} row{'s' * (len(ds) != 1)}; a {split} file needs at least {MIN_ROWS[split]} "
                                f"({'scores and the int8 export check compare predictions across rows' if split == 'dev' else 'something to train on'})")
        texts = {"text_a": [str(x) for x in ds[text_column]]}
        if text_pair_column:
            texts["text_b"] = [str(x) for x in ds[text_pair_column]]
        labels = [_label(raw, label_names, regression, path, label_column, row) for row, raw in enumerate(ds[label_column], start=1)]
        splits[split] = Dataset.from_dict(texts | {"label": labels})
    names = tuple(label_names or ())
    if regression:
        task = GlueTask("custom", "", ("text_a",), "label", None, ("score",), ("pearson", "spearman"), {"dev": ""}, ())
    else:
        n = len(names) or int(max(splits["train"]["label"])) + 1
        names = names or tuple(str(i) for i in range(n))
        task = GlueTask("custom", "", ("text_a",), "label", names, names, ("accuracy",), {"dev": ""}, ())
    return TaskData(task, splits["train"], splits["dev"], f"{train_file} / {dev_file}")


def _label(raw, names: list[str] | None, regression: bool, path: Path, column: str, row: int) -> int | float:
    if raw is None or not str(raw).strip():
        raise TaskDataError(f"{path}: column {column!r}, row {row}: empty label")
    if regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise TaskDataError(f"{path}: column {column!r}, row {row}: {raw!r} is not a number")
        return value
    if names and str(raw) in names:
        return names.index(str(raw))
    try:
        value = int(str(raw))
    except ValueError:
        value = -1
    if not 0 <= value < (len(names) if names else 1 << 30):
        allowed = f"{', '.join(names)}, or class ids 0-{len(names) - 1}" if names else "class ids 0, 1, ..."
        raise TaskDataError(f"{path}: column {column!r}, row {row}: unknown label {raw!r} (allowed: {allowed})")
    return value


UNLABELLED = -100
"""The label of a row the teacher labels alone: a class id no head has (cross-entropy's ``ignore_index``); NaN for regression."""

GLUE_SOURCE = "glue:"


def unlabelled_rows(sources: list[str], data: TaskData, data_dir: str | Path | None, text_column: str,
                    text_pair_column: str | None, max_rows: int | None, seed: int = 0) -> Dataset:
    """Extra training rows without labels, for the teacher to label (TinyBERT's augmentation, with real text).

    A source is a CSV / TSV / JSON-lines file with the task's text (and pair) columns, or ``glue:TASK`` /
    ``glue:TASK/dev`` / ``glue:TASK/test`` (the file's name) for the text of a GLUE file under ``data_dir`` (its labels
    are never read; test files have none). A
    sentence-pair task needs pair sources; a single-sentence task takes each text of a pair as a row. Rows
    whose text is also a dev row are dropped, so the dev score never rests on text the student was
    trained to match. ``max_rows`` keeps a fixed random subset.
    """
    pair = "text_b" in data.train.column_names
    first: list[str] = []
    second: list[str] = []
    for source in sources:
        a, b = _source_texts(source, data_dir, text_column, text_pair_column)
        if pair and b is None:
            raise TaskDataError(f"{source}: has no sentence pairs, and this task's rows are pairs (give another pair task, or a file "
                                f"and name its second text in task.text_pair_column)")
        if pair:
            first.extend(a)
            second.extend(b or [])
        else:
            first.extend(a + (b or []))
    dev = dev_text(data)
    keep = [i for i, key in enumerate(zip(first, second) if pair else first) if key not in dev]
    if not keep:
        raise TaskDataError(f"{', '.join(sources)}: no rows left once the dev set's text is removed")
    label = math.nan if data.task.is_regression else UNLABELLED
    columns: dict[str, list] = {"text_a": [first[i] for i in keep]}
    if pair:
        columns["text_b"] = [second[i] for i in keep]
    rows = Dataset.from_dict(columns | {"label": [label] * len(keep)}, features=data.train.features)
    return subsample(rows, max_rows, seed)


def dev_text(data: TaskData) -> set:
    """The dev set's texts (pairs for a pair task): extra training text that repeats one is dropped."""
    if "text_b" in data.dev.column_names:
        return set(zip(data.dev["text_a"], data.dev["text_b"]))
    return set(data.dev["text_a"])


def _source_texts(source: str, data_dir: str | Path | None, text_column: str, text_pair_column: str | None) -> tuple[list[str], list[str] | None]:
    if source.startswith(GLUE_SOURCE):
        name, _, split = source[len(GLUE_SOURCE):].partition("/")
        task, split = get_task(name), split or "train"
        files = {"train": "train.tsv", **{Path(f).stem: f for f in task.dev_files.values()}, **task.test_files}  # split = file name
        if split not in files:
            raise TaskDataError(f"{source}: unknown split {split!r} for {task.name} (allowed: {', '.join(files)})")
        if data_dir is None:
            raise TaskDataError(f"{source}: a GLUE source needs task.data_dir (the GLUE directory)")
        if split in task.test_files:
            return read_test_texts(task, Path(data_dir) / task.directory / files[split])
        rows = read_tsv(task, Path(data_dir) / task.directory / files[split])
        return list(rows["text_a"]), list(rows["text_b"]) if "text_b" in rows.column_names else None
    ds = _read(Path(source), text_column, text_pair_column)
    pair_texts = [str(x) for x in ds[text_pair_column]] if text_pair_column else None
    return [str(x) for x in ds[text_column]], pair_texts


def limit(data: TaskData, max_train: int | None, max_dev: int | None, seed: int = 0) -> TaskData:
    """A fixed subset of the rows (for quick runs and tests)."""
    return TaskData(data.task, subsample(data.train, max_train, seed), subsample(data.dev, max_dev, seed), data.source)


class TaskBatcher:
    """Tokenised rows, padded per batch; batch ``step`` is the same whenever it is asked for.

    Training batches group rows of similar length (each epoch's permutation is cut into windows of
    ``BUCKET_BATCHES`` batches, sorted by length within a window, and the batches shuffled), so a batch
    pads to little more than its own rows' length: on GLUE pairs this removes about a third of the
    tokens a random batch computes, at the same randomness across epochs.
    """

    BUCKET_BATCHES = 50

    def __init__(self, rows: Dataset, tokenizer, batch_size: int, max_length: int, seed: int = 0, shuffle: bool = True):
        pair = list(rows["text_b"]) if "text_b" in rows.column_names else None
        encoded = tokenizer(list(rows["text_a"]), pair, truncation=True, max_length=max_length)
        self.features = [{k: encoded[k][i] for k in encoded} for i in range(len(rows))]
        self.lengths = np.array([len(f["input_ids"]) for f in self.features])
        self.labels = np.asarray(rows["label"])
        self.tokenizer, self.batch_size, self.seed, self.shuffle = tokenizer, batch_size, seed, shuffle
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """Row indices of every batch of ``epoch``, in the order they are trained on."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        n, b = len(self.features), self.batch_size
        if not self.shuffle:
            out = [np.arange(i, min(i + b, n)) for i in range(0, n, b)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            window = b * self.BUCKET_BATCHES
            out = []
            for start in range(0, n, window):
                chunk = order[start:start + window]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                out.extend(chunk[i:i + b] for i in range(0, len(chunk), b))
            out = [out[i] for i in rng.permutation(len(out))]
        self._epoch = (epoch, out)
        return out

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self.batches(epoch)[index]
        batch = self.tokenizer.pad([self.features[i] for i in rows], return_tensors="pt")
        label = torch.as_tensor(self.labels[rows])
        batch["labels"] = label.float() if label.is_floating_point() else label.long()
        return dict(batch)
