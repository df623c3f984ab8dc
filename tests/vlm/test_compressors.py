"""Image-token compressors for VLM drafters: shapes, exact reference values, gradients, batch independence,
config/state_dict round trips, the elastic choice rule, and typed errors for bad configs and inputs."""
from __future__ import annotations

import json

import pytest
import torch

from mmspec.errors import DeviceMismatchError, InvalidInputError
from vision.compressors import AttentionPrune, AvgPool, Conv, Elastic, Identity, build_compressor

D = 8
CASES = [(16, (4, 4)), (24, (4, 6)), (10, None)]
CONFIGS = {
    "none": {"type": "none"},
    "avg_pool": {"type": "avg_pool", "stride": 2},
    "attention_prune": {"type": "attention_prune", "keep_ratio": 0.3},
    "conv": {"type": "conv", "stride": 2, "dim": D},
    "resampler": {"type": "resampler", "n_queries": 3, "dim": D, "heads": 2},
    "vispec": {"type": "vispec", "n_queries": 3, "dim": D, "heads": 2},
    "elastic": {"type": "elastic", "compressors": [{"type": "attention_prune", "keep_ratio": 0.25},
                                                   {"type": "avg_pool", "stride": 2}]},
}
# out_tokens for the CASES, in order (attention_prune: ceil(0.3 N); elastic w/o attention: cheapest, ties -> first)
EXPECTED = {"none": [16, 24, 10], "avg_pool": [4, 6, 5], "attention_prune": [5, 8, 3], "conv": [4, 6, 5],
            "resampler": [3, 3, 3], "vispec": [3, 3, 3], "elastic": [4, 6, 3]}
LEARNABLE = ["conv", "resampler", "vispec"]


