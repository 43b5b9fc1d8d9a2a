"""The teacher's sentence embeddings, computed once for every training row: the same vectors a step would compute,
read back by row, cached, and used only where every weighed term reads nothing else."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_model, make_tokenizer, max_weight_difference, save_model_dir, synthetic_sentences

import homoexport.distillation.trainer as trainer
from homoexport.config.recipe import LossSpec, validate_recipe
from homoexport.distillation.data import BlockBatcher
from homoexport.distillation.losses import DistillationLoss, active_terms, mean_pool, pool_hidden, pooled_cosine
from homoexport.distillation.sentence_targets import pooled_by_length, pooled_rows, teacher_sentence_targets
from homoexport.distillation.trainer import distill, teacher_outputs
from homoexport.evaluation.sts import Pooling, write_pooling


def padded_rows(n: int, width: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, width] right-padded (pad id 0) rows of random lengths, and the lengths."""
    g = np.random.default_rng(seed)
    lengths = g.integers(2, width, size=n)
    rows = np.zeros((n, width), dtype=np.int64)
    for i, k in enumerate(lengths):
        rows[i, :k] = g.integers(5, 100, size=k)
    return rows, lengths


def test_pooled_rows_come_back_in_row_order_as_each_row_alone_embeds():
    """Rows are encoded shortest first in batches cut to their longest row; the result is each row's own mean pooling."""
    encoder = make_model("base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()
    rows, lengths = padded_rows(37)
    pooled = pooled_rows(encoder, rows, 0, contextlib.nullcontext, batch_size=8)
    with torch.no_grad():
        for i in (0, 5, 36):
            ids = torch.from_numpy(rows[i:i + 1, :lengths[i]])
            alone = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1)
            assert torch.allclose(pooled[i], alone[0], atol=1e-5)


def test_pool_hidden_pools_as_sentence_transformers_modes_do():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    hidden[mask == 0] = 1e4  # padding must never reach the embedding
    assert torch.equal(pool_hidden(hidden, mask), mean_pool(hidden, mask))
    assert torch.equal(pool_hidden(hidden, mask, "cls"), hidden[:, 0])
    expected = torch.stack([hidden[i, :int(mask[i].sum())].amax(0) for i in range(3)])
    assert torch.equal(pool_hidden(hidden, mask, "max"), expected)


def test_the_held_out_cosine_to_the_teacher_reads_the_pooled_embedding_the_run_distils():
    """A CLS-pooling run is scored on its CLS vectors: equal first tokens give cosine 1 whatever the other tokens hold."""
    teacher = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    student = teacher.clone()
    student[:, 1:] = -student[:, 1:]
    mask = torch.ones(2, 4)
    assert float(pooled_cosine(student, teacher, mask, "cls")) == pytest.approx(1.0)
    assert float(pooled_cosine(student, teacher, mask)) < 0.9


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_rows_encoded_in_length_runs_give_the_whole_batch_vectors_and_gradients(mode):
    """pooled_by_length against one pass over the padded batch: the same pooled vectors, and the same gradients."""
    rows, _ = padded_rows(13, width=24, seed=4)
    ids = torch.from_numpy(rows)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}
    grads = []
    for runs in (1, 4):
        encoder = make_model("base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        pooled = (pooled_by_length(encoder, inputs, runs, mode) if runs > 1
                  else pool_hidden(encoder(**inputs).last_hidden_state, inputs["attention_mask"], mode))
        pooled.pow(2).sum(-1).sqrt().mul(torch.arange(13.0)).sum().backward()  # a different weight for each row
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        if runs == 1:
            whole = pooled.detach()
        else:
            assert torch.allclose(pooled.detach(), whole, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4) for n in grads[0])


def test_targets_are_cached_by_rows_teacher_precision_and_pooling(tmp_path, caplog):
    teacher = make_model("base").eval()
    rows, _ = padded_rows(20)
    first = teacher_sentence_targets(teacher, rows, 0, "fp32", tmp_path)
    assert first.shape == (20, teacher.config.hidden_size) and first.dtype == torch.float32
    assert len(list(tmp_path.glob("sentences-*.npy"))) == 1 and not list(tmp_path.glob(".*.tmp"))
    with caplog.at_level("INFO", logger="homoexport"):
        again = teacher_sentence_targets(teacher, rows, 0, "fp32", tmp_path)
    assert "rows from" in caplog.text and torch.equal(first, again)
    teacher_sentence_targets(teacher, rows, 0, "bf16", tmp_path)
    teacher_sentence_targets(make_model("base", seed=1), rows, 0, "fp32", tmp_path)
    teacher_sentence_targets(teacher, rows, 0, "fp32", tmp_path, "cls")
    assert len(list(tmp_path.glob("sentences-*.npy"))) == 4


