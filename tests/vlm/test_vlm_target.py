"""The VLM target adapter computes, for every draft node, the logits a plain forward over prompt + path gives.

This is stricter than greedy equality (a wrong position or mask shifts logits long before it flips an argmax):
each node of a tree draft, in a ragged batch of two requests with different images and lengths, is compared with a
no-cache forward of the stock model over the row's prompt (images included) followed by the node's path.
"""
from __future__ import annotations

import copy

import pytest
import torch

from mmspec.tree import Draft
from conftest import DEVICE
from vision import SpeculativeVLM
from vision.prompts import build_request
from vision.target import VLMTarget
from vlm_cases import ALL, MAX_NEW, extend_inputs, family, hf_reference, image, on_device

ATOL = 2e-4 if DEVICE.type == "cpu" else 1e-3  # CUDA fp32 kernels sum in another order



def reference_logits(model, req, path: list[int], generated_type: int) -> torch.Tensor:
    ids = torch.tensor([req.input_ids + path], device=model.device)
    extra = on_device(extend_inputs(req.inputs, len(req.input_ids), len(path), fill=generated_type))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1]


def check_rows(model, name: str, window: int | None = None):
    t = family(name)
    reqs = [build_request(t.processor, images=[image(30, name)], prompt="describe the image")[0],
            build_request(t.processor, images=[image(31, name)], prompt="what color is the sky in this picture")[0]]
    target = VLMTarget(model)
    pre = target.prefill([r.as_request() for r in reqs])
    gen_type = 1 if name == "paligemma" else 0  # PaliGemma marks generated (suffix) tokens with type 1
    for r, req in enumerate(reqs):
        torch.testing.assert_close(pre.logits[r], reference_logits(model, req, [], gen_type), atol=ATOL, rtol=0)
    committed = [[], []]
    v = model.config.get_text_config().vocab_size
    for step in range(3):  # several verify + commit rounds, so positions after compaction are checked too
        pending = [int(torch.randint(3, v, (1,), generator=torch.Generator().manual_seed(10 * step + r)))
                   for r in range(2)]
        drafts = [Draft(torch.tensor([5, 9, 7, 11, 13]), torch.tensor([-1, -1, 0, 2, 1])),
                  Draft.chain([4, 8, 12])]
        out = target.verify(pending, drafts)
        for r, (req, d) in enumerate(zip(reqs, drafts)):
            base = committed[r] + [pending[r]]
            torch.testing.assert_close(out.logits[r, 0], reference_logits(model, req, base, gen_type),
                                       atol=ATOL, rtol=0, msg=f"{name} step {step} row {r} root")
            for node in range(len(d)):
                path = base + [d.token_list[i] for i in d.path_to(node)]
                torch.testing.assert_close(out.logits[r, 1 + node], reference_logits(model, req, path, gen_type),
                                           atol=ATOL, rtol=0, msg=f"{name} step {step} row {r} node {node}")
        paths = [d.path_to(len(d) - 1)[:1 + step % 2] for d in drafts]
        target.commit(paths)
        for r, (d, p) in enumerate(zip(drafts, paths)):
            committed[r] += [pending[r]] + [d.token_list[i] for i in p]


@pytest.mark.parametrize("name", ALL)
def test_verify_logits_equal_plain_forwards(name):
    check_rows(family(name).model, name)


def small_window(model, window: int):
    model = copy.deepcopy(model)
    model.config.get_text_config().sliding_window = window
    for module in model.modules():
        if getattr(module, "is_sliding", False) or getattr(module, "sliding_window", None):
            module.sliding_window = window
    return model


def test_gemma3_sliding_window_shorter_than_the_prompt():
    """Window 6 (the prompt has ~20 tokens): sliding layers must see exactly the last 6 positions, in verify
    blocks and after compaction, although the cache keeps every slot."""
    model = small_window(family("gemma3").model, 6)
    check_rows(model, "gemma3")
    t = family("gemma3")
    row = {"prompt": "tell me about the cat", "images": [image(32, "gemma3")]}
    req = build_request(t.processor, **row)[0]
    ids = torch.tensor([req.input_ids], device=model.device)
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **on_device(req.inputs),
                         max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ref != hf_reference("gemma3", row)  # the window matters for this prompt
    for tree in (3, 5):
        svlm = SpeculativeVLM(model, t.processor, copy.deepcopy(model), tree=tree)
        assert svlm.generate(**row, max_new_tokens=MAX_NEW).token_ids == ref
