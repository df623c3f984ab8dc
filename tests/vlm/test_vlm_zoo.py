"""The VLM zoo (quick variants: tiny sizes, a few steps): the data, the recipes, `zoo:NAME` paths, every drafter
lossless on the zoo target, the CLI (`mmspec zoo`, `mmspec demo`, `mmspec bench vlm`). Slow tier: the full VLM zoo,
the demo's first run and a benchmark smoke run on it."""
from __future__ import annotations

import json

import pytest

from mmspec.errors import InvalidInputError
from vision import scenes
from vision.zoo import ATTRIBUTES, cell_labels, conversation

DRAFTERS = ("vlm-text", "vlm-draft", "vlm-eagle", "vlm-eagle3", "vlm-dream", "vlm-vispec", "vlm-dflash")


# --- data ----------------------------------------------------------------------------------------------------------
def test_conversations_are_deterministic_and_mixed():
    a = [conversation(i, 0, 20) for i in range(60)]
    b = [conversation(i, 0, 20) for i in range(60)]
    assert [m for _, m in a] == [m for _, m in b]
    assert all(x.tobytes() == y.tobytes() for (ia, _), (ib, _) in zip(a, b) for x, y in zip(ia, ib))
    text_only = [m for im, m in a if not im]
    two_turn = [m for im, m in a if len(m) == 4]
    assert 0 < len(text_only) < 30 and two_turn  # natural text mixed in; some follow-up questions
    assert all(m[-1]["role"] == "assistant" and m[0]["role"] == "user" for _, m in a)
    assert [m for _, m in a] != [m for _, m in (conversation(i, 1, 20) for i in range(60))]


def test_cell_labels_mark_what_is_where():
    thing = scenes.Thing("star", "blue", "large", 4)
    labels = cell_labels(scenes.Scene("white", (thing,), "CAT", 0))
    assert labels["shape"][4] == 1 + ATTRIBUTES["shape"].index("star")
    assert labels["colour"][4] == 1 + ATTRIBUTES["colour"].index("blue")
    assert labels["word"][0] == 1 + ATTRIBUTES["word"].index("CAT")
    assert sum(labels["shape"]) == labels["shape"][4] and labels["size"][0] == 0


# --- the quick zoo -------------------------------------------------------------------------------------------------
def test_quick_zoo_builds_cards_and_reuses_its_cache(quick_vlm_zoo):
    from vision.zoo import zoo

    root, cards = quick_vlm_zoo
    assert set(cards) == {"vlm-data", "vlm", *DRAFTERS}
    for name in DRAFTERS:
        held = cards[name]["held_out"]
        assert held["tau (greedy, chain of 4, held out)"] >= 1.0, name
        assert (zoo().path(name, quick=True) / "README.md").read_text().startswith(f"# zoo:{name}@quick")
    dirs = [zoo().path(n, quick=True) for n in cards]
    before = {p.name: p.stat().st_mtime_ns for p in dirs}
    again = zoo().build(quick=True, progress=False)  # cached: nothing retrained, same directories
    assert [c["digest"] for c in again] == [cards[c["name"]]["digest"] for c in again]
    assert {p.name: p.stat().st_mtime_ns for p in dirs} == before


@pytest.mark.parametrize("drafter", DRAFTERS + ("ngram",))
def test_every_zoo_drafter_is_lossless_on_the_zoo_target(quick_vlm_zoo, drafter):
    from vision import SpeculativeVLM
    from vision.demo import demo_image

    spec = drafter if drafter == "ngram" else f"zoo:{drafter}@quick"
    svlm = SpeculativeVLM.from_pretrained("zoo:vlm@quick", drafter=spec, tree=3)
    plain = SpeculativeVLM(svlm.model, svlm.processor, None)
    kw = dict(images=[demo_image()], prompt="Describe the image in detail.", max_new_tokens=12, eos_token_id=[])
    out = svlm.generate(**kw)
    assert out.token_ids == plain.generate(**kw).token_ids
    assert out.stats.target_forwards <= 13


def test_zoo_paths_name_unknown_models_with_a_typed_error(quick_vlm_zoo):
    from vision import SpeculativeVLM

    with pytest.raises(InvalidInputError, match="vlm-eagle"):
        SpeculativeVLM.from_pretrained("zoo:vlm-egale@quick")


