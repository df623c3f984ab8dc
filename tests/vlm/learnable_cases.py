"""A tiny target that a drafter can learn in seconds (shared by the training tests).

Random widened tiny models are too chaotic to imitate quickly; this LLaVA has small weights, a damped upper text
layer and an LM head restricted to a few words, so its answers vary with the image and the prompt yet follow
patterns a one-layer drafter picks up in a few hundred steps.
"""
from __future__ import annotations

import random

import torch

from vision.testing import tiny_vlm

WORDS = "describe the image what color is sky cat dog left right top bottom small large red green blue".split()


@torch.no_grad()
def learnable_llava(seed: int = 0):
    """tiny LLaVA, 2 text layers, N(0, 0.1) weights, layer 1 damped by 0.15, LM head restricted to WORDS (module)."""
    t = tiny_vlm("llava", seed=seed, text_layers=2, std=0.1)
    for layer in t.model.model.language_model.layers[1:]:
        layer.self_attn.o_proj.weight.mul_(0.15)
        layer.mlp.down_proj.weight.mul_(0.15)
    tok = t.processor.tokenizer
    keep = {i for w in WORDS for s in (w, " " + w) for i in tok(s, add_special_tokens=False)["input_ids"]}
    mask = torch.zeros(t.model.lm_head.weight.shape[0])
    mask[sorted(keep)] = 1.0
    t.model.lm_head.weight.mul_(mask[:, None])
    return t


def word_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(n)]


def learnable_data(directory):
    """(target, train records, held-out records): 200 self-distilled answers of 24 tokens, 16 held out."""
    from vision.testing import test_image
    from vision.train import self_distill, split

    t = learnable_llava()
    n = 200
    records = self_distill(t.model, t.processor, [test_image(100 + i) for i in range(n)], word_prompts(n),
                           directory, max_new_tokens=24, batch_size=50, progress=False)
    train, held = split(records, held_out=16, seed=0)
    return t, train, held
