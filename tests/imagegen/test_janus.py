"""JanusImageTarget: speculative image generation equals Janus's own generate(generation_mode="image") (tiny, fp32, CPU).

The tiny Janus is built offline from configs (4x4 token grid over a 48-code VQ, 8x8 images); its decoder and
generation modules are widened so greedy outputs are diverse (ARCHITECTURE.md, Tests).
"""
from __future__ import annotations

import pytest
import torch
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

from image_ar.models.janus import JanusImageTarget
from mmspec.errors import (ContextOverflowError, EmptyPromptError, GenerationConfigError, InvalidInputError,
                           UnsupportedModelError)
from image_cases import ScriptedDrafter, reference_outputs, speculative
from mmspec.testing import tiny_llama, widen_
from mmspec.tree import Draft

BOS, BOI, PAD, HIDDEN = 1, 5, 0, 64
PROMPTS = [[1, 10, 11, 12, 13, 5], [1, 30, 31, 5]]  # different lengths: generate left-pads the batch


def tiny_janus(seed: int = 0, grid: int = 4, codes: int = 48) -> JanusForConditionalGeneration:
    text = LlamaConfig(vocab_size=100, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS,
                       eos_token_id=2, pad_token_id=PAD)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=4 * grid,
                               patch_size=4, projection_dim=HIDDEN, num_image_tokens=grid * grid, intermediate_size=64)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codes, latent_channels=32, base_channels=32,
                          channel_multiplier=(1, 1), num_res_blocks=1, projection_dim=HIDDEN,
                          image_token_embed_dim=HIDDEN, num_hidden_layers=2)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=99)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg)
    with torch.no_grad():
        inner = model.model
        for part in (inner.language_model, inner.generation_embeddings, inner.generation_aligner,
                     inner.generation_head):
            widen_(part, 0.2, seed)
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    return model.float().eval()


@pytest.fixture(scope="module")
def model():
    return tiny_janus()


@pytest.fixture(scope="module")
def target(model):
    return JanusImageTarget(model, guidance_scale=3.0)


@pytest.fixture(scope="module")
def refs(target):
    """The model's own greedy generate: each prompt alone and both in one left-padded batch."""
    return reference_outputs(target, PROMPTS)


def test_reference_is_diverse_and_batch_consistent(target, refs):
    assert target.grid == (4, 4) and target.num_image_tokens == 16 and target.max_positions == 17
    assert target.vocab_size == 48
    for seq in refs["single"]:
        assert len(seq) == 16 and len(set(seq)) >= 5  # a constant output would make equality vacuous
    assert refs["single"][0] != refs["single"][1]
    assert refs["batch"] == refs["single"]  # generate's left padding shifts positions only (RoPE-invariant)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["none", "random_chain", "random_tree", "oracle", "noisy"])
def test_greedy_equals_generate(target, refs, batch, kind):
    prompts = PROMPTS[:batch]
    expected = refs["batch"] if batch == 2 else refs["single"][:1]
    drafter = None if kind == "none" else ScriptedDrafter(
        expected, target.vocab_size, {"oracle": 1.0, "noisy": 0.6}.get(kind, 0.0), tree=kind == "random_tree",
        seed=batch)
    out = speculative(target, prompts, drafter)
    assert out.sequences == expected
    st = out.stats
    if kind == "none":
        assert st.target_forwards == target.num_image_tokens
    else:
        assert st.draft_tokens > 0
    if kind == "oracle":  # every draft accepted: far fewer target forwards than tokens
        assert st.accepted_tokens == st.draft_tokens > 0
        assert st.target_forwards < target.num_image_tokens // 2


def test_rows_leave_the_batch_at_different_steps(target, refs):
    """Request 0 drafts perfectly and finishes early; request 1 drafts randomly (select_rows on both row halves)."""
    drafter = ScriptedDrafter(refs["batch"], target.vocab_size, [1.0, 0.0], seed=5)
    out = speculative(target, PROMPTS, drafter)
    assert out.sequences == refs["batch"]
    assert out.finish_reasons == ["length", "length"]


def test_guidance_scale_is_a_live_attribute(model, refs):
    t = JanusImageTarget(model, guidance_scale=3.0)
    t.guidance_scale = 2.0
    expected = t.reference_generate(PROMPTS[:1]).tolist()
    assert expected != refs["single"][:1]
    assert speculative(t, PROMPTS[:1], ScriptedDrafter(expected, t.vocab_size, 0.6)).sequences == expected


