"""One SpeculativeVLM, several streams: streams read interleaved, with different settings, give what each gives alone
(each stream owns the state it leaves in the target and drafter); chat sessions on one object get their own answers;
per-call settings never stick."""
from __future__ import annotations

import pytest

from vision import SpeculativeVLM
from vlm_cases import MAX_NEW, family, noisy_vlm, rows


def test_interleaved_vlm_streams_with_different_settings_equal_each_alone():
    import torch

    t = family("llava")
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3)
    r0, r1 = rows("llava", 2)
    kw0 = dict(max_new_tokens=MAX_NEW)
    kw1 = dict(max_new_tokens=MAX_NEW - 2, temperature=1.0, generator=torch.Generator().manual_seed(4))
    want = [svlm.generate(**r0, **kw0).text, svlm.generate(**r1, **kw1).text]
    kw1["generator"] = torch.Generator().manual_seed(4)
    a, b = svlm.stream(**r0, **kw0), svlm.stream(**r1, **kw1)
    got = ["", ""]
    live = {0: a, 1: b}
    while live:  # alternate piece by piece
        for i in list(live):
            try:
                got[i] += next(live[i])
            except StopIteration:
                del live[i]
    assert got == want
    half = svlm.stream(**r0, **kw0)
    first = next(half)
    kw1["generator"] = torch.Generator().manual_seed(4)
    assert svlm.generate(**r1, **kw1).text == want[1]  # another call while `half` waits
    assert first + "".join(half) == want[0]


def test_two_chat_sessions_share_one_pipeline():
    t = family("llava")
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3)
    r0, r1 = rows("llava", 2)
    alone = []
    for r in (r0, r1):
        chat = SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3).chat(max_new_tokens=MAX_NEW)
        alone.append([chat.send(r["prompt"], images=r["images"]).text, chat.send("what color").text])
    c0, c1 = svlm.chat(max_new_tokens=MAX_NEW), svlm.chat(max_new_tokens=MAX_NEW)
    got0 = [c0.send(r0["prompt"], images=r0["images"]).text]
    got1 = [c1.send(r1["prompt"], images=r1["images"]).text]
    got0.append(c0.send("what color").text)  # the cache holds c1's conversation: c0 must not resume from it
    got1.append(c1.send("what color").text)
    assert [got0, got1] == alone


def test_a_request_samples_the_same_alone_and_in_a_batch_of_8():
    import torch

    t = family("llava")
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3)
    reqs = rows("llava", 4) * 2
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0)
    batch = svlm.generate(prompt=[r["prompt"] for r in reqs], images=[r["images"] for r in reqs],
                          generator=[torch.Generator().manual_seed(50 + i) for i in range(8)], **kw)
    for i in (1, 6):
        alone = svlm.generate(**reqs[i], generator=torch.Generator().manual_seed(50 + i), **kw)
        assert alone.sequences[0] == batch.sequences[i]


@pytest.mark.parametrize("explicit", [dict(temperature=1.0, top_k=5, seed=2), dict(repetition_penalty=1.5),
                                      dict(max_new_tokens=3)])
def test_defaults_come_back_after_explicit_settings_and_failed_calls(explicit):
    t = family("llava")
    r0 = rows("llava", 1)[0]

    def make():
        return SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3)

    fresh = make().generate(**r0, max_new_tokens=MAX_NEW).sequences
    svlm = make()
    with_settings = svlm.generate(**r0, **{"max_new_tokens": MAX_NEW, **explicit}).sequences
    assert with_settings != fresh  # the settings did change this call ...
    from mmspec.errors import GenerationConfigError

    with pytest.raises(GenerationConfigError):
        svlm.generate(**r0, max_new_tokens=0)  # a call that fails validation
    with pytest.raises(GenerationConfigError):
        svlm.generate(**r0, temperature=1.0, seed=1, generator=__import__("torch").Generator())
    assert svlm.generate(**r0, max_new_tokens=MAX_NEW).sequences == fresh  # ... and only this call
