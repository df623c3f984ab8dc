"""`mmspec bench image --continuous`: CSpD side by side with target-only sampling on the zoo's continuous-token ARs.

Rows: plain AR (`generate_continuous`, the reference sampler), the pipeline without a drafter, and CSpD (Wang et al.
2024, arXiv:2411.11925) with the zoo draft model at k = 2 and 4 draft tokens and with 15% target-only pre-filling.
Every row is lossless: CSpD's rule is exact (image_ar.acceptance.cspd; the two-sample test is in
tests/imagegen/test_cspd.py). Columns: target forwards per image, tau (tokens per target forward), accepted drafts,
residual chains drawn per image, wall time split into drafting / target transformer / diffusion heads (acceptance,
residual and bonus draws), and the ratio to plain AR. transformers' assisted generation has no row: a continuous-token
AR is not a transformers model and has no vocabulary to verify against.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .bench import _timed
from .models.continuous_ar import generate_continuous
from .pipeline import SpeculativeImagePipeline

METHODS = (("pipeline, no drafter", None, {}), ("CSpD (k=2)", 2, {}), ("CSpD (k=4)", 4, {}),
           ("CSpD (k=4, prefill 0.15)", 4, {"prefill_ratio": 0.15}))


def _models(quick: bool, progress: bool):
    if quick:  # random tiny models: every code path in seconds (the numbers mean nothing)
        from .testing.tiny import perturbed, tiny_continuous

        target = tiny_continuous(grid_size=3, num_classes=3)
        return target, perturbed(target, 0.005)
    from .zoo import zoo_continuous

    return zoo_continuous("target", progress=progress), zoo_continuous("draft", progress=progress)


def run_continuous_benchmark(out_dir="bench_out/image_continuous", images: int = 10, guidance_scale: float = 2.0,
                             temperature: float = 1.0, repeats: int = 3, quick: bool = False,
                             progress: bool = True) -> dict:
    """Run target-only and CSpD on `images` class labels with one seed; write result.json and result.md."""
    if quick:
        images, repeats = 2, 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target, draft = _models(quick, progress)
    cfg = target.config
    labels = [i % cfg.num_classes for i in range(images)]
    kw = dict(guidance_scale=guidance_scale, temperature=temperature)

    def plain():
        gens = [torch.Generator().manual_seed(i) for i in range(images)]
        return generate_continuous(target, labels, generator=gens, **kw)

    t_plain = statistics.median([_timed(plain)[1] for _ in range(repeats)])
    rows = [{"method": "plain AR (generate_continuous)", "lossless": True,
             "forwards_per_image": float(cfg.num_image_tokens), "tau": 1.0, "acceptance": 0.0,
             "residual_per_image": 0.0, "draft_s": 0.0, "target_s": None, "heads_s": None, "seconds": t_plain,
             "speedup": 1.0}]
    for name, k, extra in METHODS:
        pipe = SpeculativeImagePipeline(target, drafter=None if k is None else draft, draft_tokens=k or 4)
        runs = [_timed(lambda: pipe(class_labels=labels, seed=0, output_type="tokens", **kw, **extra))
                for _ in range(repeats)]
        st, seconds = runs[0][0].stats, statistics.median([t for _, t in runs])
        eng = st.engine
        rows.append({"method": name, "lossless": st.lossless, "forwards_per_image": sum(st.target_forwards) / images,
                     "tau": st.tau, "acceptance": float(st.acceptance_grid.mean()),
                     "residual_per_image": (st.residual_draws or 0) / images, "draft_s": eng.time_draft,
                     "target_s": eng.time_prefill + eng.time_verify, "heads_s": eng.time_accept,
                     "seconds": seconds, "speedup": t_plain / seconds})
        if progress:
            print(f"{name:>28}: {st.summary()}", flush=True)
    result = {"device": str(target.device), "torch_threads": torch.get_num_threads(), "images": images,
              "labels": labels, "temperature": temperature, "guidance_scale": guidance_scale, "repeats": repeats,
              "sampling_steps": target.diffloss.num_steps, "tokens_per_image": cfg.num_image_tokens,
              "models": "random tiny (quick)" if quick else "zoo continuous AR (image_ar.zoo)", "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(markdown(result))
    if progress:
        print(markdown(result))
    return result


def markdown(result: dict) -> str:
    def sec(x):
        return "-" if x is None else f"{x:.2f}"

    lines = [f"# continuous-token image benchmark ({result['models']}, {result['images']} images x "
             f"{result['tokens_per_image']} tokens, {result['sampling_steps']} diffusion steps, temperature "
             f"{result['temperature']}, CFG {result['guidance_scale']})", "",
             "| method | lossless | target forwards / image | tau | accepted drafts | residual chains / image | "
             "draft s | target s | heads s | seconds | speedup vs plain AR |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {'yes' if r['lossless'] else '**LOSSY**'} | {r['forwards_per_image']:.1f} | "
                     f"{r['tau']:.2f} | {r['acceptance']:.2f} | {r['residual_per_image']:.1f} | {sec(r['draft_s'])} | "
                     f"{sec(r['target_s'])} | {sec(r['heads_s'])} | {r['seconds']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", "Every row samples the target's distribution exactly (CSpD's rule is exact; see "
              "image_ar.acceptance.cspd). Split times are from the first run: draft = the draft model and its head, "
              "target = the target transformer's forwards (prefill included), heads = the target's diffusion head "
              "(densities, residual and bonus draws). transformers' assisted generation has no row: a continuous-token "
              "AR is not a transformers model."]
    return "\n".join(lines) + "\n"
