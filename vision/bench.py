"""`mmspec bench vlm`: speculative VLM chat side by side with transformers, on the zoo or on the user's own models.

    mmspec bench vlm                                              # the zoo: zoo:vlm and all its drafters
    mmspec bench vlm --target PATH --drafter PATH --drafter ngram --prompts prompts.jsonl

One run, the same models and prompts for every method, one request at a time (the latency regime speculative decoding
is for), natural stopping at the end-of-turn token, `max_new_tokens` at most. Methods are alternated (each repeat
runs every method over every prompt, the order rotated between repeats); one untimed warm-up prompt per method;
each row reports the median repeat. At each temperature (0 and 1 by default):

* plain decoding: mmspec's loop without a drafter (the reference of every ratio) and transformers' ``generate``;
* transformers' assisted generation with the same small draft VLM (``assistant_model``) and its prompt lookup;
* each of our drafters, chain of `k` drafted tokens per step.

Speedups are paired: per repeat, mmspec's plain time per token over the method's, then the median over repeats.
Columns: tau (tokens committed per verification forward, bonus included), target forwards per generated token (prefill
included), milliseconds per token, wall-clock speedup over mmspec's plain decoding, the speedup predicted from tau and
the forward costs measured in the same run, and engine efficiency (measured / predicted; what bookkeeping costs),
lossless (greedy: the tokens are compared with plain decoding's; sampling: the rule is distribution-preserving, which
the test suite proves). transformers has no feature drafters (EAGLE, MTP) for LLaVA-family models, so it has no row for
them. Writes result.json, result.md and speedup.png to `out_dir`. The JSON rows of our methods also carry vLLM's
acceptance metrics under vLLM's names (`mmspec.stats`: num_drafts, mean_acceptance_length = 1 + accepted / drafts,
draft_acceptance_rate, acceptance_rate_per_position, ...), null where the row never drafted or, for transformers' rows,
where the drafts are not counted.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from mmspec.errors import InvalidInputError
from mmspec.stats import vllm_metrics_of

from .pipeline import SpeculativeVLM, is_vlm, load_drafter
from .prompts import build_request

ZOO_DRAFTERS = (("draft VLM (MASSV)", "zoo:vlm-draft"), ("text-only LM", "zoo:vlm-text"),
                ("EAGLE-1", "zoo:vlm-eagle"), ("EAGLE-3", "zoo:vlm-eagle3"), ("DREAM", "zoo:vlm-dream"),
                ("ViSpec", "zoo:vlm-vispec"), ("DFlash", "zoo:vlm-dflash"), ("n-gram", "ngram"))


class _Counter:
    """Counts a module's forward calls (hooks): target forwards per token."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


@dataclass
class Method:
    """One row: run(row, temperature, seed) -> (generated ids, GenerationStats or None)."""

    name: str
    run: Callable
    ours: bool
    times: list[float] = field(default_factory=list)
    seqs: list[list[int]] = field(default_factory=list)
    stats: list = field(default_factory=list)
    forwards: int = 0
    error: str | None = None
    tokens: list[int] = field(default_factory=list)  # tokens generated per repeat


# --- prompts ------------------------------------------------------------------------------------------------------
def zoo_prompts(n: int, image_size: int) -> list[dict]:
    """Held-out zoo questions: mostly scene descriptions (answers of 20-60 tokens), some natural-text questions."""
    import random

    from . import scenes
    from .zoo import HELD_OUT_SEED

    rows, rng = [], random.Random(HELD_OUT_SEED + 7)
    questions = [q for q, _ in scenes.DESCRIBE] + ["Where is the red circle?", "How many shapes are there?"]
    passages = scenes.passages()
    for i in range(n):
        if i % 4 == 3:
            q, _ = scenes.text_conversation(rng.choice(passages), rng)
            rows.append({"prompt": q, "images": []})
            continue
        scene = scenes.random_scene(rng)
        rows.append({"prompt": questions[i % len(questions)],
                     "images": [scenes.render(scene, image_size, seed=rng.randrange(1 << 30))]})
    return rows


