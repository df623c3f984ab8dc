"""Emu3ImageTarget: speculative image generation equals Emu3's own generate with the documented prefix constraint and
CFG via negative_prompt_ids (tiny, fp32, CPU).

The tiny Emu3 is built offline (128-token vocabulary with 32 visual tokens, a 3x4 latent grid -> 18 generated tokens
with EOL/EOF/EOI/EOS, 6x8 images); its decoder is widened so greedy outputs are diverse (ARCHITECTURE.md, Tests).
"""
from __future__ import annotations

import pytest
import torch
from transformers import Emu3Config, Emu3ForConditionalGeneration
from transformers.models.emu3.configuration_emu3 import Emu3TextConfig, Emu3VQVAEConfig

from image_ar.models.emu3 import Emu3ImageTarget
from mmspec.errors import EmptyPromptError, GenerationConfigError, InvalidInputError, UnsupportedModelError
from image_cases import ScriptedDrafter, reference_outputs, speculative
from mmspec.testing import tiny_llama, widen_
from mmspec.tree import Draft

VOCAB, CODES, HIDDEN = 128, 32, 64
VISUAL0, EOL, EOF, BOI, EOI, WRAP, EOS = 40, 10, 11, 12, 13, 14, 2
GRID = (3, 4)
N = (GRID[1] + 1) * GRID[0] + 3  # 18
PROMPTS = [[1, 20, 21, 22, BOI, WRAP], [1, 25, BOI, WRAP]]
NEGATIVE = [1, 30, 31]


def tiny_emu3(seed: int = 0) -> Emu3ForConditionalGeneration:
    vmap = {f"<|visual token {i:06d}|>": VISUAL0 + i for i in range(CODES)}
    vmap.update({"<|extra_200|>": EOL, "<|extra_201|>": EOF, "<|image start|>": BOI, "<|image end|>": EOI,
                 "<|image token|>": WRAP, "<image>": 15})
    text = Emu3TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                          eos_token_id=EOS, pad_token_id=0, attention_dropout=0.0)
    vq = Emu3VQVAEConfig(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32,
                         channel_multiplier=(1, 1), num_res_blocks=1, attn_resolutions=(), hidden_size=32,
                         num_attention_heads=1, temporal_downsample_factor=1)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(vq_config=vq, text_config=text, vocabulary_map=vmap))
    with torch.no_grad():
        widen_(model.model.text_model, 0.2, seed)
        widen_(model.lm_head, 0.2, seed + 1)
    return model.float().eval()


def valid_layout(seq) -> bool:
    rows, cols = GRID
    for k, tok in enumerate(seq):
        if k < (cols + 1) * rows:
            ok = tok == EOL if (k + 1) % (cols + 1) == 0 else VISUAL0 <= tok < VISUAL0 + CODES
        else:
            ok = tok == [EOF, EOI, EOS][k - (cols + 1) * rows]
        if not ok:
            return False
    return len(seq) == N


@pytest.fixture(scope="module")
def model():
    return tiny_emu3()


@pytest.fixture(scope="module")
def target(model):
    return Emu3ImageTarget(model, GRID, guidance_scale=3.0, negative_prompt_ids=NEGATIVE)


@pytest.fixture(scope="module")
def refs(target):
    return reference_outputs(target, PROMPTS)


def test_layout_and_reference(target, refs):
    assert target.num_image_tokens == N and target.max_positions == N + 1 and target.vocab_size == VOCAB
    assert target.allowed_tokens(0) == list(range(VISUAL0, VISUAL0 + CODES))
    assert [target.allowed_tokens(k) for k in (4, 9, 14, 15, 16, 17)] == [[EOL]] * 3 + [[EOF], [EOI], [EOS]]
    for seq in refs["single"]:
        assert valid_layout(seq) and len(set(seq)) >= 8  # diverse: equality below is not vacuous
    assert refs["single"][0] != refs["single"][1]
    assert refs["batch"] == refs["single"]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["none", "random_chain", "random_tree", "oracle", "noisy"])
