"""The image part of `mmspec demo`: the zoo's LlamaGen draws a few classes plainly and with its best lossless drafter.

    from image_ar.demo import run_image_demo
    summary = run_image_demo("demo_out/image")        # builds zoo:vq, zoo:llamagen, zoo:llamagen-head if needed

Both runs use the same class labels and seeds, CFG 4, temperature 1. Speculative sampling with the lossless rule draws
every image from exactly the target's distribution, but the random numbers are consumed differently, so equal seeds
do not give equal images: the two grids are two samples of the *same distribution*. A greedy (temperature 0) check
then shows the tokens themselves are identical. Writes the two grids side by side (top: plain, bottom: speculative)
and the per-position acceptance map, and returns the numbers (speedup over plain sampling, tau).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .cli import heatmap, image_grid
from .drafters import ImageHeadDrafter
from .models.llamagen import generate_tokens
from .models.vq import to_pil
from .pipeline import SpeculativeImagePipeline

DEMO_CLASSES = (0, 2, 4, 7)  # red disc, green triangle, yellow sun, orange ring
IMAGES_PER_CLASS = 2


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_image_demo(out_dir="demo_out/image", quick: bool = False, progress: bool = True, tree: int = 3,
                   guidance_scale: float = 4.0, seed: int = 0) -> dict:
    """Generate the demo grid plainly and speculatively (see the module docstring); returns a summary dict."""
    from . import shapes, zoo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = zoo.load("llamagen", quick=quick, progress=progress)
    vq = zoo.load("vq", quick=quick, progress=progress)
    head = zoo.load("llamagen-head", quick=quick, progress=progress, target=target)
    pipe = SpeculativeImagePipeline(target, vq, ImageHeadDrafter(head, tree))
    labels = [c for c in DEMO_CLASSES for _ in range(IMAGES_PER_CLASS)]
    seeds = [seed + i for i in range(len(labels))]
    kw = dict(guidance_scale=guidance_scale, temperature=1.0, top_k=0)

    def plain(ls=labels, ss=seeds, **over):
        args = {**kw, **over}
        return torch.cat([generate_tokens(target, torch.tensor([lab]), generator=torch.Generator().manual_seed(s),
                                          **args) for lab, s in zip(ls, ss)])

    def speculative(ls=labels, ss=seeds, **over):
        return [pipe(class_labels=[lab], seed=s, output_type="tokens", **{**kw, **over}) for lab, s in zip(ls, ss)]

    plain(labels[:1], [seed - 1])  # warm-up, untimed
    speculative(labels[:1], [seed - 1])
    plain_tokens, outs, t_plain, t_spec = [], [], 0.0, 0.0
    for i, (lab, s) in enumerate(zip(labels, seeds)):  # alternate image by image: a slow spell hits both alike
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                toks, t = _timed(lambda: plain([lab], [s]))
                plain_tokens.append(toks)
                t_plain += t
            else:
                got, t = _timed(lambda: speculative([lab], [s]))
                outs += got
                t_spec += t
    plain_tokens = torch.cat(plain_tokens)
    spec_tokens = torch.cat([o.tokens for o in outs])
    tau = sum(o.stats.tau for o in outs) / len(outs)
    forwards = sum(sum(o.stats.target_forwards) for o in outs) / len(outs)
    greedy_labels = list(DEMO_CLASSES[:2])
    greedy_equal = torch.equal(plain(greedy_labels, [0, 0], temperature=0.0),
                               torch.cat([o.tokens for o in speculative(greedy_labels, [0, 0], temperature=0.0)]))
    grid = target.config.grid_size
    with torch.no_grad():
        images = to_pil(vq.decode_codes(torch.cat([plain_tokens, spec_tokens]), grid))
    scale = max(1, 64 // vq.image_size)
    big = [im.resize((im.width * scale, im.height * scale), 0) for im in images]
    image_grid(big, rows=2).save(out / "image_demo.png")
    acceptance = torch.stack([o.stats.acceptance_grid for o in outs]).mean(0)
    heatmap(acceptance, cell=16).save(out / "image_demo_acceptance.png")
    summary = {"target": f"zoo:llamagen{'@quick' if quick else ''} ({target.config.dim} x {target.config.n_layer}, "
                         f"{target.config.vocab_size} codes, {grid}x{grid} tokens)",
               "drafter": f"zoo:llamagen-head, k={tree}", "classes": [shapes.CLASS_NAMES[c] for c in
                                                                              DEMO_CLASSES],
               "images": len(labels), "guidance_scale": guidance_scale, "temperature": 1.0,
               "plain_seconds": t_plain, "speculative_seconds": t_spec, "speedup": t_plain / t_spec, "tau": tau,
               "target_forwards_per_image": forwards, "tokens_per_image": target.config.num_image_tokens,
               "lossless": all(o.stats.lossless for o in outs), "greedy_identical_tokens": greedy_equal,
               "torch_threads": torch.get_num_threads(),
               "files": {"grid": str(out / "image_demo.png"), "acceptance": str(out / "image_demo_acceptance.png")}}
    (out / "image_demo.json").write_text(json.dumps(summary, indent=2))
    if progress:
        print(summary_text(summary))
    return summary


def summary_text(s: dict) -> str:
    return "\n".join([
        f"image demo: {s['images']} images of {', '.join(s['classes'])}; target {s['target']}, drafter {s['drafter']}",
        f"  plain sampling {s['plain_seconds']:.2f} s, speculative {s['speculative_seconds']:.2f} s: "
        f"{s['speedup']:.2f}x ({s['torch_threads']} torch thread(s))",
        f"  tau {s['tau']:.2f} tokens per target forward: {s['target_forwards_per_image']:.1f} target forwards per "
        f"image instead of {s['tokens_per_image']}",
        "  lossless rule: the speculative images are drawn from the same distribution as plain sampling (equal seeds "
        "do not give equal images when sampling)",
        f"  greedy check (temperature 0): identical tokens = {s['greedy_identical_tokens']}",
        f"  wrote {s['files']['grid']} (top row: plain, bottom row: speculative) and {s['files']['acceptance']}"])
