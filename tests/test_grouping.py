"""Neighbour batches and the contrastive term: related sentences share a batch, and their ranking is what is distilled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import make_model, make_tokenizer

from homoexport.config.recipe import validate_recipe
from homoexport.distillation.data import BlockBatcher, DataError
from homoexport.distillation.grouping import EpochGroups, Grouping, groups_key, neighbour_groups
from homoexport.distillation.losses import contrastive_kl
from homoexport.errors import UsageError


def clustered(n_clusters: int, size: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Unit vectors in tight clusters around random centres, rows shuffled; returns (embeddings, cluster of each row)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    label = torch.arange(n_clusters).repeat_interleave(size)
    x = centres[label] + 0.01 * torch.randn(len(label), dim, generator=g)
    perm = torch.randperm(len(label), generator=g)
    return torch.nn.functional.normalize(x[perm], dim=-1), label[perm].numpy()


GROUP_SIZE = 8


def test_neighbour_groups_gather_each_cluster_and_use_every_row_once():
    emb, cluster = clustered(5, GROUP_SIZE)
    groups = neighbour_groups(emb, GROUP_SIZE, seed=3)
    assert groups.shape == (5, GROUP_SIZE)
    assert sorted(groups.reshape(-1).tolist()) == list(range(5 * GROUP_SIZE))
    assert all(len(set(cluster[g])) == 1 for g in groups)
    assert np.array_equal(groups, neighbour_groups(emb, GROUP_SIZE, seed=3))  # deterministic for a seed
    leftovers = neighbour_groups(torch.cat([emb, emb[:3]]), GROUP_SIZE)  # 43 rows: 5 groups, 3 rows left out
    assert leftovers.shape == (5, GROUP_SIZE) and len(set(leftovers.reshape(-1).tolist())) == 5 * GROUP_SIZE
    with pytest.raises(DataError, match="at least 8"):
        neighbour_groups(emb[:5], GROUP_SIZE)
    emb, cluster = clustered(3, 16)
    groups = neighbour_groups(emb, 16)
    assert groups.shape == (3, 16) and all(len(set(cluster[g])) == 1 for g in groups)


def test_cached_groups_are_keyed_by_rows_teacher_size_seed_precision_and_pooling():
    teacher = make_model("base")
    rows = np.arange(64, dtype=np.int32).reshape(8, 8)
    key = groups_key(teacher, rows, Grouping())
    assert key == groups_key(make_model("base"), rows.copy(), Grouping(8, 0, "fp32", "mean"))
    other_rows = rows.copy()
    other_rows[3, 3] = 0
    assert len({key, groups_key(teacher, other_rows, Grouping()), groups_key(make_model("base", seed=1), rows, Grouping()),
                groups_key(teacher, rows, Grouping(precision="bf16")), groups_key(teacher, rows, Grouping(seed=1)),
                groups_key(teacher, rows, Grouping(pooling="cls")), groups_key(teacher, rows, Grouping(size=16))}) == 7
    with pytest.raises(ValueError, match="at least 2 rows"):
        Grouping(size=1)


def test_batcher_keeps_groups_whole_and_visits_every_grouped_row_once_an_epoch(tmp_path):
    tok = make_tokenizer(tmp_path)
    rows = np.arange(48 * 4, dtype=np.int32).reshape(48, 4) + 10  # row i starts with token 10 + 4i
    groups = np.random.default_rng(0).permutation(48).reshape(6, 8)
    batcher = BlockBatcher(rows, tok, 16, mlm_probability=None, groups=groups)
    assert batcher.steps_per_epoch == 3
    member = {int(r): k for k, g in enumerate(groups) for r in g}
    seen = []
    for step in range(3):
        ids = (batcher.global_ids(step)[:, 0].numpy() - 10) // 4
        for half in (ids[:8], ids[8:]):
            assert len({member[int(r)] for r in half}) == 1  # each 8 rows are one group
        seen += ids.tolist()
    assert sorted(seen) == list(range(48))
    assert not torch.equal(batcher.global_ids(0), batcher.global_ids(3))  # the next epoch reshuffles the groups
    with pytest.raises(DataError, match="multiple of the neighbour group size 8"):
        BlockBatcher(rows, tok, 12, mlm_probability=None, groups=groups)


def test_regrouping_mines_other_groups_each_epoch_as_a_pure_function_of_the_epoch(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    first = neighbour_groups(emb, 8, seed=0)
    fixed = EpochGroups(first)
    assert fixed.shape == (8, 8) and all(fixed.at(e) is first for e in (0, 1, 5))
    regrouped = EpochGroups(first, emb, seed=0)
    epochs = [regrouped.at(e) for e in range(4)]
    assert epochs[0] is first  # the cached groups open the run
    for groups in epochs:
        assert groups.shape == (8, 8) and sorted(groups.reshape(-1).tolist()) == list(range(64))
    partitions = [frozenset(frozenset(g.tolist()) for g in groups) for groups in epochs]
    assert len(set(partitions)) == 4  # each epoch its own groups
    resumed = EpochGroups(first, emb, seed=0)  # a resumed run asks for epoch 2 first
    assert np.array_equal(resumed.at(2), epochs[2]) and np.array_equal(resumed.at(1), epochs[1])
    assert not np.array_equal(EpochGroups(first, emb, seed=1).at(1), epochs[1])
    tok = make_tokenizer(tmp_path)
    rows = np.arange(64 * 4, dtype=np.int32).reshape(64, 4) + 10  # row i starts with token 10 + 4i
    batcher = BlockBatcher(rows, tok, 16, mlm_probability=None, groups=regrouped)
    assert batcher.steps_per_epoch == 4
    for epoch in (0, 1, 2):
        member = {int(r): k for k, g in enumerate(epochs[epoch]) for r in g}
        for step in range(epoch * 4, epoch * 4 + 4):
            ids = (batcher.global_ids(step)[:, 0].numpy() - 10) // 4
            assert all(len({member[int(r)] for r in half}) == 1 for half in (ids[:8], ids[8:]))  # that epoch's groups, whole


def test_regroup_needs_neighbour_batches():
    base = {"teacher": "t", "student": {"hidden": 32, "heads": 2, "ffn": 48}, "data": {"train": ["x.txt"], "unit": "sentence"}}
    with pytest.raises(UsageError, match=r"data\.regroup: .*set data\.batching to neighbours"):
        validate_recipe({**base, "data": {**base["data"], "regroup": True}})
    assert validate_recipe({**base, "data": {**base["data"], "batching": "neighbours", "regroup": True}}).data.regroup
    resolved = validate_recipe(base).model_dump(mode="json")  # recipe.resolved.yaml writes regroup: false
    assert resolved["data"]["regroup"] is False and validate_recipe(resolved).data.batching == "random"


def test_contrastive_kl_is_zero_for_the_same_ranking_at_any_width_and_scale():
    torch.manual_seed(0)
    t = torch.randn(8, 32)
    assert float(contrastive_kl(t * 5, t, 0.05)) == pytest.approx(0.0, abs=1e-6)
    rotated = t @ torch.linalg.qr(torch.randn(32, 32))[0]  # same cosines, other coordinates
    assert float(contrastive_kl(rotated, t, 0.05)) == pytest.approx(0.0, abs=1e-4)
    s = torch.randn(8, 16, requires_grad=True)
    value = contrastive_kl(s, t, 0.05)
    value.backward()
    assert float(value.detach()) > 0 and s.grad is not None and float(s.grad.abs().sum()) > 0


def test_neighbour_batching_needs_sentence_rows():
    base = {"teacher": "t", "student": {"hidden": 32, "heads": 2, "ffn": 48}, "data": {"train": ["x.txt"], "batching": "neighbours"}}
    with pytest.raises(ValueError, match=r"data\.batching: .*data\.unit to sentence \(got .neighbours.\)"):
        validate_recipe(base)
    assert validate_recipe({**base, "data": {**base["data"], "unit": "sentence"}}).data.batching == "neighbours"


def test_a_neighbour_batch_size_that_splits_a_group_fails_when_the_recipe_loads():
    """Before the teacher embeds a single row (minutes on a real corpus), not when the batcher is built."""
    base = {"teacher": "t", "student": {"hidden": 32, "heads": 2, "ffn": 48},
            "data": {"train": ["x.txt"], "unit": "sentence", "batching": "neighbours"}}
    with pytest.raises(UsageError, match=r"training\.batch_size 100 is not a multiple of data\.group_size 8") as err:
        validate_recipe({**base, "training": {"batch_size": 100}})
    assert "Value error" not in str(err.value) and "'teacher'" not in str(err.value)  # the message, not the recipe echoed
    assert validate_recipe({**base, "training": {"batch_size": 128}}).training.batch_size == 128
    assert validate_recipe({**base, "data": {**base["data"], "batching": "random"}, "training": {"batch_size": 100}})
    with pytest.raises(UsageError, match=r"training\.batch_size 64 is not a multiple of data\.group_size 48"):
        validate_recipe({**base, "data": {**base["data"], "group_size": 48}, "training": {"batch_size": 64}})
    assert validate_recipe({**base, "data": {**base["data"], "group_size": 16}, "training": {"batch_size": 128}}).data.group_size == 16


def test_a_group_size_without_neighbour_batches_is_an_error_not_ignored():
    base = {"teacher": "t", "student": {"hidden": 32, "heads": 2, "ffn": 48}, "data": {"train": ["x.txt"], "unit": "sentence"}}
    with pytest.raises(UsageError, match=r"data\.group_size: .*set data\.batching to neighbours"):
        validate_recipe({**base, "data": {**base["data"], "group_size": 16}})
    with pytest.raises(UsageError, match=r"data\.group_size"):
        validate_recipe({**base, "data": {**base["data"], "batching": "neighbours", "group_size": 1}})
    with pytest.raises(UsageError) as err:  # a misspelt batching: one error, not a second one about group_size
        validate_recipe({**base, "data": {**base["data"], "batching": "neighbors", "group_size": 16}})
    assert "data.batching" in str(err.value) and "data.group_size" not in str(err.value)
    resolved = validate_recipe(base).model_dump(mode="json")  # what recipe.resolved.yaml writes: the default group size
    assert resolved["data"]["group_size"] == 8 and validate_recipe(resolved).data.batching == "random"