# --- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_zoo_list_and_build(quick_vlm_zoo, capsys):
    from mmspec.cli import main

    assert main(["zoo", "build", "--quick", "--only", "vlm-eagle", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "vlm-eagle" in out and "vlm-data" in out  # what it needs comes along (cached here)
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "vlm-dream" in out and "llamagen" in out
    assert main(["zoo", "cards", "--quick", "--only", "vlm-eagle"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `zoo:")]
    assert sorted(r.split("`")[1] for r in rows) == ["zoo:vlm-data@quick", "zoo:vlm-eagle@quick", "zoo:vlm@quick"]
    assert main(["zoo", "build", "--only", "vlm-egale"]) == 2
    assert "vlm-eagle" in capsys.readouterr().err


def test_cli_force_rebuilds_only_the_named_models(quick_vlm_zoo, capsys):
    """--force retrains the named model against the cached target: the target (and its other drafters) stay."""
    from mmspec.cli import main
    from vision.zoo import zoo

    built = {n: zoo().card(n, quick=True)["built"] + str(zoo().path(n, quick=True).stat().st_mtime_ns)
             for n in ("vlm-data", "vlm", "vlm-eagle")}
    assert main(["zoo", "build", "--quick", "--only", "vlm-eagle", "--force", "--quiet"]) == 0
    capsys.readouterr()
    after = {n: zoo().card(n, quick=True)["built"] + str(zoo().path(n, quick=True).stat().st_mtime_ns)
             for n in built}
    assert after["vlm-data"] == built["vlm-data"] and after["vlm"] == built["vlm"]
    assert after["vlm-eagle"] != built["vlm-eagle"]


def test_cli_demo_quick_runs_both_pipelines(quick_vlm_zoo, tmp_path, capsys):
    from mmspec.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "identical: yes" in out and "tau" in out
    assert "identical tokens = True" in out and (tmp_path / "image" / "image_demo.png").is_file()
    summary = json.loads((tmp_path / "vlm" / "vlm_demo.json").read_text())
    assert summary["identical"] and len(summary["rows"]) == 3 and summary["tau"] >= 1.0
    assert (tmp_path / "vlm" / "image.png").is_file()


def test_bench_vlm_quick_writes_tables_and_every_greedy_row_is_identical(quick_vlm_zoo, tmp_path):
    from vision.bench import run_vlm_benchmark

    res = run_vlm_benchmark(tmp_path, quick=True, progress=False)
    assert [t["temperature"] for t in res["tables"]] == [0.0, 1.0]
    greedy = res["tables"][0]["rows"]
    names = [r["method"] for r in greedy]
    assert any("assisted generation" in n for n in names) and any("prompt lookup" in n for n in names)
    assert sum("(mmspec" in n for n in names) == 10  # plain + 7 zoo drafters + n-gram + DFlash's whole block
    assert any("speculation_type='dflash'" in n for n in names)  # the same DFlash weights through transformers
    for r in greedy:
        if "error" not in r:
            assert r["lossless"] == "yes (identical)", r["method"]
            assert r["tau"] >= 1.0 and r["speedup"] > 0
    ours = [r for r in greedy if r.get("ours") and "plain" not in r["method"]]
    assert all(0 < r["engine_efficiency"] for r in ours)
    for r in ours:  # vLLM's names (mmspec.stats), per step that had a draft
        assert r["num_drafts"] > 0 and 1 <= r["mean_acceptance_length"] <= 1 + len(r["acceptance_rate_per_position"])
        assert r["mean_acceptance_length"] == pytest.approx(1 + r["num_accepted_tokens"] / r["num_drafts"])
        assert r["draft_acceptance_rate"] == pytest.approx(r["num_accepted_tokens"] / r["num_draft_tokens"])
    assert (tmp_path / "result.md").read_text().count("| **") >= 10
    assert (tmp_path / "speedup.png").stat().st_size > 1000


def test_bench_prompt_files(tmp_path):
    from vision.bench import load_prompts

    scenes.render(scenes.random_scene(__import__("random").Random(0)), 20).save(tmp_path / "a.png")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "What is it?", "images": ["a.png"]}\n\n{"prompt": "Hi"}\n')
    rows = load_prompts(f)
    assert rows[0]["images"] == [str(tmp_path / "a.png")] and rows[1] == {"prompt": "Hi", "images": []}
    f.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(InvalidInputError, match="line 1"):
        load_prompts(f)
    with pytest.raises(InvalidInputError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")


# --- slow tier: the full VLM zoo --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_vlm_zoo_demo_and_bench(tmp_path):
    """Builds (or reuses) the full VLM zoo in the user's cache, runs the demo and a short benchmark on it."""
    from vision.bench import run_vlm_benchmark
    from vision.demo import run_vlm_demo
    from vision.zoo import zoo

    cards = zoo().build(progress=False)
    by = {c["name"]: c for c in cards}
    held = by["vlm"]["held_out"]
    assert held["tower probe accuracy (colour, per cell)"] > 0.95 and held["held-out exact answers"] > 0.05  # 0 if broken
    assert by["vlm-eagle"]["held_out"]["tau (greedy, chain of 4, held out)"] > 2.0
    s = run_vlm_demo(tmp_path / "demo", progress=False, repeats=1)
    assert s["identical"] and s["tau"] > 2.0
    res = run_vlm_benchmark(tmp_path / "bench", n_prompts=2, new_tokens=32, repeats=1, temperatures=(0.0,),
                            progress=False)
    assert all(r["lossless"] == "yes (identical)" for r in res["tables"][0]["rows"] if "error" not in r)
