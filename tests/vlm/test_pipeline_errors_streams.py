"""One SpeculativeVLM, two streams: the one resumed after the other started is refused with a typed error (its
cache now holds the other conversation); chat sessions on one object each get their own answers."""
from __future__ import annotations

import pytest

from mmspec.errors import StreamInterleavedError
from vision import SpeculativeVLM
from vlm_cases import MAX_NEW, family, noisy_vlm, rows


def test_interleaved_vlm_streams_raise_and_the_object_stays_usable():
    t = family("llava")
    svlm = SpeculativeVLM(t.model, t.processor, noisy_vlm("llava"), tree=3)
    r0, r1 = rows("llava", 2)
    want = [svlm.generate(**r, max_new_tokens=MAX_NEW).text for r in (r0, r1)]
    a = svlm.stream(**r0, max_new_tokens=MAX_NEW)
    b = svlm.stream(**r1, max_new_tokens=MAX_NEW)
    first = next(a)
    assert "".join(b) == want[1]
    with pytest.raises(StreamInterleavedError):
        next(a)
    assert want[0].startswith(first)
    assert "".join(svlm.stream(**r0, max_new_tokens=MAX_NEW)) == want[0]


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
