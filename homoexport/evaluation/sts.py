"""Zero-shot semantic textual similarity: what users of sentence-embedding encoders measure.

The score of an encoder is Spearman x 100 between the gold similarity of sentence pairs and the cosine of
the two pooled sentence embeddings, with no fine-tuning (the sentence-transformers / MTEB STS protocol).
Pooling follows the model's sentence-transformers files when it has them (``modules.json``,
``1_Pooling/config.json``: mean / CLS / max, and whether a ``Normalize`` module follows), mean pooling over
non-padding tokens otherwise. PyTorch models and exported ONNX files (``last_hidden_state``) are pooled by
the same code, so their scores compare.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from homoexport.errors import InputNotFoundError, UsageError
from homoexport.evaluation.glue_data import get_task, read_tsv

logger = logging.getLogger(__name__)

POOLING_MODES = ("mean", "cls", "max")
REPORT_SCHEMA = "homoexport.sts/1"


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding, and where that was read from."""

    mode: str = "mean"
    normalize: bool = False
    source: str = "default (no sentence-transformers files)"

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise UsageError(f"pooling mode {self.mode!r} is not one of {', '.join(POOLING_MODES)}")


def read_pooling(model_dir: str | os.PathLike) -> Pooling:
    """The pooling a sentence-transformers model declares (``modules.json`` + its Pooling config), else mean."""
    root = Path(model_dir)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{modules_file}: not valid JSON ({err})") from None
    types = [str(m.get("type", "")) for m in modules]
    pooling_entry = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    normalize = any(t.endswith("Normalize") for t in types)
    if pooling_entry is None:
        return Pooling(normalize=normalize, source=f"{modules_file} (no Pooling module: mean)")
    config_file = root / pooling_entry.get("path", "1_Pooling") / "config.json"
    if not config_file.is_file():
        raise InputNotFoundError(f"{modules_file} names a Pooling module but {config_file} is missing")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    flags = {"mean": config.get("pooling_mode_mean_tokens"), "cls": config.get("pooling_mode_cls_token"),
             "max": config.get("pooling_mode_max_tokens")}
    chosen = [mode for mode, on in flags.items() if on]
    if len(chosen) != 1:
        raise UsageError(f"{config_file}: exactly one of mean / CLS / max pooling is supported, found {chosen or 'none'}")
    return Pooling(chosen[0], normalize, str(config_file))


def write_pooling(directory: str | os.PathLike, pooling: Pooling, dimension: int, max_length: int) -> list[Path]:
    """sentence-transformers module files (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``)
    declaring ``pooling`` for a model of ``dimension`` hidden units, so the folder says how to pool it."""
    root = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
    files = [root / "modules.json", root / "1_Pooling" / "config.json", root / "sentence_bert_config.json"]
    files[0].write_text(json.dumps(modules, indent=2) + "\n")
    files[1].write_text(json.dumps({"word_embedding_dimension": dimension, "pooling_mode_cls_token": pooling.mode == "cls",
                                    "pooling_mode_mean_tokens": pooling.mode == "mean", "pooling_mode_max_tokens": pooling.mode == "max",
                                    "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
    files[2].write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}, indent=2) + "\n")
    if pooling.normalize:
        (root / "2_Normalize").mkdir(exist_ok=True)
    return files


def carry_pooling(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, dimension: int, max_length: int) -> bool:
    """Give a student the pooling its teacher declares (sentence-transformers files at the student's width).
    Returns False, writing nothing, when the teacher declares none."""
    if not (Path(teacher_dir) / "modules.json").is_file():
        return False
    write_pooling(student_dir, read_pooling(teacher_dir), dimension, max_length)
    return True


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """[B, T, H] token states and [B, T] mask -> [B, H] sentence embeddings."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = np.where(mask > 0, hidden, -np.inf).max(axis=1)
    else:
        out = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    if pooling.normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


@dataclass(frozen=True)
class Pairs:
    """Sentence pairs with gold similarity scores."""

    first: list[str]
    second: list[str]
    scores: np.ndarray
    source: str


def stsb_dev(data_dir: str | os.PathLike) -> Pairs:
    """STS-B dev (1,500 pairs) from the original GLUE TSV layout."""
    task = get_task("stsb")
    rows = read_tsv(task, Path(data_dir) / task.directory / "dev.tsv")
    return Pairs(list(rows["text_a"]), list(rows["text_b"]), np.asarray(rows["label"], dtype=np.float64),
                 f"STS-B dev from {Path(data_dir) / task.directory}")


def read_pairs(path: str | os.PathLike) -> Pairs:
    """A user's tab-separated file with a header naming ``sentence1``, ``sentence2`` and ``score``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: file not found")
    first, second, scores = [], [], []
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        missing = [c for c in ("sentence1", "sentence2", "score") if c not in header]
        if missing:
            raise UsageError(f"{path}:1: header lacks {', '.join(missing)} (found: {', '.join(header)})")
        i1, i2, i3 = (header.index(c) for c in ("sentence1", "sentence2", "score"))
        for lineno, line in enumerate(f, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if line.strip() == "":
                continue
            if len(fields) != len(header):
                raise UsageError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(fields)}")
            try:
                scores.append(float(fields[i3]))
            except ValueError:
                raise UsageError(f"{path}:{lineno}: score {fields[i3]!r} is not a number") from None
            first.append(fields[i1])
            second.append(fields[i2])
    if not scores:
        raise UsageError(f"{path}: no pairs")
    return Pairs(first, second, np.asarray(scores), str(path))


