"""Distillation data: text sources -> cached packed token blocks -> deterministic, resumable batches.

Pipeline:

1. **Sources** are read as streams of documents through `datasets`: plain text files (one document per
   non-empty line), JSON lines and Parquet files (a ``text`` field), gzipped or plain WikiExtractor
   shards (recognised by their ``<doc ...>`` first line; the wrapper lines and each article's title
   line are dropped, one article is one document), directories and globs of these, and hub datasets
   written ``hub:NAME`` or ``hub:NAME:CONFIG`` (streamed, only when online).
2. **Packing**: documents are tokenized with the teacher's fast tokenizer and concatenated with a
   ``[SEP]`` after each one; the stream is cut into blocks of ``block_size`` tokens, each
   ``[CLS] <block_size-2 tokens> [SEP]`` with no padding; the final partial block is dropped.
   With ``unit="sentence"`` each document is split into sentences instead and each sentence is one
   row ``[CLS] sentence [SEP] [PAD]...`` (truncated to the block), for objectives on sentence
   embeddings. Blocks are written to ``cache_dir`` (raw int32 + meta.json, keyed by the files' paths, sizes and
   mtimes, the tokenizer's serialized definition and the block size) and memory-mapped on reuse, so a
   corpus is tokenized once and corpora larger than RAM work.
3. **Batches**: :class:`BlockBatcher` maps a global step to a global batch with no hidden state:
   epoch ``e`` visits the blocks in a permutation seeded by ``(seed, e)``, and MLM masking of the whole
   global batch is seeded by ``(seed, step)``. A run resumed at step k therefore sees exactly the
   batches of an uninterrupted run, and every rank of a data-parallel run takes its own contiguous
   slice of the same global batch, so 1-process and N-process runs train on the same examples.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from homoexport.atomic import atomic_write_json, staging_dir
from homoexport.errors import UsageError

if TYPE_CHECKING:
    from homoexport.distillation.grouping import EpochGroups

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
HUB_PREFIX = "hub:"
CACHE_FORMAT = 1  # bump when packing or cleaning changes, so old caches are not reused
UNITS = ("block", "sentence")
# Sentence boundaries by rule (end punctuation, space, then an upper-case letter, digit or opening quote):
# encyclopedic prose is regular enough that a model-based splitter buys little here.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
MIN_SENTENCE_WORDS = 4  # shorter "sentences" are headings, list items and abbreviations cut off
_DOC_START = re.compile(r"<doc[\s>]")
_WORD = re.compile(r"\w")
_TOKENIZE_BATCH = 1000  # documents per tokenizer call: large enough to amortise the Python overhead
# Seed-stream tags so the shuffle and the masking never draw from the same random stream.
_SHUFFLE, _MASKING = 1, 2


class DataError(UsageError):
    """A data source is missing, unreadable, of an unknown format, or yields too little text."""


@dataclass(frozen=True)
class CorpusSpec:
    """What to read and how to cut it.

    sources: files, directories, globs or ``hub:NAME[:CONFIG]`` entries for training.
    eval_sources: separate held-out text; when empty, the evaluation blocks are the last blocks of
        ``sources`` (the tail, so no article is split across train and eval except at one boundary).
    block_size: tokens per block, [CLS] and [SEP] included (with ``unit="sentence"``: the longest row).
    unit: ``block`` packs text into full blocks; ``sentence`` makes one padded row per sentence.
    eval_blocks: how many evaluation blocks: a count (int >= 0) or a fraction (0 < float < 1) of the
        evaluation pool (``eval_sources`` when given, else the blocks read from ``sources``).
    max_blocks: stop reading ``sources`` after this many blocks (held-out tail included); needed to
        bound a streamed hub dataset, handy for quick runs.
    cache_dir: where packed blocks are cached; None packs in memory every time.
    """

    sources: list[str]
    eval_sources: list[str] = field(default_factory=list)
    block_size: int = 128
    eval_blocks: int | float = 0.01
    max_blocks: int | None = None
    cache_dir: str | Path | None = None
    unit: str = "block"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise DataError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if not self.sources:
            raise DataError("no data sources given: pass at least one file, directory, glob or hub:NAME")
        if self.block_size < 3:
            raise DataError(f"block_size must be at least 3 ([CLS], one token, [SEP]), got {self.block_size}")
        n = self.eval_blocks
        if isinstance(n, bool) or not (
            (isinstance(n, int) and n >= 0) or (isinstance(n, float) and 0.0 < n < 1.0)
        ):
            raise DataError(f"eval_blocks must be a count (int >= 0) or a fraction (0 < float < 1), got {n!r}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise DataError(f"max_blocks must be at least 1 or None, got {self.max_blocks}")


@dataclass(frozen=True)
class Source:
    """One readable unit: a local file of a known ``kind``, or a hub dataset."""

    kind: str  # "text" | "wikiextractor" | "json" | "parquet" | "hub"
    location: str

    def fingerprint(self) -> list:
        if self.kind == "hub":
            return [self.kind, self.location]
        st = os.stat(self.location)
        return [self.kind, self.location, st.st_size, st.st_mtime_ns]


# --------------------------------------------------------------------------- sources -> documents


def resolve_sources(sources: Iterable[str]) -> list[Source]:
    """Expand files, directories and globs (sorted) into typed inputs; fail naming any bad entry."""
    inputs: list[Source] = []
    for source in sources:
        if source.startswith(HUB_PREFIX):
            inputs.append(Source("hub", source[len(HUB_PREFIX):]))
            continue
        if any(c in source for c in "*?["):
            matches = sorted(p for p in glob(source, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no files match the pattern {source}")
            inputs.extend(_file_input(Path(p)) for p in matches)
        elif Path(source).is_dir():
            files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not files:
                raise DataError(f"directory {source} holds no data files (looked for {', '.join(SUFFIXES)})")
            inputs.extend(_file_input(p) for p in files)
        elif Path(source).is_file():
            inputs.append(_file_input(Path(source)))
        else:
            raise DataError(
                f"data source not found: {source} (expected a file, directory or glob; write hub:NAME for a hub dataset)"
            )
    return inputs


def _file_input(path: Path) -> Source:
    name = path.name
    if name.endswith((".txt", ".txt.gz")):
        return Source("wikiextractor" if _is_wikiextractor(path) else "text", str(path.resolve()))
    if name.endswith((".jsonl", ".jsonl.gz")):
        return Source("json", str(path.resolve()))
    if name.endswith(".parquet"):
        return Source("parquet", str(path.resolve()))
    raise DataError(f"unsupported data file {path}: expected one of {', '.join(SUFFIXES)}")


def _open_text(path: str) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _is_wikiextractor(path: Path) -> bool:
    """True when the first non-empty line is a WikiExtractor ``<doc ...>`` tag."""
    try:
        with _open_text(str(path)) as f:
            for line in f:
                if line.strip():
                    return bool(_DOC_START.match(line.lstrip()))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return False


def wikiextractor_articles(path: str) -> Iterator[str]:
    """Article texts of one WikiExtractor shard: ``<doc>``/``</doc>`` lines and title lines dropped.

    The title is the first non-empty line after ``<doc ...>``; the remaining non-empty lines of the
    article are joined with newlines. Articles with no text besides their title are skipped.
    """
    lines: list[str] | None = None  # None outside a <doc> ... </doc> pair
    title_pending = False
    with _open_text(path) as f:
        for raw in f:
            line = raw.strip()
            if _DOC_START.match(line):
                lines, title_pending = [], True
            elif line == "</doc>":
                if lines:
                    yield "\n".join(lines)
                lines = None
            elif lines is not None and line:
                if title_pending:
                    title_pending = False
                else:
                    lines.append(line)


def _wikiextractor_rows(path: str) -> Iterator[dict[str, str]]:
    for article in wikiextractor_articles(path):
        yield {"text": article}


def _dataset(inp: Source):
    """The `datasets` IterableDataset that streams one input's rows (each with a ``text`` field)."""
    from datasets import IterableDataset, load_dataset

    if inp.kind == "wikiextractor":
        # No `datasets` builder knows the WikiExtractor layout; a generator does the cleaning.
        return IterableDataset.from_generator(_wikiextractor_rows, gen_kwargs={"path": inp.location})
    if inp.kind == "hub":
        if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
            raise DataError(f"hub dataset {inp.location} needs the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
        name, _, config = inp.location.partition(":")
        try:
            return load_dataset(name, config or None, split="train", streaming=True)
        except Exception as e:  # datasets raises many types (connection, missing config, auth)
            raise DataError(f"cannot open hub dataset {inp.location}: {e}") from e
    return load_dataset(inp.kind, data_files=[inp.location], split="train", streaming=True)


def iter_documents(inp: Source, batch_size: int = _TOKENIZE_BATCH) -> Iterator[list[str]]:
    """Lists of stripped document texts from one input.

    Documents without a single letter or digit are dropped: they are layout residue (blank lines,
    ``* * *`` separators, the lone quote lines of CSV-exported WikiText) that would only add trivially
    predictable tokens and [SEP]s.
    """
    try:
        for rows in _dataset(inp).iter(batch_size=batch_size):
            if "text" not in rows:
                raise DataError(f"{inp.location} has no 'text' field (fields: {', '.join(rows)})")
            docs = [t.strip() for t in rows["text"] if t and _WORD.search(t)]
            if docs:
                yield docs
    except DataError:
        raise
    except Exception as e:  # malformed JSON/Parquet, bad encoding, unreadable file
        raise DataError(f"cannot read {inp.location}: {e}") from e


# --------------------------------------------------------------------------- documents -> blocks


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the fast tokenizer's serialized definition (vocab, normalizer, specials).

    Truncation and padding are left out: transformers rewrites them on the backend at every call, and
    packing uses neither.
    """
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def _token_stream(docs: Iterable[list[str]], tokenizer: PreTrainedTokenizerFast) -> Iterator[np.ndarray]:
    """Flat int32 token ids of each document batch, a [SEP] after every document."""
    sep = tokenizer.sep_token_id
    for texts in docs:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        count = sum(len(x) + 1 for x in ids if x)
        yield np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (sep,)) for x in ids if x),
                          dtype=np.int32, count=count)


def pack_blocks(tokens: Iterable[np.ndarray], block_size: int, cls_id: int, sep_id: int) -> Iterator[np.ndarray]:
    """Cut a token stream into [n, block_size] int32 blocks ``[CLS] body [SEP]``; drop the final remainder."""
    width = block_size - 2
    carry = np.empty(0, dtype=np.int32)
    for chunk in tokens:
        ids = np.concatenate([carry, chunk])
        n = len(ids) // width
        if n:
            blocks = np.empty((n, block_size), dtype=np.int32)
            blocks[:, 0], blocks[:, -1] = cls_id, sep_id
            blocks[:, 1:-1] = ids[: n * width].reshape(n, width)
            yield blocks
        carry = ids[n * width:]


def split_sentences(text: str) -> list[str]:
    """The sentences of a document with at least ``MIN_SENTENCE_WORDS`` words."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.split()) >= MIN_SENTENCE_WORDS]


def pack_sentences(docs: Iterable[list[str]], tokenizer: PreTrainedTokenizerFast, block_size: int) -> Iterator[np.ndarray]:
    """[n, block_size] int32 rows ``[CLS] sentence [SEP] [PAD]...``, one per sentence, truncated to the block."""
    width = block_size - 2
    for texts in docs:
        sentences = [s for text in texts for s in split_sentences(text)]
        if not sentences:
            continue
        ids = tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=width, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        rows = np.full((len(ids), block_size), tokenizer.pad_token_id, dtype=np.int32)
        rows[:, 0] = tokenizer.cls_token_id
        for i, x in enumerate(ids):
            rows[i, 1:len(x) + 1] = x
            rows[i, len(x) + 1] = tokenizer.sep_token_id
        yield rows


def _pack_inputs(inputs: list[Source], tokenizer: PreTrainedTokenizerFast, block_size: int,
                 max_blocks: int | None, out: IO[bytes], label: str, unit: str = "block") -> dict:
    """Stream every input through tokenization and packing into ``out``; return counts."""
    n_blocks = n_docs = n_tokens = 0
    start = time.perf_counter()
    logger.info("tokenizing the %s data (%d inputs)", label, len(inputs))

    def counted_docs() -> Iterator[list[str]]:
        nonlocal n_docs
        for inp in inputs:
            for docs in iter_documents(inp):
                n_docs += len(docs)
                yield docs

    def counted_tokens() -> Iterator[np.ndarray]:
        nonlocal n_tokens
        for ids in _token_stream(counted_docs(), tokenizer):
            n_tokens += len(ids)
            yield ids

    if unit == "sentence":
        pad = tokenizer.pad_token_id
        packed = (rows for rows in pack_sentences(counted_docs(), tokenizer, block_size))

        def counting(rows_iter: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
            nonlocal n_tokens
            for rows in rows_iter:
                n_tokens += int((rows != pad).sum())
                yield rows

        packed = counting(packed)
    else:
        packed = pack_blocks(counted_tokens(), block_size, tokenizer.cls_token_id, tokenizer.sep_token_id)
    for blocks in packed:
        if max_blocks is not None:
            blocks = blocks[: max_blocks - n_blocks]
        out.write(blocks.tobytes())
        n_blocks += len(blocks)
        if max_blocks is not None and n_blocks >= max_blocks:
            break
    logger.info("%s data: %s documents, %s tokens, %d blocks in %.1f s", label, f"{n_docs:,}", f"{n_tokens:,}", n_blocks, time.perf_counter() - start)
    names = ", ".join(i.location for i in inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    if n_tokens == 0:
        raise DataError(f"the {label} data yields no text: {names}")
    if n_blocks == 0:
        raise DataError(f"the {label} data yields only {n_tokens} tokens, fewer than one block of {block_size}: {names}")
    return {"blocks": n_blocks, "documents": n_docs, "tokens": n_tokens,
            "seconds": round(time.perf_counter() - start, 3)}


def load_or_pack(sources: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int = 128,
                 max_blocks: int | None = None, cache_dir: str | Path | None = None,
                 label: str = "training", unit: str = "block") -> np.ndarray:
    """[n_blocks, block_size] int32 blocks (or sentence rows) of ``sources``: memory-mapped from the cache, else packed now."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"a fast (Rust) tokenizer is needed, got {type(tokenizer).__name__}")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DataError("the tokenizer has no [CLS]/[SEP] tokens; blocks are framed as [CLS] ... [SEP]")
    inputs = resolve_sources(sources)
    if cache_dir is None:
        import io

        buffer = io.BytesIO()
        _pack_inputs(inputs, tokenizer, block_size, max_blocks, buffer, label, unit)
        return np.frombuffer(buffer.getbuffer(), dtype=np.int32).reshape(-1, block_size)

    key = {"format": CACHE_FORMAT, "block_size": block_size, "max_blocks": max_blocks,
           "tokenizer": tokenizer_fingerprint(tokenizer), "inputs": [i.fingerprint() for i in inputs],
           **({"unit": unit} if unit != "block" else {})}  # block caches written before units existed stay valid
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    final = Path(cache_dir) / f"blocks-{block_size}-{digest}"
    if not (final / "meta.json").exists():
        with staging_dir(final, overwrite=True) as tmp:
            with open(tmp / "blocks.int32", "wb") as f:
                counts = _pack_inputs(inputs, tokenizer, block_size, max_blocks, f, label, unit)
            atomic_write_json(tmp / "meta.json", {**counts, "block_size": block_size, "key": key})
    meta = json.loads((final / "meta.json").read_text())
    return np.memmap(final / "blocks.int32", dtype=np.int32, mode="r", shape=(meta["blocks"], block_size))


def _eval_count(spec: CorpusSpec, pool: int) -> int:
    n = spec.eval_blocks
    return min(pool, n) if isinstance(n, int) else max(1, round(n * pool))


def build_blocks(spec: CorpusSpec, tokenizer: PreTrainedTokenizerFast) -> tuple[np.ndarray, np.ndarray]:
    """(train [n_train, block_size], eval [n_eval, block_size]) int32 blocks for ``spec``.

    Without ``eval_sources`` the evaluation blocks are the tail of the blocks read from ``sources``
    and are excluded from training.
    """
    pool = load_or_pack(spec.sources, tokenizer, spec.block_size, spec.max_blocks, spec.cache_dir, "training", spec.unit)
    if spec.eval_sources:
        eval_pool = load_or_pack(spec.eval_sources, tokenizer, spec.block_size, None, spec.cache_dir, "evaluation", spec.unit)
        return pool, eval_pool[: _eval_count(spec, len(eval_pool))]
    n_eval = _eval_count(spec, len(pool))
    if n_eval >= len(pool):
        raise DataError(
            f"holding out {n_eval} evaluation blocks leaves none of the {len(pool)} blocks for training; "
            "lower eval_blocks, add text, or give eval_sources"
        )
    return pool[: len(pool) - n_eval], pool[len(pool) - n_eval:]


# --------------------------------------------------------------------------- blocks -> batches


def mixed_seed(*words: int) -> int:
    """A well-mixed 63-bit seed derived from integers (so nearby steps get unrelated streams)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


class BlockBatcher:
    """Global batches of packed blocks as a pure function of the step.

    Step ``s`` belongs to epoch ``s // steps_per_epoch``; each epoch visits ``steps_per_epoch *
    batch_size`` blocks in a permutation seeded by ``(seed, epoch)`` (``shuffle=False`` keeps corpus
    order, for evaluation), dropping the remainder. A data-parallel rank gets rows
    ``[rank * B/W, (rank+1) * B/W)`` of the global batch, and micro-batches split that slice further,
    so the union over ranks and micro-batches is always the same global batch. With ``groups`` (rows that
    must share a batch, see :mod:`homoexport.distillation.grouping`) the permutation is of whole groups.

    Masking (``mlm_probability`` not None) uses transformers' ``DataCollatorForLanguageModeling``
    (15%, 80/10/10, specials never chosen). Its ``seed`` option seeds one generator for the collator's
    lifetime, which would make masks depend on how many batches came before; instead the collator's
    generator is re-seeded from ``(seed, step)`` and the whole global batch is masked before slicing,
    so masks do not depend on resume point, world size or accumulation.
    """

    def __init__(self, blocks: np.ndarray, tokenizer: PreTrainedTokenizerFast, batch_size: int, seed: int = 0,
                 mlm_probability: float | None = 0.15, shuffle: bool = True, padded: bool = False,
                 groups: np.ndarray | EpochGroups | None = None):
        from homoexport.distillation.grouping import EpochGroups  # grouping reads this module's errors and seeds

        if isinstance(groups, np.ndarray):
            groups = EpochGroups(groups)
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if len(blocks) < batch_size:
            raise DataError(f"only {len(blocks)} blocks, fewer than one batch of {batch_size}; add text or lower the batch size")
        if groups is not None and batch_size % groups.shape[1]:
            raise DataError(f"batch_size {batch_size} is not a multiple of the neighbour group size {groups.shape[1]}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.groups = groups  # each epoch's [n_groups, size] row indices that share a batch, visited in a shuffled order
        self.steps_per_epoch = (groups.shape[0] * groups.shape[1] if groups is not None else len(blocks)) // batch_size
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if padded else None  # sentence rows: attention only where not [PAD]
        self.collator = (
            DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
            if mlm_probability is not None else None
        )
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) of the last epoch used

    @property
    def tokens_per_row(self) -> float:
        """Real (non-padding) tokens in a row: the block size, or for sentence rows their mean over up to 10,000 rows."""
        if self.pad_id is None:
            return float(self.blocks.shape[1])
        return float((np.asarray(self.blocks[:10_000]) != self.pad_id).sum(1).mean())

    def order(self, epoch: int) -> np.ndarray:
        """Block indices visited in ``epoch``, in order (cached for the current epoch)."""
        if not self.shuffle:
            return np.arange(len(self.blocks))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(mixed_seed(self.seed, _SHUFFLE, epoch))
            if self.groups is None:
                self._order = (epoch, rng.permutation(len(self.blocks)))
            else:
                groups = self.groups.at(epoch)
                self._order = (epoch, groups[rng.permutation(len(groups))].reshape(-1))
        return self._order[1]

    def global_rows(self, step: int) -> np.ndarray:
        """[batch_size] indices into ``blocks`` of the global batch at ``step``."""
        if step < 0:
            raise UsageError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[within * self.batch_size:(within + 1) * self.batch_size]

    def global_ids(self, step: int) -> torch.Tensor:
        """[batch_size, block_size] int64 clean token ids of the global batch at ``step``."""
        return torch.from_numpy(np.asarray(self.blocks[self.global_rows(step)], dtype=np.int64))

    def micro_batches(self, step: int, n_micro: int = 1, rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the global batch at ``step``, split into ``n_micro`` equal micro-batches.

        Each dict holds [b, block_size] int64 ``input_ids``, ``attention_mask`` (ones; 0 on [PAD] when ``padded``),
        ``token_type_ids`` (zeros), with masking ``mlm_input_ids`` and ``mlm_labels`` (-100 where
        not masked), and [b] int64 ``rows``, the index of each row in ``blocks``.
        """
        if not 0 <= rank < world_size:
            raise UsageError(f"rank must be in [0, {world_size}), got {rank}")
        if n_micro < 1 or self.batch_size % (world_size * n_micro):
            raise UsageError(
                f"global batch {self.batch_size} does not split into {world_size} ranks x {n_micro} micro-batches"
            )
        rows = self.global_rows(step)
        ids = torch.from_numpy(np.asarray(self.blocks[rows], dtype=np.int64))
        batch: dict[str, torch.Tensor] = {
            "input_ids": ids, "attention_mask": torch.ones_like(ids) if self.pad_id is None else (ids != self.pad_id).long(),
            "token_type_ids": torch.zeros_like(ids), "rows": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        }
        if self.collator is not None:
            self.collator.generator = torch.Generator().manual_seed(mixed_seed(self.seed, _MASKING, step))
            special = torch.isin(ids, self.special_ids)
            batch["mlm_input_ids"], batch["mlm_labels"] = self.collator.torch_mask_tokens(ids.clone(), special)
        size = self.batch_size // (world_size * n_micro)
        first = rank * n_micro
        return [{k: v[(first + j) * size:(first + j + 1) * size] for k, v in batch.items()} for j in range(n_micro)]

    def batch_at(self, step: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """This rank's whole share of the global batch at ``step`` (see :meth:`micro_batches`)."""
        return self.micro_batches(step, 1, rank, world_size)[0]

    def iterate(self, start_step: int = 0, stop_step: int | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Batches for steps ``start_step, start_step+1, ...`` (up to ``stop_step``, else forever)."""
        steps = itertools.count(start_step) if stop_step is None else range(start_step, stop_step)
        for step in steps:
            yield self.batch_at(step, rank, world_size)
