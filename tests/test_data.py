"""Data pipeline: source reading and cleaning, packing, caching, masking, determinism, resume, sharding."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tokenizer, synthetic_sentences

from homoexport.distillation import data
from homoexport.distillation.data import BlockBatcher, CorpusSpec, DataError, build_blocks, load_or_pack, resolve_sources, wikiextractor_articles

WIKI = """<doc id="1" url="?curid=1" title="Red Cat">
Red Cat

the red cat sat on the mat.
Early life.
it ran under the tree.

</doc>
<doc id="2" url="?curid=2" title="Stub Page">
Stub Page


</doc>
<doc id="3" url="?curid=3" title="Blue Bird">
Blue Bird
the blue bird flew in the city.
</doc>
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A text file of 400 synthetic sentences, one document per line, with blank lines between some."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    lines = synthetic_sentences(400, seed=1)
    path.write_text("\n".join(line + ("\n" if i % 7 == 0 else "") for i, line in enumerate(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def blocks(corpus, tok) -> np.ndarray:
    return load_or_pack([str(corpus)], tok, block_size=32)


def _ids(tok, texts: list[str]) -> list[int]:
    """Reference stream: each document's tokens followed by [SEP]."""
    out: list[int] = []
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    return out


# --------------------------------------------------------------------------- reading and cleaning


def test_wikiextractor_cleaning_drops_doc_and_title_lines(tmp_path, tok):
    shard = tmp_path / "wiki_00.txt.gz"
    shard.write_bytes(gzip.compress(WIKI.encode()))
    assert [i.kind for i in resolve_sources([str(shard)])] == ["wikiextractor"]
    articles = list(wikiextractor_articles(str(shard)))
    assert articles == ["the red cat sat on the mat.\nEarly life.\nit ran under the tree.", "the blue bird flew in the city."]
    # Through the datasets reader and packing: the stream is exactly the articles with [SEP] after each.
    width = 6
    got = load_or_pack([str(shard)], tok, block_size=width + 2)[:, 1:-1].ravel().tolist()
    expected = _ids(tok, articles)
    assert got == expected[: len(expected) // width * width]
    assert tok.convert_tokens_to_ids("stub") not in got  # the title-only article contributes nothing


def test_documents_are_stripped_lines_with_some_text(tmp_path):
    path = tmp_path / "quoted.txt"
    path.write_text('""\n" = Red Cat = \n"\n\n   * * *  \n  the cat sat .  \n')
    (inp,) = resolve_sources([str(path)])
    assert [d for docs in data.iter_documents(inp) for d in docs] == ['" = Red Cat =', "the cat sat ."]


def test_every_source_kind_gives_the_same_blocks(tmp_path, tok):
    docs = synthetic_sentences(60, seed=3)
    (tmp_path / "plain.txt").write_text("\n\n".join(docs) + "\n")
    (tmp_path / "gz.txt.gz").write_bytes(gzip.compress(("\n".join(docs) + "\n").encode()))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    from datasets import Dataset

    Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "rows.parquet"))
    reference = load_or_pack([str(tmp_path / "plain.txt")], tok, block_size=16)
    for name in ["gz.txt.gz", "rows.jsonl", "rows.parquet"]:
        np.testing.assert_array_equal(load_or_pack([str(tmp_path / name)], tok, block_size=16), reference, err_msg=name)
    kinds = [i.kind for i in resolve_sources([str(tmp_path)])]
    assert sorted(kinds) == ["json", "parquet", "text", "text"]
    assert [i.location for i in resolve_sources([str(tmp_path / "*.txt*")])] == [
        str((tmp_path / "gz.txt.gz").resolve()), str((tmp_path / "plain.txt").resolve())]


# --------------------------------------------------------------------------- packing


def test_blocks_have_fixed_length_specials_and_the_document_stream(blocks, corpus, tok):
    assert blocks.dtype == np.int32 and blocks.shape[1] == 32 and len(blocks) > 50
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    assert not (blocks == tok.pad_token_id).any()
    specials = [tok.cls_token_id, tok.mask_token_id, tok.pad_token_id]
    assert not np.isin(blocks[:, 1:-1], specials).any()
    docs = [line for line in corpus.read_text().splitlines() if line.strip()]
    expected = _ids(tok, docs)
    body = blocks[:, 1:-1].ravel().tolist()
    assert body == expected[: len(body)] and len(expected) - len(body) < 30  # only the last partial block dropped


def test_max_blocks_and_held_out_tail(corpus, tok, blocks):
    capped = load_or_pack([str(corpus)], tok, block_size=32, max_blocks=10)
    np.testing.assert_array_equal(capped, blocks[:10])
    train, held = build_blocks(CorpusSpec([str(corpus)], block_size=32, eval_blocks=5), tok)
    np.testing.assert_array_equal(np.concatenate([train, held]), blocks)
    assert len(held) == 5
    train, held = build_blocks(CorpusSpec([str(corpus)], block_size=32, eval_blocks=0.1), tok)
    assert len(held) == round(0.1 * len(blocks)) and len(train) + len(held) == len(blocks)


def test_separate_eval_sources(tmp_path, corpus, tok, blocks):
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(synthetic_sentences(50, seed=9)) + "\n")
    train, held = build_blocks(CorpusSpec([str(corpus)], eval_sources=[str(valid)], block_size=32, eval_blocks=3), tok)
    np.testing.assert_array_equal(train, blocks)
    np.testing.assert_array_equal(held, load_or_pack([str(valid)], tok, block_size=32)[:3])


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_and_invalidated_by_file_changes(tmp_path, tok, monkeypatch):
    text = tmp_path / "c.txt"
    text.write_text("\n".join(synthetic_sentences(80, seed=4)) + "\n")
    cache = tmp_path / "cache"
    first = load_or_pack([str(text)], tok, block_size=16, cache_dir=cache)
    assert isinstance(first, np.memmap) and len(list(cache.iterdir())) == 1
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    assert meta["blocks"] == len(first) and meta["tokens"] > 0

    def no_repacking(*args, **kwargs):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(data, "_pack_inputs", no_repacking)
        np.testing.assert_array_equal(load_or_pack([str(text)], tok, block_size=16, cache_dir=cache), first)
    text.write_text("\n".join(synthetic_sentences(90, seed=5)) + "\n")
    second = load_or_pack([str(text)], tok, block_size=16, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and not np.array_equal(second[: len(first)], first)


def test_tokenizer_fingerprint_ignores_call_state_but_not_the_vocabulary(tmp_path, tok):
    loaded = make_tokenizer(tmp_path)
    loaded.backend_tokenizer.enable_truncation(max_length=16)  # as a saved tokenizer.json may carry
    before = data.tokenizer_fingerprint(loaded)
    loaded(["the cat"], add_special_tokens=False)  # transformers resets truncation on the backend
    assert data.tokenizer_fingerprint(loaded) == before == data.tokenizer_fingerprint(tok)
    loaded.add_tokens(["zebra"])
    assert data.tokenizer_fingerprint(loaded) != before


def test_failed_build_leaves_no_cache_entry(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="yields no text"):
        load_or_pack([str(empty)], tok, cache_dir=cache)
    assert not any(cache.iterdir())


# --------------------------------------------------------------------------- masking


def test_masking_rates_and_specials(blocks, tok):
    batcher = BlockBatcher(blocks, tok, batch_size=64, seed=0)
    masked = kept = replaced = randomized = candidates = 0
    for step in range(8):
        b = batcher.batch_at(step)
        ids, mlm, labels = b["input_ids"], b["mlm_input_ids"], b["mlm_labels"]
        special = torch.isin(ids, torch.tensor(tok.all_special_ids))
        assert (labels[special] == -100).all() and torch.equal(mlm[special], ids[special])
        sel = labels != -100
        assert torch.equal(labels[sel], ids[sel]) and torch.equal(mlm[~sel], ids[~sel])
        candidates += int((~special).sum())
        masked += int(sel.sum())
        replaced += int((mlm[sel] == tok.mask_token_id).sum())
        kept += int((mlm[sel] == ids[sel]).sum())
        randomized += int(((mlm[sel] != ids[sel]) & (mlm[sel] != tok.mask_token_id)).sum())
    assert abs(masked / candidates - 0.15) < 0.01
    assert abs(replaced / masked - 0.8) < 0.02
    assert abs(randomized / masked - 0.1) < 0.02  # a random draw can hit the original token or [MASK] (~2%)
    assert abs(kept / masked - 0.1) < 0.02


def test_masking_is_optional(blocks, tok):
    b = BlockBatcher(blocks, tok, batch_size=8, mlm_probability=None).batch_at(0)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "rows"}
    assert b["input_ids"].dtype == torch.long and (b["attention_mask"] == 1).all() and (b["token_type_ids"] == 0).all()


# --------------------------------------------------------------------------- order, determinism, resume, sharding


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_are_permutations_and_seeds_matter(blocks, tok):
    batcher = BlockBatcher(blocks, tok, batch_size=8, seed=3)
    spe = batcher.steps_per_epoch
    epoch0 = torch.cat([batcher.global_ids(s) for s in range(spe)])
    uniq = {tuple(r) for r in epoch0.tolist()}
    assert len(uniq) == len({tuple(r) for r in blocks.tolist()} & uniq) == len(epoch0)  # no block twice in an epoch
    assert not torch.equal(batcher.global_ids(0), batcher.global_ids(spe))  # epoch 1 reshuffles
    again = BlockBatcher(blocks, tok, batch_size=8, seed=3)
    other = BlockBatcher(blocks, tok, batch_size=8, seed=4)
    assert all(_same(batcher.batch_at(s), again.batch_at(s)) for s in (0, 5, spe + 1))
    assert not torch.equal(batcher.batch_at(0)["input_ids"], other.batch_at(0)["input_ids"])
    unshuffled = [BlockBatcher(blocks, tok, batch_size=8, seed=s, shuffle=False).batch_at(0) for s in (3, 4)]
    assert torch.equal(unshuffled[0]["input_ids"], torch.from_numpy(blocks[:8].astype(np.int64)))
    assert not torch.equal(unshuffled[0]["mlm_input_ids"], unshuffled[1]["mlm_input_ids"])  # masks follow the seed


def test_resume_at_any_step_matches_an_uninterrupted_run(blocks, tok):
    batcher = BlockBatcher(blocks, tok, batch_size=16, seed=1)
    stop = 2 * batcher.steps_per_epoch + 3  # crosses two epoch boundaries
    run = list(BlockBatcher(blocks, tok, batch_size=16, seed=1).iterate(0, stop))
    for k in (0, 1, batcher.steps_per_epoch - 1, batcher.steps_per_epoch, stop - 1):
        resumed = BlockBatcher(blocks, tok, batch_size=16, seed=1)  # fresh object: no state carried over
        assert _same(resumed.batch_at(k), run[k])
        assert all(_same(a, b) for a, b in zip(resumed.iterate(k, stop), run[k:], strict=True))


def test_rank_shards_and_micro_batches_partition_the_global_batch(blocks, tok):
    batcher = BlockBatcher(blocks, tok, batch_size=12, seed=2)
    for step in (0, 7, batcher.steps_per_epoch + 2):
        whole = batcher.batch_at(step)
        shards = [batcher.batch_at(step, rank=r, world_size=2) for r in range(2)]
        micro = [mb for r in range(2) for mb in batcher.micro_batches(step, 3, rank=r, world_size=2)]
        for parts in (shards, micro):
            for key in whole:
                assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        assert all(len(p["input_ids"]) == 6 for p in shards) and all(len(p["input_ids"]) == 2 for p in micro)
    with pytest.raises(ValueError, match="does not split"):
        batcher.batch_at(0, rank=0, world_size=5)


# --------------------------------------------------------------------------- errors


def test_missing_and_malformed_sources_fail_naming_them(tmp_path, tok, corpus):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"not found: {missing}"):
        build_blocks(CorpusSpec([str(corpus), str(missing)]), tok)
    with pytest.raises(DataError, match="no files match"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file .*data.csv"):
        resolve_sources([str(tmp_path / "data.csv")])
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "the cat"}) + "\n")
    with pytest.raises(DataError, match="rows.jsonl has no 'text' field"):
        load_or_pack([str(tmp_path / "rows.jsonl")], tok)
    with pytest.raises(DataError, match="hub dataset wikitext:wikitext-2-raw-v1 needs the network"):
        load_or_pack(["hub:wikitext:wikitext-2-raw-v1"], tok)  # the tests run with HF_DATASETS_OFFLINE=1
    with pytest.raises(DataError, match="eval_blocks"):
        CorpusSpec([str(corpus)], eval_blocks=1.5)


