"""Budget planner: budget parsing, candidate enumeration, the bisection chooser, the cache, the
export-candidates / measure / plan --measurements round trip, apply_plan, and one real tiny plan."""

from __future__ import annotations

import json
import math

import pytest
from tiny import save_model_dir

from homoexport.config.recipe import validate_recipe
from homoexport.deployment import budget
from homoexport.deployment.budget import (
    MB,
    BudgetError,
    FigureSource,
    Measurement,
    NoFitError,
    PlanSettings,
    SearchSpace,
    Shape,
    TeacherShape,
    apply_plan,
    choose_heads,
    enumerate_candidates,
    export_candidates,
    measure_candidates,
    pareto_front,
    parse_budget,
    parse_candidates,
    parse_depths,
    plan,
    plan_for_recipe,
    teacher_shape,
)

MINILM = TeacherShape(hidden=384, heads=12, ffn=1536, layers=6, vocab=30522, max_positions=512, type_vocab=2)


def fake_cost(shape: Shape) -> float:
    """A deterministic latency model: grows with hidden x FFN and depth (ms)."""
    return 0.5 + shape.layers * (shape.hidden * 4 * shape.hidden + 2 * shape.hidden * shape.ffn) * 128 / 2e8


class FakeMeasure:
    """Injected measure function recording every call."""

    def __init__(self, cost=fake_cost):
        self.calls: list[Shape] = []
        self.cost = cost

    def __call__(self, shape: Shape, with_rss: bool) -> Measurement:
        self.calls.append(shape)
        ms = self.cost(shape)
        return Measurement(ms, ms * 1.1, shape.hidden * 1000, 50.0 + shape.hidden / 10 if with_rss else None)


@pytest.fixture()
def teacher_dir(tmp_path):
    """A tiny teacher (hidden 64, 4 heads of 16, FFN 128, 2 layers) saved as a model directory."""
    return save_model_dir(tmp_path / "teacher", kind="base")


# --- budgets --------------------------------------------------------------------------------------


def test_parse_budget_units_and_combinations():
    (lat,) = parse_budget("latency=8ms")
    assert (lat.kind, lat.limit) == ("latency", 8.0)
    assert parse_budget("latency=500us")[0].limit == pytest.approx(0.5)
    assert parse_budget("latency=0.01s")[0].limit == pytest.approx(10.0)
    assert parse_budget("memory=30MB")[0].limit == 30 * MB
    assert parse_budget("rss=1GB")[0].limit == 2**30
    assert parse_budget("params=20M")[0].limit == 20e6
    assert parse_budget("params=1500000")[0].limit == 1.5e6
    both = parse_budget("latency=8ms, memory=30MB")
    assert [c.kind for c in both] == ["latency", "memory"]


@pytest.mark.parametrize("bad", ["", "latency", "latency=8", "latency=8MB", "memory=30ms", "speed=8ms", "latency=-1ms",
                                 "latency=0ms", "latency=8ms,latency=9ms", "params=20X", "latency=fast"])
def test_bad_budget_strings_fail_with_the_syntax(bad):
    with pytest.raises(BudgetError, match=r"latency=8ms \| memory=30MB|must be > 0|given twice") as e:
        parse_budget(bad)
    if "twice" not in str(e.value) and "> 0" not in str(e.value):
        assert "KIND=VALUE" in str(e.value)


# --- candidates -----------------------------------------------------------------------------------


