"""LlamaGen GPT: cache / tree-mask exactness, CFG, the plain AR sampler, checkpoints, typed errors (tiny, fp32, CPU)."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from image_ar.models import LlamaGen, LlamaGenConfig, cfg_logits, generate_tokens
from mmspec.cache import BufferCache
from image_ar.models.llamagen import infer_config
from image_ar.testing import tiny_llamagen
from mmspec.errors import (
    CheckpointError,
    ContextOverflowError,
    GenerationConfigError,
    InvalidInputError,
    UnsupportedModelError,
)

ATOL, RTOL = 1e-5, 1e-5  # logits of the widened tiny models are O(10): allow float32 rounding of the sum order


@pytest.fixture(scope="module")
def c2i():
    return tiny_llamagen(seed=0)


@pytest.fixture(scope="module")
def t2i():
    return tiny_llamagen(seed=3, model_type="t2i")


def make_cond(model, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if cfg.model_type == "c2i":
        return torch.randint(0, cfg.num_classes, (b,), generator=g)
    return torch.randn(b, cfg.cls_token_num, cfg.caption_dim, generator=g)


def tokens(model, b, t, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def last_logits(model, cond, idx):
    """No-cache reference: one forward over prefix + idx, logits and hidden of the last position."""
    out = model(idx, cond)
    return out.logits[:, -1], out.hidden[:, -1]


# --- cache and masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_incremental_decoding_equals_full_forward(kind, c2i, t2i):
    model = c2i if kind == "c2i" else t2i
    cond, idx = make_cond(model, 2), tokens(model, 2, model.config.num_image_tokens - 1)
    full = model(idx, cond)  # (B, P + T, V)
    p = model.config.cls_token_num
    cache = model.new_cache()
    out = model(None, cond, cache=cache)
    torch.testing.assert_close(out.logits, full.logits[:, :p], atol=ATOL, rtol=RTOL)
    out = model(idx[:, :3], cache=cache)  # a chunk, then one token at a time
    torch.testing.assert_close(out.logits, full.logits[:, p:p + 3], atol=ATOL, rtol=RTOL)
    for i in range(3, idx.shape[1]):
        out = model(idx[:, i:i + 1], input_pos=torch.tensor([p + i]), cache=cache)
        torch.testing.assert_close(out.logits[:, 0], full.logits[:, p + i], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.hidden[:, 0], full.hidden[:, p + i], atol=ATOL, rtol=RTOL)
    assert cache.length == full.logits.shape[1]


# node tokens are per row; parents: two roots, node 2 and 3 under node 0, node 4 under node 2
PARENTS = [-1, -1, 0, 0, 2]


def tree_inputs(parents, prefix_len, b):
    """(mask (B, 1, N, prefix + N), positions (B, N), paths) of a token tree hung after prefix_len slots."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    depth = [0] * n
    for i, par in enumerate(parents):
        if par >= 0:
            anc[i] |= anc[par]
            depth[i] = depth[par] + 1
    mask = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool), anc], dim=1).expand(b, 1, n, prefix_len + n)
    pos = (prefix_len + torch.tensor(depth)).expand(b, n)
    paths = [[j for j in range(i + 1) if anc[i, j]] for i in range(n)]
    return mask, pos, paths


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_tree_mask_gives_each_node_its_path_logits(kind, c2i, t2i):
    model = c2i if kind == "c2i" else t2i
    b, cond, prefix = 2, make_cond(model, 2), tokens(model, 2, 3)
    cache = model.new_cache()
    model(prefix, cond, cache=cache)
    start = cache.length
    nodes = tokens(model, b, len(PARENTS), seed=5)
    mask, pos, paths = tree_inputs(PARENTS, start, b)
    out = model(nodes, input_pos=pos, cache=cache, mask=mask)
    for i, path in enumerate(paths):
        ref_logits, ref_hidden = last_logits(model, cond, torch.cat([prefix, nodes[:, path]], dim=1))
        torch.testing.assert_close(out.logits[:, i], ref_logits, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.hidden[:, i], ref_hidden, atol=ATOL, rtol=RTOL)


