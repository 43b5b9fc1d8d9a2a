"""Cubic schedule (monotone, exact targets, rounding) and importance aggregation."""

import pytest
import torch
from tiny import make_model, random_batch

from homoexport.pruning.importance import ImportanceTracker, aggregate
from homoexport.pruning.mask_groups import Masks, UnitScores, Widths, build_layout, full_widths, prepare, shrink
from homoexport.pruning.schedule import Schedule, one_shot

FULL = Widths(768, 12, 64, 3072)
TARGET = Widths(256, 4, 64, 1024)


@pytest.mark.parametrize("t_i,t_f,interval", [(0, 0, 1), (10, 30, 5), (0, 100, 7), (50, 0, 3)])
def test_schedule_is_monotone_and_ends_exactly_at_target(t_i, t_f, interval):
    s = Schedule(FULL, TARGET, total_steps=300, t_i=t_i, t_f=t_f, interval=interval, multiple=16)
    previous = FULL
    for step in range(300):
        w = s.widths_at(step)
        for f in ("hidden", "heads", "head_dim", "ffn"):
            assert getattr(TARGET, f) <= getattr(w, f) <= getattr(previous, f)
        previous = w
    assert s.widths_at(s.end) == TARGET and s.widths_at(299) == TARGET
    assert s.is_update_step(s.end)
    assert s.widths_at(max(0, t_i - 1)) == FULL or t_i == 0


def test_intermediate_widths_are_rounded_to_the_multiple():
    s = Schedule(FULL, Widths(200, 4, 50, 1000), total_steps=100, t_f=20, multiple=16)
    for step in range(1, s.end):
        w = s.widths_at(step)
        assert w.hidden % 16 == 0 or w.hidden == 200
        assert w.ffn % 16 == 0 or w.ffn == 1000
    assert s.widths_at(s.end) == Widths(200, 4, 50, 1000)


def test_cubic_prunes_fast_early():
    s = Schedule(FULL, TARGET, total_steps=100, multiple=1)
    quarter = s.widths_at(25).hidden
    assert quarter - TARGET.hidden < 0.5 * (FULL.hidden - TARGET.hidden)  # (1 - 0.25)^3 = 0.42 of the range left


def test_one_shot_is_at_target_from_step_zero():
    s = one_shot(FULL, TARGET, 50)
    assert s.widths_at(0) == TARGET and s.is_update_step(0)


def test_bad_schedules_fail_clearly():
    with pytest.raises(ValueError, match="hidden"):
        Schedule(FULL, Widths(1024, 4, 64, 1024), total_steps=10)
    with pytest.raises(ValueError, match="exceeds"):
        Schedule(FULL, TARGET, total_steps=10, t_i=6, t_f=6)


def _tracker(method):
    model = make_model("mlm").train()
    masked = prepare(model)
    tracker = ImportanceTracker(model, masked.layout, method)
    for seed in range(3):
        batch = random_batch(model.config.vocab_size, seed=seed)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        tracker.update()
        model.zero_grad()
    return model, masked, tracker


@pytest.mark.parametrize("method", ["sensitivity", "ema", "platon"])
def test_unit_scores_have_mask_shapes_and_are_positive(method):
    model, masked, tracker = _tracker(method)
    scores = tracker.unit_scores()
    L = masked.layout
    assert scores.hidden.shape == (L.hidden,) and scores.ffn.shape == (L.num_layers, L.ffn)
    assert scores.attn.shape == (L.num_layers, L.num_heads, L.head_dim)
    assert (scores.hidden > 0).all() and (scores.ffn >= 0).all()


def test_unit_score_sums_every_slice_of_the_group():
    """An FFN unit's score = its intermediate row + bias + its output.dense column."""
    model, masked, tracker = _tracker("sensitivity")
    ps = tracker.parameter_scores()
    p = "bert.encoder.layer.1."
    expected = ps[p + "intermediate.dense.weight"][5].sum() + ps[p + "intermediate.dense.bias"][5] + ps[p + "output.dense.weight"][:, 5].sum()
    assert torch.isclose(aggregate(ps, masked.layout).ffn[1, 5], expected.double())


def test_platon_is_ema_times_uncertainty():
    _, _, tracker = _tracker("platon")
    name = next(iter(tracker.mean))
    assert torch.equal(tracker.parameter_scores()[name], tracker.mean[name] * tracker.uncertainty[name])


def test_shrink_keeps_top_units_and_whole_heads():
    model = make_model("base")
    layout = build_layout(model)
    L = layout.num_layers
    attn = torch.zeros(L, layout.num_heads, layout.head_dim)
    attn[:, 2] = 10.0  # head 2 is the most important
    attn[:, :, 3] += 1.0  # dim 3 of every head more important than the rest
    scores = UnitScores(hidden=torch.arange(layout.hidden, dtype=torch.float), attn=attn, ffn=torch.arange(layout.ffn).float().repeat(L, 1))
    masks = shrink(Masks.full(layout), scores, Widths(16, 1, 1, 8))
    assert torch.equal(torch.nonzero(masks.hidden).flatten(), torch.arange(layout.hidden - 16, layout.hidden))
    assert masks.heads[:, 2].all() and masks.heads.sum() == L
    assert masks.head_dims[0, 2, 3] and masks.widths() == Widths(16, 1, 1, 8)
    assert full_widths(layout) == Widths(64, 4, 16, 128)


def test_importance_state_round_trips():
    model, masked, tracker = _tracker("platon")
    other = ImportanceTracker(model, masked.layout, "platon")
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.unit_scores().hidden, tracker.unit_scores().hidden)
    with pytest.raises(ValueError, match="method"):
        ImportanceTracker(model, masked.layout, "ema").load_state_dict(tracker.state_dict())
