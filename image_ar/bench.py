"""`mmspec bench image`: every image method side by side on the zoo LlamaGen, one table (JSON + Markdown) and maps.

Rows: plain AR (`generate_tokens`, the reference sampler), the pipeline without a drafter, SJD, a LlamaGen draft model,
the EAGLE-style head (lossless), then LANTERN, LANTERN++ and GSD with SJD drafts (LOSSY, with their measured TV) and
LANTERN under a TV budget. Columns: target forwards per image, tau (image tokens per target forward), mean
acceptance, measured per-position TV (lossy rows), wall time and its ratio to plain AR. transformers' assisted
generation has no LlamaGen (not a transformers model) and does not apply CFG to the assistant, so it has no row.
Each method runs the same class labels with the same seed; times are the median of `repeats` runs.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .cli import heatmap, image_grid
from .drafters import ImageHeadDrafter, ImageModelDrafter, JacobiDrafter
from .models.llamagen import generate_tokens
from .pipeline import SpeculativeImagePipeline
from .models.vq import to_pil

LOSSY = {"lantern": dict(acceptance="lantern", lantern_delta=0.1),
         "lantern++": dict(acceptance="lantern", lantern_lambda=5.0, lantern_k=10),
         "gsd": dict(acceptance="gsd"),
         "lantern tv<=0.05": dict(acceptance="lantern", lantern_delta=0.1, tv_budget=0.05)}


def _models(quick: bool, progress: bool):
    if quick:  # random tiny models: exercises every code path in seconds (the numbers mean nothing)
        from .drafters.head import ImageHead
        from .testing.tiny import tiny_llamagen, tiny_vq

        target = tiny_llamagen(grid_size=4)
        return target, tiny_llamagen(grid_size=4, seed=1, n_layer=1), ImageHead(target), tiny_vq(codebook_size=64)
    from .zoo import zoo_head, zoo_llamagen, zoo_vq

    target = zoo_llamagen("target", progress=progress)
    return target, zoo_llamagen("draft", progress=progress), zoo_head(target, progress=progress), zoo_vq()


def run_image_benchmark(out_dir="bench_out/image", images: int = 10, temperature: float = 1.0, top_k: int = 0,
                        guidance_scale: float = 4.0, repeats: int = 3, quick: bool = False,
                        progress: bool = True) -> dict:
    """Run every method on `images` class labels (0, 1, ...); write result.json, result.md, grids and maps."""
    if quick:
        images, repeats = 3, 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, draft, head, vq = _models(quick, progress)
    labels = [i % target.config.num_classes for i in range(images)]
    kw = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k)
    pipes = {"pipeline, no drafter": SpeculativeImagePipeline(target, vq),
             "SJD (window 16)": SpeculativeImagePipeline(target, vq, JacobiDrafter(16)),
             "draft model (k=4)": SpeculativeImagePipeline(target, vq, ImageModelDrafter(draft, 4)),
             "head (k=4)": SpeculativeImagePipeline(target, vq, ImageHeadDrafter(head, 4))}
    jobs = [(name, pipe, {}) for name, pipe in pipes.items()]
    if temperature > 0:
        jobs += [(f"{name} + SJD", pipes["SJD (window 16)"], rule) for name, rule in LOSSY.items()]

    def plain():
        gens = [torch.Generator().manual_seed(i) for i in range(images)]
        return generate_tokens(target, torch.tensor(labels), generator=gens if temperature > 0 else None, **kw)

    rows, times = [], {}
    t_plain = _median([_timed(plain)[1] for _ in range(repeats)])
    rows.append({"method": "plain AR (generate_tokens)", "lossless": True, "forwards_per_image": target.config.
                 num_image_tokens, "tau": 1.0, "acceptance": 0.0, "tv_mean": None, "tv_max": None,
                 "seconds": t_plain, "speedup": 1.0})
    for name, pipe, rule in jobs:
        runs = [_timed(lambda: pipe(class_labels=labels, seed=0, **kw, **rule)) for _ in range(repeats)]
        res = runs[0][0]
        st = res.stats
        times[name] = _median([t for _, t in runs])
        rows.append({"method": name, "lossless": st.lossless, "forwards_per_image": sum(st.target_forwards) / images,
                     "tau": st.tau, "acceptance": float(st.acceptance_grid.mean()), "tv_mean": st.tv_mean,
                     "tv_max": st.tv_max, "seconds": times[name], "speedup": t_plain / times[name]})
        slug = _slug(name)
        image_grid(res.images, rows=1).save(out / f"images_{slug}.png")
        heatmap(st.acceptance_grid).save(out / f"acceptance_{slug}.png")
        if progress:
            print(f"{name:>32}: {st.summary()}")
    image_grid(to_pil(vq.decode_codes(plain(), target.config.grid_size)), rows=1).save(out / "images_plain.png")
    result = {"device": "cpu", "torch_threads": torch.get_num_threads(), "images": images, "labels": labels,
              "temperature": temperature, "top_k": top_k, "guidance_scale": guidance_scale, "repeats": repeats,
              "models": "random tiny (quick)" if quick else "zoo LlamaGen (image_ar.zoo)", "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(_markdown(result))
    if progress:
        print(_markdown(result))
    return result


def _timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def _median(xs):
    return statistics.median(xs)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _markdown(result: dict) -> str:
    lines = [f"# image benchmark ({result['models']}, {result['images']} images, temperature "
             f"{result['temperature']}, CFG {result['guidance_scale']})", "",
             "| method | lossless | target forwards / image | tau | mean acceptance | measured TV mean / max | "
             "seconds | speedup vs plain AR |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tv = "0 (exact)" if r["lossless"] else f"{r['tv_mean']:.4f} / {r['tv_max']:.4f}"
        lines.append(f"| {r['method']} | {'yes' if r['lossless'] else '**LOSSY**'} | {r['forwards_per_image']:.1f} | "
                     f"{r['tau']:.2f} | {r['acceptance']:.2f} | {tv} | {r['seconds']:.3f} | {r['speedup']:.2f}x |")
    lines += ["", "Lossy rows change the output distribution; the TV column is measured during generation (per "
              "position, against the target's distribution). transformers' assisted generation has no row: LlamaGen "
              "is not a transformers model and assisted generation does not apply CFG to the assistant."]
    return "\n".join(lines) + "\n"