def test_enumeration_respects_divisibility_and_rounding():
    shapes = enumerate_candidates(MINILM, multiple=16)
    assert shapes == sorted(shapes) and shapes[-1] == Shape(384, 12, 1536, 6)
    for s in shapes:
        assert s.hidden % 16 == 0 and s.hidden <= 384
        assert s.hidden % s.heads == 0 and s.heads <= 12 and s.head_dim <= 32
        assert s.ffn % 16 == 0 and s.ffn == min(1536, round(s.hidden * 4 / 16) * 16)
        assert s.layers == 6
        if s.hidden % 32 == 0:
            assert s.head_dim == 32  # the teacher's head_dim wherever it divides hidden
        else:
            assert s.head_dim % 8 == 0  # else a multiple of 8
    assert Shape(48, 2, 192, 6) in shapes  # 48 = 2 heads x 24
    assert {s.hidden for s in enumerate_candidates(MINILM, multiple=8)} >= {s.hidden for s in shapes}
    assert all(s.ffn == round(s.hidden * 2 / 16) * 16 for s in enumerate_candidates(MINILM, 16, ffn_ratio=2.0))
    assert {s.layers for s in enumerate_candidates(MINILM, 16, depths=[4])} == {4}
    with pytest.raises(BudgetError, match="multiple must be one of"):
        enumerate_candidates(MINILM, multiple=12)


def test_choose_heads_reachability():
    assert choose_heads(256, MINILM) == 8
    assert choose_heads(80, MINILM) == 5  # head_dim 16 (32 does not divide 80)
    assert choose_heads(376, MINILM) is None  # needs head_dim in [31.4, 32] dividing 376: none
    assert 376 not in {s.hidden for s in enumerate_candidates(MINILM, multiple=8)}


def test_parse_candidates_validates_reachability():
    got = parse_candidates("128, 256:8:1024", MINILM)
    assert got == [Shape(128, 4, 512, 6), Shape(256, 8, 1024, 6)]
    for bad in ("512", "256:7:1024", "256:8:4096", "128:2:512", "abc", "256:8"):
        with pytest.raises(BudgetError, match="HIDDEN|not reachable"):
            parse_candidates(bad, MINILM)


# --- the chooser (fake measurements) --------------------------------------------------------------


@pytest.fixture(autouse=True)
def steady_machine(monkeypatch):
    """The calibration probe of a machine whose speed never changes (tests that need another script it)."""
    monkeypatch.setattr(budget, "calibration_probe", lambda threads=None: 8.0)


@pytest.fixture()
def minilm_dir(tmp_path):
    """A config-only directory shaped like all-MiniLM-L6-v2: enough for planning with fake measurements."""
    d = tmp_path / "minilm"
    d.mkdir()
    t = MINILM
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": t.hidden, "num_attention_heads": t.heads,
                                               "intermediate_size": t.ffn, "num_hidden_layers": t.layers, "vocab_size": t.vocab,
                                               "max_position_embeddings": t.max_positions, "type_vocab_size": t.type_vocab}))
    return d


def _plan(teacher, budget, measure, candidates=None, margin=0.05, refine=2, cache_path=None, fresh=False, **kw):
    space = SearchSpace(candidates or enumerate_candidates(MINILM), margin=margin, refine=refine)
    return plan(teacher, budget, space=space, source=FigureSource(cache_path, measure=measure, machine={"id": "testmachine"}, fresh=fresh), **kw)


@pytest.mark.parametrize("limit_ms", [1.0, 3.0, 6.0, 10.0])
def test_chooses_the_largest_fitting_shape_and_measures_few(minilm_dir, limit_ms):
    fake = FakeMeasure()
    shapes = enumerate_candidates(MINILM)
    report = _plan(minilm_dir, f"latency={limit_ms}ms", fake, margin=0.05)
    fitting = [s for s in shapes if fake_cost(s) <= limit_ms * 0.95]
    assert report["chosen"]["name"] == fitting[-1].name
    assert report["chosen"]["predicted"]["p50_ms"] <= limit_ms * 0.95
    assert len(set(fake.calls)) <= math.ceil(math.log2(len(shapes) + 1)) + 2 < len(shapes)  # bisection + refine, not all
    twice = {s for s in fake.calls if fake.calls.count(s) == 2}
    assert twice == {s for s in fake.calls if fake_cost(s) > limit_ms * 0.95}  # only figures over the budget are checked again
    assert [r["name"] for r in report["rechecked"]] == [s.name for s in dict.fromkeys(fake.calls) if s in twice]


