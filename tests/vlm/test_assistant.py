"""Gemma 4's assistant as a drafter (`vision.drafters.AssistantDrafter`): a tiny Gemma 4 target with sliding-window
and KV-shared layers (driven by the engine's own adapter or by `vision.VLMTarget`; both mask windows instead of
evicting keys) and a tiny
`Gemma4AssistantForCausalLM` reading its cache. Greedy output equals the target's `generate` for chains and static
trees, in a batch of 3 and alone; a chi-square test of sampling with an assistant fitted to be partly right; the
same assistant through transformers' own path (batch 1 only there); bad pairings are typed errors."""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.errors import IncompatibleModelsError, UnsupportedModelError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_gemma4, tiny_gemma4_assistant, tiny_llama
from mmspec.tree import StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs
from vision.drafters import AssistantDrafter
from vision.target import VLMTarget
from vision.train.assistant_fit import fit_assistant

PROMPTS = [[5, 9, 3, 7, 1, 2, 44, 12, 5, 9, 3], [8, 8, 4], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
gemma4, assistant = tiny_gemma4, tiny_gemma4_assistant


def fitted(target, prompt: list[int], steps: int = 80):
    """An assistant fitted (`fit_assistant`, a few seconds) to the target's next token after 32 sampled
    continuations of `prompt`."""
    a = assistant()
    torch.manual_seed(0)
    seqs = target.generate(torch.tensor([prompt] * 32), max_new_tokens=6, do_sample=True, top_k=4, top_p=0.9,
                           eos_token_id=None, pad_token_id=0)
    losses = fit_assistant(a, target, seqs, len(prompt), steps=steps)
    assert losses[-1] < losses[0] / 2
    return a


def refs(model, n=12):
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


@pytest.mark.parametrize("adapter", ["engine", "vlm"])
@pytest.mark.parametrize("tree", [3, StaticTree.full((2, 2, 1))], ids=["chain3", "tree221"])
def test_assistant_drafter_is_lossless(tree, adapter):
    model = gemma4()
    expected = refs(model)
    target = model if adapter == "engine" else VLMTarget(model)  # the engine's CausalLMTarget, or the VLM adapter
    dec = SpeculativeDecoder(target, AssistantDrafter(fitted(model, PROMPTS[0]), tree))
    out = dec.generate(PROMPTS, max_new_tokens=12)
    assert out.sequences == expected
    assert out.stats.accepted_tokens > 0 and 0 < out.stats.time_drafter_model <= out.stats.time_draft
    assert [dec.generate([p], max_new_tokens=12).sequences[0] for p in PROMPTS] == expected


def test_sampling_matches_the_exact_distribution():
    model = gemma4()
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 3, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(model, prompt, spec, length)
    dec = SpeculativeDecoder(model, AssistantDrafter(fitted(model, prompt), 2))
    samples, accepted, drafted = sampled_runs(dec, prompt, length, 1200, temperature=1.0, top_k=4, top_p=0.9)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    assert 0.1 < accepted / drafted < 0.95, (accepted, drafted)  # both the accept and the residual paths


def test_transformers_runs_the_same_assistant_at_batch_1_only():
    model, a = gemma4(), assistant()
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    p = torch.tensor([PROMPTS[0]])
    assert torch.equal(model.generate(p, assistant_model=a, **kw), model.generate(p, **kw))
    with pytest.raises(ValueError, match="batch_size = 1"):
        model.generate(torch.tensor([PROMPTS[0][:3], PROMPTS[1]]), assistant_model=a, **kw)


def test_bad_pairings_are_typed_errors():
    with pytest.raises(UnsupportedModelError, match="not a Gemma 4 assistant"):
        AssistantDrafter(tiny_llama())
    with pytest.raises(IncompatibleModelsError, match="hidden size 48"):
        SpeculativeDecoder(VLMTarget(gemma4()), AssistantDrafter(assistant(backbone=48))).generate(
            [[5, 6]], max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="shares no KV cache"):
        SpeculativeDecoder(VLMTarget(tiny_llama()), AssistantDrafter(assistant())).generate([[5, 6]], max_new_tokens=2)


def test_an_assistant_loads_by_path_or_by_name(tmp_path):
    """A saved assistant (config + safetensors, no tokenizer: it shares the target's) loads by path, and
    drafter="assistant" finds it beside a target loaded from a directory ("<target>-assistant")."""
    from transformers import AutoModelForCausalLM

    from mmspec.errors import InvalidInputError
    from vision.pipeline import is_assistant, load_drafter

    a = assistant()
    a.save_pretrained(tmp_path / "gemma-assistant")
    gemma4().save_pretrained(tmp_path / "gemma")
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma")
    for spec in (str(tmp_path / "gemma-assistant"), "assistant"):
        model, extra = load_drafter(spec, target)
        assert is_assistant(model) and extra == {}
        assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), a.state_dict().values()))
    with pytest.raises(InvalidInputError, match="built in memory"):
        load_drafter("assistant", gemma4())


def test_vlm_drafter_assistant_by_name_is_wired(tmp_path):
    """SpeculativeVLM(drafter="assistant") loads '<target dir>-assistant' and wraps it; on a target without KV
    sharing (LLaVA) the pairing is refused with a typed error naming why."""
    from transformers import AutoModelForImageTextToText

    from vision import SpeculativeVLM
    from vlm_cases import family

    t = family("llava")
    t.model.save_pretrained(tmp_path / "llava")
    assistant(backbone=t.model.config.text_config.hidden_size,
              vocab=t.model.get_output_embeddings().weight.shape[0]).save_pretrained(tmp_path / "llava-assistant")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava")
    with pytest.raises(UnsupportedModelError, match="shares no KV cache"):
        SpeculativeVLM(model, t.processor, "assistant").generate(prompt="hi", max_new_tokens=2)
