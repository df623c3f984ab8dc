"""Gemma 4 as a VLM target: `Gemma4ForConditionalGeneration` (vision.testing's "gemma4": sliding-window layers with a
window of 6 < the prompt, KV-shared layers, per-layer inputs, bidirectional attention among an image's soft tokens at
prefill) with Gemma 4's assistant (`AssistantDrafter` over a `Gemma4AssistantForCausalLM` reading the VLM's cache).

With an image, greedy output equals transformers' own `generate` for the n-gram drafter and for an assistant fitted
to be partly right (chain and static tree, a batch of 3 with different images and lengths and each alone); the same
assistant through transformers' own assisted generation (batch 1 there); a chi-square test of sampling with the
assistant against the exact image-conditioned distribution; bad pairings are typed errors."""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import DEVICE
from mmspec import SpeculativeDecoder
from mmspec.errors import IncompatibleModelsError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_gemma4, tiny_gemma4_assistant
from mmspec.tree import StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs
from vision import SpeculativeVLM
from vision.drafters import AssistantDrafter
from vision.prompts import build_request
from vision.target import VLMTarget
from vision.testing import draft_vlm, test_image
from vision.train.assistant_fit import fit_assistant
from vlm_cases import MAX_NEW, QUESTIONS, family, hf_reference, on_device

NAME = "gemma4"
ROWS = [{"prompt": QUESTIONS[0], "images": [test_image(10)]},
        {"prompt": QUESTIONS[1], "images": [test_image(11).resize((48, 24))]},  # 55 soft tokens instead of 64
        {"prompt": QUESTIONS[2], "images": [test_image(12)]}]


class WithImage(torch.nn.Module):
    """The VLM with one request's image bound (its features computed once): called on ids (B, T) that start with the
    request's prompt, as `stats_tools.exact_joint` and `fit_assistant` call a text model. Tokens after the prompt
    are text (token type 0)."""

    def __init__(self, model, inputs: dict):
        super().__init__()
        self.model, self.types = model, inputs["mm_token_type_ids"].to(model.device)  # (1, T_prompt)
        with torch.no_grad():
            self.image = model.model.get_image_features(inputs["pixel_values"].to(model.device),
                                                        inputs["image_position_ids"].to(model.device))

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, **kwargs):
        b, t = input_ids.shape
        types = torch.cat([self.types, self.types.new_zeros(1, t - self.types.shape[1])], dim=1).expand(b, t)
        image = type(self.image)(pooler_output=self.image.pooler_output * b)  # one copy of the features per row
        return self.model(input_ids=input_ids, mm_token_type_ids=types, mm_encoder_outputs={"image": image}, **kwargs)


def request(row: dict):
    return build_request(family(NAME).processor, **row)[0]


@functools.lru_cache(maxsize=None)
def refs() -> list[list[int]]:
    return [hf_reference(NAME, r) for r in ROWS]


@functools.lru_cache(maxsize=None)
def fitted(row: int = 0):
    """An assistant (`tiny_gemma4_assistant(target=...)`) fitted (`fit_assistant`, ~1 s) to the VLM's next token after
    16 sampled continuations of ROWS[row], image included."""
    model, req = family(NAME).model, request(ROWS[row])
    bound = WithImage(model, req.inputs)
    torch.manual_seed(0)
    seqs = model.generate(input_ids=torch.tensor([req.input_ids] * 16, device=DEVICE),
                          **{k: v.to(DEVICE).repeat(16, *[1] * (v.dim() - 1)) for k, v in req.inputs.items()},
                          max_new_tokens=6, do_sample=True, top_k=4, top_p=0.9, eos_token_id=None, pad_token_id=0)
    a = tiny_gemma4_assistant(target=model).to(DEVICE)
    losses = fit_assistant(a, bound, seqs, len(req.input_ids), steps=40)
    assert losses[-1] < losses[0] / 2
    return a


def run(svlm: SpeculativeVLM, rows: list[dict]):
    return svlm.generate(prompt=[r["prompt"] for r in rows], images=[r["images"] for r in rows],
                         max_new_tokens=MAX_NEW)