def test_a_figure_over_budget_is_measured_again_and_the_faster_kept(minilm_dir):
    shapes = enumerate_candidates(MINILM)
    seen: set[Shape] = set()

    def first_call_doubled(s):  # the first figure of every shape taken during a burst of load
        cost = float(shapes.index(s))
        if s in seen:
            return cost
        seen.add(s)
        return 2 * cost

    report = _plan(minilm_dir, "latency=11.5ms", FakeMeasure(first_call_doubled), margin=0.0, refine=0)
    assert report["chosen"]["name"] == shapes[11].name  # a single-figure planner stops near 5
    assert report["chosen"]["predicted"]["p50_ms"] == 11.0
    over = {r["name"]: r["p50_ms"] for r in report["rechecked"]}
    assert over[shapes[12].name] == [24.0, 12.0]


def test_refinement_finds_a_larger_shape_past_a_non_monotone_step(minilm_dir):
    shapes = enumerate_candidates(MINILM)
    bump = shapes[10]  # one shape that is slow for its size (e.g. an odd head count)

    def cost(s):
        return 100.0 if s == bump else float(shapes.index(s))

    report = _plan(minilm_dir, "latency=11.5ms", FakeMeasure(cost), margin=0.0, refine=2)
    assert report["chosen"]["name"] == shapes[11].name  # bisection stops at 9, refinement looks past 10


def test_combined_and_params_budgets(minilm_dir):
    shapes = enumerate_candidates(MINILM)
    report = _plan(minilm_dir, "latency=10ms,memory=200KB", FakeMeasure(), margin=0.05)
    assert report["chosen"]["hidden"] * 1000 <= 200 * 1024
    fake = FakeMeasure()
    report = _plan(minilm_dir, "params=12M", fake)
    assert fake.calls == []  # params need no measurement
    from homoexport.deployment.budget import parameters

    best = max((s for s in shapes if parameters(s, MINILM) <= 12e6), key=lambda s: s.hidden)
    assert report["chosen"]["name"] == best.name and report["chosen"]["params"] <= 12e6
    rss = FakeMeasure()
    report = _plan(minilm_dir, "rss=80MB", rss, margin=0.0)
    assert report["chosen"]["predicted"]["rss_mb"] <= 80


def test_fails_naming_the_smallest_achievable_figure(minilm_dir):
    smallest = enumerate_candidates(MINILM)[0]
    with pytest.raises(NoFitError, match=rf"{smallest.name}.*latency {fake_cost(smallest):.2f} ms > latency=0.1ms"):
        _plan(minilm_dir, "latency=0.1ms", FakeMeasure())
    with pytest.raises(NoFitError, match=r"params 0\.52M > params=1K"):
        _plan(minilm_dir, "params=1K", FakeMeasure())


def test_never_returns_a_shape_over_budget_when_cost_is_noisy(minilm_dir):
    import random

    rng = random.Random(0)
    for _ in range(20):
        report = _plan(minilm_dir, "latency=5ms", FakeMeasure(lambda s: fake_cost(s) * rng.uniform(0.7, 1.3)), margin=0.05)
        assert report["chosen"]["predicted"]["p50_ms"] <= 5 * 0.95


def test_cache_hits_skip_measurement(minilm_dir, tmp_path):
    cache = tmp_path / "cache.json"
    first = FakeMeasure()
    a = _plan(minilm_dir, "latency=6ms", first, cache_path=cache)
    assert first.calls and a["cache_hits"] == 0 and a["measured"] == len(set(first.calls))
    second = FakeMeasure()
    b = _plan(minilm_dir, "latency=6ms", second, cache_path=cache)
    assert second.calls == [] and b["cache_hits"] == len(set(first.calls)) and b["chosen"] == {**a["chosen"], "predicted": {**a["chosen"]["predicted"], "source": "cache"}}
    other_settings = FakeMeasure()
    _plan(minilm_dir, "latency=6ms", other_settings, cache_path=cache, settings=PlanSettings(threads=1, seq=64))
    assert other_settings.calls  # another setting is another key
    other_machine = FakeMeasure()
    plan(minilm_dir, "latency=6ms", space=SearchSpace(enumerate_candidates(MINILM)),
         source=FigureSource(cache, measure=other_machine, machine={"id": "elsewhere"}))
    assert other_machine.calls  # another machine is another key
    needs_rss = FakeMeasure()
    _plan(minilm_dir, "rss=80MB", needs_rss, cache_path=cache)
    assert needs_rss.calls  # cached entries without RSS are measured again when RSS is budgeted