def load_prompts(path) -> list[dict]:
    """Prompts from a JSONL file ({"prompt": str, "images": [paths relative to the file]} per line) or a
    `vision.train.data` dataset directory (each record's conversation without its final answer)."""
    p = Path(path)
    if p.is_dir():
        from .train.data import load_dataset

        return [{"messages": r.prompt_messages, "images": [str(x) for x in r.images]} for r in load_dataset(p)]
    if not p.is_file():
        raise InvalidInputError(f"--prompts {str(path)!r}: no such file or directory (expected a JSONL file of "
                                '{"prompt": ..., "images": [...]} lines or a dataset directory)')
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InvalidInputError(f"--prompts {str(path)!r} line {n}: not JSON ({e})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InvalidInputError(f'--prompts {str(path)!r} line {n}: expected {{"prompt": "...", "images": '
                                    '["a.png"]}}')
        rows.append({"prompt": obj["prompt"], "images": [str(p.parent / x) for x in obj.get("images", [])]})
    if not rows:
        raise InvalidInputError(f"--prompts {str(path)!r} holds no prompts")
    return rows


# --- methods ------------------------------------------------------------------------------------------------------
def _ours(svlm: SpeculativeVLM, new_tokens: int):
    def run(row, temperature, seed):
        out = svlm.generate(**row, max_new_tokens=new_tokens, temperature=temperature, seed=seed)
        return out.token_ids, out.stats
    return run


def _hf(model, processor, new_tokens: int, **extra):
    eos = model.generation_config.eos_token_id

    def run(row, temperature, seed):
        req = build_request(processor, **row)[0]
        ids = torch.tensor([req.input_ids], device=model.device)
        inputs = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in req.inputs.items()}
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, **sample, **extra,
                             max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        seq = out[0, ids.shape[1]:].tolist()
        return (seq[: seq.index(eos) + 1] if eos in seq else seq), None
    return run


def make_methods(model, processor, drafters: list[tuple[str, object, dict]], *, k: int,
                 new_tokens: int, compile: bool | None = None) -> list[Method]:
    """Plain decoding (ours, transformers), transformers' assisted generation (with the first draft VLM among
    `drafters`: (name, drafter, SpeculativeVLM kwargs)) and prompt lookup, then our drafters. compile: our rows'
    `SpeculativeVLM(compile=)`."""
    methods = [Method("plain decoding (mmspec)",
                      _ours(SpeculativeVLM(model, processor, None, compile=compile), new_tokens), True),
               Method("plain decoding (transformers generate)", _hf(model, processor, new_tokens), False)]
    small = next((d for _, d, _ in drafters if isinstance(d, torch.nn.Module) and is_vlm(d)), None)
    if small is not None:
        cfg = small.generation_config
        cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = k, "constant"
        cfg.assistant_confidence_threshold = 0.0
        methods.append(Method(f"assisted generation (transformers, same draft VLM, k={k})",
                              _hf(model, processor, new_tokens, assistant_model=small), False))
    methods.append(Method(f"prompt lookup (transformers, k={k})",
                          _hf(model, processor, new_tokens, prompt_lookup_num_tokens=k), False))
    for name, drafter, extra in drafters:
        methods.append(Method(f"{name} (mmspec, chain {k})",
                              _ours(SpeculativeVLM(model, processor, drafter, tree=k, compile=compile, **extra),
                                    new_tokens), True))
    methods += _dflash_methods(model, processor, drafters, new_tokens, compile)
    return methods


def _dflash_methods(model, processor, drafters, new_tokens: int, compile: bool | None) -> list[Method]:
    """For a DFlash drafter, its whole block both ways: transformers' own DFlash path (the same weights, batch 1
    only) and mmspec's."""
    from .drafters import DFlashDrafter

    out = []
    for name, drafter, _ in drafters:
        if isinstance(drafter, DFlashDrafter):
            n = drafter.head.block_size - 1
            out.append(Method(f"{name} (transformers speculation_type='dflash', block of {n})",
                              _hf(model, processor, new_tokens, assistant_model=drafter.head.model,
                                  speculation_type="dflash"), False))
            out.append(Method(f"{name} (mmspec, block of {n})",
                              _ours(SpeculativeVLM(model, processor, DFlashDrafter(drafter.head), compile=compile),
                                    new_tokens), True))
    return out


