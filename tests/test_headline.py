"""benchmarks/headline.py without training: its recipes validate, and the table is built right from injected results."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from homoexport.config.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("headline", REPO / "benchmarks" / "headline.py")
headline = importlib.util.module_from_spec(_spec)
sys.modules["headline"] = headline  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(headline)


def _report(per_seed_rows: dict[str, list[list[float]]], seeds: list[int]) -> dict:
    """A glue_report.json as run_glue writes it, reduced to what the table reads: rows of per-seed points."""
    n_rows = len(per_seed_rows["pytorch"])
    return {"results": [{"seeds": seeds, "per_seed": {b: v[i] for b, v in per_seed_rows.items()}} for i in range(n_rows)]}


def _latency(params: int, ms: float) -> dict:
    return {"params": params, "layers": 6, "hidden": 192, "heads": 6, "ffn": 768,
            "pytorch_ms": 2 * ms, "int8_ms": ms}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes" / "experiments").glob("*.yaml")))
@pytest.mark.parametrize("scale", sorted(headline.SCALES))
def test_experiment_recipes_validate_at_every_shape_and_scale(recipe, scale):
    arm = next(a for a in headline.ARMS.values() if a.recipe == recipe)
    shapes = headline.SHAPES if arm.per_shape else {None: None}
    for shape in shapes:
        entry = headline.Entry(f"{arm.name}-{shape}", arm.name, shape)
        r = load_recipe(REPO / "recipes" / "experiments" / recipe, headline.recipe_overrides(entry, headline.SCALES[scale]))
        assert r.training.steps == headline.SCALES[scale].steps and r.training.batch_size == headline.SCALES[scale].batch_size
        assert r.data.block_size == headline.block_size()
        if shape:
            assert (r.student.hidden, r.student.heads, r.student.ffn) == tuple(vars(headline.SHAPES[shape]).values())
            if r.losses.relation:
                assert r.student.hidden % r.losses.relation_heads == 0 == 384 % r.losses.relation_heads


def test_recipes_encode_the_arms():
    rec = {a.name: load_recipe(REPO / "recipes" / "experiments" / a.recipe) for a in headline.ARMS.values() if a.recipe}
    assert (rec["homodistil"].init, rec["homodistil"].pruning.schedule) == ("copy", "homotopic")
    assert (rec["oneshot"].init, rec["oneshot"].pruning.schedule) == ("copy", "one_shot")
    assert (rec["truncate"].init, rec["truncate"].student.layers, rec["truncate"].losses.layer_mapping) == ("truncate", 3, "uniform")
    assert rec["truncate"].student.hidden is None and rec["truncate"].pruning.schedule == "none"
    d = rec["minilmv2"]
    assert (d.init, d.pruning.schedule, d.losses.hidden, d.losses.attention, d.losses.embedding) == ("random", "none", 0, 0, 0)
    assert d.losses.relation > 0
    # Same data and optimizer everywhere: the same tokens per step.
    assert len({(r.data.model_dump_json(), r.optimizer.model_dump_json()) for r in rec.values()}) == 1


def test_plan_orders_teacher_then_shapes_widest_first_then_arms():
    entries = headline.plan_entries(["prune_only", "truncate", "homodistil", "oneshot"], ["128", "192"])
    assert [e.run for e in entries] == ["teacher", "homodistil-192", "oneshot-192", "truncate", "prune_only-192",
                                        "homodistil-128", "oneshot-128", "prune_only-128"]
    assert next(e for e in entries if e.run == "truncate").group == "192"


def test_glue_runs_the_widest_group_then_the_teacher_then_the_rest():
    entries = headline.plan_entries(["homodistil", "truncate", "prune_only"], ["128", "192"])
    order = [e.run for e in headline.glue_order(entries)]
    assert order == ["homodistil-192", "truncate", "prune_only-192", "teacher", "homodistil-128", "prune_only-128"]


def test_task_summary_is_mean_and_std_over_seeds_of_the_per_seed_metric_mean():
    # MRPC-like: two metrics (F1, acc) over three seeds; the task score per seed is their mean.
    report = _report({"pytorch": [[80.0, 84.0, 82.0], [70.0, 74.0, 78.0]], "onnx_int8": [[79.0, 83.0, 81.0], [69.0, 73.0, 77.0]]}, [42, 43, 44])
    s = headline.task_summary(report, "pytorch")
    assert s["per_seed"] == [75.0, 79.0, 80.0]
    assert s["mean"] == pytest.approx(78.0) and s["std"] == pytest.approx(statistics.stdev([75.0, 79.0, 80.0]))
    one = headline.task_summary(_report({"pytorch": [[90.0]]}, [42]), "pytorch")
    assert (one["mean"], one["std"]) == (90.0, None)
    assert headline.task_summary(_report({"pytorch": [[90.0]]}, [42]), "onnx_int8")["mean"] is None


def _rows():
    def reports(base: float) -> dict:
        return {
            "sst2": _report({"pytorch": [[base + 10]], "onnx_int8": [[base + 9]]}, [42]),
            "mrpc": _report({"pytorch": [[base, base + 2, base + 4]] * 2, "onnx_int8": [[base - 1, base + 1, base + 3]] * 2}, [42, 43, 44]),
            "cola": _report({"pytorch": [[base - 40, base - 38, base - 36]], "onnx_int8": [[base - 41, base - 39, base - 37]]}, [42, 43, 44]),
        }

    entries = {e.run: e for e in headline.plan_entries(["homodistil", "oneshot", "truncate"], ["192"])}
    rows = [
        headline.build_row(entries["oneshot-192"], reports(70.0), _latency(8_000_000, 5.0)),
        headline.build_row(entries["truncate"], {"sst2": reports(60.0)["sst2"]}, None),  # unfinished: no average
        headline.build_row(entries["homodistil-192"], reports(75.0), _latency(8_000_000, 5.0)),
        headline.build_row(entries["teacher"], reports(80.0), _latency(22_000_000, 12.0)),
    ]
    return headline.order_rows(rows)


def test_rows_average_the_three_task_means_and_order_like_the_paper():
    rows = _rows()
    assert [r["run"] for r in rows] == ["teacher", "homodistil-192", "oneshot-192", "truncate"]
    a = rows[1]
    # SST-2 85, MRPC 77 (mean of seeds 75, 77, 79), CoLA 37 -> 66.33; int8 one point lower everywhere.
    assert a["tasks"]["mrpc"]["pytorch"]["mean"] == pytest.approx(77.0) and a["tasks"]["mrpc"]["pytorch"]["std"] == pytest.approx(2.0)
    assert a["average_pytorch"] == pytest.approx((85 + 77 + 37) / 3)
    assert a["average_onnx_int8"] == pytest.approx((84 + 76 + 36) / 3)
    assert rows[3]["average_pytorch"] is None and rows[3]["tasks"]["sst2"]["pytorch"]["mean"] == 70.0


def test_comparisons_subtract_each_arm_from_homodistil_in_its_group():
    deltas = headline.comparisons(_rows())
    assert deltas == [{"group": "192", "versus": "oneshot-192", "key": "b", "delta": pytest.approx(5.0)}]


def test_markdown_json_and_png_from_injected_rows(tmp_path):
    rows = _rows()
    result = {"scale_name": "smoke", "scale_note": "a pipeline check", "scale": {"steps": 20, "batch_size": 8, "recipe_overrides": [],
              "seeds": {"sst2": [42], "mrpc": [42, 43, 44], "cola": [42, 43, 44]}},
              "glue_settings": {"epochs": 1, "learning_rate": 1e-4, "batch_size": 16, "max_length": 64, "max_train_samples": 320,
                                "max_eval_samples": 200},
              "block_size": 128, "threads": 2, "rows": rows, "comparisons": headline.comparisons(rows), "wall_s": 1.0, "command": "x"}
    text = headline.markdown(result)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(rows)  # header + one line per row
    assert "| a | HomoDistil" in lines[2] and "85.0 / 84.0 | 77.0" in lines[2]
    assert "77.0 ± 2.0 / 76.0 ± 2.0" in lines[2] and "66.3 | 65.3" in lines[2]
    assert "(a) − (b) oneshot-192 = +5.0" in text and "smoke" in text
    assert lines[4].endswith("| - | - |")  # the unfinished truncation row
    json.dumps(result)
    headline.plot(result, tmp_path / "headline.png")
    assert (tmp_path / "headline.png").stat().st_size > 0
