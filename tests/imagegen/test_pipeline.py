"""SpeculativeImagePipeline on tiny LlamaGens: lossless equality with plain AR decoding (CFG), the copy-drafter
bookkeeping check, relaxed rules reducing to lossless, measured TV, budgets, stats and bad input."""
from __future__ import annotations

import copy

import pytest
import torch

from image_ar import JacobiDrafter, SpeculativeImagePipeline, generate_tokens
from image_ar.drafters.model import ImageModelDrafter
from image_ar.target import LlamaGenTarget
from image_ar.testing.tiny import tiny_llamagen, tiny_vq
from mmspec.errors import (CheckpointError, GenerationConfigError, IncompatibleModelsError, InvalidInputError,
                           UnsupportedModelError)
from mmspec.loop import SpeculativeDecoder

LABELS = [1, 3, 5, 7]


@pytest.fixture(scope="module")
def target():
    return tiny_llamagen(grid_size=5)


@pytest.fixture(scope="module")
def small():
    return tiny_llamagen(grid_size=5, seed=3, n_layer=1, dim=32, n_head=2, n_kv_head=1)


@pytest.fixture(scope="module")
def vq():
    return tiny_vq(codebook_size=64, image_size=10)


def greedy_ref(model, labels, scale, **kw):
    return generate_tokens(model, torch.tensor(labels), guidance_scale=scale, temperature=0, **kw)


def drafters(small):
    return {"jacobi": JacobiDrafter(6), "jacobi-neighbour": JacobiDrafter(6, "neighbour"),
            "model": ImageModelDrafter(small, 3)}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("scale", [3.0, 1.0])
@pytest.mark.parametrize("kind", ["jacobi", "jacobi-neighbour", "model"])
def test_greedy_equals_plain_ar_decoding(target, small, batch, scale, kind):
    labels = LABELS[:batch]
    pipe = SpeculativeImagePipeline(target, drafter=drafters(small)[kind])
    out = pipe(class_labels=labels, guidance_scale=scale, temperature=0, output_type="tokens")
    assert out.tokens.tolist() == greedy_ref(target, labels, scale).tolist()
    assert out.stats.lossless and out.stats.tv_mean is None


def test_copy_of_the_target_accepts_every_draft(target):
    pipe = SpeculativeImagePipeline(target, drafter=ImageModelDrafter(copy.deepcopy(target), 4))
    out = pipe(class_labels=LABELS, guidance_scale=4.0, temperature=0, output_type="tokens")
    assert out.tokens.tolist() == greedy_ref(target, LABELS, 4.0).tolist()
    assert out.stats.engine.alpha == [1.0] * 4  # CFG and the caches line up at every depth
    assert out.stats.target_forwards == [1 + 5] * 4  # prefill; 4 steps of 4 drafts + 1 bonus; 3 drafts + 1 bonus
    assert out.stats.acceptance_grid.view(-1)[1:].mean() == pytest.approx(19 / 24)
    # with sampling the copy's q is the target's p, so min(1, p/q) = 1 as well
    out = pipe(class_labels=LABELS, guidance_scale=4.0, temperature=1.0, top_k=20, seed=0, output_type="tokens")
    assert out.stats.engine.alpha == [1.0] * 4


def test_text_conditional_with_caption_padding():
    t2i = tiny_llamagen(grid_size=4, model_type="t2i", seed=1)
    emb = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ref = generate_tokens(t2i, emb, cond_mask=mask, guidance_scale=2.5, temperature=0)
    pipe = SpeculativeImagePipeline(t2i, drafter="jacobi", tree=4)
    out = pipe(prompt_embeds=emb, prompt_mask=mask, guidance_scale=2.5, temperature=0, output_type="tokens")
    assert out.tokens.tolist() == ref.tolist()
    with pytest.raises(UnsupportedModelError, match="prompt_embeds"):
        pipe(prompt="a cat", temperature=0)