def test_greedy_equals_generate(target, refs, batch, kind):
    prompts = PROMPTS[:batch]
    expected = refs["batch"] if batch == 2 else refs["single"][:1]
    drafter = None if kind == "none" else ScriptedDrafter(
        expected, VOCAB, {"oracle": 1.0, "noisy": 0.6}.get(kind, 0.0), tree=kind == "random_tree", seed=batch)
    out = speculative(target, prompts, drafter)
    assert out.sequences == expected
    st = out.stats
    if kind == "none":
        assert st.target_forwards == N
    else:
        assert st.draft_tokens > 0
    if kind == "oracle":
        assert st.accepted_tokens == st.draft_tokens > 0
        assert st.target_forwards < N // 2


def test_rows_leave_the_batch_at_different_steps(target, refs):
    drafter = ScriptedDrafter(refs["batch"], VOCAB, [1.0, 0.0], seed=5)
    out = speculative(target, PROMPTS, drafter)
    assert out.sequences == refs["batch"] and out.finish_reasons == ["length", "length"]


@pytest.mark.parametrize("case", ["per_request_negatives", "no_negative", "unguided"])
def test_negative_prompts_and_scales(model, case):
    """Per-request negative prompts of different lengths (left-padded by generate), generate's default unconditional
    input (the prompt's last token), and guidance_scale == 1 (no CFG processor: raw logits + constraint)."""
    if case == "per_request_negatives":
        t = Emu3ImageTarget(model, GRID, guidance_scale=2.0)
        conds = [{"input_ids": PROMPTS[0], "negative_prompt_ids": [1, 7, 8, 9]},
                 {"input_ids": torch.tensor(PROMPTS[1]), "negative_prompt_ids": torch.tensor([1, 33])}]
    else:
        t = Emu3ImageTarget(model, GRID, guidance_scale=3.0 if case == "no_negative" else 1.0)
        conds = PROMPTS
    expected = t.reference_generate(conds).tolist()
    assert all(valid_layout(s) for s in expected)
    assert speculative(t, conds, ScriptedDrafter(expected, VOCAB, 0.6, tree=True)).sequences == expected
    assert speculative(t, conds).sequences == expected


def test_guidance_scale_is_a_live_attribute(model, refs):
    t = Emu3ImageTarget(model, GRID, guidance_scale=3.0, negative_prompt_ids=NEGATIVE)
    t.guidance_scale = 6.0
    expected = t.reference_generate(PROMPTS[:1]).tolist()
    assert expected != refs["single"][:1]
    assert speculative(t, PROMPTS[:1], ScriptedDrafter(expected, VOCAB, 0.6)).sequences == expected


@pytest.mark.parametrize("scale", [3.0, 1.0])
@torch.inference_mode()
def test_logits_equal_a_full_forward(model, refs, scale):
    """prefill + one verify of the whole sequence: CFG on log-softmaxed full-vocabulary logits, then the constraint."""
    t = Emu3ImageTarget(model, GRID, guidance_scale=scale, negative_prompt_ids=NEGATIVE)
    seq = refs["single"][0]
    pre = t.prefill(t.requests([PROMPTS[0]]))
    out = t.verify([seq[0]], [Draft.chain(seq[1:])])
    got = torch.cat([pre.logits[0], out.logits[0, :-1]])  # (N, V)

    def row(ids):
        return model(torch.tensor([ids + seq[:-1]])).logits[0, len(ids) - 1:]  # (N, V)

    want = row(PROMPTS[0])
    if scale != 1:
        c, u = torch.log_softmax(want, -1), torch.log_softmax(row(NEGATIVE), -1)
        want = scale * (c - u) + u
    allowed = torch.zeros(N, VOCAB, dtype=torch.bool)
    for k in range(N):
        allowed[k, t.allowed_tokens(k)] = True
    want = want.masked_fill(~allowed, float("-inf"))
    assert torch.equal(got.isinf(), ~allowed)
    torch.testing.assert_close(got[allowed], want[allowed], atol=1e-4, rtol=1e-4)