def test_plan_writes_json_and_plot(minilm_dir, tmp_path):
    report = _plan(minilm_dir, "latency=6ms", FakeMeasure(), out=tmp_path / "plan.json", plot=tmp_path / "plan.png")
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["chosen"] == report["chosen"] and saved["statistic"] == "p50_ms" and saved["settings"]["threads_resolved"] >= 1
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


# --- depth -----------------------------------------------------------------------------------------


def test_depths_parse_enumerate_and_refuse_the_unreachable():
    assert parse_depths("6, 4,3") == [6, 4, 3] and parse_depths(None) is None
    with pytest.raises(BudgetError, match="bad --layers '6,x'"):
        parse_depths("6,x")
    shapes = enumerate_candidates(MINILM, depths=[6, 3])
    assert {s.layers for s in shapes} == {6, 3}
    assert len(shapes) == 2 * len(enumerate_candidates(MINILM))
    assert {s.layers for s in parse_candidates("128,256", MINILM, depths=[6, 2])} == {6, 2}
    with pytest.raises(BudgetError, match="depth 7 is not reachable from a 6-layer teacher"):
        enumerate_candidates(MINILM, depths=[7])


def batch1_cost(shape: Shape) -> float:
    """Batch-1 latency with a fixed cost per layer (kernel launches, LayerNorms): shallow students get wider."""
    return 0.2 + shape.layers * (0.6 + shape.hidden * shape.ffn * 6 * 128 / 2e9)


def test_depth_search_bisects_each_depth_and_picks_the_most_backbone(minilm_dir):
    fake = FakeMeasure(batch1_cost)
    report = _plan(minilm_dir, "latency=4ms", fake, margin=0.0, candidates=enumerate_candidates(MINILM, depths=[6, 3]))
    by_depth = {d["layers"]: d for d in report["depths"]}
    assert set(by_depth) == {6, 3}
    for depth in (6, 3):
        at = [s for s in enumerate_candidates(MINILM, depths=[depth]) if batch1_cost(s) <= 4.0]
        assert by_depth[depth]["best"] == at[-1].name  # each depth's own bisection finds its widest fit
        assert sum(1 for s in fake.calls if s.layers == depth) < len(at)  # bisection, not a sweep
    backbone = {d: by_depth[d]["best_backbone_params"] for d in (6, 3)}
    assert report["chosen"]["layers"] == max(backbone, key=lambda d: (backbone[d], d))
    for d in report["depths"]:  # every front member was measured and none dominates another
        rows = [r for r in report["candidates"] if r["name"] in d["pareto"]]
        assert rows and all(r["measurement"] and r["layers"] == d["layers"] for r in rows)
    # Deeper wins ties and wins whenever it keeps more non-embedding parameters.
    deep_only = _plan(minilm_dir, "latency=4ms", FakeMeasure(batch1_cost), margin=0.0)
    assert deep_only["chosen"]["layers"] == 6 and len(deep_only["depths"]) == 1


def test_pareto_front_keeps_only_undominated_points():
    def row(name, params, ms):
        return {"name": name, "params": params, "measurement": {"p50_ms": ms}}

    rows = [row("a", 10, 1.0), row("b", 20, 2.0), row("c", 15, 2.5), row("d", 20, 3.0), {"name": "e", "params": 5, "measurement": None}]
    assert pareto_front(rows) == ["a", "b"]


