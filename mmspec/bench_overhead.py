"""Engine-overhead sweep: mmspec's per-step cost outside model forwards, against target forwards of growing cost.

The engine's own work per step (building blocks and masks, acceptance, cache compaction, drafting bookkeeping) does
not depend on the model, while a target forward t_fwd(1) grows with it. This benchmark measures both on
:func:`mmspec.testing.pairs.layer_pair` pairs whose targets have more and more layers (same 1-layer drafter width, same
prompts), so the table shows the overhead in ms per step and as a share of t_fwd(1) at each size, and where the
share falls under a threshold (10% by default). Every method is greedy and must reproduce plain decoding token for
token (`equal`).

Methods, all at batch size 1: plain decoding, a chain of 4, the static tree (2, 2, 1), EAGLE-2 (4, 4, 16), with the
layer-truncated self-draft. The repeats go round-robin over the methods of one size (machine drift hits them alike);
overhead and t_fwd(1) are medians over repeats.

Run ``mmspec bench overhead --layers 4 8 12`` (or ``run_overhead_sweep()``); results go to
``out_dir/overhead.{json,md}`` and, where matplotlib is installed, ``overhead.png``.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from .bench import (CHAIN_K, DYNAMIC_TREE, STATIC_TREE, _hf_version, _load, _mm_run, _per_step, _PHASES, _vllm_fields,
                    make_prompts, pyplot)
from .loop import SpeculativeDecoder
from .testing.pairs import layer_pair

SWEEP_METHODS = {
    "plain": None,
    f"chain{CHAIN_K}": CHAIN_K,
    "tree221": STATIC_TREE,
    "eagle2": DYNAMIC_TREE,
}


def _measure_size(layers: int, hidden: int, prompts, new_tokens: int, repeats: int, bar) -> list[dict]:
    """Every method on one pair size: rows of per-step overhead, its phases and the model times."""
    target, drafter = layer_pair(layers=layers, hidden=hidden)
    decoders = {name: SpeculativeDecoder(target) if tree is None else SpeculativeDecoder(target, drafter, tree=tree)
                for name, tree in SWEEP_METHODS.items()}
    reps = {name: [] for name in decoders}
    for rep in range(-1, repeats):
        for name, dec in decoders.items():
            bar.set_postfix_str(f"layers={layers} {name}" + (" warm-up" if rep < 0 else f" run {rep + 1}"))
            if rep < 0:
                _mm_run(dec, prompts[:2], 1, min(new_tokens, 32))
            else:
                reps[name].append(_mm_run(dec, prompts, 1, new_tokens))
            bar.update(1)
    t_fwd1 = _per_step(reps["plain"], "time_target_model")
    reference = reps["plain"][0].sequences
    rows = []
    for name, rs in reps.items():
        overhead = _per_step(rs, "time_engine")
        m = rs[0].m
        rows.append(dict(
            layers=layers, hidden=hidden, method=name, t_fwd1_ms=t_fwd1, overhead_ms=overhead,
            overhead_pct=100.0 * overhead / t_fwd1 if t_fwd1 else None,
            **{f"{part}_ms": _per_step(rs, fn) for part, fn in _PHASES.items()},
            target_model_ms=_per_step(rs, "time_target_model"), drafter_model_ms=_per_step(rs, "time_drafter_model"),
            tau=m["committed"] / m["steps"] if m["steps"] else 0.0,
            **_vllm_fields(m),  # vLLM's names (mmspec.stats); ratios null for plain decoding
            overhead_all_ms=[1e3 * r.m["time_engine"] / max(r.m["batched_steps"], 1) for r in rs],
            equal=all(r.sequences == reference for r in rs)))
    return rows


def run_overhead_sweep(out_dir="bench_out/overhead", layers=(4, 8, 12), hidden: int = 256, new_tokens: int = 128,
                       n_prompts: int = 8, repeats: int = 3, threshold_pct: float = 10.0, quick: bool = False,
                       progress: bool = True) -> dict:
    """Measure engine overhead per step on layer_pair targets of each depth in `layers`; write overhead.{json,md}.

    quick=True shrinks everything for tests (layers (2, 3), hidden 64, 16 tokens, 2 prompts, 1 repeat)."""
    from tqdm.auto import tqdm

    if quick:
        layers, hidden, new_tokens, n_prompts, repeats = (2, 3), 64, 16, 2, 1
    layers = tuple(int(n) for n in layers)
    if not layers or min(layers) < 2:
        raise ValueError(f"layers={layers}: every target needs at least 2 layers (the drafter is its first layer)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(n_prompts, 512)
    bar = tqdm(total=len(layers) * len(SWEEP_METHODS) * (1 + repeats), desc="overhead sweep", disable=not progress,
               leave=False)
    t_start, load_start = time.perf_counter(), _load()
    try:
        with torch.inference_mode():
            rows = [row for n in layers for row in _measure_size(n, hidden, prompts, new_tokens, repeats, bar)]
    finally:
        bar.close()
    result = dict(
        config=dict(pair=f"mmspec.testing.pairs.layer_pair(layers=L, hidden={hidden})", layers=list(layers),
                    hidden=hidden, drafter_layers=1, new_tokens=new_tokens, n_prompts=n_prompts, repeats=repeats,
                    threshold_pct=threshold_pct, quick=quick, batch=1, temperature=0.0),
        environment=dict(torch=torch.__version__, transformers=_hf_version(), python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads(), load_avg_start=load_start,
                         load_avg_end=_load()),
        rows=rows, all_equal=all(r["equal"] for r in rows), elapsed_s=time.perf_counter() - t_start,
    )
    result["first_under_threshold"] = _first_under(rows, threshold_pct)
    md = overhead_markdown(result)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    (out / "overhead.md").write_text(md)
    _maybe_plot(result, out / "overhead.png")
    print(md)
    return result


def _first_under(rows: list[dict], threshold: float) -> dict:
    """Per method: the smallest target depth from which its overhead share stays at or under the threshold."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["layers"])
        first = None
        for i, r in enumerate(mine):
            if all(x["overhead_pct"] is not None and x["overhead_pct"] <= threshold for x in mine[i:]):
                first = r["layers"]
                break
        out[method] = first
    return out