def test_hidden_features_are_cond_and_uncond(target):
    drafter = ScriptedDrafter([[0] * N] * 2, VOCAB, 0.0, tree=True, needs_hidden=True)
    speculative(target, PROMPTS, drafter)
    kind, logits, hidden = drafter.hidden_shapes[0]
    assert kind == "prefill" and logits == (2, 1, VOCAB) and hidden == (2, 1, 2 * HIDDEN)
    for kind, logits, hidden in drafter.hidden_shapes[1:]:
        assert kind == "verify" and hidden == logits[:2] + (2 * HIDDEN,)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=12),
                                dict(temperature=1.2, top_p=0.9)])
def test_seeded_sampling_draws_what_generate_draws(target, kw):
    torch.manual_seed(7)
    expected = target.reference_generate(PROMPTS[:1], do_sample=True, **kw).tolist()
    out = speculative(target, PROMPTS[:1], None, generator=torch.Generator().manual_seed(7), **kw)
    assert out.sequences == expected and valid_layout(expected[0])


def test_sampled_speculation_keeps_the_layout(target, refs):
    """Drafts of arbitrary ids at structural positions are rejected by the constraint, whatever is sampled."""
    drafter = ScriptedDrafter(refs["batch"], VOCAB, 0.5, tree=True, seed=3)
    out = speculative(target, PROMPTS, drafter, temperature=1.0, seed=0)
    assert all(valid_layout(s) for s in out.sequences)


def test_decode_gives_pil_images(target, refs):
    images = target.decode(torch.tensor(refs["batch"]))
    assert len(images) == 2
    for im in images:
        assert im.size == (8, 6) and im.mode == "RGB"  # (width, height): 4x3 latents, spatial factor 2


def test_bad_inputs(model, target):
    with pytest.raises(InvalidInputError, match="list with one condition"):
        target.requests("a cat")
    with pytest.raises(EmptyPromptError):
        target.requests([])
    with pytest.raises(EmptyPromptError, match="condition 0"):
        target.requests([torch.tensor([], dtype=torch.long)])
    with pytest.raises(InvalidInputError, match="keys"):
        target.requests([{"ids": PROMPTS[0]}])
    with pytest.raises(EmptyPromptError, match="negative_prompt_ids"):
        target.requests([{"input_ids": PROMPTS[0], "negative_prompt_ids": []}])
    with pytest.raises(InvalidInputError, match="dtype"):
        target.requests([torch.tensor([1.5, 2.0])])
    with pytest.raises(InvalidInputError, match=r"\[0, 128\)"):
        target.requests([[1, -3, BOI]])
    with pytest.raises(InvalidInputError, match="grid"):
        Emu3ImageTarget(model, (0, 4))
    with pytest.raises(InvalidInputError, match="negative_prompt_ids"):
        Emu3ImageTarget(model, GRID, negative_prompt_ids="lowres")
    with pytest.raises(GenerationConfigError):
        Emu3ImageTarget(model, GRID, guidance_scale=float("nan"))
    with pytest.raises(UnsupportedModelError):
        Emu3ImageTarget(tiny_llama(), GRID)
    with pytest.raises(UnsupportedModelError, match="eof_token_id"):
        Emu3ImageTarget(model, GRID, eof_token_id=VOCAB)
    with pytest.raises(InvalidInputError, match="shape"):
        target.decode(torch.zeros(2, N - 3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="non-visual"):
        target.decode(torch.zeros(1, N, dtype=torch.long))


@pytest.mark.parametrize("drafter", [None, "jacobi"])
def test_pipeline_greedy_equals_generate_and_decodes(target, refs, drafter):
    from image_ar import SpeculativeImagePipeline

    pipe = SpeculativeImagePipeline(target, drafter=drafter, tree=4 if drafter else None)
    out = pipe(prompt=PROMPTS, guidance_scale=target.guidance_scale, temperature=0)
    assert out.tokens.tolist() == refs["batch"]
    assert len(out.images) == 2 and out.stats.tau >= 1.0