# --- the run --------------------------------------------------------------------------------------------------------
def run_vlm_benchmark(out_dir="bench_out/vlm", target: str = "zoo:vlm", drafters=None, prompts=None,
                      n_prompts: int = 8, new_tokens: int = 64, temperatures=(0.0, 1.0), repeats: int = 3,
                      k: int = 4, quick: bool = False, progress: bool = True, compile: bool | None = None) -> dict:
    """Run the benchmark (module docstring); `drafters`: a list of paths / "zoo:NAME" / "ngram" (default: every zoo
    drafter when the target is the zoo's, else n-gram only); `prompts`: a JSONL file or dataset directory (default:
    held-out zoo questions). quick: the quick zoo, 2 prompts, 16 tokens, 1 repeat (a smoke run)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .pipeline import _load
    from .zoo import resolve

    if quick:
        target = "zoo:vlm@quick" if target == "zoo:vlm" else target
        n_prompts, new_tokens, repeats = 2, 16, 1
    zoo_target = str(target).startswith("zoo:vlm")
    if drafters is None:
        drafters = [(n, d + ("@quick" if quick and d.startswith("zoo:") else "")) for n, d in ZOO_DRAFTERS] \
            if zoo_target else [("n-gram", "ngram")]
    else:
        drafters = [(str(d), d) for d in drafters]
    path = resolve(target, progress=progress)
    model = _load(AutoModelForImageTextToText, path, "target").eval()
    processor = _load(AutoProcessor, path, "target")
    loaded = [(name, *load_drafter(spec, model, tree=k)) for name, spec in drafters]
    rows = load_prompts(prompts) if prompts else zoo_prompts(n_prompts, processor.image_processor.crop_size["height"])
    methods = make_methods(model, processor, loaded, k=k, new_tokens=new_tokens, compile=compile)
    tables = [_run_temperature(methods, model, rows, t, repeats, progress) for t in temperatures]
    result = {"config": {"target": str(target), "drafters": [str(s) for _, s in drafters], "prompts": len(rows),
                         "prompt_source": str(prompts) if prompts else "held-out zoo questions",
                         "new_tokens": new_tokens, "k": k, "repeats": repeats, "temperatures": list(temperatures),
                         "compile": compile,
                         "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                         "device": str(model.device), "threads": torch.get_num_threads(),
                         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")},
              "tables": tables}
    _write(result, Path(out_dir))
    return result


def _run_temperature(methods: list[Method], model, rows: list[dict], temperature: float, repeats: int,
                     progress: bool) -> dict:
    """Every repeat runs every prompt through every method, the method order rotated per prompt and repeat, so a
    slow spell of the machine hits all methods alike; a method's time of a repeat is the sum over the prompts."""
    from tqdm.auto import tqdm

    for m in methods:
        m.times, m.seqs, m.stats, m.tokens, m.forwards, m.error = [], [], [], [], 0, None
        try:
            m.run(rows[0], temperature, 12345)  # warm-up, untimed
        except Exception as e:  # a method transformers refuses for this model: reported, never hidden
            m.error = f"{type(e).__name__}: {e}"
    live = [m for m in methods if not m.error]
    counters = {id(m): 0 for m in live}
    bar = tqdm(total=repeats * len(rows), desc=f"bench vlm (T={temperature:g})", disable=not progress)
    for rep in range(repeats):
        spent = {id(m): 0.0 for m in live}
        made = {id(m): 0 for m in live}
        for i, row in enumerate(rows):
            shift = (rep * len(rows) + i) % len(live)
            for m in live[shift:] + live[:shift]:
                counter = _Counter(model)
                t0 = time.perf_counter()
                st = None
                try:
                    seq, st = m.run(row, temperature, 1000 * rep + i)
                finally:
                    spent[id(m)] += time.perf_counter() - t0 - (st.time_compile if st is not None else 0.0)
                    counter.close()
                made[id(m)] += len(seq)
                if rep == 0:
                    m.seqs.append(seq)
                    m.stats.append(st)
                    counters[id(m)] += counter.n
            bar.update(1)
        for m in live:
            m.times.append(spent[id(m)])
            m.tokens.append(made[id(m)])
    bar.close()
    for m in live:
        m.forwards = counters[id(m)]
    return {"temperature": temperature, "rows": _rows(methods, temperature)}


def _decode_forwards(stats) -> int:
    return sum(s.target_forwards - s.requests for s in stats)


