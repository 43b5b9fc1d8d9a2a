"""HomoDistilPruner in a user-owned loop and inside a stock transformers.Trainer."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from tiny import make_model, random_batch
from transformers import Trainer, TrainingArguments

from homoexport.pruning.callback import HomoDistilCallback
from homoexport.pruning.mask_groups import Widths
from homoexport.pruning.pruner import HomoDistilPruner, PrunerSettings, slice_optimizer_state, stages
from homoexport.pruning.surgery import parity_max_abs_diff

TARGET = Widths(hidden=32, heads=2, head_dim=16, ffn=64)


def test_pruner_in_a_plain_loop_reaches_target_monotonically_with_parity():
    model = make_model("cls", num_labels=2).train()
    pruner = HomoDistilPruner(model, TARGET, PrunerSettings(total_steps=12, t_f=4, interval=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = random_batch(model.config.vocab_size)
    previous = pruner.masks.clone()
    changes = 0
    for step in range(12):
        model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()
        changes += pruner.after_backward(step)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step()
        assert pruner.masks.is_subset_of(previous) and pruner.masked.pruned_weights_are_zero()
        previous = pruner.masks.clone()
    assert changes >= 2 and pruner.widths() == TARGET and pruner.reached_target(11)
    dense = pruner.materialize()
    assert dense.classifier.weight.shape == (2, 32)
    assert parity_max_abs_diff(pruner.masked, dense, batch) <= 1e-4
    # Training on the dense student, the loop drops the scores (two model-sized tensors each) and can prune no more.
    full = weakref.ref(model)
    del model, opt, dense
    pruner.stop_scoring()
    assert pruner.importance.mean == {} == pruner.state_dict()["importance"]["uncertainty"] and pruner.widths() == TARGET
    gc.collect()
    assert full() is None  # nor does the pruner keep the full-width model alive
    with pytest.raises(RuntimeError, match="after stop_scoring"):
        pruner.after_backward(2)
    with pytest.raises(RuntimeError, match="masked model was released"):
        pruner.materialize()


def test_pruner_state_round_trip_and_one_shot():
    model = make_model("cls", num_labels=2).train()
    pruner = HomoDistilPruner(model, TARGET, PrunerSettings(total_steps=5, schedule="one_shot"))
    model(**random_batch(model.config.vocab_size), labels=torch.tensor([0, 1, 1])).loss.backward()
    pruner.importance.update()
    pruner.prune_to_target()
    assert pruner.widths() == TARGET
    other = HomoDistilPruner(copy.deepcopy(make_model("cls", num_labels=2)), TARGET, PrunerSettings(total_steps=5, schedule="one_shot"))
    other.load_state_dict(pruner.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.masks.tensors(), pruner.masks.tensors()))
    with pytest.raises(ValueError, match="schedule 'cubic' is not one of homotopic, one_shot"):
        PrunerSettings(total_steps=5, schedule="cubic")


def test_optimizer_state_is_sliced_with_the_query_scale():
    model = make_model("base").train()
    target = Widths(hidden=32, heads=4, head_dim=8, ffn=64)  # head_dim 16 -> 8: W_q scaled by sqrt(1/2)
    pruner = HomoDistilPruner(model, target, PrunerSettings(total_steps=1, schedule="one_shot"))
    model(**random_batch(model.config.vocab_size)).last_hidden_state.sum().backward()
    pruner.importance.update()
    pruner.prune_to_target()
    name = "encoder.layer.0.attention.self.query.weight"
    state = {"step": torch.tensor(3.0), "exp_avg": torch.ones(64, 64), "exp_avg_sq": torch.ones(64, 64)}
    sliced = slice_optimizer_state(pruner, name, state)
    c = (8 / 16) ** 0.5
    assert sliced["exp_avg"].shape == (32, 32) and sliced["step"] is state["step"]
    assert torch.allclose(sliced["exp_avg"], torch.full((32, 32), 1 / c)) and torch.allclose(sliced["exp_avg_sq"], torch.full((32, 32), 1 / c**2))


def test_stock_trainer_with_callback_prunes_to_target(tmp_path):
    model = make_model("cls", num_labels=2).train()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, model.config.vocab_size, (12,), generator=g), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    callback = HomoDistilCallback(TARGET, PrunerSettings(total_steps=1, t_f=2, interval=1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert callback.pruner.widths() == TARGET and callback.pruner.masked.pruned_weights_are_zero()
    dense = callback.materialize()
    assert (dense.config.hidden_size, dense.config.num_attention_heads, dense.config.intermediate_size) == (32, 2, 64)
    batch = random_batch(model.config.vocab_size)
    assert parity_max_abs_diff(callback.pruner.masked, dense, batch) <= 1e-4


def _prune(target: Widths, steps: int, share: float | None) -> HomoDistilPruner:
    """Backward passes on fixed weights (no optimizer), pruning on schedule; with ``share``, going on over the
    materialised model whenever :meth:`~HomoDistilPruner.worth_rebasing` says so."""
    pruner = HomoDistilPruner(make_model("cls", num_labels=2), target, PrunerSettings(total_steps=12, t_f=4, interval=2))
    for step in range(steps):
        pruner.model(**random_batch(128, seed=step), labels=torch.tensor([0, 1, 0])).loss.backward()
        changed = pruner.after_backward(step)
        pruner.model.zero_grad(set_to_none=True)
        pruner.after_optimizer_step()
        if share is not None and changed and pruner.worth_rebasing(share) and not pruner.reached_target(step):
            pruner.rebase(pruner.materialize())
    return pruner


@pytest.mark.parametrize("target", [TARGET, Widths(hidden=32, heads=4, head_dim=8, ffn=64)])
def test_going_on_over_the_materialised_model_chooses_the_units_the_masked_one_does(target):
    """Weights that leave the model at a rebase take their decaying scores along as a residue, so the rebased pruner
    ranks units as the masked one does; kept heads are numbered as in the first model; its state replays."""
    masked, rebased = _prune(target, 12, None), _prune(target, 12, 0.9)
    assert len(rebased.stages) >= 2 and rebased.widths() == masked.widths() == target
    assert torch.equal(rebased.kept_heads().teacher, masked.masks.heads) and rebased.kept_heads().student.sum(-1).tolist() == [target.heads] * 2
    a, b = masked.materialize().state_dict(), rebased.materialize().state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    halfway = _prune(target, 7, 0.9)
    assert halfway.stages and halfway.widths() != target
    state = halfway.state_dict()
    again = HomoDistilPruner(make_model("cls", num_labels=2), target, PrunerSettings(total_steps=12, t_f=4, interval=2))
    with pytest.raises(ValueError, match="replay them first"):
        again.load_state_dict(state)
    for masks in stages(state):
        again.masked.set_masks(masks)
        again.rebase(again.materialize())
    again.load_state_dict(state)
    ours, theirs = again.importance.unit_scores(), halfway.importance.unit_scores()
    assert all(torch.equal(getattr(ours, k), getattr(theirs, k)) for k in ("hidden", "attn", "ffn"))
    assert torch.equal(again.kept_heads().teacher, halfway.kept_heads().teacher)

    rebased.rebase(rebased.materialize(), final=True)  # the loop trains the target from here: nothing left to score
    assert not rebased.scoring and rebased.widths() == target and bool(rebased.kept_heads().student.all())
    assert torch.equal(rebased.kept_heads().teacher, masked.masks.heads)
    assert rebased.masked.model is None