def test_images_stats_and_grid(target, vq):
    pipe = SpeculativeImagePipeline(target, vq, drafter="jacobi", tree=3)
    out = pipe(class_labels=[2, 4], num_images_per_prompt=2, temperature=0, guidance_scale=2.0)
    assert len(out.images) == 4 and out.images[0].size == (10, 10)
    assert out.tokens[0].tolist() == out.tokens[1].tolist()  # greedy: same label, same image
    st = out.stats
    assert st.acceptance_grid.shape == (5, 5) and st.acceptance_grid[0, 0] == 0  # the first token is the target's
    assert float(st.acceptance_grid.sum()) * 4 == pytest.approx(st.engine.accepted_tokens)
    assert st.tau == pytest.approx(sum(25 / f for f in st.target_forwards) / 4)
    assert "lossless" in st.summary() and st.as_dict()["images"] == 4


@pytest.mark.parametrize("rule", [dict(acceptance="lantern", lantern_delta=0.0),
                                  dict(acceptance="lantern", lantern_lambda=1.0, lantern_k=5),
                                  dict(acceptance="gsd", gsd_rank_window=0),
                                  dict(acceptance="gsd", tv_budget=0.0)])
def test_relaxed_rules_at_their_lossless_limit_are_lossless_draw_for_draw(target, vq, rule):
    pipe = SpeculativeImagePipeline(target, vq, drafter="jacobi", tree=4)
    kw = dict(class_labels=LABELS, guidance_scale=3.0, temperature=1.0, top_k=16, seed=7, output_type="tokens")
    base = pipe(**kw)
    relaxed = pipe(**kw, **rule)
    assert relaxed.tokens.tolist() == base.tokens.tolist()
    assert not relaxed.stats.lossless and relaxed.stats.tv_max == pytest.approx(0.0, abs=1e-6)


def test_acceptance_grows_with_delta_and_the_budget_holds(target, vq):
    pipe = SpeculativeImagePipeline(target, vq, drafter="jacobi", tree=4)
    kw = dict(class_labels=list(range(10)) * 2, guidance_scale=2.0, temperature=1.0, top_k=0, seed=3,
              output_type="tokens")
    rates = [pipe(**kw, acceptance="lantern", lantern_delta=d).stats.acceptance_grid.mean() for d in (0.0, 0.2, 0.6)]
    assert rates[0] < rates[1] < rates[2]
    out = pipe(**kw, acceptance="lantern", lantern_delta=0.6, tv_budget=0.05)
    assert 0 < out.stats.tv_max <= 0.05 + 1e-6
    assert out.stats.acceptance_grid.mean() > rates[0]
    free = pipe(**kw, acceptance="lantern", lantern_delta=0.6)
    assert free.stats.tv_max > 0.05  # the unbudgeted rule drifts further than the budget allows
    assert "LOSSY" in free.stats.summary() and free.stats.tv_grid.shape == (5, 5)


@pytest.mark.parametrize("n", [1200, pytest.param(6000, marks=pytest.mark.slow)])
def test_sampling_matches_plain_ar_sampling_in_distribution(n):
    """Seeded Monte Carlo, SJD vs plain AR with CFG and top-k: every position's marginal (two-sample chi-square at
    alpha = 1e-4). With 6000 images it detects a Jacobi drafter that records q without top-k (worst stat/threshold 1.6)."""
    model = tiny_llamagen(grid_size=3, vocab_size=6, num_classes=2, seed=5, std=0.3)
    labels = [1] * n
    plain = generate_tokens(model, torch.tensor(labels), guidance_scale=2.0, temperature=1.0, top_k=3,
                            generator=[torch.Generator().manual_seed(10_000 + i) for i in range(n)])
    pipe = SpeculativeImagePipeline(model, drafter=JacobiDrafter(4))
    out = pipe(class_labels=labels, guidance_scale=2.0, temperature=1.0, top_k=3, seed=0, output_type="tokens")
    assert out.stats.acceptance_grid.mean() > 0.1  # drafts (fresh and Jacobi-updated) really were accepted
    for c in range(9):
        stat, thresh = two_sample_chi_square([(t,) for t in plain[:, c].tolist()],
                                             [(t,) for t in out.tokens[:, c].tolist()])
        assert stat < thresh, (c, stat, thresh)


def two_sample_chi_square(a, b):
    from collections import Counter

    from stats_tools import chi_square_threshold

    ca, cb = Counter(a), Counter(b)
    cells = [c for c in set(ca) | set(cb) if ca[c] + cb[c] >= 10]
    rest_a = len(a) - sum(ca[c] for c in cells)
    rest_b = len(b) - sum(cb[c] for c in cells)
    pairs = [(ca[c], cb[c]) for c in cells] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    na, nb = len(a), len(b)
    stat = sum((x * (nb / na) ** 0.5 - y * (na / nb) ** 0.5) ** 2 / (x + y) for x, y in pairs if x + y)
    return stat, chi_square_threshold(max(len(pairs) - 1, 1))


