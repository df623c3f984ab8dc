"""DREAM's head and every feature drafter x every compressor: lossless on LLaVA and Qwen2-VL; the attention-driven
compressors read the target's real last-layer attention; ViSpec's global vector reaches the text features.

Untrained heads accept little, so these tests are about the output (which must be the target's whatever the head
does) and about what each piece feeds where; the gates of DREAM's cross-attention and ViSpec's fusion are opened
(nonzero) so those branches change the drafts rather than sitting at their identity initialisation.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from mmspec import SpeculativeDecoder
from mmspec.errors import CheckpointError, InvalidInputError
from mmspec.tree import DynamicTree, StaticTree
from vision import SpeculativeVLM
from vision.attention_probe import AttentionProbe, attention_weights, decoder_layers, last_query_mass, query_entropy
from vision.compressors import build_compressor
from vision.drafters import DreamDrafter, DreamHead, EagleDrafter, EagleHead
from vision.prompts import build_request
from vlm_cases import MAX_NEW, family, image, references, rows

SHAPES = {"chain3": 3, "tree221": StaticTree.full((2, 2, 1)), "eagle2": DynamicTree(topk=3, depth=3, total=8)}


def opened(head: DreamHead, value: float = 0.7) -> DreamHead:
    cross = head.body.layers[head.cross_index]
    with torch.no_grad():
        cross.attn_gate.fill_(value)
        cross.mlp_gate.fill_(value)
    return head


@pytest.mark.parametrize("shape", list(SHAPES))
def test_dream_on_a_causal_lm_matches_generate(target, prompts, reference, shape):
    torch.manual_seed(0)
    dec = SpeculativeDecoder(target, DreamDrafter(opened(DreamHead(target)), SHAPES[shape]))
    assert dec.generate([prompts[0]], max_new_tokens=24).sequences == [reference[0]]
    assert dec.generate(prompts[:6], max_new_tokens=24).sequences == reference[:6]


def test_cross_attention_is_gated_identity_at_init_and_reads_the_features(target):
    torch.manual_seed(0)
    head = DreamHead(target)
    ids = torch.randint(0, 96, (2, 7), device=DEVICE)
    feats = torch.randn(2, 7, head.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        out = head(ids, feats, use_cache=False)
        x = head.fc(torch.cat([head.get_input_embeddings()(ids), feats], -1)) if hasattr(head, "get_input_embeddings") \
            else head.fc(torch.cat([target.get_input_embeddings()(ids), feats], -1))
        pos = torch.arange(7, device=DEVICE)[None].expand(2, 7)
        rope = head.body.rotary_emb(x, position_ids=pos)
        first = head.body.layers[0](x, position_embeddings=rope, position_ids=pos)
        torch.testing.assert_close(out.cross_hidden, first)  # tanh(0) = 0: the block passes h through
        opened(head)
        a = head(ids, feats, use_cache=False).cross_hidden
        b = head(ids, feats + 1.0, use_cache=False).cross_hidden  # same tokens, other features
    assert (a - b).abs().max() > 1e-3  # open gates: the block reads the feature stream
    assert (a[:, :3] - head(ids[:, :3], feats[:, :3], use_cache=False).cross_hidden).abs().max() < 1e-5  # causal


def test_dream_checkpoint_round_trip_and_kind_check(target, prompts, reference, tmp_path):
    torch.manual_seed(0)
    head = opened(DreamHead(target))
    path = head.save_pretrained(tmp_path / "dream")
    again = DreamHead.from_pretrained(path, target)
    ids = torch.tensor([[3, 4, 5]], device=DEVICE)
    feats = torch.randn(1, 3, head.config.hidden_size, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, feats).logits, head(ids, feats).logits)
    with pytest.raises(CheckpointError, match="mmspec.eagle"):
        EagleHead.from_pretrained(path, target)  # a DREAM checkpoint is not an EAGLE one
    with pytest.raises(InvalidInputError, match="layers"):
        DreamHead(target, layers=2)
    with pytest.raises(InvalidInputError, match="DreamHead"):
        DreamDrafter(EagleHead(target))


DRAFTERS = ["eagle1", "eagle3", "msd", "dream"]
COMPRESSORS = ["none", "avg_pool", "attention_prune", "conv", "resampler", "vispec", "elastic"]


def make_drafter(kind: str, compressor: str, model) -> EagleDrafter:
    h = model.config.get_text_config().hidden_size
    cfg = {"none": None, "avg_pool": {"type": "avg_pool", "stride": 2},
           "attention_prune": {"type": "attention_prune", "keep_ratio": 0.5},
           "conv": {"type": "conv", "dim": h, "stride": 2},
           "resampler": {"type": "resampler", "dim": h, "n_queries": 4, "heads": 4},
           "vispec": {"type": "vispec", "dim": h, "n_queries": 4, "heads": 4},
           "elastic": {"type": "elastic", "min_tokens": 2, "compressors": [
               {"type": "attention_prune", "keep_ratio": 0.25}, {"type": "avg_pool", "stride": 2}]}}[compressor]
    torch.manual_seed(0)
    comp = build_compressor(cfg).to(DEVICE) if cfg else None
    if compressor == "vispec":
        with torch.no_grad():
            comp.gate.fill_(0.5)  # fuse the global vector for real
    image_id = model.config.image_token_id
    head = {"eagle1": lambda: EagleHead(model), "eagle3": lambda: EagleHead(model, taps=(1, 2)),
            "msd": lambda: EagleHead(model, image_token_id=image_id),
            "dream": lambda: opened(DreamHead(model))}[kind]()
    cls = DreamDrafter if kind == "dream" else EagleDrafter
    return cls(head, DynamicTree(topk=3, depth=3, total=8), compressor=comp)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("kind", DRAFTERS)
def test_every_drafter_with_every_compressor_is_lossless(kind, compressor, name):
    t = family(name)
    drafter = make_drafter(kind, compressor, t.model)
    svlm = SpeculativeVLM(t.model, t.processor, drafter)
    batch = rows(name)  # different images and lengths; Qwen2-VL's third row has no image
    out = svlm.generate(prompt=[r["prompt"] for r in batch], images=[r["images"] for r in batch],
                        max_new_tokens=MAX_NEW)
    assert out.sequences == [list(r) for r in references(name)]
    with_image = [i for i, r in enumerate(batch) if r["images"]]
    prompt_len = [len(build_request(t.processor, **r)[0].input_ids) for r in batch]
    shorter = [drafter.prompt_slots[i] < prompt_len[i] for i in with_image]
    assert all(shorter) == (compressor != "none"), (drafter.prompt_slots, prompt_len)


def test_attention_prune_keeps_the_image_tokens_the_target_attends_to():
    """The pruned view keeps exactly the top image tokens by the target's last-layer attention from the last
    prompt token (recomputed here with eager attention), not a proxy."""
    t = family("llava")
    drafter = make_drafter("eagle1", "attention_prune", t.model)
    seen = []
    original = drafter.compressor.forward
    drafter.compressor.forward = lambda feats, **kw: (seen.append(kw["attention"]), original(feats, **kw))[1]
    svlm = SpeculativeVLM(t.model, t.processor, drafter)
    row = {"prompt": "describe the image", "images": [image(93, "llava")]}
    svlm.generate(**row, max_new_tokens=4)
    req = build_request(t.processor, **row)[0]
    ids = torch.tensor([req.input_ids], device=DEVICE)
    t.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = t.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                          **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in req.inputs.items()})
    finally:
        t.model.set_attn_implementation("sdpa")
    mass = out.attentions[-1][0, :, -1].sum(0)  # (T,) last layer, last query, summed over heads
    where = (ids[0] == drafter.image_token_id).nonzero().flatten()
    assert len(seen) == 1 and seen[0] is not None
    torch.testing.assert_close(seen[0][0].float(), mass[where].float(), atol=1e-5, rtol=1e-4)


def test_attention_probe_matches_eager_attentions():
    t = family("qwen2_vl")
    req = build_request(t.processor, images=[image(94, "qwen2_vl")], prompt="describe the image")[0]
    ids = torch.tensor([req.input_ids], device=DEVICE)
    inputs = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in req.inputs.items()}
    n = len(decoder_layers(t.model))
    with torch.no_grad(), AttentionProbe(t.model, list(range(n)), query_entropy) as probe:
        plain = t.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
    t.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = t.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, **inputs)
    finally:
        t.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(plain, ref.logits, atol=1e-4, rtol=0)  # the probe leaves the output alone
    for i, att in enumerate(ref.attentions[-n:]):
        torch.testing.assert_close(probe.records[i][0], query_entropy(att.float()), atol=1e-4, rtol=0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4)
    w = attention_weights(q, k, None, None)  # causal, the queries being the last 3 of 5 keys
    assert torch.all(w[..., 0, 3:] == 0) and torch.all(w[..., 1, 4:] == 0) and torch.allclose(w.sum(-1), torch.ones(1))
    assert last_query_mass(w).shape == (1, 5)


def test_vispec_global_vector_reaches_the_text_after_the_image():
    t = family("llava")
    drafter = make_drafter("eagle1", "vispec", t.model)
    svlm = SpeculativeVLM(t.model, t.processor, drafter)
    row = {"prompt": "describe the image", "images": [image(95, "llava")]}
    svlm.generate(**row, max_new_tokens=4)
    g = drafter.global_vecs[0]
    assert g is not None and g.shape == (t.model.config.get_text_config().hidden_size,)
    req = build_request(t.processor, **row)[0]
    ids = req.input_ids
    last_image = max(i for i, x in enumerate(ids) if x == drafter.image_token_id)
    with torch.no_grad():
        hidden = t.model(input_ids=torch.tensor([ids], device=DEVICE), output_hidden_states=True,
                         **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in req.inputs.items()}
                         ).hidden_states[-1][0]
        tokens, feats, g2 = drafter._view(ids[1:], hidden[:-1])
    text_after = feats[-(len(ids) - 1 - last_image):]  # pairs whose token comes after the image
    raw = hidden[last_image: len(ids) - 1]
    torch.testing.assert_close(text_after, drafter._fuse(raw, g2))
    assert (text_after - raw).abs().max() > 1e-4  # the fusion changed them