def test_a_shallower_plan_truncates_the_teacher_with_a_layer_mapping(minilm_dir, tmp_path):
    recipe = validate_recipe({"teacher": str(minilm_dir), "student": {}})
    report = _plan(minilm_dir, "latency=4ms", FakeMeasure(lambda s: batch1_cost(s) if s.layers == 3 else 99.0), margin=0.0,
                   candidates=enumerate_candidates(MINILM, depths=[6, 3]))
    assert report["chosen"]["layers"] == 3
    planned = apply_plan(recipe, report)
    assert (planned.init, planned.student.layers, planned.losses.layer_mapping) == ("truncate", 3, "uniform")
    assert planned.student.hidden == report["chosen"]["hidden"]
    (tmp_path / "plan.json").write_text(json.dumps(report))
    with pytest.raises(BudgetError, match="need a budget"):
        plan_for_recipe(recipe, plan_file=tmp_path / "plan.json", depths=[6, 3])


# --- recipes ----------------------------------------------------------------------------------------


def test_apply_plan_and_plan_for_recipe(minilm_dir, tmp_path):
    recipe = validate_recipe({"teacher": str(minilm_dir), "student": {}})
    report = _plan(minilm_dir, "latency=6ms", FakeMeasure())
    student = apply_plan(recipe, report).student
    assert (student.hidden, student.heads, student.ffn) == (report["chosen"]["hidden"], report["chosen"]["heads"], report["chosen"]["ffn"])
    (tmp_path / "plan.json").write_text(json.dumps(report))
    planned, used = plan_for_recipe(recipe, plan_file=tmp_path / "plan.json")
    assert used == report and planned.student.hidden == report["chosen"]["hidden"]
    assert plan_for_recipe(recipe) == (recipe, None)
    fixed = validate_recipe({"teacher": str(minilm_dir), "student": {"hidden": 32}, "budget": "latency=8ms"})
    with pytest.raises(BudgetError, match="widths and a budget"):
        plan_for_recipe(fixed)
    # A plan or budget given on the command line wins over the recipe's widths.
    widths = validate_recipe({"teacher": str(minilm_dir), "student": {"hidden": 32, "heads": 2, "ffn": 64}})
    planned, _ = plan_for_recipe(widths, plan_file=tmp_path / "plan.json")
    assert (planned.student.hidden, planned.student.ffn) == (report["chosen"]["hidden"], report["chosen"]["ffn"])
    with pytest.raises(BudgetError, match="abc"):
        plan_for_recipe(widths, budget="latency=abc")


def test_a_budget_that_leaves_a_very_narrow_student_warns(minilm_dir, tmp_path, caplog):
    recipe = validate_recipe({"teacher": str(minilm_dir), "student": {}})
    report = _plan(minilm_dir, "latency=6ms", FakeMeasure())
    wide = report["chosen"]["hidden"]
    assert wide >= MINILM.hidden / 3
    narrow = {**report, "chosen": {**report["chosen"], "hidden": 64, "heads": 2, "ffn": 256}}
    for name, plan_report, warns in (("wide", report, False), ("narrow", narrow, True)):
        (tmp_path / f"{name}.json").write_text(json.dumps(plan_report))
        caplog.clear()
        with caplog.at_level("WARNING", logger="homoexport.deployment.budget"):
            planned, _ = plan_for_recipe(recipe, plan_file=tmp_path / f"{name}.json")
        assert planned.student.hidden == plan_report["chosen"]["hidden"]
        assert ("64 of the teacher's 384 hidden units (17%)" in caplog.text) is warns
    assert "accuracy-drop" not in caplog.text  # only a task recipe can check it
    task = validate_recipe({"teacher": str(minilm_dir), "student": {}, "task": {"train_file": "train.csv", "dev_file": "dev.csv"}})
    caplog.clear()
    with caplog.at_level("WARNING", logger="homoexport.deployment.budget"):
        plan_for_recipe(task, plan_file=tmp_path / "narrow.json")
    assert "add accuracy-drop=N to the budget" in caplog.text


