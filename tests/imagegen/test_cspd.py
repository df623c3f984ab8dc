"""CSpD on continuous-token models: the density ratio, the exact rule end to end (two-sample test against
target-only sampling, and a wrong rule caught by the same test), seeded equality of target-only decoding through
the engine, bookkeeping, the pipeline API and checkpoints."""
import argparse

import pytest
import torch
from torch.distributions import Normal

from mmspec.twosample import energy_test
from image_ar import SpeculativeImagePipeline
from image_ar.acceptance.cspd import CSpD, ResidualSamplingError, TrajectoryDraft, accepted_prefix, head_rows
from image_ar.acceptance.cspd import log_density, sample_chains
from image_ar.models.continuous_ar import ContinuousAR, generate_continuous, load_mar_diffusion_head
from image_ar.models.kl_vae import tiny_kl_vae
from image_ar.testing import perturbed, tiny_continuous
from image_ar.testing import tiny_continuous_config as tiny_config
from image_ar.testing.patterns import train_continuous
from mmspec.errors import CheckpointError, GenerationConfigError, InvalidInputError, UnsupportedModelError
from mmspec.kernels import Verdict


def direct_chain_log_prob(head, z, scale, states, temperature):
    """The chain's density written out: guided eps from two head calls, the DDPM posterior mean, the learned-range
    variance, torch.distributions.Normal per step, summed (float64)."""
    d, c = head.diffusion, head.diffusion.sample
    betas = c.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post = betas * (1 - abar_prev) / (1 - abar)
    zc, zu = z.chunk(2, -1)
    total = torch.zeros(len(z), dtype=torch.float64)
    for j in range(d.num_steps):
        s = d.num_steps - 1 - j
        x = states[:, j]
        t = torch.full((len(x),), d.timesteps[s], dtype=torch.long)
        ec, v = head.net(x, t, zc).double().chunk(2, -1)
        eu, _ = head.net(x, t, zu).double().chunk(2, -1)
        eps = eu + scale.double()[:, None] * (ec - eu)
        x0 = (x.double() - (1 - abar[s]).sqrt() * eps) / abar[s].sqrt()
        mean = betas[s] * abar_prev[s].sqrt() / (1 - abar[s]) * x0 + \
            (1 - abar_prev[s]) * (1 - betas[s]).sqrt() / (1 - abar[s]) * x.double()
        frac = (v + 1) / 2
        logvar = frac * betas[s].log() + (1 - frac) * (post[1] if s == 0 else post[s]).log()
        total += Normal(mean, temperature * (0.5 * logvar).exp()).log_prob(states[:, j + 1].double()).sum(-1)
    return total


