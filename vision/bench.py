"""`mmspec bench vlm`: speculative VLM decoding side by side with transformers' generate and assisted generation.

Offline and tiny: a random stock VLM of one family (vision.testing.tiny) and drafters that see the image to
different degrees. What carries over to real models is target forwards per generated token and acceptance: the
draft VLM here is a copy of the target with noise on its output head (`noisy_copy`), so it agrees often *when it
sees the image*. transformers' assisted generation runs the same drafter as `assistant_model`; whatever it does
with the pixels shows up as its acceptance. Prints a Markdown table and writes result.json / result.md.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from mmspec.testing import noisy_copy

from .pipeline import SpeculativeVLM
from .prompts import build_request
from .testing.tiny import test_image, text_drafter, tiny_vlm

QUESTIONS = ["describe the image", "what color is the sky in this picture", "how many animals are there",
             "tell me about the cat and the dog on the left"]


class _Counter:
    """Counts a module's forward calls (hooks), for target forwards per token."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


def _hf_rows(model, processor, rows, new_tokens, **extra):
    counter, seqs, t0 = _Counter(model), [], time.perf_counter()
    try:
        for row in rows:
            req = build_request(processor, **row)[0]
            ids = torch.tensor([req.input_ids])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **req.inputs,
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **extra)
            seqs.append(out[0, ids.shape[1]:].tolist())
    finally:
        counter.close()
    return seqs, counter.n, time.perf_counter() - t0


def _mm_rows(svlm, rows, new_tokens):
    counter, seqs, t0, taus = _Counter(svlm.model), [], time.perf_counter(), []
    try:
        for row in rows:
            out = svlm.generate(**row, max_new_tokens=new_tokens, eos_token_id=[])
            seqs.append(out.token_ids)
            taus.append(out.stats.tau)
    finally:
        counter.close()
    return seqs, counter.n, time.perf_counter() - t0, statistics.mean(taus)


def run_vlm_benchmark(out_dir="bench_out/vlm", family: str = "llava", new_tokens: int = 32, k: int = 4,
                      noise: float = 0.3, n_prompts: int = 4) -> dict:
    t = tiny_vlm(family)
    model, processor = t.model, t.processor
    drafter = noisy_copy(model, noise, seed=5)
    rows = [{"prompt": QUESTIONS[i % len(QUESTIONS)], "images": [test_image(60 + i, t.image_size)]}
            for i in range(n_prompts)]
    results = []
    ref, fwd, wall = _hf_rows(model, processor, rows, new_tokens)
    results.append(dict(method="hf-greedy", forwards=fwd, wall=wall, seqs=ref, tau=1.0))
    gen_cfg = drafter.generation_config
    gen_cfg.num_assistant_tokens, gen_cfg.num_assistant_tokens_schedule = k, "constant"
    gen_cfg.assistant_confidence_threshold = 0.0
    try:
        seqs, fwd, wall = _hf_rows(model, processor, rows, new_tokens, assistant_model=drafter)
        results.append(dict(method=f"hf-assisted (same draft VLM, k={k})", forwards=fwd, wall=wall, seqs=seqs,
                            tau=None))
    except Exception as e:  # some families refuse extra inputs in assisted generation: report, don't hide
        results.append(dict(method=f"hf-assisted (same draft VLM, k={k})", error=f"{type(e).__name__}: {e}"))
    for name, d in [("mmspec plain", None), (f"mmspec draft VLM, chain {k}", drafter),
                    (f"mmspec text-only LM, chain {k}", text_drafter(family)), (f"mmspec n-gram, chain {k}", "ngram")]:
        seqs, fwd, wall, tau = _mm_rows(SpeculativeVLM(model, processor, d, tree=k), rows, new_tokens)
        results.append(dict(method=name, forwards=fwd, wall=wall, seqs=seqs, tau=tau))
    total = sum(len(s) for s in ref)
    for r in results:
        if "error" in r:
            continue
        r["target_forwards_per_token"] = r["forwards"] / total
        r["tokens_per_s"] = total / r["wall"]
        r["speedup_vs_hf_greedy"] = results[0]["wall"] / r["wall"]
        r["equal_to_hf_greedy"] = r.pop("seqs") == ref
    result = dict(config=dict(family=family, new_tokens=new_tokens, k=k, drafter=f"noisy_copy(target, {noise})",
                              prompts=n_prompts, dtype="float32", torch=torch.__version__), rows=results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (out / "result.md").write_text(md)
    print(md)
    return result


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# mmspec VLM benchmark ({c['family']}, tiny random, {c['dtype']}, greedy, {c['new_tokens']} new tokens "
             f"x {c['prompts']} prompts; draft VLM = {c['drafter']})", "",
             "| method | target fwd / token | tau | tokens/s | vs HF greedy | equal to HF greedy |",
             "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | raises: {r['error'][:80]} | | | | |")
            continue
        tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(f"| {r['method']} | {r['target_forwards_per_token']:.3f} | {tau} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_hf_greedy']:.2f}x | {'yes' if r['equal_to_hf_greedy'] else 'NO'} |")
    lines += ["", "Target forwards per token counts every forward of the target (prefill included). All methods are "
              "lossless (greedy); timings are single runs on tiny models and say little."]
    return "\n".join(lines) + "\n"


