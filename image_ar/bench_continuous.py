"""`mmspec bench continuous`: CSpD side by side with target-only sampling on continuous-token (MAR-style) models.

Default models: the zoo's (`image_ar.zoo`: a 256-wide, 10-layer ContinuousAR with its diffusion head on 4-channel KL
latents, and a 1-layer ContinuousAR drafter); `target=` / `drafter=` take paths or ``zoo:NAME`` instead. Rows: the
plain sampler (`generate_continuous`, the reference), the pipeline without a drafter, and CSpD (Wang et al. 2024,
arXiv:2411.11925) at k = 2 and 4 draft tokens and with 15% target-only pre-filling. Every row is lossless: CSpD's rule
is exact (image_ar.acceptance.cspd; the two-sample test is in tests/imagegen/test_cspd.py). One run, the same labels
and seeds for every method, one image per call, methods alternated image by image (the starting method rotating) over
`repeats` passes after an untimed warm-up image each; speedup = median over passes of the plain sampler's pass time
over the method's.

The time split says where a CSpD step goes: draft (the draft model's transformer and its diffusion-head sampling
chains), target transformer (verification forwards), target heads (the densities of the drafted chains under the
target's head, the residual and bonus draws). CSpD pays for every drafted token with a whole denoising chain of the
draft's head and a density evaluation of the target's: it gains only when the target's transformer dominates a token's
cost and enough drafts are accepted. transformers' assisted generation has no row (no vocabulary to verify against).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from mmspec.stats import vllm_metrics_of

from .bench import read_labels
from .models.continuous_ar import ContinuousAR, generate_continuous
from .pipeline import SpeculativeImagePipeline

METHODS = (("pipeline, no drafter", None, {}), ("CSpD (k=2)", 2, {}), ("CSpD (k=4)", 4, {}),
           ("CSpD (k=4, prefill 0.15)", 4, {"prefill_ratio": 0.15}))


def _models(target, drafter, quick: bool, progress: bool):
    from .zoo import resolve

    tag = "@quick" if quick else ""
    return (ContinuousAR.from_pretrained(resolve(target or f"zoo:continuous{tag}", progress)),
            ContinuousAR.from_pretrained(resolve(drafter or f"zoo:continuous-draft{tag}", progress)))


def _plain(target, labels, seeds, kw):
    return torch.cat([generate_continuous(target, [lab], generator=torch.Generator().manual_seed(s), **kw)
                      for lab, s in zip(labels, seeds)]), []


def _pipe(pipe, extra, labels, seeds, kw):
    outs = [pipe(class_labels=[lab], seed=s, output_type="tokens", **kw, **extra) for lab, s in zip(labels, seeds)]
    return torch.cat([o.tokens for o in outs]), [o.stats for o in outs]


def run_continuous_benchmark(out_dir="bench_out/image_continuous", *, target=None, drafter=None, labels=None,
                             images: int = 10, guidance_scale: float = 2.0, temperature: float = 1.0,
                             repeats: int = 3, seed: int = 0, quick: bool = False, progress: bool = True) -> dict:
    """Target-only vs CSpD on the class labels (a list, a file with one int per line, or None: 0, 1, ... for
    `images` images); writes result.json and result.md. quick: the quick zoo, 2 images, one pass."""
    if quick:
        images, repeats = 2, 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = "zoo (quick)" if quick and target is None else "zoo" if target is None else "given"
    target, draft = _models(target, drafter, quick, progress)
    cfg = target.config
    labels = read_labels(labels) if isinstance(labels, (str, Path)) else (
        list(labels) if labels is not None else [i % cfg.num_classes for i in range(images)])
    kw = dict(guidance_scale=guidance_scale, temperature=temperature)
    runs = [("plain AR (generate_continuous)", lambda ls, ss: _plain(target, ls, ss, kw))]
    for name, k, extra in METHODS:
        pipe = SpeculativeImagePipeline(target, drafter=None if k is None else draft, tree=k)
        runs.append((name, lambda ls, ss, p=pipe, e=extra: _pipe(p, e, ls, ss, kw)))
    for _, run in runs:  # warm-up, untimed
        run(labels[:1], [seed + 10**6])
    times = {name: [] for name, _ in runs}
    stats = {name: [] for name, _ in runs}
    for r in range(repeats):  # image by image, the starting method rotating: a slow spell hits every method alike
        totals = {name: 0.0 for name, _ in runs}
        for i, label in enumerate(labels):
            s = seed + r * len(labels) + i
            for j in range(len(runs)):
                name, run = runs[(i + j) % len(runs)]
                t0 = time.perf_counter()
                _, st = run([label], [s])
                totals[name] += time.perf_counter() - t0
                stats[name] += st
        for name, _ in runs:
            times[name].append(totals[name])
        if progress:
            print(f"pass {r + 1}/{repeats}: " + ", ".join(f"{n} {t:.2f} s" for n, t in totals.items()), flush=True)
    plain = times[runs[0][0]]
    rows = [_row(name, stats[name], times[name], plain, len(labels), cfg) for name, _ in runs]
    result = {"device": str(target.device), "torch_threads": torch.get_num_threads(), "images": len(labels),
              "labels": labels, "repeats": repeats, "temperature": temperature, "guidance_scale": guidance_scale,
              "sampling_steps": target.diffloss.num_steps, "draft_sampling_steps": draft.diffloss.num_steps,
              "tokens_per_image": cfg.num_image_tokens,
              "target": f"ContinuousAR {cfg.dim} x {cfg.n_layer}, head {cfg.head_width} x {cfg.head_depth}",
              "drafter": f"ContinuousAR {draft.config.dim} x {draft.config.n_layer}, head "
                         f"{draft.config.head_width} x {draft.config.head_depth}",
              "models": names, "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(markdown(result))
    _plots(result, out)
    if progress:
        print(markdown(result))
    return result


def _row(name: str, st: list, times: list[float], plain: list[float], images: int, cfg) -> dict:
    """A table row; speedup = median over passes of the plain sampler's pass time / this method's (same spell of the
    machine); time split per image (mean over every image of every pass)."""
    seconds = statistics.median(times)
    row = {"method": name, "lossless": True, "seconds": seconds, "seconds_per_image": seconds / images,
           "speedup": statistics.median(p / t for p, t in zip(plain, times)), "pass_seconds": list(times)}
    if not st:
        return {**row, "forwards_per_image": float(cfg.num_image_tokens), "tau": 1.0, "accepted_fraction": 0.0,
                "residual_per_image": 0.0, "draft_s": None, "target_s": None, "heads_s": None, "engine_s": None,
                "mean_acceptance_length": None, "draft_acceptance_rate": None, "acceptance_rate_per_position": None}
    n = len(st)
    eng = [s.engine for s in st]
    return {**row, "lossless": all(s.lossless for s in st),
            "forwards_per_image": sum(sum(s.target_forwards) for s in st) / n,
            "tau": sum(s.tau for s in st) / n,
            "accepted_fraction": sum(float(s.acceptance_grid.mean()) for s in st) / n,
            **vllm_metrics_of(eng, undefined=None),  # vLLM's names (mmspec.stats), over every image
            "residual_per_image": sum(s.residual_draws or 0 for s in st) / n,
            "draft_s": sum(e.time_draft for e in eng) / n,  # drafter: transformer + head chains
            "target_s": sum(e.time_prefill + e.time_verify for e in eng) / n,  # target transformer forwards
            "heads_s": sum(e.time_accept for e in eng) / n,  # target head: densities, residual, bonus draws
            "engine_s": sum(max(0.0, e.time_total - e.time_prefill - e.time_draft - e.time_verify - e.time_accept)
                            for e in eng) / n}


def markdown(result: dict) -> str:
    def sec(x):
        return "-" if x is None else f"{1e3 * x:.0f}"

    lines = [f"# continuous-token image benchmark ({result['models']} models; target {result['target']}, drafter "
             f"{result['drafter']}; {result['images']} images x {result['repeats']} passes x "
             f"{result['tokens_per_image']} tokens, {result['sampling_steps']} diffusion steps, temperature "
             f"{result['temperature']}, CFG {result['guidance_scale']}, {result['device']}, "
             f"{result['torch_threads']} thread(s))", "",
             "| method | lossless | tau | target fwd / image | accepted | residual chains / image | "
             "ms / image: draft | target transformer | target heads | engine | s / image | speedup vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {'yes' if r['lossless'] else '**LOSSY**'} | {r['tau']:.2f} | "
                     f"{r['forwards_per_image']:.1f} | {r['accepted_fraction']:.2f} | {r['residual_per_image']:.1f} | "
                     f"{sec(r['draft_s'])} | {sec(r['target_s'])} | {sec(r['heads_s'])} | {sec(r['engine_s'])} | "
                     f"{r['seconds_per_image']:.3f} | **{r['speedup']:.2f}x** |")
    lines += ["", "Every row samples the target's distribution exactly (CSpD's rule is exact; see "
              "image_ar.acceptance.cspd). Time split per image: draft = the draft model's transformer and its "
              "diffusion-head chains; target transformer = the target's forwards (prefill included); target heads = "
              "the target's diffusion head (chain densities, residual and bonus draws); engine = the rest. "
              "transformers' assisted generation has no row: a continuous-token AR is not a transformers model."]
    return "\n".join(lines) + "\n"


def _plots(result: dict, out: Path) -> None:
    """speed vs tau (PIL, image_ar.plots)."""
    from .plots import scatter_png

    scatter_png(out / "speed_vs_acceptance.png",
                [(r["tau"], r["speedup"], r["method"], r["lossless"]) for r in result["rows"][1:]],
                xlabel="tau (tokens per target forward)", ylabel="speedup vs plain AR",
                title="continuous tokens: speed vs acceptance", hline=1.0)