def test_density_ratio_matches_a_direct_gaussian_computation():
    target, draft = tiny_continuous(0, token_dim=3), tiny_continuous(7, token_dim=3)
    g = torch.Generator().manual_seed(0)
    z_p, z_q = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    scale = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0])
    rows_p, rows_q = head_rows(z_p, scale), head_rows(z_q, scale)
    noise = torch.randn(5, 5, 3, generator=g)
    chains = sample_chains(draft.diffloss, rows_q, noise, 0.9)  # the draft's chains, as the drafter makes them
    log_q, log_p = chains.log_prob, log_density(target.diffloss, rows_p, chains.states, 0.9)
    want_q = direct_chain_log_prob(draft.diffloss, z_q, scale, chains.states, 0.9)
    want_p = direct_chain_log_prob(target.diffloss, z_p, scale, chains.states, 0.9)
    torch.testing.assert_close(log_q.double(), want_q, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(log_p.double(), want_p, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close((log_p - log_q).double(), want_p - want_q, rtol=1e-3, atol=1e-2)
    assert (want_p - want_q).abs().max() > 1.0  # two different models: the ratio is far from 1 (the check can fail)


def test_accepted_prefix_stops_at_the_first_failed_coin():
    log_ratio = torch.log(torch.tensor([2.0, 0.5, 0.5, 1.0]))
    assert accepted_prefix(log_ratio, torch.tensor([0.99, 0.4, 0.6, 0.1])) == 2
    assert accepted_prefix(log_ratio, torch.tensor([0.1, 0.6, 0.1, 0.1])) == 1
    assert accepted_prefix(log_ratio, torch.tensor([0.5, 0.1, 0.2, 0.9])) == 4


def test_target_only_decoding_through_the_engine_equals_the_plain_sampler():
    model = tiny_continuous(0)
    pipe = SpeculativeImagePipeline(model)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    got = pipe(class_labels=[0, 1, 2], guidance_scale=2.5, guidance_schedule="linear", temperature=0.8,
               output_type="tokens", generator=gens).tokens
    want = generate_continuous(model, [0, 1, 2], guidance_scale=2.5, guidance_schedule="linear", temperature=0.8,
                               generator=[torch.Generator().manual_seed(s) for s in (3, 4, 5)])
    assert got.shape == (3, 4, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    other = generate_continuous(model, [0, 1, 2], guidance_scale=2.5, temperature=0.8,
                                generator=[torch.Generator().manual_seed(s) for s in (3, 4, 5)])
    assert not torch.allclose(other, want, atol=1e-3)  # the linear schedule changed something (test can fail)


def test_a_copy_of_the_target_as_drafter_is_always_accepted():
    model = tiny_continuous(0, grid_size=3)
    pipe = SpeculativeImagePipeline(model, drafter=perturbed(model, 0.0), tree=4)
    out = pipe(class_labels=[0, 1], guidance_scale=2.0, output_type="tokens", seed=0)
    # 9 tokens: prefill gives 1, then each verification accepts 4 drafts + 1 bonus (budget permitting)
    assert out.stats.target_forwards == [3, 3]
    assert out.stats.residual_draws == 0
    assert out.tokens.shape == (2, 9, 2) and torch.isfinite(out.tokens).all()


def test_drafted_tokens_are_resampled_from_the_residual_when_rejected():
    model = tiny_continuous(0)
    pipe = SpeculativeImagePipeline(model, drafter=perturbed(model, 0.02), tree=3)
    out = pipe(class_labels=[0] * 20, guidance_scale=2.0, output_type="tokens", seed=0)
    assert out.stats.residual_draws > 0
    assert sum(out.stats.target_forwards) > 2 * 20  # rejections cost forwards


def test_a_batch_gives_each_image_what_it_gets_alone():
    """The rule runs the whole batch at once (one head call per round) yet every image draws only from its own
    generator in its own order: batch outputs equal one-image runs, through rejections and residual rounds."""
    model = tiny_continuous(0, grid_size=3)
    pipe = SpeculativeImagePipeline(model, drafter=perturbed(model, 0.01), tree=3)
    labels, seeds = [0, 1, 2, 1], [5, 6, 7, 8]
    kw = dict(guidance_scale=2.0, output_type="tokens", temperature=0.9)
    out = pipe(class_labels=labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    assert out.stats.residual_draws > 0 and 0 < float(out.stats.acceptance_grid.mean()) < 1
    for i, (label, s) in enumerate(zip(labels, seeds)):
        alone = pipe(class_labels=[label], generator=[torch.Generator().manual_seed(s)], **kw)
        torch.testing.assert_close(alone.tokens[0], out.tokens[i], rtol=1e-4, atol=1e-5)
        assert alone.stats.target_forwards[0] == out.stats.target_forwards[i]


def test_residual_sampler_raises_instead_of_making_up_a_token():
    model = tiny_continuous(0)
    head = model.diffloss
    rule = CSpD(head, max_candidates=32, candidates=8)
    row = head_rows(torch.randn(64), torch.tensor(2.0))
    with pytest.raises(ResidualSamplingError, match="32 chains"):
        rule.residual(row, row, head, torch.Generator().manual_seed(0))  # p == q: the residual has no mass


class AlwaysAccept(CSpD):
    """A deliberately wrong rule: every drafted token is kept."""

    lossless = False

    def verify_rows(self, drafts, rows, generators):
        return [Verdict(list(range(len(d))), list(d.tokens), None, self.first(r[len(d)], g), bonus=True)
                for d, r, g in zip(drafts, rows, generators)]


@pytest.fixture(scope="module")
def trained_pair():
    """A tiny target trained 300 steps and a drafter trained 100 steps from another seed: they disagree enough
    that a rule keeping drafts unchecked is caught, and agree enough for CSpD to accept ~25% of drafts."""
    cfg = tiny_config(sampling_steps=8)
    return (train_continuous(cfg, 300, 3e-3, batch_size=64, progress=False),
            train_continuous(cfg, 100, 3e-3, batch_size=64, seed=1, progress=False))


def test_two_sample_cspd_matches_target_only_sampling_and_a_wrong_rule_does_not(trained_pair):
    target, draft = trained_pair
    n, labels = 600, [0] * 600
    ref = SpeculativeImagePipeline(target)(class_labels=labels, guidance_scale=2.0, output_type="tokens",
                                           seed=10**6).tokens
    spec = SpeculativeImagePipeline(target, drafter=draft, tree=3)
    out = spec(class_labels=labels, guidance_scale=2.0, output_type="tokens", seed=0)
    wrong = SpeculativeImagePipeline(target, drafter=draft, tree=3)
    wrong._kernel = lambda *a, **k: AlwaysAccept(wrong.target.head)
    bad = wrong(class_labels=labels, guidance_scale=2.0, output_type="tokens", seed=0).tokens
    assert out.tokens.shape == ref.shape == bad.shape == (n, 4, 2)
    mean_accept = float(out.stats.acceptance_grid.mean())
    assert 0.1 < mean_accept < 0.9 and out.stats.residual_draws > 0  # both branches of the rule ran
    assert sum(out.stats.target_forwards) < 4 * n  # fewer target forwards than target-only (4 per image + 0)
    _, p_cspd = energy_test(out.tokens, ref, permutations=200)
    _, p_wrong = energy_test(bad, ref, permutations=200)
    assert p_cspd > 0.05, p_cspd
    assert p_wrong < 0.01, p_wrong


def test_pipeline_options_and_errors():
    model = tiny_continuous(0)
    pipe = SpeculativeImagePipeline(model, drafter=perturbed(model, 0.0), vae=tiny_kl_vae(latent_channels=2))
    out = pipe(class_labels=1, guidance_scale=1.5, seed=0, prefill_ratio=0.5)
    assert len(out.images) == 1 and out.images[0].size == (4, 4)  # 2x2 latents -> 4x4 pixels (tiny VAE)
    assert out.stats.acceptance == "cspd" and out.stats.lossless and "LOSSY" not in out.stats.summary()
    assert float(out.stats.acceptance_grid[0, 0]) == 0 and float(out.stats.acceptance_grid[0, 1]) == 0  # pre-filled
    for kwargs, match in [(dict(acceptance="lantern"), "exact CSpD"), (dict(temperature=0), "temperature"),
                          (dict(top_p=0.9), "top_p"), (dict(prefill_ratio=1.5), "prefill_ratio"),
                          (dict(guidance_schedule="cosine"), "guidance_schedule"), (dict(tv_budget=0.1), "CSpD")]:
        with pytest.raises(InvalidInputError, match=match):
            pipe(class_labels=0, output_type="tokens", **kwargs)
    with pytest.raises(InvalidInputError, match="class label"):
        pipe(class_labels=3, output_type="tokens")
    out = pipe(class_labels=2, output_type="tokens", seed=1)  # the session is still usable after the errors
    assert out.tokens.shape == (1, 4, 2)
    with pytest.raises(InvalidInputError, match="VAE"):
        SpeculativeImagePipeline(model)(class_labels=0)
    with pytest.raises(InvalidInputError, match="ContinuousAR"):
        SpeculativeImagePipeline(model, drafter="jacobi")
    with pytest.raises(UnsupportedModelError, match="steps"):
        SpeculativeImagePipeline(model, drafter=tiny_continuous(1, sampling_steps=3))
    with pytest.raises(UnsupportedModelError, match="token_dim"):
        SpeculativeImagePipeline(model, drafter=tiny_continuous(1, token_dim=3))


def test_cspd_is_refused_on_discrete_targets():
    from image_ar.testing.tiny import tiny_llamagen

    pipe = SpeculativeImagePipeline(tiny_llamagen())
    with pytest.raises(GenerationConfigError, match="continuous-token targets"):
        pipe(class_labels=0, acceptance="cspd", output_type="tokens")


class Evil:
    """Not a tensor container: a weights-only reader must refuse it."""


def test_checkpoints_round_trip_and_reference_layout(tmp_path):
    model = tiny_continuous(0)
    model.save_pretrained(tmp_path / "ours")
    back = ContinuousAR.from_pretrained(tmp_path / "ours")
    want = generate_continuous(model, [1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(generate_continuous(back, [1], generator=torch.Generator().manual_seed(0)), want)
    pipe = SpeculativeImagePipeline.from_pretrained(tmp_path / "ours", drafter=tmp_path / "ours")
    assert isinstance(pipe.target.model, ContinuousAR) and pipe.drafter is not None
    # a MAR-style training checkpoint: weights under model / model_ema, the args Namespace next to them
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "model_ema": ema, "args": argparse.Namespace(lr=1e-4), "epoch": 3},
               tmp_path / "checkpoint-last.pth")
    loaded = ContinuousAR.from_pretrained(tmp_path / "checkpoint-last.pth", model.config)
    torch.testing.assert_close(loaded.z_proj.weight, ema["z_proj.weight"])  # the EMA weights are the ones used
    head = load_mar_diffusion_head(tmp_path / "checkpoint-last.pth", sampling_steps=4, noise_schedule="linear",
                                   train_steps=100)
    torch.testing.assert_close(head.net.input_proj.weight, ema["diffloss.net.input_proj.weight"])
    assert head.net.in_channels == 2 and len(head.net.res_blocks) == 2
    with pytest.raises(CheckpointError, match="config"):
        ContinuousAR.from_pretrained(tmp_path / "checkpoint-last.pth")
    masked = {"encoder_blocks.0.attn.qkv.weight": torch.zeros(3, 3), **{f"diffloss.{k}": v for k, v in
                                                                         model.diffloss.state_dict().items()}}
    torch.save({"model_ema": masked}, tmp_path / "mar.pth")
    with pytest.raises(UnsupportedModelError, match="masked-order"):
        ContinuousAR.from_pretrained(tmp_path / "mar.pth", model.config)
    assert load_mar_diffusion_head(tmp_path / "mar.pth", sampling_steps=4, noise_schedule="linear",
                                   train_steps=100).net.in_channels == 2

    torch.save({"model": model.state_dict(), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ContinuousAR.from_pretrained(tmp_path / "evil.pth", model.config)


def test_trajectory_drafts_are_required():
    rule = CSpD(tiny_continuous(0).diffloss)
    from mmspec.tree import Draft

    with pytest.raises(GenerationConfigError, match="TrajectoryDraft"):
        rule(Draft.chain([0, 1]), torch.zeros(3, 65))
    assert isinstance(TrajectoryDraft(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), TrajectoryDraft)


def test_cli_generates_with_cspd(tmp_path, capsys):
    import json

    from mmspec.cli import main

    model = tiny_continuous(0)
    model.save_pretrained(tmp_path / "target")
    tiny_kl_vae(latent_channels=2).save_pretrained(tmp_path / "vae")
    out = tmp_path / "img.png"
    rc = main(["image", "--target", str(tmp_path / "target"), "--vae", str(tmp_path / "vae"), "--drafter",
               str(tmp_path / "target"), "--class-label", "0", "2", "--num-images", "2", "--guidance-schedule",
               "linear", "--acceptance", "cspd", "--out", str(out)])
    assert rc == 0 and out.is_file() and out.with_suffix(".acceptance.png").is_file()
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["acceptance"] == "cspd" and stats["lossless"] and stats["images"] == 4
    assert stats["mean_target_forwards"] < 4  # a copy of the target drafts: fewer forwards than tokens
    assert "cspd" in capsys.readouterr().err


def test_bench_image_continuous_quick(quick_zoo, tmp_path, capsys):
    import json

    from mmspec.cli import main

    assert main(["bench", "image", "--continuous", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows)[:2] == ["plain AR (generate_continuous)", "pipeline, no drafter"]
    assert all(r["lossless"] for r in rows.values())
    n = res["tokens_per_image"]
    assert rows["pipeline, no drafter"]["forwards_per_image"] == n and rows["pipeline, no drafter"]["tau"] == 1.0
    cspd = [r for m, r in rows.items() if m.startswith("CSpD")]
    assert len(cspd) == 3 and all(r["forwards_per_image"] <= n and r["tau"] >= 1 for r in cspd)
    assert all(0 <= r["accepted_fraction"] <= 1 and r["draft_s"] > 0 and r["heads_s"] > 0 for r in cspd)
    md = (tmp_path / "result.md").read_text()
    assert md.count("| CSpD") == 3 and "speedup vs plain" in md and md in capsys.readouterr().out
