"""The image zoo (quick variants: tiny sizes, a few steps, seconds): builds, caches, loads by `zoo:NAME@quick`,
runs through the pipeline, the CLI, both benchmarks and the demo; the image set; the Fréchet distance. Slow tier: the
full image zoo and a benchmark run on it."""
from __future__ import annotations

import json

import pytest
import torch

from image_ar import shapes
from image_ar.frechet import frechet_distance, frechet_from_stats, gaussian, sqrtm_psd
from mmspec.errors import InvalidInputError


# --- the image set ---------------------------------------------------------------------------------------------------
def test_image_set_is_deterministic_and_its_classes_differ():
    a, la = shapes.dataset(40, seed=3)
    b, lb = shapes.dataset(40, seed=3)
    c, _ = shapes.dataset(40, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (40, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert sorted(la.tolist()) == sorted(list(range(10)) * 4)  # balanced
    means = torch.stack([a[la == k].mean((0, 2, 3)) for k in range(10)])  # (10, 3) mean colour per class
    dist = torch.cdist(means, means) + torch.eye(10)
    assert dist.min() > 0.05  # every class looks different from every other
    im = shapes.render(torch.tensor([0, 0]), torch.Generator().manual_seed(0))
    assert not torch.equal(im[0], im[1])  # jitter: a class is a distribution of images


def test_image_set_rejects_bad_labels():
    with pytest.raises(InvalidInputError, match="out of range"):
        shapes.render(torch.tensor([10]), torch.Generator())
    with pytest.raises(InvalidInputError, match="1-D integer"):
        shapes.render(torch.tensor([0.5]), torch.Generator())


# --- Fréchet distance ------------------------------------------------------------------------------------------------
def test_sqrtm_psd_squares_back():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    m = a @ a.T
    r = sqrtm_psd(m)
    torch.testing.assert_close(r @ r, m)
    torch.testing.assert_close(r, r.T)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    got = frechet_from_stats(mu1, torch.diag(s1 ** 2), mu2, torch.diag(s2 ** 2))
    want = float((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum())  # 5 + (4 + 1 + 0)
    assert got == pytest.approx(want, rel=1e-9) and want == pytest.approx(10.0)


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=g)
    y = torch.randn(4000, 4, generator=g)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, y) < 0.02  # same Gaussian: only sampling noise
    shifted = frechet_distance(x, y + torch.tensor([2.0, 0, 0, 0]))
    assert shifted == pytest.approx(4.0, abs=0.15)
    mu, cov = gaussian(x)
    assert cov.shape == (4, 4) and mu.shape == (4,)
    with pytest.raises(InvalidInputError, match="widths"):
        frechet_distance(x, y[:, :3])


# --- the quick zoo ---------------------------------------------------------------------------------------------------
def test_quick_zoo_builds_every_recipe_with_a_card(quick_zoo):
    from image_ar.zoo import MODELS

    root, cards = quick_zoo
    assert set(cards) == {m.name for m in MODELS}
    for name, card in cards.items():
        assert card["variant"] == "quick" and card["parameters"] > 0 and card["final_loss"] is not None, name
        d = next(root.glob(f"{name}-quick-*"))
        assert (d / "card.json").is_file() and (d / "README.md").is_file()
    assert "tau (k=3, CFG 4, T=1)" in cards["llamagen-head"]["held_out"]
    assert 0 <= cards["image-classifier"]["held_out"]["accuracy"] <= 1
    assert cards["llamagen-draft"]["trained_against"]["llamagen"].startswith("llamagen-quick-")


def test_second_build_reuses_the_cache(quick_zoo, capsys, tmp_path):
    import dataclasses

    from image_ar.zoo import MODELS
    from mmspec.zoo import Zoo

    root, _ = quick_zoo
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/card.json")}
    calls = []
    counting = Zoo([dataclasses.replace(m, build=lambda ctx: calls.append(ctx.name) or {}) for m in MODELS])
    counting.build(quick=True, progress=True)  # same recipes, same digests: every model is cached
    assert calls == [] and capsys.readouterr().out.count("cached") == len(MODELS)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/card.json")} == before
    fresh = Zoo(counting.models.values(), root=tmp_path)  # the counter does count where nothing is cached
    fresh.build(["image-classifier"], quick=True, progress=False)
    assert calls == ["image-classifier"]


def test_zoo_paths_load_through_the_pipeline(quick_zoo):
    from image_ar import ImageHeadDrafter, SpeculativeImagePipeline, generate_tokens

    pipe = SpeculativeImagePipeline.from_pretrained("zoo:llamagen@quick", vq="zoo:vq@quick",
                                                    drafter="zoo:llamagen-head@quick")
    assert isinstance(pipe.drafter, ImageHeadDrafter)
    out = pipe(class_labels=[0, 3], seed=0, temperature=0)
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    ref = generate_tokens(pipe.target.model, torch.tensor([0, 3]), guidance_scale=4.0, temperature=0)
    assert out.tokens.tolist() == ref.tolist()  # lossless: greedy equals plain decoding


def test_continuous_zoo_paths_load_through_the_pipeline(quick_zoo):
    from image_ar import ContinuousDrafter, SpeculativeImagePipeline

    pipe = SpeculativeImagePipeline.from_pretrained("zoo:continuous@quick", vae="zoo:kl-vae@quick",
                                                    drafter="zoo:continuous-draft@quick")
    assert isinstance(pipe.drafter, ContinuousDrafter)
    out = pipe(class_labels=[1], seed=0, guidance_scale=2.0)
    assert out.images[0].size == (16, 16) and out.stats.lossless


def test_unknown_zoo_name_is_a_typed_error(quick_zoo):
    from image_ar import SpeculativeImagePipeline

    with pytest.raises(InvalidInputError, match="does not exist; the zoo has"):
        SpeculativeImagePipeline.from_pretrained("zoo:nope@quick")


def test_image_cli_takes_zoo_paths(quick_zoo, tmp_path, capsys):
    from mmspec.cli import main

    out = tmp_path / "zoo.png"
    assert main(["image", "--target", "zoo:llamagen@quick", "--vq", "zoo:vq@quick", "--drafter",
                 "zoo:llamagen-draft@quick", "--class-label", "2", "--out", str(out)]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["lossless"] is True


def test_bench_image_quick_on_the_quick_zoo(quick_zoo, tmp_path):
    from image_ar.bench import run_image_benchmark

    labels = tmp_path / "labels.txt"
    labels.write_text("# two classes\n1\n\n4\n")
    res = run_image_benchmark(out_dir=tmp_path / "b", labels=labels, quick=True, progress=False)
    assert res["labels"] == [1, 4]
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows)[0].startswith("plain AR") and rows["plain AR (generate_tokens)"]["speedup"] == 1.0
    assert {"pipeline, no drafter", "SJD (window 16)", "head (k=3)", "draft model (k=2)"} <= set(rows)
    lossy = [r for r in res["rows"] if not r["lossless"]]
    assert lossy and all(r["tv_max"] is not None for r in lossy)
    assert all(r["tv_max"] <= 0.05 + 1e-6 for r in lossy if "TV budget 0.05" in r["method"])
    head = rows["head (k=3)"]
    assert head["tau"] >= 1 and head["predicted_speedup"] > 0 and head["efficiency"] > 0
    assert head["num_drafts"] > 0 and len(head["acceptance_rate_per_position"]) == 3  # vLLM's names
    assert head["mean_acceptance_length"] == pytest.approx(1 + head["num_accepted_tokens"] / head["num_drafts"])
    assert rows["plain AR (generate_tokens)"]["mean_acceptance_length"] is None
    assert head["fd_real"] is not None and head["fd_lossless"] is not None and head["fd_samples"] == 2
    assert set(res["forward_ms"]) >= {"1", "4"}
    md = (tmp_path / "b" / "result.md").read_text()
    assert "**LOSSY**" in md and "FD vs real" in md and (tmp_path / "b" / "result.json").is_file()
    assert (tmp_path / "b" / "images_head__k_3.png").is_file()


def test_bench_continuous_quick_on_the_quick_zoo(quick_zoo, tmp_path):
    from image_ar.bench_continuous import run_continuous_benchmark

    res = run_continuous_benchmark(out_dir=tmp_path, quick=True, progress=False)
    names = [r["method"] for r in res["rows"]]
    assert names[0].startswith("plain AR") and "CSpD (k=4, prefill 0.15)" in names
    cspd = res["rows"][2]
    assert cspd["lossless"] and cspd["draft_s"] > 0 and cspd["target_s"] > 0 and cspd["heads_s"] > 0
    assert cspd["num_drafts"] > 0 and 0 <= cspd["draft_acceptance_rate"] <= 1  # vLLM's names
    assert cspd["mean_acceptance_length"] == pytest.approx(1 + sum(cspd["acceptance_rate_per_position"]))
    assert "target heads" in (tmp_path / "result.md").read_text()


def test_image_demo_quick(quick_zoo, tmp_path):
    from image_ar.demo import run_image_demo

    s = run_image_demo(tmp_path, quick=True, progress=False)
    assert s["lossless"] and s["greedy_identical_tokens"] is True and s["tau"] >= 1
    assert s["images"] == 8 and s["speedup"] > 0
    from PIL import Image

    assert Image.open(s["files"]["grid"]).size == (8 * 64, 2 * 64)
    assert json.loads((tmp_path / "image_demo.json").read_text())["images"] == 8


def test_sample_teacher_matches_the_teacher_forced_pass(quick_zoo):
    from image_ar.train import sample_teacher, teacher
    from image_ar.zoo import load

    model = load("llamagen", quick=True, progress=False)
    labels = torch.tensor([0, 5, 9])
    grids, feats, probs = sample_teacher(model, labels, guidance_scale=4.0, batch_size=2,
                                         generator=torch.Generator().manual_seed(0))
    want_f, want_p = teacher(model, labels, grids, 4.0)
    torch.testing.assert_close(feats, want_f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probs, want_p, rtol=1e-4, atol=1e-5)
    assert len({tuple(g) for g in grids.tolist()}) == 3  # sampled, not collapsed


# --- slow tier: the full image zoo -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_image_zoo_builds_and_benchmarks(tmp_path):
    """Builds the full image models (minutes on CPU; cached under $MMSPEC_ZOO, a second build reuses them) and runs a
    short benchmark on them. Speeds are printed, never asserted."""
    from image_ar.bench import run_image_benchmark
    from image_ar.zoo import IMAGE_BENCH, zoo

    cards = {c["name"]: c for c in zoo().build(list(IMAGE_BENCH), progress=False)}
    assert cards["image-classifier"]["held_out"]["accuracy"] > 0.9
    assert cards["vq"]["held_out"]["reconstruction MSE ([-1, 1] pixels)"] < 0.05
    assert cards["vq"]["held_out"]["codes used"] > 64  # the codebook did not collapse
    assert cards["llamagen-head"]["held_out"]["tau (k=3, CFG 4, T=1)"] > 2.0
    assert cards["llamagen-draft"]["held_out"]["tau (k=4, CFG 4, T=1)"] > 1.5
    res = run_image_benchmark(out_dir=tmp_path, images=4, repeats=1, progress=False)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["head (k=3)"]["tau"] > 2.0 and rows["head (k=3)"]["forwards_per_image"] < 40
    assert rows["plain AR (generate_tokens)"]["fd_real"] is not None and rows["head (k=3)"]["fd_lossless"] is not None
    budget = [r for r in res["rows"] if "TV budget 0.05" in r["method"]]
    assert budget and all(r["tv_max"] <= 0.05 + 1e-6 and not r["lossless"] for r in budget)
    assert (tmp_path / "speed_vs_acceptance.png").is_file() and (tmp_path / "speed_vs_quality.png").is_file()


@pytest.mark.slow
def test_full_continuous_zoo_builds_and_benchmarks(tmp_path):
    from image_ar.bench_continuous import run_continuous_benchmark
    from image_ar.zoo import CONTINUOUS_BENCH, zoo

    cards = {c["name"]: c for c in zoo().build(list(CONTINUOUS_BENCH), progress=False)}
    assert cards["kl-vae"]["held_out"]["reconstruction MSE ([-1, 1] pixels)"] < 0.05
    assert cards["continuous-draft"]["held_out"]["CSpD tau (k=4, CFG 2)"] > 1.0
    res = run_continuous_benchmark(out_dir=tmp_path, images=2, repeats=1, progress=False)
    cspd = [r for r in res["rows"] if r["method"].startswith("CSpD")]
    assert res["models"] == "zoo" and all(r["lossless"] and r["tau"] > 1.0 for r in cspd)
    assert all(r["draft_s"] > 0 and r["target_s"] > 0 and r["heads_s"] > 0 for r in cspd)


@pytest.mark.slow
def test_image_demo_on_the_full_zoo(tmp_path):
    """The demo's first run builds what it needs (cached afterwards); its output is lossless, greedy-identical."""
    from image_ar.demo import run_image_demo

    s = run_image_demo(tmp_path, progress=False)
    assert s["lossless"] and s["greedy_identical_tokens"] is True and s["tau"] > 2.0
    assert s["target_forwards_per_image"] < s["tokens_per_image"] / 2
    from PIL import Image

    assert Image.open(s["files"]["grid"]).size == (8 * 64, 2 * 64)