def build(cfg: dict, seed: int = 0):
    with torch.random.fork_rng():  # module init draws from the global RNG; keep it out of other tests
        torch.manual_seed(seed)
        return build_compressor(cfg)


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def perturb(module: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_shapes_and_out_tokens(name, case):
    n, grid = CASES[case]
    c = build(CONFIGS[name])
    out = c(randn(2, n, D), grid=grid)
    m = EXPECTED[name][case]
    assert c.out_tokens(n, grid) == m
    assert out.tokens.shape == (2, m, D) and out.tokens.dtype == torch.float32
    assert out.index is None or (out.index.shape == (2, m) and out.index.dtype == torch.long)
    assert (out.global_vec is not None) == (name == "vispec")
    if out.global_vec is not None:
        assert out.global_vec.shape == (2, D)
    assert out.method == (name if name != "elastic" else "attention_prune")


@pytest.mark.parametrize("name", CONFIGS)
def test_dtype_follows_input(name):
    c = build(CONFIGS[name]).double()
    out = c(randn(1, 16, D, dtype=torch.float64), grid=(4, 4))
    assert out.tokens.dtype == torch.float64


def hand_pool(x: torch.Tensor, h: int, w: int, s: int) -> torch.Tensor:
    grid = x.reshape(x.shape[0], h, w, x.shape[-1])
    rows = [grid[:, i:i + s, j:j + s].mean(dim=(1, 2)) for i in range(0, h, s) for j in range(0, w, s)]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("n,grid,s", [(24, (4, 6), 2), (15, (3, 5), 2), (16, (4, 4), 3), (10, None, 3)])
def test_avg_pool_matches_hand_computation(n, grid, s):
    x = randn(2, n, D)
    h, w = grid or (1, n)
    out = AvgPool(s)(x, grid=grid)
    torch.testing.assert_close(out.tokens, hand_pool(x, h, w, s), rtol=0, atol=1e-6)
    assert out.tokens.shape[1] == AvgPool(s).out_tokens(n, grid)
    if grid == (4, 6):  # first window by hand: tokens 0, 1 (row 0) and 6, 7 (row 1)
        torch.testing.assert_close(out.tokens[:, 0], x[:, [0, 1, 6, 7]].mean(1))


def test_attention_prune_keeps_top_mass_in_original_order():
    x = randn(2, 16, D)
    att = 0.01 * randn(2, 16, seed=1).abs()
    tops = [[13, 2, 7, 9], [0, 15, 5, 6]]  # decreasing mass; kept in position order
    for b, ids in enumerate(tops):
        att[b, ids] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = AttentionPrune(0.25)(x, grid=(4, 4), attention=att)
    expect = torch.tensor([sorted(t) for t in tops])
    assert torch.equal(out.index, expect)
    assert torch.equal(out.tokens, torch.stack([x[b, expect[b]] for b in range(2)]))


def test_attention_prune_falls_back_to_feature_norm_and_matches_identity_at_ratio_one():
    x = randn(1, 10, D)
    x[0, [8, 1, 4]] *= 100.0
    out = AttentionPrune(0.3)(x)
    assert AttentionPrune(0.3).out_tokens(10, None) == 3  # ceil(0.3 * 10) despite float noise
    assert out.index.tolist() == [[1, 4, 8]]
    full, ident = AttentionPrune(1.0)(x, attention=randn(1, 10).abs()), Identity()(x)
    assert torch.equal(full.tokens, ident.tokens) and torch.equal(full.index, ident.index)


@pytest.mark.parametrize("n,grid,s", [(16, (4, 4), 2), (24, (4, 6), 2), (10, None, 2), (15, (3, 5), 2),
                                      (24, (4, 6), 3)])
def test_conv_untrained_equals_avg_pool(n, grid, s):
    x = randn(2, n, D)
    conv = build({"type": "conv", "stride": s, "dim": D})
    torch.testing.assert_close(conv(x, grid=grid).tokens, AvgPool(s)(x, grid=grid).tokens, rtol=0, atol=1e-6)


def test_vispec_fuse_is_identity_untrained():
    v = build(CONFIGS["vispec"])
    h = randn(2, 5, D, seed=3)
    g = v(randn(2, 16, D), grid=(4, 4)).global_vec
    assert torch.equal(v.fuse(h, g), h)
    with torch.no_grad():
        v.gate.fill_(0.5)
    assert not torch.allclose(v.fuse(h, g), h)


@pytest.mark.parametrize("name", LEARNABLE)
def test_gradients_reach_every_parameter(name):
    c = build(CONFIGS[name])
    if name == "vispec":  # at gate = 0 only the gate itself gets a gradient through fuse; open it a little
        with torch.no_grad():
            c.gate.fill_(0.3)
    x = randn(2, 24, D)
    out = c(x, grid=(4, 6))
    loss = (out.tokens * randn(*out.tokens.shape, seed=2)).sum()
    if name == "vispec":
        loss = loss + (c.fuse(randn(2, 3, D, seed=4), out.global_vec) * randn(2, 3, D, seed=6)).sum()
    loss.backward()
    for pname, p in c.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


def test_vispec_gate_gets_gradient_at_init():
    v = build(CONFIGS["vispec"])
    out = v(randn(1, 16, D), grid=(4, 4))
    (v.fuse(randn(1, 3, D, seed=1), out.global_vec) * randn(1, 3, D, seed=2)).sum().backward()
    assert v.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_independence(name):
    c = build(CONFIGS[name])
    x, att = randn(3, 24, D), randn(3, 24, seed=1).abs()
    if name == "elastic":
        att = None  # the elastic choice is per call; with attention, other rows may change it (documented)
    out = c(x, grid=(4, 6), attention=att)
    x2 = x.clone()
    x2[1:] = randn(2, 24, D, seed=9)
    att2 = None if att is None else torch.cat([att[:1], randn(2, 24, seed=8).abs()])
    out2 = c(x2, grid=(4, 6), attention=att2)
    single = c(x[:1], grid=(4, 6), attention=None if att is None else att[:1])
    for other in (out2, single):
        torch.testing.assert_close(other.tokens[0], out.tokens[0], rtol=0, atol=1e-6)
        if out.index is not None:
            assert torch.equal(other.index[0], out.index[0])
        if out.global_vec is not None:
            torch.testing.assert_close(other.global_vec[0], out.global_vec[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [*CONFIGS, "elastic_conv"])
def test_config_round_trip_and_state_dict(name):
    cfg = CONFIGS.get(name) or {"type": "elastic", "min_tokens": 2, "threshold": 0.4, "top_fraction": 0.2,
                                "compressors": [{"type": "conv", "stride": 2, "dim": D}]}
    c = build(cfg, seed=0)
    perturb(c)
    c2 = build(json.loads(json.dumps(c.config())), seed=1)
    assert type(c2) is type(c) and c2.config() == c.config()
    x = randn(2, 16, D)
    if name in LEARNABLE or name == "elastic_conv":
        assert not torch.equal(c2(x, grid=(4, 4)).tokens, c(x, grid=(4, 4)).tokens)
    c2.load_state_dict(c.state_dict())
    a, b = c(x, grid=(4, 4)), c2(x, grid=(4, 4))
    assert torch.equal(a.tokens, b.tokens)
    if name == "vispec":
        assert torch.equal(a.global_vec, b.global_vec)
        h = randn(2, 3, D)
        assert torch.equal(c.fuse(h, a.global_vec), c2.fuse(h, b.global_vec))


def test_elastic_prunes_peaked_attention_and_pools_flat_attention():
    e = Elastic([AttentionPrune(0.25), AvgPool(2)])
    x = randn(2, 16, D)
    flat = torch.ones(2, 16)
    peaked = torch.full((2, 16), 1e-3)
    peaked[:, [3, 10]] = 1.0
    out = e(x, grid=(4, 4), attention=peaked)
    assert (out.choice, out.method) == (0, "attention_prune")
    assert {3, 10} <= set(out.index[0].tolist())
    out = e(x, grid=(4, 4), attention=flat)
    assert (out.choice, out.method) == (1, "avg_pool")
    assert torch.equal(out.tokens, AvgPool(2)(x, grid=(4, 4)).tokens)
    mixed = torch.stack([peaked[0], flat[0]])  # one diffuse row makes the batch diffuse
    assert e(x, grid=(4, 4), attention=mixed).method == "avg_pool"


def test_elastic_token_budget():
    e = Elastic([AvgPool(4), AttentionPrune(0.5), AvgPool(2)], min_tokens=2)  # 1, 8 and 4 tokens on 4x4
    flat, peaked = torch.ones(1, 16), torch.eye(16)[:1] + 1e-4
    assert e.choose(16, (4, 4), flat) == 2 and e.out_tokens(16, (4, 4), attention=flat) == 4
    assert e.choose(16, (4, 4), peaked) == 1 and e.out_tokens(16, (4, 4), attention=peaked) == 8
    assert e.choose(16, (4, 4)) == 2  # no attention: cheapest within budget
    big = Elastic([AvgPool(4), AttentionPrune(0.5), AvgPool(2)], min_tokens=100)
    assert big.choose(16, (4, 4)) == 1  # nothing fits: the most tokens


@pytest.mark.parametrize("cfg,needle", [
    ({"type": "nope"}, "'nope'"),
    ("avg_pool", "'avg_pool'"),
    ({"type": "avg_pool", "stride": 0}, "stride=0"),
    ({"type": "conv", "stride": -1, "dim": D}, "stride=-1"),
    ({"type": "attention_prune", "keep_ratio": 0.0}, "keep_ratio=0.0"),
    ({"type": "attention_prune", "keep_ratio": 1.5}, "keep_ratio=1.5"),
    ({"type": "attention_prune", "keep_ratio": "half"}, "keep_ratio='half'"),
    ({"type": "resampler", "n_queries": 2, "dim": D, "heads": 3}, "heads=3"),
    ({"type": "vispec", "n_queries": 0, "dim": D, "heads": 2}, "n_queries=0"),
    ({"type": "avg_pool", "strid": 2}, "strid"),
    ({"type": "elastic", "compressors": []}, "compressors"),
    ({"type": "elastic", "compressors": [{"type": "bogus"}]}, "'bogus'"),
    ({"type": "elastic", "threshold": 2.0}, "threshold=2.0"),
])
def test_bad_config_raises_typed_error(cfg, needle):
    with pytest.raises(InvalidInputError, match="expected|valid") as info:
        build_compressor(cfg)
    assert needle in str(info.value)


@pytest.mark.parametrize("name", CONFIGS)
def test_grid_that_does_not_match_n_raises(name):
    c = build(CONFIGS[name])
    with pytest.raises(InvalidInputError, match=r"grid=\(3, 3\).*N=16"):
        c(randn(1, 16, D), grid=(3, 3))
    with pytest.raises(InvalidInputError, match=r"grid=\(3, 3\)"):
        c.out_tokens(16, (3, 3))


def test_bad_inputs_raise_typed_errors():
    x = randn(2, 16, D)
    with pytest.raises(InvalidInputError, match=r"feats has shape \(16, 8\)"):
        AvgPool(2)(x[0])
    with pytest.raises(InvalidInputError, match=r"attention has shape \(2, 15\)"):
        AttentionPrune(0.5)(x, attention=torch.ones(2, 15))
    with pytest.raises(InvalidInputError, match="dim=4"):
        build({"type": "conv", "stride": 2, "dim": 4})(x, grid=(4, 4))
    with pytest.raises(InvalidInputError, match="non-negative"):
        Elastic()(x, attention=-torch.ones(2, 16))
    with pytest.raises(DeviceMismatchError, match="float64"):
        Conv(2, D)(x.double(), grid=(4, 4))
    v = build(CONFIGS["vispec"])
    with pytest.raises(InvalidInputError, match="fuse"):
        v.fuse(randn(2, 3, D), randn(3, D))