def test_read_back_targets_give_the_loss_the_online_teacher_gives(tmp_path):
    """Every sentence-level term, on a batch of padded sentence rows: precomputed vectors by row index against
    the teacher run on the batch."""
    tok = make_tokenizer(tmp_path)
    teacher = make_model("base").eval()
    student = make_model("base", seed=1).eval()
    rows, _ = padded_rows(48, seed=2)
    sentences = teacher_sentence_targets(teacher, rows, tok.pad_token_id, "fp32")
    batch = BlockBatcher(rows, tok, 16, mlm_probability=None, padded=True).batch_at(1)
    assert torch.equal(batch["input_ids"], torch.from_numpy(rows[batch["rows"].numpy()]))
    spec = LossSpec(hidden=0, attention=0, embedding=0, mlm=0, kl=0, sentence=1.0, similarity=1.0, contrastive=1.0)
    loss = DistillationLoss(spec, 64, 64, 2, 2, has_mlm=False)
    with torch.no_grad():
        s_out = trainer.encode(student, trainer.student_inputs(batch, False)[0])
        online = loss(s_out, teacher_outputs(teacher, batch, loss, None), batch["attention_mask"], None, None)[1]
        read = loss(s_out, teacher_outputs(teacher, batch, loss, None, sentences), batch["attention_mask"], None, None)[1]
    assert set(read) == {"sentence", "similarity", "contrastive"}
    assert all(float(read[k]) == pytest.approx(float(online[k]), rel=1e-5, abs=1e-7) for k in online)


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("targets")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(400, seed=3)))
    return save_model_dir(root / "teacher", "base"), corpus  # the student's dropout keeps its loss, and so its importance scores, off zero


def sentence_recipe(teacher: Path, corpus: Path, out: Path, **losses) -> dict:
    return {
        "teacher": str(teacher), "student": {"hidden": 32, "heads": 2, "ffn": 48},
        "data": {"train": [str(corpus)], "block_size": 32, "eval_blocks": 8, "unit": "sentence", "batching": "neighbours",
                 "cache_dir": str(out.parent / "cache")},
        "losses": {"hidden": 0.0, "attention": 0.0, "embedding": 0.0, "contrastive": 1.0, **losses},
        "pruning": {"schedule": "one_shot", "score_batches": 2, "multiple": 8},
        "optimizer": {"lr": 1e-3, "warmup": 0},
        "training": {"steps": 10, "batch_size": 16, "log_every": 1, "checkpoint_every": 4, "precision": "fp32"},
        "output": str(out),
    }


def test_a_sentence_level_run_trains_as_the_online_teacher_would_without_running_it(setting, tmp_path, monkeypatch, caplog):
    teacher, corpus = setting
    r = sentence_recipe(teacher, corpus, tmp_path / "read")
    with caplog.at_level("INFO", logger="homoexport"):
        report = distill(validate_recipe(r))
    assert report["teacher_sentences_s"] is not None and "embedding" in caplog.text and "rows once" in caplog.text
    assert "rows with the teacher" not in caplog.text  # grouping reused the same vectors
    # The same run with the teacher run on every batch, as before the vectors were kept.
    built = trainer.build_corpus_setup
    monkeypatch.setattr(trainer, "build_corpus_setup", lambda *a, **k: built(*a, **{**k, "sentence_targets": False}))
    online = distill(validate_recipe(dict(r, output=str(tmp_path / "online"))))
    assert online["teacher_sentences_s"] is None
    assert online["final_loss_terms"] == pytest.approx(report["final_loss_terms"], rel=1e-4, abs=1e-6)
    assert max_weight_difference(tmp_path / "read" / "student", tmp_path / "online" / "student") < 1e-4