@pytest.mark.parametrize("budget", ["latency=6ms", "latency=6ms,rss=200MB"])
def test_the_plan_table_reads_at_80_columns(minilm_dir, budget):
    from rich.console import Console

    from homoexport.cli.tables import plan_table

    report = _plan(minilm_dir, budget, FakeMeasure())
    for r in report["candidates"]:  # deployed files as large as real MiniLM students'
        if r["measurement"]:
            r["measurement"]["file_bytes"] = 123_456_789
    console = Console(width=80, record=True)
    console.print(plan_table(report))
    text = console.export_text()
    assert "…" not in text
    assert all(f" {r['name']} " in text for r in report["candidates"] if r["measurement"])
    assert ("rss" in text) is ("rss" in budget)


# --- real export, edge round trip (one tiny export per candidate) ---------------------------------------


def test_real_plan_and_edge_round_trip(teacher_dir, tmp_path):
    t = teacher_shape(teacher_dir)
    assert t == TeacherShape(64, 4, 128, 2, t.vocab, 128, 2)
    settings = PlanSettings(seq=32, threads=1, warmup=2, repeats=5, rounds=2)
    candidates = parse_candidates("32,64", t)
    report = plan(teacher_dir, "latency=10s", settings, SearchSpace(candidates), FigureSource(tmp_path / "cache.json"))
    assert report["chosen"]["name"] == candidates[-1].name  # generous budget: the largest shape
    measured = [r for r in report["candidates"] if r["measurement"]]
    assert measured and all(r["measurement"]["p50_ms"] > 0 and r["measurement"]["file_bytes"] > 0 for r in measured)

    manifest = export_candidates(teacher_dir, tmp_path / "cands", settings, SearchSpace(candidates))
    assert [c["name"] for c in manifest["candidates"]] == [c.name for c in candidates]
    assert all((tmp_path / "cands" / c["file"]).is_file() for c in manifest["candidates"])
    data = measure_candidates(tmp_path / "cands")
    assert (tmp_path / "cands" / "measurements.json").is_file() and all(r["measurement"]["rss_mb"] > 0 for r in data["candidates"])
    small = data["candidates"][0]["measurement"]
    limit = small["file_bytes"] + 1
    from_file = plan(teacher_dir, f"memory={limit / 1024:.3f}KB", space=SearchSpace(candidates),
                     source=FigureSource(measurements=tmp_path / "cands" / "measurements.json"))
    assert from_file["chosen"]["name"] == candidates[0].name and from_file["chosen"]["predicted"]["source"] == "file"
    with pytest.raises(BudgetError, match="no measurement of"):
        plan(teacher_dir, "latency=10s", space=SearchSpace(parse_candidates("48", t)),
             source=FigureSource(measurements=tmp_path / "cands" / "measurements.json"))


def test_cache_entries_from_another_machine_speed_are_measured_again(minilm_dir, tmp_path, monkeypatch):
    """The scenario of a plan after a busy minute: figures cached under load must not be reused on a quiet machine."""
    cache = tmp_path / "cache.json"
    monkeypatch.setattr(budget, "calibration_probe", lambda threads=None: 24.0)  # busy: 3x slower
    busy = _plan(minilm_dir, "latency=6ms", FakeMeasure(), cache_path=cache)
    monkeypatch.setattr(budget, "calibration_probe", lambda threads=None: 8.0)  # quiet again
    quiet = FakeMeasure()
    report = _plan(minilm_dir, "latency=6ms", quiet, cache_path=cache)
    assert quiet.calls and report["cache_hits"] == 0 and report["cache"]["stale_remeasured"]
    assert set(report["cache"]["stale_remeasured"]) <= {c["name"] for c in busy["candidates"] if c["measurement"]}
    again = FakeMeasure()
    assert _plan(minilm_dir, "latency=6ms", again, cache_path=cache)["cache_hits"] and not again.calls  # same speed: reused
    fresh = FakeMeasure()
    assert _plan(minilm_dir, "latency=6ms", fresh, cache_path=cache, fresh=True)["cache_hits"] == 0 and fresh.calls


