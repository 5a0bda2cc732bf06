"""`python -m moesim validate`: case files are checked field by field, every shipped case composes into a run,
the judging arithmetic (order, ratios, goals) is right, and pinned predictions do not drift silently."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from moesim.__main__ import compose, main
from moesim.errors import MoesimError
from moesim.hardware import load_hardware
from moesim.validate import (CASES_DIR, Outcome, case_paths, case_trace, goals, load_case, page, predict,
                             row_overrides, table_checks)

PINS = Path(__file__).parent / "baseline" / "validation.json"

GOOD = {
    "source": "t", "title": "a test", "citation": "nowhere, Table 1",
    "trace": {"preset": "mixtral-like", "prompt": 8, "decode": 16, "batch": 1, "sequences": 1},
    "options": {"strategy": "lru", "hardware": "rtx-4090", "budget": 64, "model.experts_format": "q4_k"},
    "rows": [{"id": "a", "published": 2.0}, {"id": "b", "published": 1.0, "options": {"budget": 128}}],
}


def write(tmp_path, data, name="t.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("citation"), "field 'citation' must be a non-empty string"),
    (lambda d: d["rows"][0].update(published="fast"), "row 'a': field 'published' must be a positive number"),
    (lambda d: d["rows"][0].update(published=0), "field 'published' must be a positive number"),
    (lambda d: d["rows"][1].update(id="a"), "row 'a': id used twice"),
    (lambda d: d["rows"][0].update(speed=3), "unknown field(s) ['speed']"),
    (lambda d: d["rows"][0].update(metric="joules"), "metric 'joules' unknown"),
    (lambda d: d["trace"].update(path="x.moetrace.safetensors"), "exactly one of 'preset'"),
    (lambda d: d["trace"].update(decode=0), "trace.decode: expected an integer >= 1"),
    (lambda d: d["trace"].update(preset="nope"), "unknown synthetic preset 'nope'"),
    (lambda d: d.update(tables=[{"id": "x", "rows": ["a", "zz"]}]), "row(s) ['zz'] not in the file"),
    (lambda d: d.update(rows=[]), "'rows' must be a non-empty list"),
])
def test_a_bad_case_file_is_refused_naming_file_and_field(tmp_path, change, message):
    data = json.loads(json.dumps(GOOD))
    change(data)
    p = write(tmp_path, data)
    with pytest.raises(MoesimError) as e:
        load_case(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_not_yaml_and_missing_files_are_clear_errors(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("rows: [unclosed")
    with pytest.raises(MoesimError, match="not a YAML file"):
        load_case(p)
    assert main(["validate", "cases=[no-such-case]"]) == 2
    assert "no case file" in capsys.readouterr().err
    assert main(["validate", f"cases=[{write(tmp_path, GOOD)}]", "write_docs=true"]) == 2
    assert "needs every case" in capsys.readouterr().err


def test_every_shipped_case_composes_into_a_run():
    """Each row of validation/cases/ is a valid run: its options compose, its hardware loads, its trace
    shape is known (the replay itself is the pinned test's and `validate`'s)."""
    paths = case_paths("all")
    assert len(paths) >= 4, "issue 14 asks for at least four sources"
    for p in paths:
        case = load_case(p)
        assert case.citation and all(r.published > 0 for r in case.rows)
        for row in case.rows:
            cfg = compose("run", row_overrides(row.options))
            load_hardware(str(cfg.hardware))


def test_order_and_ratios_are_judged_against_the_first_row(tmp_path):
    case = load_case(write(tmp_path, {**GOOD, "rows": [{"id": "a", "published": 2.0}, {"id": "b", "published": 1.0},
                                                        {"id": "c", "published": 4.0}]}))
    a, b, c = case.rows
    outs = [Outcome(case, a, 3.0), Outcome(case, b, 1.2), Outcome(case, c, 2.4)]  # c ranked below a: wrong
    (check,) = table_checks(case, outs)
    assert (check["pairs"], check["agree"], check["ranked"]) == (3, 2, False)
    ratios = {r["row"]: r for r in check["ratios"]}
    assert ratios["b"]["published"] == 0.5 and math.isclose(ratios["b"]["predicted"], 0.4)
    assert math.isclose(ratios["b"]["error"], -0.2)
    g = goals(outs, [check])
    assert math.isclose(g["median_abs_error"], 0.4)  # |+50%|, |+20%|, |-40%|
    assert g["within_factor_2"] == 3 and g["ratios_within"] == 0 and g["tables_ranked"] == 0
    text = page(outs)
    assert "not reproduced (2 of 3 pairs)" in text and "| a |" in text


def test_a_row_replays_with_its_own_shape_and_options(tmp_path):
    """Two rows of one file differ only in the budget: the larger cache hits more and decodes faster; the
    trace has the shape the file asks for."""
    case = load_case(write(tmp_path, GOOD))
    tr = case_trace(case.rows[0].trace)
    assert tr.n_seqs == 1 and tr.n_tokens == 8 + 16
    small, large = (predict(r) for r in case.rows)
    assert large["hit_rate"] > small["hit_rate"] and large["predicted"] > small["predicted"]
    assert small["whole_model"] and small["budget_slots"] == 64


def test_six_experts_is_a_trace_of_top_k_six(tmp_path):
    data = json.loads(json.dumps(GOOD))
    data["trace"] = {"preset": "deepseek-v3-like", "prompt": 4, "decode": 4, "sequences": 1, "top_k": 6}
    case = load_case(write(tmp_path, data))
    assert case_trace(case.rows[0].trace).spec.top_k == 6


def test_pinned_predictions_do_not_drift():
    """Every shipped row, replayed (10 s): its prediction equals the pinned one (the sim is deterministic), and
    every row is pinned. After a deliberate change: python -m moesim validate pin=tests/baseline/validation.json"""
    pins = json.loads(PINS.read_text())
    shipped = {f"{c.source}/{r.id}" for c in map(load_case, case_paths("all")) for r in c.rows}
    assert shipped == set(pins), f"rows not pinned: {sorted(shipped - set(pins))}; pinned, gone: {sorted(set(pins) - shipped)}"
    by_case: dict[str, list[str]] = {}
    for key in pins:
        case, row = key.split("/", 1)
        by_case.setdefault(case, []).append(row)
    for case_name, rows in by_case.items():
        case = load_case(CASES_DIR / f"{case_name}.yaml")
        for row in case.rows:
            if row.id in rows:
                got = predict(row)["predicted"]
                want = pins[f"{case_name}/{row.id}"]
                assert math.isclose(got, want, rel_tol=1e-6), f"{case_name}/{row.id}: {got} != pinned {want}"