def test_references_are_diverse_and_the_image_matters():
    """Guards against vacuous equality: answers vary and depend on the image, and the image's soft tokens attend to
    each other (the logits change without the token types)."""
    got = refs()
    assert len({tuple(r) for r in got}) == 3 and all(len(set(r)) >= 5 for r in got), got
    other = dict(ROWS[0], images=[test_image(13)])
    assert hf_reference(NAME, other) != got[0]
    model, req = family(NAME).model, request(ROWS[0])
    ids = torch.tensor([req.input_ids], device=DEVICE)
    inputs = on_device(req.inputs)
    with torch.no_grad():
        bidirectional = model(input_ids=ids, **inputs).logits[0, -1]
        causal = model(input_ids=ids, **{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits[0, -1]
    assert not torch.allclose(bidirectional, causal, atol=1e-3)
    cfg = model.config.text_config
    assert cfg.sliding_window < len(req.input_ids) and cfg.num_kv_shared_layers == 2


def test_ngram_drafter_is_lossless():
    t = family(NAME)
    svlm = SpeculativeVLM(t.model, t.processor, "ngram", tree=3)
    assert run(svlm, ROWS).sequences == refs()
    assert [run(svlm, [r]).token_ids for r in ROWS] == refs()


@pytest.mark.parametrize("tree", [3, StaticTree.full((2, 2, 1))], ids=["chain3", "tree221"])
def test_assistant_drafter_is_lossless(tree):
    t = family(NAME)
    svlm = SpeculativeVLM(t.model, t.processor, fitted(), tree=tree)
    assert isinstance(svlm.drafter, AssistantDrafter)
    out = run(svlm, ROWS)
    assert out.sequences == refs()
    s = out.stats
    assert 0 < s.accepted_tokens < s.draft_tokens, s.summary()  # both the accept and the reject paths ran
    assert 0 < s.time_drafter_model <= s.time_draft
    assert [run(svlm, [r]).token_ids for r in ROWS] == refs()


def test_transformers_runs_the_same_assistant_with_an_image():
    """transformers' own assisted generation (batch 1) takes the VLM, its image and the assistant, with the same
    greedy answer."""
    model, req = family(NAME).model, request(ROWS[0])
    ids = torch.tensor([req.input_ids], device=DEVICE)
    out = model.generate(input_ids=ids, **on_device(req.inputs), assistant_model=fitted(), max_new_tokens=MAX_NEW,
                         do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == refs()[0]


def test_sampling_matches_the_exact_distribution():
    """1200 seeded samples of 3 tokens (top-k 4, top-p 0.9) after an image prompt, drafted by the fitted assistant:
    their frequencies fit the target's exact image-conditioned distribution (alpha = 1e-4)."""
    model, req = family(NAME).model, request(ROWS[0])
    length, sampling = 3, dict(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(WithImage(model, req.inputs), list(req.input_ids), SamplingSpec(**sampling), length)
    dec = SpeculativeDecoder(VLMTarget(model), AssistantDrafter(fitted(), 2))
    samples, accepted, drafted = sampled_runs(dec, req.as_request(), length, 1200, **sampling)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    assert 0.1 < accepted / drafted < 0.95, (accepted, drafted)  # both the accept and the residual paths


def test_bad_pairings_are_typed_errors():
    t = family(NAME)
    vocab = t.model.get_output_embeddings().out_features
    for wrong, why in [(tiny_gemma4_assistant(vocab=vocab, backbone=48), "hidden size 48"),
                       (tiny_gemma4_assistant(target=tiny_gemma4()), "vocabulary 96")]:  # the text Gemma 4's
        with pytest.raises(IncompatibleModelsError, match=why):
            SpeculativeVLM(t.model, t.processor, wrong.to(DEVICE)).generate(**ROWS[0], max_new_tokens=2)
    small = draft_vlm(NAME)  # one full-attention layer: no sliding keys for the assistant's sliding layer
    with pytest.raises(IncompatibleModelsError, match="sliding_attention layers"):
        SpeculativeVLM(small.model.to(DEVICE), small.processor, tiny_gemma4_assistant(target=small.model).to(DEVICE)
                       ).generate(**ROWS[0], max_new_tokens=2)