def test_cache_compact_crop_gather_and_rows(c2i):
    model, b = c2i, 2
    cond, prefix = make_cond(model, b), tokens(model, b, 3)
    cache = model.new_cache(capacity=4)  # small: forces the buffers to grow
    model(prefix, cond, cache=cache)
    start = cache.length
    nodes = tokens(model, b, len(PARENTS), seed=5)
    mask, pos, _ = tree_inputs(PARENTS, start, b)
    model(nodes, input_pos=pos, cache=cache, mask=mask)
    # row 0 accepts the path 0 -> 2 -> 4, row 1 the path 1 (padded with a hole the mask hides)
    cache.compact(start, torch.tensor([[start, start + 2, start + 4], [start + 1, start + 1, start + 1]]))
    assert cache.length == start + 3
    nxt = tokens(model, b, 1, seed=9)
    key_ok = torch.ones(b, 1, 1, start + 4, dtype=torch.bool)
    key_ok[1, :, :, start + 1:start + 3] = False  # row 1's two hole slots
    out = model(nxt, input_pos=torch.tensor([[start + 3], [start + 1]]), cache=cache, mask=key_ok)
    ref0, _ = last_logits(model, cond[:1], torch.cat([prefix[:1], nodes[:1, [0, 2, 4]], nxt[:1]], dim=1))
    ref1, _ = last_logits(model, cond[1:], torch.cat([prefix[1:], nodes[1:, [1]], nxt[1:]], dim=1))
    torch.testing.assert_close(out.logits[:, 0], torch.cat([ref0, ref1]), atol=ATOL, rtol=RTOL)

    cache.crop(start)  # drop everything after the prefix, then decode a chain
    chain = tokens(model, b, 2, seed=11)
    out = model(chain, cache=cache)
    ref, _ = last_logits(model, cond, torch.cat([prefix, chain], dim=1))
    torch.testing.assert_close(out.logits[:, -1], ref, atol=ATOL, rtol=RTOL)

    cache.gather(torch.arange(start))  # shared index: back to the prefix
    cache.select_rows([1])
    out = model(chain[1:, :1], cache=cache)
    ref, _ = last_logits(model, cond[1:], torch.cat([prefix[1:], chain[1:, :1]], dim=1))
    torch.testing.assert_close(out.logits[:, -1], ref, atol=ATOL, rtol=RTOL)
    with pytest.raises(InvalidInputError):
        cache.compact(0, torch.tensor([cache.length]))
    with pytest.raises(InvalidInputError):
        cache.crop(cache.length + 1)


def test_failed_forward_leaves_cache_unchanged(c2i):
    cache = c2i.new_cache()
    c2i(None, make_cond(c2i, 1), cache=cache)
    with pytest.raises(InvalidInputError):
        c2i(tokens(c2i, 1, 2), cache=cache, mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))  # S must be 3
    assert cache.length == 1


# --- conditioning and CFG -------------------------------------------------------------------------------------------
def test_cfg_combination_matches_manual(c2i):
    cond, idx, s = make_cond(c2i, 2), tokens(c2i, 2, 5), 3.5
    both = c2i(torch.cat([idx, idx]), torch.cat([cond, c2i.null_cond(2)])).logits  # (2B, T, V)
    c, u = c2i(idx, cond).logits, c2i(idx, c2i.null_cond(2)).logits
    torch.testing.assert_close(cfg_logits(both, s), u + s * (c - u), atol=ATOL, rtol=RTOL)


