"""`mmspec bench native` (vision.bench_native): every case runs both sides; what transformers refuses is a row with
its error; every mmspec row gives transformers' greedy tokens; the tables are written."""
from __future__ import annotations

import json


def test_native_benchmark_rows(tmp_path, capsys):
    from vision.bench_native import run_native_benchmark

    result = run_native_benchmark(out_dir=tmp_path, new_tokens=6, repeats=1, fit_steps=3, progress=False)
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"DFlash (block of 4)", "Gemma 4 assistant (chain 3)",
                                         "Qwen3.5 MTP layer (random, chain 3)",
                                         "DeepSeek-V3 MTP layer (random, chain 2)"}
    refused = [r for r in rows if "error" in r]
    assert {(r["case"], r["batch"]) for r in refused if "batch_size = 1" in r["error"]} == {
        ("DFlash (block of 4)", 4), ("Gemma 4 assistant (chain 3)", 4), ("DeepSeek-V3 MTP layer (random, chain 2)", 4)}
    assert all("num_mtp_layers" in r["error"] for r in refused if r["case"].startswith("Qwen3.5"))
    ours = [r for r in rows if r["method"].startswith("mmspec")]
    assert len(ours) == 16 and all(r["equal"] and r["forwards_per_token"] > 0 for r in ours)
    use_mtp = [r for r in rows if r["case"].startswith("DeepSeek") and "use_mtp" in r["method"] and r["batch"] == 1]
    assert use_mtp and use_mtp[0]["equal"]  # transformers' own MTP path ran on the same checkpoint
    assert json.loads((tmp_path / "result.json").read_text())["rows"][0]["case"] == rows[0]["case"]
    assert "raises: ValueError" in (tmp_path / "result.md").read_text() and "| mmspec" in capsys.readouterr().out