def test_steady_load_reuses_quiet_figures_and_flags_what_it_measures(minilm_dir, tmp_path, monkeypatch):
    """A machine that stays busy measures consistently slow: only its quiet speed on record can tell."""
    cache = tmp_path / "cache.json"
    quiet = _plan(minilm_dir, "latency=6ms", FakeMeasure(), cache_path=cache)
    assert json.loads(cache.read_text())["references"] == {f"testmachine|t{PlanSettings().resolved_threads()}": 8.0}
    monkeypatch.setattr(budget, "calibration_probe", lambda threads=None: 12.0)  # steady load: 1.5x slower throughout

    def slow(shape):
        return fake_cost(shape) * 1.5

    busy_cached = FakeMeasure(slow)
    report = _plan(minilm_dir, "latency=6ms", busy_cached, cache_path=cache)
    assert report["chosen"]["name"] == quiet["chosen"]["name"] and not busy_cached.calls and not report["contended"]
    assert report["machine_speed"] == {"probe_ms": 12.0, "quiet_probe_ms": 8.0, "load_avg_1m": report["machine_speed"]["load_avg_1m"]}
    busy_fresh = FakeMeasure(slow)
    report = _plan(minilm_dir, "latency=6ms", busy_fresh, cache_path=cache, fresh=True)
    measured = [c for c in report["candidates"] if c["measurement"]]
    assert set(report["contended"]) == {c["name"] for c in measured}  # every busy figure is flagged, none silently used
    assert len(busy_fresh.calls) == 3 * len(measured)  # each was tried three times first


def test_a_measurement_whose_probe_moves_is_repeated_then_marked_contended(minilm_dir, tmp_path, monkeypatch):
    readings = iter([8.0, 8.1] + [8.0, 20.0] * 200)  # the first measurement is steady, every later one is disturbed

    monkeypatch.setattr(budget, "calibration_probe", lambda threads=None: next(readings))
    report = _plan(minilm_dir, "latency=6ms", FakeMeasure(), cache_path=tmp_path / "cache.json")
    measured = [c for c in report["candidates"] if c["measurement"]]
    assert report["contended"] and all(m["measurement"]["probe_ms"] for m in measured)
    cached = json.loads((tmp_path / "cache.json").read_text())["entries"]
    assert len(cached) == len(measured) - len(report["contended"])  # contended figures are never cached


def test_calibration_probe_is_a_positive_time():
    from homoexport.deployment.bench import calibration_probe, same_speed

    ms = calibration_probe(1, repeats=3)
    assert ms > 0 and same_speed(ms, ms * 1.1) and not same_speed(ms, ms * 2) and not same_speed(None, ms)


def test_search_space_validates_its_fields_and_lists_shapes():
    for bad, match in (({"margin": 1.0}, "margin"), ({"refine": -1}, "refine"), ({"multiple": 12}, "multiple"), ({"ffn_ratio": 0.0}, "ffn ratio")):
        with pytest.raises(BudgetError, match=match):
            SearchSpace(**bad)
    assert SearchSpace(depths=[6, 3]).shapes(MINILM) == enumerate_candidates(MINILM, depths=[6, 3])
    chosen = parse_candidates("128,256", MINILM)
    assert SearchSpace(list(reversed(chosen))).shapes(MINILM) == chosen  # sorted by size, whatever the order given


def test_a_cache_written_with_the_former_probe_is_not_reused(minilm_dir, tmp_path):
    """Schema /1 entries carry probes of a single MatMul: set against today's probe they would judge nothing."""
    cache = tmp_path / "cache.json"
    _plan(minilm_dir, "latency=6ms", FakeMeasure(), cache_path=cache)
    data = json.loads(cache.read_text())
    assert data["schema"] == budget.CACHE_SCHEMA == "homoexport.plan-cache/2"
    cache.write_text(json.dumps({**data, "schema": "homoexport.plan-cache/1"}))
    again = FakeMeasure()
    report = _plan(minilm_dir, "latency=6ms", again, cache_path=cache)
    assert again.calls and report["cache_hits"] == 0
    assert json.loads(cache.read_text())["schema"] == "homoexport.plan-cache/2"
