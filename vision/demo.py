"""The VLM part of `mmspec demo`: a tiny offline LLaVA answering about an image, with each kind of drafter."""
from __future__ import annotations

from mmspec.testing import noisy_copy

from .pipeline import SpeculativeVLM
from .testing.tiny import test_image, text_drafter, tiny_vlm


def run_vlm_demo(new_tokens: int = 32, family: str = "llava") -> None:
    t = tiny_vlm(family)
    img = test_image(0, t.image_size)
    question = "describe the image"
    print(f"\nVLM chat: tiny random {type(t.model).__name__} with its own processor and chat template, "
          f"one {img.size[0]}x{img.size[1]} image, greedy, {new_tokens} new tokens\n")
    rows = [("target only", None), ("draft VLM (sees the image)", noisy_copy(t.model, 0.3, seed=5)),
            ("text-only LM drafter", text_drafter(family)), ("n-gram drafter", "ngram")]
    base = None
    print(f"{'drafter':28s} {'tau':>5s} {'target fwd/token':>17s} {'same answer':>12s}")
    for name, drafter in rows:
        out = SpeculativeVLM(t.model, t.processor, drafter, tree=4).generate(
            images=[img], prompt=question, max_new_tokens=new_tokens)
        s = out.stats
        base = out.token_ids if base is None else base
        same = "yes" if out.token_ids == base else "NO"
        print(f"{name:28s} {s.tau:5.2f} {s.target_forwards / max(len(out.token_ids), 1):17.3f} {same:>12s}")
    print("\nThe draft VLM is the target with noise on its output head: it agrees often because it sees the image "
          "(`mmspec bench vlm` compares it with transformers' assisted generation). Random tiny models: the answer "
          f"is token soup, e.g. {out.text[:60]!r}.")
