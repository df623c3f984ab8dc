"""MASSV-style draft-VLM distillation (vision.train.vlm_distill): an independent 1-layer draft VLM sharing the target's
processor, distilled on the target's self-distilled answers, raises held-out tau; decoding stays lossless; the
checkpoint (save_pretrained, safetensors) reloads with from_pretrained to the same tau; train="projector" moves only
the multimodal projector.

The target is the learnable tiny LLaVA of tests/vlm/learnable_cases.py (shared with test_train.py): 2 text layers,
the upper one damped, the LM head restricted to a small word vocabulary, so a small draft can learn its answers.
"""
from __future__ import annotations


import pytest
import torch

from mmspec.errors import InvalidInputError
from vision import SpeculativeVLM
from vision.testing.tiny import draft_vlm
from vision.train import distill_draft_vlm, evaluate_draft_tau
from vision.train.vlm_distill import projector_of
from learnable_cases import learnable_data

EVAL = dict(tree=4, max_new_tokens=24, batch_size=16)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(target, train, held, undistilled tau, distilled draft, report, distilled tau, out_dir)."""
    t, train, held = learnable_data(tmp_path_factory.mktemp("massv-data"))
    draft = draft_vlm("llava").model  # same family, 1 text layer, 16-wide 1-layer vision tower, same vocabulary
    assert draft.get_output_embeddings().weight.shape == (t.model.lm_head.weight.shape[0], 64)
    before = evaluate_draft_tau(draft, t.model, t.processor, held, **EVAL)
    out = tmp_path_factory.mktemp("massv-draft")
    report = distill_draft_vlm(draft, t.model, t.processor, train, steps=300, lr=3e-3, topk=8, out_dir=out,
                               progress=False, train="all")
    after = evaluate_draft_tau(draft, t.model, t.processor, held, **EVAL)
    return t, train, held, before, draft, report, after, out


def test_distillation_raises_held_out_tau(distilled):
    _, _, _, before, _, report, after, _ = distilled
    numbers = (f"held-out tau {before['tau']:.3f} undistilled draft VLM -> {after['tau']:.3f} distilled "
               f"(alpha {[round(a, 3) for a in after['alpha']]}), train loss {report['losses'][0]:.3f} -> "
               f"{report['loss']:.3f}, top-1 agreement {report['acceptance']:.3f}, {report['seconds']:.1f} s")
    print(numbers)
    assert before["tau"] < 1.15, numbers
    assert after["tau"] >= 1.35 and after["tau"] - before["tau"] >= 0.3, numbers
    assert report["loss"] < report["losses"][0] and report["acceptance"] > 0.25, numbers


def test_distilled_draft_is_lossless(distilled):
    t, _, held, before, _, _, after, _ = distilled
    alone = SpeculativeVLM(t.model, t.processor, None)
    reference = []
    for s in range(0, len(held), EVAL["batch_size"]):
        rows = held[s:s + EVAL["batch_size"]]
        reference += alone.generate(messages=[r.prompt_messages for r in rows],
                                    images=[[str(p) for p in r.images] for r in rows],
                                    max_new_tokens=EVAL["max_new_tokens"]).sequences
    assert after["sequences"] == reference == before["sequences"]
    tok = t.processor.tokenizer
    assert [tok.decode(s, skip_special_tokens=True).strip() for s in reference] == [r.answer.strip() for r in held]


def test_checkpoint_reloads_with_from_pretrained(distilled):
    from transformers import LlavaForConditionalGeneration

    t, _, held, _, draft, report, after, out = distilled
    files = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pth", ".pkl", ".pickle"}, files
    assert report["out_dir"] == str(out)
    loaded = LlavaForConditionalGeneration.from_pretrained(out).float().eval()
    sd = draft.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    again = evaluate_draft_tau(loaded, t.model, t.processor, held, **EVAL)
    assert again["tau"] == after["tau"] and again["sequences"] == after["sequences"]


def test_projector_phase_moves_only_the_projector(distilled):
    t, train, _, _, _, _, _, _ = distilled
    draft = draft_vlm("llava").model
    proj = {id(p) for p in projector_of(draft).parameters()}
    start = {k: v.clone() for k, v in draft.state_dict().items()}
    names = {k for k, p in draft.named_parameters() if id(p) in proj}
    report = distill_draft_vlm(draft, t.model, t.processor, train[:6], steps=4, lr=1e-2, batch_size=2,
                               progress=False, train="projector")
    assert report["train"] == "projector" and len(report["losses"]) == 4
    assert report["trainable_parameters"] == sum(p.numel() for p in projector_of(draft).parameters())
    for k, v in draft.state_dict().items():
        assert torch.equal(v, start[k]) != (k in names), k  # projector changed, everything else did not
    assert all(p.requires_grad for p in draft.parameters())  # flags restored
    with pytest.raises(InvalidInputError, match="train="):
        distill_draft_vlm(draft, t.model, t.processor, train[:2], steps=1, lr=1e-3, train="vision", progress=False)