def test_targets_are_kept_only_when_every_term_reads_the_sentence_embedding_alone(setting, tmp_path):
    teacher, corpus = setting
    mixed = validate_recipe(sentence_recipe(teacher, corpus, tmp_path / "mixed", hidden=1.0))
    assert set(active_terms(mixed.losses, has_mlm=False)) == {"hidden", "contrastive"}
    setup = trainer.build_corpus_setup(mixed, sentence_targets=True)
    assert setup.sentences is None and setup.sentences_s is None
    sentence_only = validate_recipe(sentence_recipe(teacher, corpus, tmp_path / "only", sentence=1.0))
    setup = trainer.build_corpus_setup(sentence_only, sentence_targets=True)
    assert setup.sentences is not None and setup.sentences.shape == (len(setup.batcher.blocks), 64)
    assert trainer.build_corpus_setup(sentence_only).sentences is None  # only a loop that reads them asks for them


def test_a_cls_pooling_teacher_is_distilled_by_its_cls_embedding(tmp_path, caplog):
    """The sentence terms read the embedding the teacher's sentence-transformers files declare, not always the mean."""
    teacher_dir = save_model_dir(tmp_path / "cls-teacher", "base")
    write_pooling(teacher_dir, Pooling("cls"), 64, 32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(200, seed=5)))
    r = sentence_recipe(teacher_dir, corpus, tmp_path / "run")
    with caplog.at_level("INFO", logger="homoexport"):
        setup = trainer.build_corpus_setup(validate_recipe(r), sentence_targets=True)
    assert setup.pooling == "cls" and "cls pooling" in caplog.text
    rows = setup.batcher.blocks
    with torch.no_grad():
        for i in (0, 7):
            length = int((rows[i] != setup.tokenizer.pad_token_id).sum())
            ids = torch.from_numpy(np.asarray(rows[i:i + 1, :length], dtype=np.int64))
            states = setup.teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            assert torch.allclose(setup.sentences[i], states[0, 0], atol=1e-5)
            assert not torch.allclose(setup.sentences[i], states[0].mean(0), atol=1e-3)
    assert distill(validate_recipe(r))["sentence_pooling"] == "cls"


def test_a_bad_pooling_config_stops_only_runs_that_pool(tmp_path):
    """The teacher's pooling files are read, and a bad one named, only where a sentence embedding is pooled."""
    import json

    from homoexport.errors import UsageError

    teacher_dir = save_model_dir(tmp_path / "teacher", "base")
    write_pooling(teacher_dir, Pooling("mean"), 64, 32)
    config = teacher_dir / "1_Pooling" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pooling_mode_cls_token": True}))  # two modes at once
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(100, seed=6)))
    with pytest.raises(UsageError, match="1_Pooling/config.json"):
        trainer.build_corpus_setup(validate_recipe(sentence_recipe(teacher_dir, corpus, tmp_path / "a")))
    r = sentence_recipe(teacher_dir, corpus, tmp_path / "b", hidden=1.0, contrastive=0.0)
    r["data"]["batching"] = "random"
    assert trainer.build_corpus_setup(validate_recipe(r)).pooling == "mean"


def test_the_recipe_group_size_sizes_the_neighbour_groups_of_a_run(setting, tmp_path):
    teacher, corpus = setting
    r = sentence_recipe(teacher, corpus, tmp_path / "run")
    for size in (8, 16):
        setup = trainer.build_corpus_setup(validate_recipe({**r, "data": {**r["data"], "group_size": size}}), sentence_targets=True)
        assert setup.batcher.groups is not None and setup.batcher.groups.shape[1] == size
        assert setup.batcher.groups.shape[0] == len(setup.batcher.blocks) // size


@pytest.mark.parametrize("targets", [True, False])
def test_a_regrouping_run_mines_each_epoch_from_the_teacher_vectors_and_trains_across_epochs(setting, tmp_path, targets, caplog):
    teacher, corpus = setting
    r = sentence_recipe(teacher, corpus, tmp_path / "run")
    r["data"]["regroup"] = True
    setup = trainer.build_corpus_setup(validate_recipe(r), sentence_targets=targets)
    groups = setup.batcher.groups
    assert groups is not None and groups.embeddings is not None and groups.embeddings.shape[0] == len(setup.batcher.blocks)
    assert torch.allclose(groups.embeddings.norm(dim=-1), torch.ones(len(setup.batcher.blocks)), atol=1e-5)
    assert not np.array_equal(groups.at(0), groups.at(1))
    if targets:  # the whole run: it crosses into the second epoch, whose batches come from the new groups
        steps = setup.batcher.steps_per_epoch + 2
        r["training"] = {**r["training"], "steps": steps}
        with caplog.at_level("INFO", logger="homoexport"):
            report = distill(validate_recipe(r))
        assert report["steps"] == steps and "epoch 1 regrouped" in caplog.text
