"""The engine-overhead sweep runs end to end in quick mode, stays lossless and reports consistent shares. Timings are
never asserted."""
from __future__ import annotations

import json

import pytest

from mmspec.bench_overhead import SWEEP_METHODS, _first_under, overhead_markdown, run_overhead_sweep
from mmspec.cli import main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    return out, run_overhead_sweep(out, quick=True, progress=False)


def test_every_size_and_method_is_measured_and_equal_to_plain(sweep):
    out, result = sweep
    saved = json.loads((out / "overhead.json").read_text())
    assert (out / "overhead.md").read_text() == overhead_markdown(result)
    rows = saved["rows"]
    assert {(r["layers"], r["method"]) for r in rows} == {(n, m) for n in (2, 3) for m in SWEEP_METHODS}
    assert saved["all_equal"] and all(r["equal"] for r in rows)
    for r in rows:
        assert r["overhead_ms"] > 0 and r["t_fwd1_ms"] > 0
        assert r["overhead_pct"] == pytest.approx(100 * r["overhead_ms"] / r["t_fwd1_ms"])
        phases = r["draft_side_ms"] + r["verify_side_ms"] + r["accept_ms"] + r["other_ms"]
        assert phases == pytest.approx(r["overhead_ms"], rel=1e-6, abs=1e-9)  # one repeat: the phases add up
        assert r["tau"] >= 1.0 and (r["method"] != "plain" or r["tau"] == 1.0)
    deeper = {r["layers"]: r["t_fwd1_ms"] for r in rows if r["method"] == "plain"}
    assert set(deeper) == {2, 3}


def test_first_depth_under_the_threshold():
    rows = [dict(method="chain", layers=n, overhead_pct=p) for n, p in ((4, 18.0), (8, 9.0), (12, 6.0))]
    rows += [dict(method="tree", layers=n, overhead_pct=p) for n, p in ((4, 9.0), (8, 12.0), (12, 8.0))]
    rows += [dict(method="eagle", layers=n, overhead_pct=p) for n, p in ((4, 30.0), (8, 20.0), (12, 11.0))]
    assert _first_under(rows, 10.0) == {"chain": 8, "tree": 12, "eagle": None}  # tree must stay under from 12 on


def test_engine_bench_takes_one_depth_only(capsys):
    assert main(["bench", "engine", "--layers", "4", "8"]) == 2
    assert "overhead" in capsys.readouterr().err


def test_sweep_rejects_a_one_layer_target(tmp_path):
    with pytest.raises(ValueError, match="layers"):
        run_overhead_sweep(tmp_path, layers=(1, 4), progress=False)
