"""The compiled decode path on VLM targets (`mmspec.compile`): after the multimodal prefill the cache moves into a
static one and every text block runs compiled. Greedy output equals transformers' own `generate` for a 1-D-position
family (LLaVA) and an M-RoPE one (Qwen2-VL), with a draft VLM and with an EAGLE head; sliding-window targets are
refused with a typed error (and left eager under compile=None)."""
from __future__ import annotations

import pytest
import torch

from mmspec.errors import UnsupportedModelError
from vision import SpeculativeVLM
from vision.drafters import EagleDrafter, EagleHead
from vlm_cases import family, noisy_vlm, references, rows

MAX_NEW = 12  # vlm_cases' references are longer; compared on their first MAX_NEW tokens


def run(svlm: SpeculativeVLM, batch: list[dict]):
    return svlm.generate(prompt=[r["prompt"] for r in batch], images=[r["images"] for r in batch],
                         max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_compiled_vlm_matches_generate(name):
    t = family(name)
    ref = [list(r)[:MAX_NEW] for r in references(name)]
    torch.manual_seed(0)
    for drafter, tree in ((noisy_vlm(name), 3), (EagleDrafter(EagleHead(t.model), 3), 3)):
        svlm = SpeculativeVLM(t.model, t.processor, drafter, tree=tree, compile=True)
        assert svlm.decoder.compile
        out = run(svlm, rows(name))
        assert [s[:MAX_NEW] for s in out.sequences] == ref
        assert svlm.target.kv.compiled and svlm.drafter.runner.kv.compiled
        assert run(svlm, rows(name)[:1]).sequences[0][:MAX_NEW] == ref[0]


def test_sliding_window_target_is_refused():
    t = family("gemma3")
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        SpeculativeVLM(t.model, t.processor, None, compile=True)
    assert SpeculativeVLM(t.model, t.processor, None, compile=None).decoder.compile is False


def test_compiled_chat_resumes_the_cache():
    """A chat's next turn continues the static cache the compiled turn left (grown for the new text) and answers
    as the eager chat does."""
    t = family("qwen2_vl")
    answers = []
    for compile in (False, True):
        svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm("qwen2_vl"), tree=3, compile=compile)
        chat = svlm.chat(max_new_tokens=MAX_NEW)
        img = rows("qwen2_vl")[0]["images"]
        turns = [chat.send("describe the image", images=img).token_ids, chat.send("what color is it").token_ids]
        assert svlm.target.last_prefill["resumed"]
        answers.append(turns)
    assert answers[0] == answers[1]