def _rows(methods: list[Method], temperature: float) -> list[dict]:
    """Per row: speedup = the median over repeats of (plain ms/token / the method's ms/token) in the same repeat."""
    plain = methods[0]
    per_token0 = [t * 1e3 / n for t, n in zip(plain.times, plain.tokens)]
    tokens0 = sum(len(s) for s in plain.seqs)
    t1 = sum(s.time_target_model for s in plain.stats) / max(1, _decode_forwards(plain.stats))
    prefill0 = sum(s.time_prefill for s in plain.stats)
    out = []
    for m in methods:
        if m.error:
            out.append({"method": m.name, "error": m.error[:300]})
            continue
        per_token = [t * 1e3 / n for t, n in zip(m.times, m.tokens)]
        tokens = sum(len(s) for s in m.seqs)
        row = {"method": m.name, "ours": m.ours, "tokens": tokens, "ms_per_token": statistics.median(per_token),
               "speedup": statistics.median(a / b for a, b in zip(per_token0, per_token)),
               "target_forwards_per_token": m.forwards / tokens, "times_s": m.times, "tokens_per_repeat": m.tokens}
        if m.ours:
            steps = sum(s.steps for s in m.stats)
            row["tau"] = sum(s.committed_tokens for s in m.stats) / max(1, steps)
            fwd = max(1, _decode_forwards(m.stats))
            step_cost = (sum(s.time_target_model for s in m.stats) + sum(s.time_drafter_model for s in m.stats)) / fwd
            predicted_ms = (sum(s.time_prefill for s in m.stats) + tokens / row["tau"] * step_cost) * 1e3 / tokens
            row["predicted_speedup"] = ((prefill0 + tokens0 * t1) * 1e3 / tokens0) / predicted_ms
            row["engine_efficiency"] = row["speedup"] / row["predicted_speedup"]
            row["target_ms_per_verify"] = sum(s.time_target_model for s in m.stats) * 1e3 / fwd
            row["drafter_ms_per_step"] = sum(s.time_drafter_model for s in m.stats) * 1e3 / fwd
            row.update(vllm_metrics_of(m.stats, undefined=None))
        else:
            row["tau"] = tokens / max(1, m.forwards - len(m.seqs))
            row.update(mean_acceptance_length=None, draft_acceptance_rate=None, acceptance_rate_per_position=None)
        if temperature == 0:
            row["lossless"] = "yes (identical)" if m.seqs == plain.seqs else "NO: output differs"
        else:
            row["lossless"] = "yes (distribution)"
        out.append(row)
    return out


# --- output -------------------------------------------------------------------------------------------------------
def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# `mmspec bench vlm`: {c['target']}, {c['prompts']} prompts ({c['prompt_source']}), up to "
             f"{c['new_tokens']} new tokens, chain k={c['k']}, median of {c['repeats']}; {c['device']} "
             f"({c['threads']} threads), {c['dtype']}, torch {c['torch']}, transformers {c['transformers']}, "
             f"{c['date']}", ""]
    for t in result["tables"]:
        lines += [f"## temperature {t['temperature']:g}", "",
                  "| method | tau | target fwd / token | ms / token | speedup | predicted | engine efficiency | "
                  "lossless |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in t["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | raises: {r['error'][:100]} | | | | | | |")
                continue
            pred = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "-"
            eff = f"{r['engine_efficiency']:.2f}" if "engine_efficiency" in r else "-"
            lines.append(f"| {r['method']} | {r['tau']:.2f} | {r['target_forwards_per_token']:.3f} | "
                         f"{r['ms_per_token']:.1f} | **{r['speedup']:.2f}x** | {pred} | {eff} | {r['lossless']} |")
        lines.append("")
    lines += ["Speedup: wall time per generated token of mmspec's plain decoding / the method's, same run. tau: tokens "
              "per verification forward (transformers rows: generated tokens per decoding forward of the target). "
              "Predicted: from tau and the forward costs of the target and drafter measured in the same run; "
              "engine efficiency = speedup / predicted."]
    return "\n".join(lines) + "\n"


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (out / "result.md").write_text(md)
    print(md)
    plot(result, out / "speedup.png")


def plot(result: dict, path: Path) -> None:
    """Speedup against tau, one panel per temperature (our drafters and transformers' rows)."""
    from mmspec.bench import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["tables"]), figsize=(6 * len(result["tables"]), 4.5), squeeze=False)
    for ax, t in zip(axes[0], result["tables"]):
        for r in t["rows"]:
            if "error" in r:
                continue
            ax.scatter(r["tau"], r["speedup"], marker="o" if r["ours"] else "s", color="C0" if r["ours"] else "C3")
            ax.annotate(r["method"].split(" (")[0], (r["tau"], r["speedup"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="tau (tokens per target forward)", ylabel="wall-clock speedup over plain decoding",
               title=f"{result['config']['target']}, temperature {t['temperature']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                head(ids, torch.randn(1, n, hidden), cache=DynamicCache(config=head.config), use_cache=True)
                prefill_ms.append((time.perf_counter() - t0) * 1e3)
                cache = DynamicCache(config=head.config)
                head(ids, torch.randn(1, n, hidden), cache=cache, use_cache=True)
                one, f = torch.tensor([[7]]), torch.randn(1, 1, hidden)
                t0 = time.perf_counter()
                for i in range(steps):
                    head(one, f, position_ids=torch.tensor([[n + i]]), cache=cache, use_cache=True)
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
