"""`mmspec bench image`: every image method side by side on one target, one table (JSON + Markdown), maps and plots.

Default models: the image zoo (`image_ar.zoo`: a 384-wide, 8-layer class-conditional LlamaGen on 8x8 VQ codes, its
EAGLE-style head, a 2-layer LlamaGen draft model, and the classifier behind the Fréchet distance); `target=`, `vq=`,
`drafter=` take paths or ``zoo:NAME`` instead. One run: the same models, the same class labels and seeds for every
method, methods alternated round-robin over `repeats` passes (a pass generates every label once, one image per call:
the latency regime speculative decoding is for), one untimed warm-up image per method first, median pass time.

Rows: the plain AR sampler (`generate_tokens`, the reference), the pipeline without a drafter (the engine's own
overhead), SJD, the draft model and the head at several depths (all lossless), then LANTERN (delta), LANTERN++
(lambda), GSD and the TV budget with the head's drafts (LOSSY). Columns: tau (tokens per target forward, the prefill and
the bonus token included; the JSON rows also carry vLLM's mean_acceptance_length = 1 + accepted / drafts,
draft_acceptance_rate and acceptance_rate_per_position over the decoding steps, `mmspec.stats`), target forwards per
image, wall-clock speedup over the plain sampler, the speedup predicted from tau and forward costs measured in the same
run (``tau * t_fwd(1) / (t_fwd(k + 1) + t_draft per step)``), engine efficiency (measured / predicted), the measured
output TV of the lossy rows (per position, against the target's distribution), and the Fréchet distance on the zoo
classifier's features against real images of the image set and against the plain sampler's images (lossless rows give
the noise floor at this sample count). transformers' assisted generation has no row: LlamaGen is not a transformers
model and assisted generation does not apply CFG to the assistant.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mmspec.errors import InvalidInputError
from mmspec.stats import vllm_metrics_of

from .cli import heatmap, image_grid
from .drafters import ImageHead, ImageHeadDrafter, ImageModelDrafter, JacobiDrafter
from .models.llamagen import LlamaGen, generate_tokens
from .models.vq import to_pil
from .pipeline import SpeculativeImagePipeline

RELAXED = (("LANTERN delta=0.05", dict(acceptance="lantern", lantern_delta=0.05)),
           ("LANTERN delta=0.2", dict(acceptance="lantern", lantern_delta=0.2)),
           ("LANTERN++ lambda=2 (k=10)", dict(acceptance="lantern", lantern_lambda=2.0, lantern_k=10)),
           ("LANTERN++ lambda=5 (k=10)", dict(acceptance="lantern", lantern_lambda=5.0, lantern_k=10)),
           ("GSD", dict(acceptance="gsd")),
           ("LANTERN delta=0.2, TV budget 0.05", dict(acceptance="lantern", lantern_delta=0.2, tv_budget=0.05)),
           ("GSD, TV budget 0.05", dict(acceptance="gsd", tv_budget=0.05)))
HEAD_DEPTHS, DRAFT_DEPTHS, RELAXED_DEPTH = (2, 3, 4), (2, 3), 4
REFERENCE_IMAGES = 1000
FD_DIMS = 8  # principal axes of the real images' classifier features the FD is computed in


@dataclass
class Method:
    """One row: `run(labels, seeds)` -> (tokens (N, T), per-image ImageStats or None for the plain sampler)."""

    name: str
    run: Callable
    lossless: bool
    depth: int = 0  # tokens drafted per step (the verification block is depth + 1)
    relaxed_of: str | None = None  # the lossless row with the same drafts (the gain of a relaxed rule is over it)
    times: list[float] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    stats: list = field(default_factory=list)


def read_labels(path) -> list[int]:
    """Class labels from a text file, one int per line (blank lines and # comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"labels file {str(p)!r} does not exist: expected a text file, one int per line")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            out.append(int(line))
        except ValueError:
            raise InvalidInputError(f"{str(p)!r} line {i}: {line!r} is not an int class label") from None
    if not out:
        raise InvalidInputError(f"labels file {str(p)!r} holds no labels")
    return out


# --- models -----------------------------------------------------------------------------------------------------------
def _models(target, vq, drafter, quick: bool, progress: bool) -> dict:
    """target / vq / drafters / classifier: the zoo's unless given (paths or zoo:NAME)."""
    from .models.vq import load_vq
    from .zoo import resolve

    tag = "@quick" if quick else ""
    zoo_target = target is None
    target = LlamaGen.from_pretrained(resolve(target or f"zoo:llamagen{tag}", progress))
    vq = load_vq(resolve(vq or f"zoo:vq{tag}", progress))
    drafters = {}
    if drafter is not None:
        drafters["given"] = drafter if drafter == "jacobi" else resolve(drafter, progress)
    elif zoo_target:
        drafters["draft"] = LlamaGen.from_pretrained(resolve(f"zoo:llamagen-draft{tag}", progress))
        drafters["head"] = ImageHead.from_pretrained(resolve(f"zoo:llamagen-head{tag}", progress), target)
    classifier = None
    try:
        from .frechet import ShapeClassifier

        classifier = ShapeClassifier.from_pretrained(resolve(f"zoo:image-classifier{tag}", progress))
    except Exception as e:  # FD is a column, not a reason to stop: say why it is missing
        if progress:
            print(f"no Fréchet distance: the zoo classifier is unavailable ({type(e).__name__}: {e})")
    return {"target": target, "vq": vq, "drafters": drafters, "classifier": classifier,
            "names": "zoo" + (" (quick)" if quick else "") if zoo_target else "given"}


def _methods(m: dict, kw: dict, temperature: float) -> list[Method]:
    target, vq = m["target"], m["vq"]

    def plain(labels, seeds):
        toks = [generate_tokens(target, torch.tensor([lab]), generator=torch.Generator().manual_seed(s), **kw)
                for lab, s in zip(labels, seeds)]
        return torch.cat(toks), None

    def pipe_run(pipe, rule=None):
        def run(labels, seeds):
            outs = [pipe(class_labels=[lab], seed=s, output_type="tokens", **kw, **(rule or {}))
                    for lab, s in zip(labels, seeds)]
            return torch.cat([o.tokens for o in outs]), [o.stats for o in outs]
        return run

    def row(name, drafter, depth):
        return Method(name, pipe_run(SpeculativeImagePipeline(target, vq, drafter)), True, depth)

    rows = [Method("plain AR (generate_tokens)", plain, True), row("pipeline, no drafter", None, 0)]
    rows += [row(f"SJD (window {w})", JacobiDrafter(w), w - 1) for w in (4, 16)]
    relaxed = ("SJD (window 16)", lambda: JacobiDrafter(16))
    for kind, obj in m["drafters"].items():
        if isinstance(obj, ImageHead):
            rows += [row(f"head (k={k})", ImageHeadDrafter(obj, k), k) for k in HEAD_DEPTHS]
            relaxed = (f"head (k={RELAXED_DEPTH})", lambda head=obj: ImageHeadDrafter(head, RELAXED_DEPTH))
        elif isinstance(obj, LlamaGen):
            rows += [row(f"draft model (k={k})", ImageModelDrafter(obj, k), k) for k in DRAFT_DEPTHS]
        else:  # a given path or "jacobi": the pipeline loads it (a head directory, a LlamaGen, SJD)
            pipe = SpeculativeImagePipeline(target, vq, obj, tree=RELAXED_DEPTH)
            depth = pipe.drafter.window - 1 if obj == "jacobi" else RELAXED_DEPTH
            rows.append(Method(f"drafter {obj} (k={depth})", pipe_run(pipe), True, depth))
            relaxed = (rows[-1].name, lambda given=pipe: given.drafter)
    if temperature > 0:  # relaxed rules relax *sampling*
        base, make = relaxed
        depth = next(r.depth for r in rows if r.name == base)
        pipe = SpeculativeImagePipeline(target, vq, make())
        rows += [Method(f"{name} + {base}", pipe_run(pipe, rule), False, depth, base) for name, rule in RELAXED]
    return rows


# --- measuring --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def forward_costs(model: LlamaGen, guidance_scale: float, sizes, repeats: int = 15) -> dict[int, float]:
    """Seconds of one cached target forward of T new tokens (CFG: 2 rows) after half an image, for T in sizes
    (the median of `repeats`): t_fwd(1) is plain decoding's step, t_fwd(k + 1) a verification of k drafts."""
    rows = 2 if guidance_scale != 1.0 else 1
    n, half = model.config.cls_token_num, model.config.num_image_tokens // 2
    cond = torch.zeros(rows, dtype=torch.long, device=model.device)
    if rows == 2:
        cond[1] = model.config.num_classes
    out = {}
    for t in sorted(set(sizes)):
        cache = model.new_cache()
        model(None, cond, cache=cache)
        model(torch.zeros(rows, half, dtype=torch.long, device=model.device), cache=cache)
        times = []
        size = min(t, model.config.max_seq_len - n - half)
        for _ in range(repeats):
            cache.crop(n + half)
            t0 = time.perf_counter()
            model(torch.zeros(rows, size, dtype=torch.long, device=model.device), cache=cache)
            times.append(time.perf_counter() - t0)
        out[t] = statistics.median(times)
    return out


def _one_image(method: Method, label: int, seed: int) -> float:
    t0 = time.perf_counter()
    tokens, stats = method.run([label], [seed])
    seconds = time.perf_counter() - t0
    method.tokens.append(tokens)
    method.stats += stats or []
    return seconds


def _passes(methods: list[Method], labels: list[int], seed: int, repeats: int, model, guidance_scale: float,
            progress: bool) -> dict[int, float]:
    """`repeats` passes over the labels; within a pass every method generates each image in turn (the starting
    method rotating), so that a slow spell of the machine falls on every method alike. Returns the forward costs
    (median over the passes, measured once per pass)."""
    sizes = [1] + [m.depth + 1 for m in methods]
    costs: dict[int, list[float]] = {}
    for r in range(repeats):
        totals = [0.0] * len(methods)
        for i, label in enumerate(labels):
            s = seed + r * len(labels) + i
            for j in range(len(methods)):
                k = (i + j) % len(methods)
                totals[k] += _one_image(methods[k], label, s)
        for m, t in zip(methods, totals):
            m.times.append(t)
        for t, v in forward_costs(model, guidance_scale, sizes).items():
            costs.setdefault(t, []).append(v)
        if progress:
            print(f"pass {r + 1}/{repeats}: " + ", ".join(f"{m.name} {t:.2f} s" for m, t in zip(methods, totals)),
                  flush=True)
    return {t: statistics.median(v) for t, v in costs.items()}


def _row(method: Method, ref: dict, costs: dict, images: int) -> dict:
    """Aggregate one method's passes into its table row."""
    seconds = statistics.median(method.times)
    speedup = statistics.median(p / t for p, t in zip(ref["plain_times"], method.times))  # per pass: same spell
    out = {"method": method.name, "lossless": method.lossless, "draft_tokens": method.depth, "seconds": seconds,
           "seconds_per_image": seconds / images, "speedup": speedup, "pass_seconds": list(method.times)}
    if not method.stats:  # the plain sampler
        return {**out, "tau": 1.0, "forwards_per_image": float(ref["tokens"]), "accepted_fraction": 0.0,
                "predicted_speedup": None, "efficiency": None, "tv_mean": None, "tv_max": None,
                "mean_acceptance_length": None, "draft_acceptance_rate": None, "acceptance_rate_per_position": None}
    st = method.stats
    steps = [max(sum(s.target_forwards) - 1, 1) for s in st]  # decoding steps (the prefill excluded)
    draft_step = sum(s.engine.time_drafter_model for s in st) / sum(steps)
    tau = sum(s.tau for s in st) / len(st)
    block = costs.get(method.depth + 1)
    predicted = tau * costs[1] / (block + draft_step) if block else None
    tvs = [s.tv_mean for s in st if s.tv_mean is not None]
    return {**out, "tau": tau, "forwards_per_image": sum(sum(s.target_forwards) for s in st) / len(st),
            "accepted_fraction": sum(float(s.acceptance_grid.mean()) for s in st) / len(st),
            "draft_model_ms_per_step": 1e3 * draft_step,
            "target_model_ms_per_step": 1e3 * sum(s.engine.time_target_model for s in st) / sum(steps),
            "engine_ms_per_step": 1e3 * sum(s.engine.time_engine for s in st) / sum(steps),
            "predicted_speedup": predicted, "efficiency": None if not predicted else out["speedup"] / predicted,
            **vllm_metrics_of([s.engine for s in st], undefined=None),  # vLLM's names, over every image
            "tv_mean": sum(tvs) / len(tvs) if tvs else None,
            "tv_max": max((s.tv_max for s in st if s.tv_max is not None), default=None)}


def run_image_benchmark(out_dir="bench_out/image", *, target=None, vq=None, drafter=None, labels=None,
                        images: int = 10, temperature: float = 1.0, top_k: int = 0, guidance_scale: float = 4.0,
                        repeats: int = 3, seed: int = 0, quick: bool = False, progress: bool = True) -> dict:
    """Run every method on the class labels (`labels`: a list, a file with one int per line, or None: 0, 1, ... for
    `images` images) and write result.json, result.md, image grids, acceptance maps and (with matplotlib) plots.
    quick: the quick zoo (tiny models, seconds; the numbers mean nothing), 3 images, one pass."""
    if quick:
        images, repeats = 3, 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = _models(target, vq, drafter, quick, progress)
    model = m["target"]
    labels = read_labels(labels) if isinstance(labels, (str, Path)) else (
        list(labels) if labels is not None else [i % model.config.num_classes for i in range(images)])
    kw = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k)
    methods = _methods(m, kw, temperature)
    for meth in methods:  # warm-up (untimed, not kept): first-call allocations, neighbour tables
        meth.run(labels[:1], [seed + 10**6])
    costs = _passes(methods, labels, seed, repeats, model, guidance_scale, progress)
    ref = {"plain_times": methods[0].times, "tokens": model.config.num_image_tokens}
    rows = [_row(meth, ref, costs, len(labels)) for meth in methods]
    by_name = {r["method"]: r for r in rows}
    for meth, r in zip(methods, rows):  # a relaxed rule's gain over lossless verification of the same drafts
        r["gain_over_lossless"] = r["speedup"] / by_name[meth.relaxed_of]["speedup"] if meth.relaxed_of else None
    _frechet(rows, methods, m, out, len(labels))
    for meth in methods[1:]:
        if meth.stats:
            grid = torch.stack([s.acceptance_grid for s in meth.stats]).mean(0)
            heatmap(grid).save(out / f"acceptance_{_slug(meth.name)}.png")
    result = {"device": str(model.device), "torch_threads": torch.get_num_threads(), "models": m["names"],
              "images": len(labels), "labels": labels, "repeats": repeats, "temperature": temperature,
              "top_k": top_k, "guidance_scale": guidance_scale, "seed": seed,
              "forward_ms": {str(k): 1e3 * v for k, v in sorted(costs.items())}, "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(markdown(result))
    _plots(result, out)
    if progress:
        print(markdown(result))
    return result


def _frechet(rows: list[dict], methods: list[Method], m: dict, out: Path, n_images: int) -> None:
    """FD of every method's images (all passes) against real images of the image set and against the pooled images
    of the *other* lossless rows (same distribution: their FD is the noise floor), in the reference's top FD_DIMS
    principal axes of the classifier's features; saves each method's first-pass images as a grid."""
    from . import shapes
    from .frechet import frechet_distance, image_features, principal_axes, project

    vq, grid, clf = m["vq"], m["target"].config.grid_size, m["classifier"]
    feats = []
    for meth in methods:
        with torch.no_grad():
            decoded = vq.decode_codes(torch.cat(meth.tokens), grid)
        image_grid(to_pil(decoded[:n_images]), rows=max(1, n_images // 10)).save(out / f"images_{_slug(meth.name)}.png")
        feats.append(None if clf is None else image_features(clf, decoded))
    for row in rows:
        row["fd_real"] = row["fd_lossless"] = None
    if clf is None or len(feats[0]) < 2:
        return
    real = None
    if m["target"].config.num_classes == shapes.NUM_CLASSES:
        real = image_features(clf, shapes.dataset(REFERENCE_IMAGES, seed=20_000, size=vq.image_size)[0])
    axes = principal_axes(real if real is not None else torch.cat(feats), FD_DIMS)
    proj = [project(f, axes) for f in feats]
    lossless = [i for i, meth in enumerate(methods) if meth.lossless]
    for i, row in enumerate(rows):
        row["fd_samples"] = len(proj[i])
        if real is not None:
            row["fd_real"] = frechet_distance(proj[i], project(real, axes))
        pool = [proj[j] for j in lossless if j != i]
        if pool:
            row["fd_lossless"] = frechet_distance(proj[i], torch.cat(pool))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    fwd = result["forward_ms"]
    lines = [f"# image benchmark ({result['models']} models, {result['images']} images x {result['repeats']} passes, "
             f"temperature {result['temperature']}, top-k {result['top_k'] or 'off'}, CFG {result['guidance_scale']}, "
             f"{result['device']}, {result['torch_threads']} thread(s))", "",
             "| method | lossless | tau | target fwd / image | speedup vs plain | predicted | efficiency | "
             "TV mean / max | gain over lossless | FD vs real | FD vs lossless | s / image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tv = "0 (exact)" if r["lossless"] else f"{_f(r['tv_mean'], '{:.4f}')} / {_f(r['tv_max'], '{:.4f}')}"
        lines.append(f"| {r['method']} | {'yes' if r['lossless'] else '**LOSSY**'} | {r['tau']:.2f} | "
                     f"{r['forwards_per_image']:.1f} | **{r['speedup']:.2f}x** | {_f(r['predicted_speedup'])} | "
                     f"{_f(r['efficiency'])} | {tv} | {_f(r.get('gain_over_lossless'), '{:.2f}x')} | "
                     f"{_f(r.get('fd_real'), '{:.3f}')} | {_f(r.get('fd_lossless'), '{:.3f}')} | "
                     f"{r['seconds_per_image']:.3f} |")
    lines += ["", "Target forward (CFG, 2 rows) by new tokens T, ms: " +
              ", ".join(f"T={k}: {v:.1f}" for k, v in fwd.items()) + ".", "",
              "tau: tokens per target forward (mean acceptance length, bonus included). predicted: tau * t_fwd(1) / "
              "(t_fwd(k+1) + drafter model time per step), from forward costs measured in this run; efficiency = "
              "measured / predicted (what the engine's own work costs). speedup: median over passes of the plain "
              "sampler's pass time / the method's (methods alternate image by image). gain over lossless: a relaxed "
              "rule's speedup / that of lossless verification of the same drafts. Lossy rows change the output distribution: "
              "TV is measured during generation, per position, against the target's distribution. FD: Fréchet "
              f"distance on the zoo classifier's features (image_ar.frechet), in the top {FD_DIMS} principal axes of "
              f"{REFERENCE_IMAGES} real images' features, against those real images and against the pooled images of "
              "the other lossless rows (which share the target's distribution: their own FD vs lossless is the noise "
              "floor at this sample count)."]
    return "\n".join(lines) + "\n"


def _plots(result: dict, out: Path) -> None:
    """speed vs tau (every row but the reference) and speed vs FD against real images (every row with an FD): PNGs
    drawn with PIL (image_ar.plots; matplotlib is not a dependency)."""
    from .plots import scatter_png

    rows = result["rows"]
    scatter_png(out / "speed_vs_acceptance.png",
                [(r["tau"], r["speedup"], r["method"], r["lossless"]) for r in rows[1:]],
                xlabel="tau (tokens per target forward)", ylabel="speedup vs plain AR",
                title=f"speed vs acceptance (CFG {result['guidance_scale']}, T={result['temperature']})", hline=1.0)
    scatter_png(out / "speed_vs_quality.png",
                [(r.get("fd_real"), r["speedup"], r["method"], r["lossless"]) for r in rows],
                xlabel="Frechet distance vs real images (lower is better)", ylabel="speedup vs plain AR",
                title="speed vs quality (relaxed rules are LOSSY)", hline=1.0)