# --- what compressing the drafter's view of the image saves ----------------------------------------------------------
def run_compression_benchmark(out_dir="bench_out/compress", image_tokens: int = 576, text_tokens: int = 48,
                              hidden: int = 512, steps: int = 100, repeats: int = 3) -> dict:
    """Per-step cost of an EAGLE drafter (1 layer, `hidden` wide) whose cache holds the prompt with the image as
    each compressor leaves it: `image_tokens` (LLaVA-1.5: 576 = 24 x 24) become M tokens. Times one drafting
    step (one token attending to the whole cache) and the drafter's prefill, median of `repeats`."""
    from transformers import DynamicCache

    from mmspec.testing import tiny_llama

    from .compressors import build_compressor
    from .drafters import EagleHead

    torch.manual_seed(0)
    target = tiny_llama(seed=0, vocab=512, hidden=hidden, layers=2, heads=8, kv_heads=8, max_positions=4096)
    head = EagleHead(target).eval()
    side = int(round(image_tokens ** 0.5))
    grid = (side, side) if side * side == image_tokens else None
    configs = {"none": {"type": "none"}, "avg_pool s=2": {"type": "avg_pool", "stride": 2},
               "avg_pool s=4": {"type": "avg_pool", "stride": 4},
               "attention_prune r=0.25": {"type": "attention_prune", "keep_ratio": 0.25},
               "conv s=2": {"type": "conv", "dim": hidden, "stride": 2},
               "resampler 64": {"type": "resampler", "dim": hidden, "n_queries": 64, "heads": 8}}
    feats = torch.randn(1, image_tokens, hidden)
    rows = []
    for name, cfg in configs.items():
        comp = build_compressor(cfg).eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            m = comp(feats, grid=grid).tokens.shape[1]
            t_compress = time.perf_counter() - t0
        n = text_tokens + m
        step_ms, prefill_ms = [], []
        for _ in range(repeats):
            ids = torch.randint(3, 512, (1, n))
            with torch.inference_mode():
                t0 = time.perf_counter()
                head(ids, torch.randn(1, n, hidden), past_key_values=DynamicCache(config=head.config), use_cache=True)
                prefill_ms.append((time.perf_counter() - t0) * 1e3)
                cache = DynamicCache(config=head.config)
                head(ids, torch.randn(1, n, hidden), past_key_values=cache, use_cache=True)
                one, f = torch.tensor([[7]]), torch.randn(1, 1, hidden)
                t0 = time.perf_counter()
                for i in range(steps):
                    head(one, f, position_ids=torch.tensor([[n + i]]), past_key_values=cache, use_cache=True)
                step_ms.append((time.perf_counter() - t0) * 1e3 / steps)
        rows.append(dict(compressor=name, image_tokens=image_tokens, drafter_image_slots=m, cache_slots=n,
                         step_ms=statistics.median(step_ms), prefill_ms=statistics.median(prefill_ms),
                         compress_ms=t_compress * 1e3))
    base = rows[0]
    for r in rows:
        r["step_vs_none"] = r["step_ms"] / base["step_ms"]
        r["prefill_vs_none"] = r["prefill_ms"] / base["prefill_ms"]
    result = dict(config=dict(hidden=hidden, image_tokens=image_tokens, text_tokens=text_tokens, steps=steps,
                              repeats=repeats, torch=torch.__version__, threads=torch.get_num_threads()), rows=rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Drafter cost per compressor (EAGLE head, hidden {hidden}, {image_tokens} image + {text_tokens} text "
             f"tokens, CPU, {torch.get_num_threads()} thread(s))", "",
             "| compressor | image slots in the drafter | drafting step ms | vs none | drafter prefill ms | vs none |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['compressor']} | {r['drafter_image_slots']} | {r['step_ms']:.3f} | "
                     f"{r['step_vs_none']:.2f}x | {r['prefill_ms']:.1f} | {r['prefill_vs_none']:.2f}x |")
    lines += ["", "A drafting step is one token through the head with the whole cache in view; the target is "
              "untouched (compression changes only what the drafter reads, never the output)."]
    md = "\n".join(lines) + "\n"
    (out / "result.md").write_text(md)
    print(md)
    return result