def test_empty_or_too_small_corpus_fails(tmp_path, tok):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="yields no text"):
        load_or_pack([str(tmp_path / "blank.txt")], tok)
    (tmp_path / "short.txt").write_text("the cat sat.\n")
    with pytest.raises(DataError, match="fewer than one block of 128"):
        load_or_pack([str(tmp_path / "short.txt")], tok)
    few = load_or_pack([str(tmp_path / "short.txt")], tok, block_size=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        BlockBatcher(few, tok, batch_size=len(few) + 1)
    with pytest.raises(DataError, match="leaves none"):
        build_blocks(CorpusSpec([str(tmp_path / "short.txt")], block_size=4, eval_blocks=len(few)), tok)


# --------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_two_wikipedia_shards_with_the_real_tokenizer(shared_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir / "models" / "all-MiniLM-L6-v2")
    shards = sorted((shared_dir / "data" / "corpus" / "wikipedia-en-wikiextractor").glob("*.txt.gz"))[:2]
    train, held = build_blocks(CorpusSpec([str(s) for s in shards], block_size=128, eval_blocks=0.01, cache_dir=tmp_path), tok)
    assert len(train) > 1000 and len(held) == round(0.01 * (len(train) + len(held)))
    assert (train[:, 0] == tok.cls_token_id).all() and (train[:, -1] == tok.sep_token_id).all()
    text = tok.decode(train[:50].ravel())
    assert "<doc" not in text and "</doc>" not in text and "curid" not in text
    # wiki_00 opens with a title-only stub ("Marcus Claudius Tacitus"), then "Jarred Shaw": neither title survives.
    assert tok.decode(train[0, 1:-1]).startswith("jarred shaw ( born september 28, 1990 ) is an american")
    batch = BlockBatcher(train, tok, batch_size=32, seed=0).batch_at(0)
    assert batch["mlm_input_ids"].shape == (32, 128) and (batch["mlm_labels"] != -100).float().mean() > 0.1


def test_sentence_rows_split_documents_pad_and_mask(tmp_path, tok):
    doc = ("The red cat sat on the mat. It ran under the old tree! Short one. Does the blue bird fly in the city? "
           "The cat and the dog and the bird and the tree and the city and the mat sat.")
    assert data.split_sentences(doc)[:3] == ["The red cat sat on the mat.", "It ran under the old tree!", "Does the blue bird fly in the city?"]
    path = tmp_path / "doc.txt"
    path.write_text(doc + "\n")
    rows = load_or_pack([str(path)], tok, block_size=12, unit="sentence", cache_dir=tmp_path / "cache")
    assert rows.shape == (4, 12) and (rows[:, 0] == tok.cls_token_id).all()
    first = tok("The red cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert list(rows[0, 1:len(first) + 2]) == first + [tok.sep_token_id] and (rows[0, len(first) + 2:] == tok.pad_token_id).all()
    assert rows[3, -1] == tok.sep_token_id and tok.pad_token_id not in rows[3]  # the long sentence is truncated to the row
    blocks = load_or_pack([str(path)], tok, block_size=12, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2 and tok.pad_token_id not in blocks  # one cache entry per unit
    batch = BlockBatcher(rows, tok, 4, mlm_probability=0.15, shuffle=False, padded=True).batch_at(0)
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != tok.pad_token_id).long())
    assert (batch["mlm_labels"][batch["input_ids"] == tok.pad_token_id] == -100).all()  # padding is never a prediction target
    with pytest.raises(DataError, match="unit must be one of block, sentence"):
        CorpusSpec(sources=[str(path)], unit="paragraph")