Encoder = Callable[[dict[str, np.ndarray]], np.ndarray]  # tokenized batch -> [B, T, H] last hidden states


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        yield {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def embed(encode: Encoder, tokenizer, texts: Sequence[str], pooling: Pooling, batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """[N, H] pooled sentence embeddings of ``texts``."""
    out = [pool(encode(b), b["attention_mask"], pooling) for b in _batches(tokenizer, texts, batch_size, max_length)]
    return np.concatenate(out).astype(np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def spearman(encode: Encoder, tokenizer, pairs: Pairs, pooling: Pooling, batch_size: int = 64, max_length: int = 128) -> float:
    """Spearman x 100 between gold scores and the cosine of the pooled embeddings of each pair."""
    return pair_spearman(*pair_embeddings(encode, tokenizer, pairs, pooling, batch_size, max_length), pairs.scores)


def pair_embeddings(encode: Encoder, tokenizer, pairs: Pairs, pooling: Pooling, batch_size: int = 64,
                    max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The pooled embeddings of every first and every second sentence."""
    return (embed(encode, tokenizer, pairs.first, pooling, batch_size, max_length),
            embed(encode, tokenizer, pairs.second, pooling, batch_size, max_length))


def pair_spearman(a: np.ndarray, b: np.ndarray, scores: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(100 * spearmanr(cosines(a, b), scores)[0])


def torch_encoder(model_dir: str | os.PathLike, threads: int | None = None) -> Encoder:
    """Last hidden states of the encoder in ``model_dir`` (a classifier's or MLM model's encoder too)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()
    if threads:
        torch.set_num_threads(threads)

    def encode(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            return model(**inputs).last_hidden_state.float().numpy()

    return encode


def onnx_encoder(onnx_path: str | os.PathLike, threads: int | None = None) -> Encoder:
    """``last_hidden_state`` of an exported feature-extraction ONNX file, through onnxruntime."""
    from homoexport.deployment.bench import load_session

    session = load_session(onnx_path, threads)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if "last_hidden_state" not in outputs:
        raise UsageError(f"{onnx_path} has no last_hidden_state output (found {', '.join(outputs)}): export it as feature-extraction")

    def encode(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: batch.get(n, np.zeros_like(batch["input_ids"])) for n in names}
        return session.run(["last_hidden_state"], feed)[0]

    return encode


@dataclass(frozen=True)
class StsResult:
    """One model's zero-shot STS score on one set of pairs."""

    name: str
    spearman: float
    pairs: int
    pooling: dict

    def to_dict(self) -> dict:
        return asdict(self)


def run_sts(model_dir: str | os.PathLike, pairs: Pairs, teacher: str | os.PathLike | None = None, export_dir: str | os.PathLike | None = None,
            threads: int | None = None, max_length: int = 128) -> dict:
    """Score ``model_dir`` (and the teacher, and the fp32 / int8 ONNX files of ``export_dir``) on ``pairs``.

    Every model is pooled the same way: as the teacher declares when one is given (the student inherits
    its use), else as ``model_dir`` declares.
    """
    from transformers import AutoTokenizer

    from homoexport.deployment.export import FP32_FILE, QUANTIZED_FILE
    from homoexport.machine import fingerprint

    pooling = read_pooling(teacher if teacher is not None else model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    entries: list[tuple[str, Callable[[], Encoder]]] = []
    if teacher is not None:
        entries.append(("teacher (PyTorch)", lambda: torch_encoder(teacher, threads)))
    entries.append(("student (PyTorch)", lambda: torch_encoder(model_dir, threads)))
    if export_dir is not None:
        for label, name in (("student (ONNX fp32)", FP32_FILE), ("student (ONNX int8)", QUANTIZED_FILE)):
            path = Path(export_dir) / name
            if path.is_file():
                entries.append((label, lambda path=path: onnx_encoder(path, threads)))
        if len(entries) == (2 if teacher is not None else 1):
            raise InputNotFoundError(f"no {FP32_FILE} or {QUANTIZED_FILE} in {export_dir}")
    results, embeddings = [], {}
    for label, make in entries:
        logger.info("zero-shot STS: %s on %d pairs", label, len(pairs.scores))
        embeddings[label] = pair_embeddings(make(), tokenizer, pairs, pooling, max_length=max_length)
        results.append(StsResult(label, pair_spearman(*embeddings[label], pairs.scores), len(pairs.scores), asdict(pooling)))
    return {"schema": REPORT_SCHEMA, "model_dir": str(model_dir), "teacher": str(teacher) if teacher else None,
            "export_dir": str(export_dir) if export_dir else None, "data": pairs.source, "pooling": asdict(pooling),
            "metric": "Spearman x 100 of cosine(pooled embeddings) vs gold score, no fine-tuning",
            "results": [r.to_dict() for r in results], "int8": int8_effect(embeddings, results), "machine": fingerprint()}


def int8_effect(embeddings: dict[str, tuple[np.ndarray, np.ndarray]], results: Sequence[StsResult]) -> dict[str, float] | None:
    """What int8 did to the sentence embedding, in its users' terms: cosine of every int8 sentence embedding to the
    fp32 one, and the STS points int8 lost against the PyTorch student. None without an int8 file."""
    int8, fp32 = embeddings.get("student (ONNX int8)"), embeddings.get("student (ONNX fp32)") or embeddings.get("student (PyTorch)")
    if int8 is None or fp32 is None:
        return None
    cos = np.concatenate([cosines(int8[0], fp32[0]), cosines(int8[1], fp32[1])])
    score = {r.name: r.spearman for r in results}
    return {"cosine_to_fp32_mean": float(cos.mean()), "cosine_to_fp32_min": float(cos.min()),
            "spearman_drop_vs_pytorch": score["student (PyTorch)"] - score["student (ONNX int8)"]}
