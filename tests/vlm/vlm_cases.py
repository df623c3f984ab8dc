"""Shared cases for the VLM pipeline tests: tiny models per family (cached), requests, and HF references."""
from __future__ import annotations

import copy
import functools

import torch

from conftest import DEVICE
from vision.testing.tiny import FAMILIES, TEXT_ONLY_FAMILIES, draft_vlm, test_image, text_drafter, tiny_vlm

ALL = list(FAMILIES)
MAX_NEW = 12
QUESTIONS = ["describe the image", "what color is the sky in this picture please answer",
             "how many", "tell me about the cat and the dog on the left of the image"]


@functools.lru_cache(maxsize=None)
def family(name: str):
    t = tiny_vlm(name)
    t.model.to(DEVICE)  # MMSPEC_TEST_DEVICE=cuda runs the pipeline tests on a GPU
    return t


@functools.lru_cache(maxsize=None)
def small_vlm(name: str):
    return draft_vlm(name).model.to(DEVICE)


@functools.lru_cache(maxsize=None)
def text_lm(name: str):
    return text_drafter(name).to(DEVICE)


def on_device(inputs: dict) -> dict:
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}


@functools.lru_cache(maxsize=None)
def copy_of(name: str):
    return copy.deepcopy(family(name).model)


@functools.lru_cache(maxsize=None)
def noisy_vlm(name: str):
    from mmspec.testing import noisy_copy

    return noisy_copy(family(name).model, 0.5, seed=3)


def extend_inputs(inputs: dict, n_prompt: int, n_extra: int, fill: int = 0) -> dict:
    """Per-token inputs (token types) grow with appended text tokens (type `fill`); per-image ones stay."""
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, n_prompt):
            v = torch.cat([v, v.new_full((1, n_extra), fill)], dim=1)
        out[k] = v
    return out


def image(seed: int, name: str):
    return test_image(seed, family(name).image_size)


def rows(name: str, n: int = 4) -> list[dict]:
    """n requests with different images and prompt lengths (one without an image where the family allows it)."""
    out = []
    for i in range(n):
        imgs = [image(10 + i, name)]
        if i == 2 and name in TEXT_ONLY_FAMILIES:
            imgs = []
        out.append({"prompt": QUESTIONS[i % len(QUESTIONS)], "images": imgs})
    return out


def hf_reference(name: str, row: dict, max_new: int = MAX_NEW) -> list[int]:
    """transformers' own greedy generate on the same rendered prompt and images."""
    from vision.prompts import build_request

    t = family(name)
    req, _, _ = build_request(t.processor, images=row.get("images"), prompt=row.get("prompt"),
                              messages=row.get("messages"))
    ids = torch.tensor([req.input_ids], device=DEVICE)
    out = t.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **on_device(req.inputs),
                           max_new_tokens=max_new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@functools.lru_cache(maxsize=None)
def references(name: str) -> tuple:
    return tuple(tuple(hf_reference(name, r)) for r in rows(name))


@torch.no_grad()
def near_oracle(model):
    """An EAGLE head right most of the time by construction (a 1-layer LLaMA-family text model): fc passes the token
    embedding through, the head's decoder layer and norm are copies of the target's."""
    from vision.drafters import EagleHead

    text = getattr(getattr(model, "model", None), "language_model", None) or model.model
    assert len(text.layers) == 1
    head = EagleHead(model)
    h = head.config.hidden_size
    head.fc.weight.zero_()
    head.fc.bias.zero_()
    head.fc.weight[:, :h] = torch.eye(h)
    head.body.layers[0].load_state_dict(text.layers[0].state_dict())
    head.body.norm.load_state_dict(text.norm.state_dict())
    return head