def test_cond_drop_uses_the_null_condition(c2i, t2i):
    for model in (c2i, t2i):
        cond, idx = make_cond(model, 2), tokens(model, 2, 3)
        drop = torch.tensor([True, False])
        out = model(idx, cond, cond_drop=drop).logits
        torch.testing.assert_close(out[0], model(idx[:1], model.null_cond(1)).logits[0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out[1], model(idx[1:], cond[1:]).logits[0], atol=ATOL, rtol=RTOL)
    drop = c2i.sample_cond_drop(1000, torch.Generator().manual_seed(0))
    assert 50 < int(drop.sum()) < 150  # class_dropout_prob = 0.1


def naive_generate(model, cond, n, scale):
    """Greedy plain AR with CFG and no cache at all: the definition generate_tokens must reproduce."""
    out = torch.zeros(len(cond), 0, dtype=torch.long)
    for _ in range(n):
        c = model(out, cond).logits[:, -1] if out.shape[1] else model(None, cond).logits[:, -1]
        if scale != 1.0:
            null = model.null_cond(len(cond))
            u = model(out, null).logits[:, -1] if out.shape[1] else model(None, null).logits[:, -1]
            c = u + scale * (c - u)
        out = torch.cat([out, c.argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("kind,scale", [("c2i", 1.0), ("c2i", 4.0), ("t2i", 2.0)])
def test_generate_greedy_matches_naive_and_is_diverse(kind, scale, c2i, t2i):
    model = c2i if kind == "c2i" else t2i
    cond = make_cond(model, 3)
    toks = generate_tokens(model, cond, guidance_scale=scale, temperature=0)
    assert toks.shape == (3, model.config.num_image_tokens) and toks.dtype == torch.long
    assert torch.equal(toks, naive_generate(model, cond, model.config.num_image_tokens, scale))
    assert torch.equal(toks, generate_tokens(model, cond, guidance_scale=scale, temperature=0))
    for row in toks:  # not one repeated token: the equality above is not vacuous
        assert len(set(row.tolist())) >= 6


def test_generate_sampling_is_seeded_and_top_k_1_is_greedy(c2i):
    cond = make_cond(c2i, 2)

    def run(seed, **kw):
        return generate_tokens(c2i, cond, guidance_scale=2.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(0, top_p=0.9, top_k=20, temperature=0.7), run(0, top_p=0.9, top_k=20, temperature=0.7))
    greedy = generate_tokens(c2i, cond, guidance_scale=2.0, temperature=0)
    assert torch.equal(run(3, top_k=1), greedy)
    # one generator per row: row 0 of a batch draws what a batch of one draws with the same generator
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    both = generate_tokens(c2i, cond, guidance_scale=2.0, generator=gens)
    one = generate_tokens(c2i, cond[:1], guidance_scale=2.0, generator=[torch.Generator().manual_seed(7)])
    assert torch.equal(both[:1], one)
    assert generate_tokens(c2i, cond, num_tokens=5, temperature=0).shape == (2, 5)


def test_t2i_caption_mask(t2i):
    cond = make_cond(t2i, 2)
    full = torch.ones(2, t2i.config.cls_token_num, dtype=torch.bool)
    plain = generate_tokens(t2i, cond, guidance_scale=2.0, temperature=0, num_tokens=6)
    assert torch.equal(generate_tokens(t2i, cond, guidance_scale=2.0, temperature=0, num_tokens=6, cond_mask=full),
                       plain)
    padded = full.clone()
    padded[:, 0] = False  # a left-padded caption: the pad slot is hidden from every later query
    other = cond.clone()
    other[:, 0] = torch.randn(2, t2i.config.caption_dim, generator=torch.Generator().manual_seed(3))

    def run(c, m):
        return generate_tokens(t2i, c, guidance_scale=1.0, temperature=0, num_tokens=6, cond_mask=m)

    assert torch.equal(run(cond, padded), run(other, padded))  # what sits in a hidden slot does not matter
    assert not torch.equal(run(cond, None), run(other, None))
    with pytest.raises(InvalidInputError, match="cond_mask"):
        run(cond, full[:, 1:])


# --- bad inputs -----------------------------------------------------------------------------------------------------
def test_class_labels_and_guidance_errors(c2i, t2i):
    with pytest.raises(InvalidInputError, match="out of range"):
        c2i.check_class_labels(torch.tensor([0, 10]))
    with pytest.raises(InvalidInputError, match="out of range"):
        generate_tokens(c2i, torch.tensor([10]), temperature=0)  # 10 is the null class, not a user label
    with pytest.raises(InvalidInputError):
        c2i.check_class_labels(torch.tensor([1.5]))
    with pytest.raises(InvalidInputError, match="out of range"):
        c2i(None, torch.tensor([-1]))
    no_null = tiny_llamagen(class_dropout_prob=0.0)
    with pytest.raises(UnsupportedModelError, match="null class"):
        no_null.null_cond(2)
    with pytest.raises(UnsupportedModelError, match="guidance_scale=1.0"):
        generate_tokens(no_null, torch.tensor([1]), guidance_scale=4.0)
    generate_tokens(no_null, torch.tensor([1]), num_tokens=2, temperature=0)  # no guidance: fine
    with pytest.raises(UnsupportedModelError):
        t2i.check_class_labels(torch.tensor([1]))
    with pytest.raises(InvalidInputError, match="caption embeddings"):
        t2i(None, torch.randn(1, 2, t2i.config.caption_dim))


def test_bad_tokens_positions_masks_and_sampling_args(c2i):
    cond = make_cond(c2i, 1)
    with pytest.raises(InvalidInputError, match="codebook"):
        c2i(torch.tensor([[64]]), cond)
    with pytest.raises(ContextOverflowError):
        c2i(torch.tensor([[1]]), input_pos=torch.tensor([c2i.config.max_seq_len]))
    with pytest.raises(InvalidInputError, match="mask"):
        c2i(torch.tensor([[1, 2]]), cond, mask=torch.ones(1, 1, 3, 3))  # not bool
    with pytest.raises(InvalidInputError):
        c2i()
    with pytest.raises(ContextOverflowError):
        generate_tokens(c2i, cond, num_tokens=c2i.config.num_image_tokens + 1)
    with pytest.raises(GenerationConfigError):
        generate_tokens(c2i, cond, temperature=-1.0)
    with pytest.raises(GenerationConfigError):
        generate_tokens(c2i, cond, top_p=0.0)
    with pytest.raises(InvalidInputError):
        LlamaGenConfig(dim=30, n_head=3)  # head size not a multiple of 4
    with pytest.raises(InvalidInputError):
        LlamaGenConfig(model_type="i2i")


# --- checkpoints ----------------------------------------------------------------------------------------------------
def assert_same_model(a, b, same_config=True):
    cond, idx = make_cond(a, 2), tokens(a, 2, 6)
    assert torch.equal(a(idx, cond).logits, b(idx, cond).logits)
    assert a.config.max_seq_len == b.config.max_seq_len and a.config.hidden_dim == b.config.hidden_dim
    if same_config:
        assert a.config == b.config


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_save_pretrained_round_trip(kind, c2i, t2i, tmp_path):
    model = c2i if kind == "c2i" else t2i
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    loaded = LlamaGen.from_pretrained(tmp_path / "m")
    assert_same_model(model, loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


@pytest.mark.parametrize("wrap", ["model", "module", "state_dict", None])
def test_reference_checkpoint_loads_to_identical_outputs(wrap, c2i, tmp_path):
    state = {f"module.{k}" if wrap == "module" else k: v for k, v in c2i.state_dict().items()}
    state["freqs_cis"] = torch.zeros(17, 8, 2)  # the reference's RoPE table: ignored
    obj = state if wrap is None else {wrap: state, "steps": 100, "optimizer": {"lr": torch.tensor(1e-4)}}
    path = tmp_path / "c2i_tiny.pt"
    torch.save(obj, path)
    cfg = c2i.config
    inferred = LlamaGen.from_pretrained(path, n_head=cfg.n_head, grid_size=cfg.grid_size, multiple_of=16)
    assert_same_model(c2i, inferred, same_config=False)
    assert (inferred.config.num_classes, inferred.config.n_kv_head) == (cfg.num_classes, cfg.n_kv_head)
    assert_same_model(c2i, LlamaGen.from_pretrained(path, config=cfg))


def test_reference_t2i_checkpoint_and_safetensors_file(t2i, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t2i.safetensors"
    save_file({k: v.contiguous() for k, v in t2i.state_dict().items()}, str(path))
    cfg = t2i.config
    loaded = LlamaGen.from_pretrained(path, n_head=cfg.n_head, grid_size=cfg.grid_size, multiple_of=16,
                                      num_classes=cfg.num_classes)
    assert_same_model(t2i, loaded, same_config=False)
    assert (loaded.config.model_type, loaded.config.cls_token_num) == ("t2i", cfg.cls_token_num)


def test_config_inference_uses_presets():
    def fake(dim, n_layer, vocab=16384, rows=1001):
        meta = {"tok_embeddings.weight": torch.empty(vocab, dim, device="meta"),
                "cls_embedding.embedding_table.weight": torch.empty(rows, dim, device="meta"),
                "layers.0.attention.wqkv.weight": torch.empty(3 * dim, dim, device="meta"),
                "layers.0.feed_forward.w1.weight": torch.empty(int(8 * dim / 3) // 256 * 256 + 256, dim,
                                                               device="meta")}
        meta.update({f"layers.{i}.ffn_norm.weight": torch.empty(dim, device="meta") for i in range(n_layer)})
        return meta

    cfg = infer_config(fake(1024, 24), "x.pt")
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.num_classes, cfg.vocab_size) == (1024, 24, 16, 1000, 16384)
    assert cfg.n_kv_head is None and cfg.hidden_dim == LlamaGenConfig.preset("GPT-L").hidden_dim
    assert infer_config(fake(768, 12), "x.pt").n_head == 12
    assert infer_config(fake(1280, 36), "x.pt", grid_size=24).grid_size == 24
    with pytest.raises(CheckpointError, match="n_head"):
        infer_config(fake(96, 3), "x.pt")
    assert LlamaGenConfig.preset("GPT-XL").n_head == 20


def test_checkpoint_errors_are_typed_and_name_the_file(c2i, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LlamaGen.from_pretrained(tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        LlamaGen.from_pretrained(bad, config=c2i.config)
    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": {"foo": torch.zeros(2)}}, unknown)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        LlamaGen.from_pretrained(unknown, config=c2i.config)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": c2i.state_dict(), "hook": pathlib.PurePosixPath("x")}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt"):
        LlamaGen.from_pretrained(unsafe, config=c2i.config)

    c2i.save_pretrained(tmp_path / "m")
    wrong = dataclasses.replace(c2i.config, vocab_size=65)
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight.*\(64, 64\).*\(65, 64\)"):
        LlamaGen.from_pretrained(tmp_path / "m", config=wrong)
    with pytest.raises(CheckpointError, match="missing"):
        LlamaGen.from_pretrained(tmp_path / "m", config=dataclasses.replace(c2i.config, n_layer=3))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LlamaGen.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        LlamaGen.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"kind": "something.else"}))
    with pytest.raises(CheckpointError, match="config"):
        LlamaGen.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        LlamaGen.from_pretrained(tmp_path / "m")


def test_kv_cache_standalone_shapes():
    cache = BufferCache(n_layer=1)
    k = torch.randn(2, 3, 4, 5)
    keys, values = cache.update(0, k, k + 1)
    assert keys.shape == (2, 3, 4, 5) and cache.length == 0  # committed only by advance
    cache.advance(4)
    cache.gather(torch.tensor([[3, 1], [0, 2]]))  # per-row slots
    assert cache.length == 2
    assert torch.equal(cache.keys[0][0, :, :2], k[0, :, [3, 1]])
    assert torch.equal(cache.values[0][1, :, :2], k[1, :, [0, 2]] + 1)