def overhead_markdown(result: dict) -> str:
    cfg, env, rows = result["config"], result["environment"], result["rows"]
    th = cfg["threshold_pct"]
    lines = [
        "# mmspec engine overhead sweep", "",
        f"Pairs: `{cfg['pair']}` for L in {cfg['layers']} (1-layer self-draft), {cfg['n_prompts']} prompts, "
        f"{cfg['new_tokens']} new tokens each, greedy, batch 1; medians of {cfg['repeats']} run(s) after a warm-up. "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} thread(s), "
        f"{env['machine']}.", "",
        "Overhead = wall time per step outside the target's and the drafter's model forwards; t_fwd(1) = one "
        "target forward of plain decoding (1 token).", "",
        f"| target layers | t_fwd(1) ms | method | overhead ms/step | % of t_fwd(1) | <= {th:g}% | draft-side ms | "
        "verify-side ms | accept ms | other ms | tau | equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["overhead_pct"] is not None and r["overhead_pct"] <= th
        lines.append(
            f"| {r['layers']} | {r['t_fwd1_ms']:.2f} | {r['method']} | {r['overhead_ms']:.3f} | "
            f"{r['overhead_pct']:.1f}% | {'yes' if ok else 'no'} | {r['draft_side_ms']:.3f} | {r['verify_side_ms']:.3f} | "
            f"{r['accept_ms']:.3f} | {r['other_ms']:.3f} | {r['tau']:.2f} | {'yes' if r['equal'] else '**NO**'} |")
    lines += ["", f"Smallest target depth from which each method stays at or under {th:g}%: " + ", ".join(
        f"{m}: {'L=' + str(n) if n is not None else 'none of these'}" for m, n in result["first_under_threshold"].items())
        + "."]
    if not result["all_equal"]:
        lines += ["", "> **WARNING: some rows differ from plain greedy decoding; a lossless engine must match.**"]
    return "\n".join(lines) + "\n"


def _maybe_plot(result: dict, path: Path) -> None:
    """Overhead share vs t_fwd(1) per method, with the threshold line (only if matplotlib is installed)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        mine = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["layers"])
        ax.plot([r["t_fwd1_ms"] for r in mine], [r["overhead_pct"] for r in mine], marker="o", label=method)
    ax.axhline(result["config"]["threshold_pct"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("t_fwd(1), ms (target layers grow left to right)")
    ax.set_ylabel("engine overhead, % of t_fwd(1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