def full_forward_logits(model, prompt, image_tokens, scale):
    """No cache, no engine: guided generation-head logits predicting every image position, as generate combines."""
    inner = model.model

    def row(ids):
        emb = torch.cat([model.get_input_embeddings()(torch.tensor([ids])),
                         model.prepare_embeddings_for_image_generation(torch.tensor([image_tokens[:-1]]))], dim=1)
        h = inner.language_model(inputs_embeds=emb).last_hidden_state[0, len(ids) - 1:]
        return inner.generation_head(h)  # (N, V)

    cond = row(prompt)
    if scale == 1:
        return cond
    uncond = row([t if t in (BOS, BOI) else PAD for t in prompt])
    return uncond + (cond - uncond) * scale


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.5])
@torch.inference_mode()
def test_logits_equal_a_full_forward(model, refs, scale):
    """prefill + one verify of the whole reference sequence give the guided logits of every position."""
    t = JanusImageTarget(model, guidance_scale=scale)
    seq = refs["single"][0]
    pre = t.prefill(t.requests([PROMPTS[0]]))
    out = t.verify([seq[0]], [Draft.chain(seq[1:])])
    got = torch.cat([pre.logits[0], out.logits[0, :-1]])  # (N, V): position k's logits
    want = full_forward_logits(model, PROMPTS[0], seq, scale)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_hidden_features_are_cond_and_uncond(model, guidance):
    t = JanusImageTarget(model, guidance_scale=guidance)
    drafter = ScriptedDrafter([[0] * 16] * 2, t.vocab_size, 0.0, tree=True, needs_hidden=True)
    speculative(t, PROMPTS, drafter)
    width = HIDDEN * (2 if guidance != 1 else 1)
    kind, logits, hidden = drafter.hidden_shapes[0]
    assert kind == "prefill" and logits == (2, 1, 48) and hidden == (2, 1, width)
    for kind, logits, hidden in drafter.hidden_shapes[1:]:
        assert kind == "verify" and hidden == logits[:2] + (width,)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=10),
                                dict(temperature=1.3, top_p=0.8)])
def test_seeded_sampling_draws_what_generate_draws(target, kw):
    """Target-only sampling consumes one multinomial draw per token, as generate does: the same seed gives the same
    image iff the two warp the same distribution."""
    torch.manual_seed(123)
    expected = target.reference_generate(PROMPTS[:1], do_sample=True, **kw).tolist()
    out = speculative(target, PROMPTS[:1], None, generator=torch.Generator().manual_seed(123), **kw)
    assert out.sequences == expected


def test_decode_gives_pil_images(target, refs):
    images = target.decode(torch.tensor(refs["batch"]))
    assert len(images) == 2
    for im in images:
        assert im.size == (8, 8) and im.mode == "RGB"


def test_bad_inputs(model, target):
    with pytest.raises(InvalidInputError, match="list with one condition"):
        target.requests(torch.tensor([[1, 2, 5]]))
    with pytest.raises(InvalidInputError, match="condition 0 is int"):
        target.requests([1, 2, 5])  # a bare prompt, not a list of prompts
    with pytest.raises(EmptyPromptError):
        target.requests([])
    with pytest.raises(EmptyPromptError, match="condition 1"):
        target.requests([[1, 5], []])
    with pytest.raises(InvalidInputError, match="dtype"):
        target.requests([torch.tensor([1.0, 5.0])])
    with pytest.raises(InvalidInputError, match="1-D"):
        target.requests([torch.tensor([[1, 5]])])
    with pytest.raises(InvalidInputError, match=r"outside the text vocabulary \[0, 100\)"):
        target.requests([[1, 100, 5]])
    with pytest.raises(InvalidInputError, match="expected a 1-D integer tensor"):
        target.requests([[True, False]])
    with pytest.raises(ContextOverflowError):
        target.requests([[1] * 250])
    with pytest.raises(GenerationConfigError):
        JanusImageTarget(model, guidance_scale="strong")
    with pytest.raises(UnsupportedModelError):
        JanusImageTarget(tiny_llama())
    fresh = JanusImageTarget(model)
    with pytest.raises(InvalidInputError, match="carry no condition"):
        fresh.prefill([[0]])
    with pytest.raises(InvalidInputError, match="share guidance_scale"):
        fresh.prefill(fresh.requests(PROMPTS[:1]) + fresh.requests(PROMPTS[1:2], guidance_scale=2.0))
    with pytest.raises(GenerationConfigError, match="> 1"):
        fresh.reference_generate(PROMPTS, guidance_scale=1.0)
    with pytest.raises(InvalidInputError, match="shape"):
        target.decode(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="outside"):
        target.decode(torch.full((1, 16), 48))
    with pytest.raises(InvalidInputError, match="dtype"):
        target.decode(torch.zeros(1, 16))


@pytest.mark.parametrize("drafter", [None, "jacobi"])
def test_pipeline_greedy_equals_generate_and_decodes(target, refs, drafter):
    from image_ar import SpeculativeImagePipeline

    pipe = SpeculativeImagePipeline(target, drafter=drafter, tree=4 if drafter else None)
    out = pipe(prompt=PROMPTS, guidance_scale=3.0, temperature=0)
    assert out.tokens.tolist() == refs["batch"]
    assert len(out.images) == 2 and out.images[0].size == (8, 8)
    assert out.stats.acceptance_grid.shape == (4, 4) and out.stats.lossless


def test_compiled_decode_equals_generate(target, refs):
    """`compile=True` (`mmspec.compile`): both guided rows of each request decode over a static cache with the
    forward compiled; a noisy drafter's chains and rows leaving at different steps give generate's output."""
    from mmspec import SpeculativeDecoder

    drafter = ScriptedDrafter(refs["batch"], target.vocab_size, [1.0, 0.5], seed=5)
    dec = SpeculativeDecoder(target, drafter, compile=True)
    out = dec.generate(target.requests(PROMPTS), max_new_tokens=target.num_image_tokens, temperature=0.0)
    assert out.sequences == refs["batch"]
    assert target.runner.kv.compiled and out.stats.accepted_tokens > 0