def test_generators_reproduce(target):
    pipe = SpeculativeImagePipeline(target, drafter="jacobi", tree=3)
    kw = dict(class_labels=[1, 2], temperature=1.0, top_k=10, output_type="tokens")
    a = pipe(**kw, generator=torch.Generator().manual_seed(1)).tokens
    b = pipe(**kw, generator=torch.Generator().manual_seed(1)).tokens
    c = pipe(**kw, seed=1).tokens
    d = pipe(**kw, seed=1).tokens
    assert a.tolist() == b.tolist() and c.tolist() == d.tolist()


def test_bad_input(target, vq, tmp_path):
    pipe = SpeculativeImagePipeline(target, vq, drafter="jacobi")
    with pytest.raises(InvalidInputError, match="out of range"):
        pipe(class_labels=[10], temperature=0)
    with pytest.raises(InvalidInputError, match="exactly one"):
        pipe(temperature=0)
    with pytest.raises(GenerationConfigError, match="acceptance"):
        pipe(class_labels=[1], acceptance="typical")
    with pytest.raises(GenerationConfigError, match="temperature 0"):
        pipe(class_labels=[1], acceptance="lantern", temperature=0)
    with pytest.raises(GenerationConfigError, match="tv_budget"):
        pipe(class_labels=[1], tv_budget=0.1)
    with pytest.raises(InvalidInputError, match="num_tokens"):
        pipe(class_labels=[1], num_tokens=26)
    with pytest.raises(InvalidInputError, match="vq="):  # before generating anything, not after
        SpeculativeImagePipeline(target)(class_labels=[1], temperature=0)
    pipe(class_labels=[1], temperature=0, num_tokens=3)  # the session is still usable after the errors
    with pytest.raises(IncompatibleModelsError, match="codes"):
        SpeculativeImagePipeline(target, tiny_vq(codebook_size=32))
    no_null = tiny_llamagen(grid_size=5, class_dropout_prob=0.0)
    with pytest.raises(UnsupportedModelError, match="null class"):
        SpeculativeImagePipeline(no_null)(class_labels=[1], guidance_scale=4.0)
    SpeculativeImagePipeline(no_null)(class_labels=[1], guidance_scale=1.0, temperature=0, output_type="tokens")
    d = target.save_pretrained(tmp_path / "t")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        SpeculativeImagePipeline.from_pretrained(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        SpeculativeImagePipeline(target, drafter=tmp_path / "missing")
    with pytest.raises(UnsupportedModelError):
        ImageModelDrafter(tiny_llamagen(grid_size=4)).check_target(LlamaGenTarget(target))


def test_default_guidance_is_llamagens(target):
    out = SpeculativeImagePipeline(target, drafter="jacobi")(class_labels=[2, 6], temperature=0, output_type="tokens")
    assert out.tokens.tolist() == greedy_ref(target, [2, 6], 4.0).tolist()


def test_from_pretrained_round_trip(target, vq, small, tmp_path):
    target.save_pretrained(tmp_path / "target")
    vq.save_pretrained(tmp_path / "vq")
    small.save_pretrained(tmp_path / "draft")
    pipe = SpeculativeImagePipeline.from_pretrained(tmp_path / "target", vq=tmp_path / "vq",
                                                    drafter=str(tmp_path / "draft"), tree=2)
    assert isinstance(pipe.drafter, ImageModelDrafter) and pipe.drafter.k == 2
    out = pipe(class_labels=[4], guidance_scale=2.0, temperature=0)
    assert out.tokens.tolist() == greedy_ref(target, [4], 2.0).tolist() and len(out.images) == 1


def test_engine_events_carry_accepted_counts(target):
    t = LlamaGenTarget(target, 2.0)
    stream = SpeculativeDecoder(t, ImageModelDrafter(copy.deepcopy(target), 3)).stream(t.requests([1]),
                                                                                       max_new_tokens=25)
    events = list(stream)
    assert events[0].accepted == 0 and all(e.drift is None for e in events)
    assert sum(e.accepted for e in events) == stream.output.stats.accepted_tokens
