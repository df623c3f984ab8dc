"""A small in-process comparison of VLM drafters (and compressors) for notebooks: one target, the same questions.

    rows = compare_drafters(svlm.model, svlm.processor, [("EAGLE-1", "zoo:vlm-eagle"), ("n-gram", "ngram"),
                            ("EAGLE-1 + avg_pool 2", EagleDrafter(head, 4, compressor=AvgPool(2)))], questions)

Greedy decoding, a chain of `k` drafted tokens per step (or each drafter's own block), one request at a time. Every
method answers every question once untimed (warm-up), then `repeats` passes alternate the methods (the order
rotated per question) so a slow spell of the shared machine hits them alike. Per row: vLLM's mean acceptance length
(1 + accepted drafts per drafted step), tau, milliseconds per token (median pass), the wall-clock speedup over plain
decoding in the same passes, the speedup predicted from tau and the model forward times the loop measured
(`mmspec.trace.predicted_speedup`: what the row would reach with no engine overhead), and whether every answer is
token for token the plain one (it must be: greedy speculative decoding is lossless). `mmspec bench vlm` is the full
benchmark (transformers' rows, sampling, files); this is its in-notebook cousin.
"""
from __future__ import annotations

import statistics
import time

from mmspec.stats import vllm_metrics_of
from mmspec.trace import predicted_speedup

from .pipeline import SpeculativeVLM, load_drafter


def compare_drafters(model, processor, drafters: list[tuple], rows: list[dict], *, k: int = 4,
                     max_new_tokens: int = 48, repeats: int = 2) -> list[dict]:
    """drafters: (name, spec) or (name, spec, tree) with spec a path / "zoo:NAME" / "ngram" / model / Drafter;
    rows: [{"images": [...], "prompt": str}]. Returns one dict per method, plain decoding first."""
    methods = [("plain decoding", SpeculativeVLM(model, processor, None))]
    for entry in drafters:
        name, spec, tree = (entry + (k,))[:3]
        drafter, extra = load_drafter(spec, model, tree=tree)
        methods.append((name, SpeculativeVLM(model, processor, drafter, tree=tree, **extra)))

    def run(svlm, row):
        return svlm.generate(images=row["images"], prompt=row["prompt"], max_new_tokens=max_new_tokens)

    for _, svlm in methods:
        run(svlm, rows[0])  # warm-up, untimed
    times = {name: [] for name, _ in methods}
    outs = {name: [] for name, _ in methods}
    for rep in range(repeats):
        spent = {name: 0.0 for name, _ in methods}
        for i, row in enumerate(rows):
            shift = (rep * len(rows) + i) % len(methods)
            for name, svlm in methods[shift:] + methods[:shift]:
                t0 = time.perf_counter()
                out = run(svlm, row)
                spent[name] += time.perf_counter() - t0
                if rep == 0:
                    outs[name].append(out)
        for name in spent:
            times[name].append(spent[name])
    plain_name = methods[0][0]
    plain_tokens = sum(len(o.token_ids) for o in outs[plain_name])
    plain_stats = [o.stats for o in outs[plain_name]]
    table = []
    for name, _ in methods:
        stats = [o.stats for o in outs[name]]
        tokens = sum(len(o.token_ids) for o in outs[name])
        speed = [(p / plain_tokens) / (t / tokens) for p, t in zip(times[plain_name], times[name])]
        m = vllm_metrics_of(stats, undefined=None)
        table.append({"method": name, "tokens": tokens,
                      "mean_acceptance_length": m["mean_acceptance_length"] or 1.0,
                      "tau": sum(s.committed_tokens for s in stats) / max(1, sum(s.steps for s in stats)),
                      "ms_per_token": statistics.median(times[name]) * 1e3 / tokens,
                      "speedup": statistics.median(speed),
                      "predicted_speedup": predicted_speedup(plain_stats, stats),
                      "identical": [o.token_ids for o in outs[name]] == [o.token_ids for o in outs[plain_name]]})
    return table
