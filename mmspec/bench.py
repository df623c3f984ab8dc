"""Engine benchmark: mmspec's decode loop against transformers' own decoders, on one pair, one machine, one run.

Metrics follow ALGORITHMS.md §7: tokens/s and speedup (wall time of plain target decoding / wall time of the method,
same prompts, same run), tau (tokens per verification forward, bonus included) and tau - 1, alpha by depth, target
forwards per generated token, drafter forwards, vLLM's acceptance metrics under vLLM's names (JSON only:
mean_acceptance_length, draft_acceptance_rate, acceptance_rate_per_position, ...; `mmspec.stats`), and the engine's
own cost: wall time per step outside the target's and drafter's model forwards, in ms and as a share of one plain
target forward t_fwd(1). Every row is greedy
(temperature 0), so every row must reproduce transformers' plain greedy output token for token (`equal`); a row that
does not is reported loudly, never dropped.

The pair is :func:`mmspec.testing.pairs.layer_pair` (a tiny random LLaMA and its 1-layer self-draft), built offline.
On such a small model a forward costs mostly fixed per-call overhead, so verifying k + 1 tokens costs about as much
as 1 and a 1-layer drafter costs a large fraction of the 4-layer target: absolute speedups here say little about real
models, while the engine-overhead columns (per-step ms outside model forwards) carry over.

Run ``python -m mmspec.bench`` (or ``run_engine_benchmark()``); results go to ``out_dir/result.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .compile import resolve_compile
from .loop import SpeculativeDecoder
from .stats import vllm_metrics
from .drafters import ModelDrafter, NGramDrafter
from .testing.pairs import distinct_fraction, layer_pair
from .tree import DynamicTree, StaticTree
from .target import CausalLMRunner, CausalLMTarget, model_device, sync_time

CHAIN_K = 4
STATIC_TREE = StaticTree.full((2, 2, 1))
DYNAMIC_TREE = DynamicTree(topk=4, depth=4, total=16)

# name -> what the row runs (shown in the table)
METHODS: dict[str, str] = {
    "hf-greedy": "transformers generate, greedy",
    "hf-assisted": f"generate(assistant_model=drafter), num_assistant_tokens={CHAIN_K}, constant schedule, "
                   "assistant_confidence_threshold=0",
    "hf-prompt-lookup": f"generate(prompt_lookup_num_tokens={CHAIN_K}), max_matching_ngram_size=2",
    "mmspec-plain": "SpeculativeDecoder(drafter=None)",
    "mmspec-chain4": f"model drafter, chain k={CHAIN_K}",
    "mmspec-tree221": f"model drafter, StaticTree.full((2, 2, 1)) ({len(STATIC_TREE)} nodes)",
    "mmspec-eagle2": "model drafter, EAGLE-2 DynamicTree(topk=4, depth=4, total=16)",
    "mmspec-ngram4": f"NGramDrafter(k={CHAIN_K}, max_ngram=3)",
}
COMPILED = ("mmspec-plain", "mmspec-chain4", "mmspec-tree221", "mmspec-eagle2")  # rows with a compiled twin
METHODS.update({f"{n}-compiled": f"{METHODS[n]}, compiled (static cache, torch.compile; `mmspec.compile`)"
                for n in COMPILED})
HF_METHODS = ("hf-greedy", "hf-assisted", "hf-prompt-lookup")
MEMORY_METHODS = ("mmspec-plain", "mmspec-chain4", "mmspec-tree221", "mmspec-eagle2")


# --- prompts ---------------------------------------------------------------------------------------------------------
def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n deterministic prompts of varied lengths (8..96 tokens); every third one repeats a short motif, so n-gram
    lookup has matches to propose from."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 8 + (i * 37) % 89
        body = torch.randint(3, vocab, (length,), generator=g).tolist()
        if i % 3 == 0:
            motif = body[: 3 + i % 4]
            body = (motif * (length // len(motif) + 1))[:length]
        out.append(body)
    return out


# --- measuring transformers' generate (forward counts and times via hooks; draft lengths via its strategy hook) -----
class _ForwardMeter:
    """Counts a module's forward calls and the wall time spent inside them."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.forwards, self.time, self._t0, self._handles = module, 0, 0.0, 0.0, []
        self.device = model_device(module)  # CUDA runs asynchronously: forwards are timed to completion

    def __enter__(self):
        self._handles = [self.module.register_forward_pre_hook(self._pre),
                         self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self):
        self.forwards, self.time = 0, 0.0

    def _pre(self, module, args):
        self._t0 = sync_time(self.device)

    def _post(self, module, args, output):
        self.forwards += 1
        self.time += sync_time(self.device) - self._t0


@contextlib.contextmanager
def _hf_step_log(log: list):
    """Record (candidates proposed, candidates accepted) for every assisted / prompt-lookup step of transformers.

    transformers calls ``candidate_generator.update_candidate_strategy(input_ids, scores, n_matches)`` once per
    verification, with scores (1, candidates + 1, V). Patched on the classes for the duration only."""
    try:
        from transformers.generation import candidate_generator as cg
    except ImportError:  # pragma: no cover - transformers layout changed: acceptance columns stay empty
        yield
        return
    patched = []
    for cls in (getattr(cg, "AssistedCandidateGenerator", None), getattr(cg, "PromptLookupCandidateGenerator", None)):
        if cls is None or not hasattr(cls, "update_candidate_strategy"):
            continue
        own, inherited = cls.__dict__.get("update_candidate_strategy"), cls.update_candidate_strategy

        def wrapper(self, input_ids, scores, num_matches, _orig=inherited):
            log.append((int(scores.shape[1]) - 1, int(num_matches)))
            return _orig(self, input_ids, scores, num_matches)

        cls.update_candidate_strategy = wrapper
        patched.append((cls, own))
    try:
        yield
    finally:
        for cls, own in patched:
            if own is None:
                del cls.update_candidate_strategy
            else:
                cls.update_candidate_strategy = own


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _depth_counts(steps: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """alpha bookkeeping of GenerationStats.record_step for chain drafts given (draft length, accepted)."""
    tries, accepts = [0] * CHAIN_K, [0] * CHAIN_K
    for n, acc in steps:
        for d in range(1, min(n, acc + 1) + 1):
            if d > len(tries):
                tries.append(0)
                accepts.append(0)
            tries[d - 1] += 1
            accepts[d - 1] += int(d <= acc)
    return tries, accepts


@dataclass
class _Rep:
    wall: float
    sequences: list[list[int]]
    m: dict = field(default_factory=dict)  # counts and times (see _mm_metrics / _hf_metrics)


def _hf_run(target, prompts, new_tokens: int, extra: dict, meters, log: list) -> _Rep:
    pad = target.config.pad_token_id if target.config.pad_token_id is not None else 0
    for meter in meters:
        meter.reset()
    log.clear()
    seqs = []
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.long, device=target.device)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=None, **extra)
        seqs.append(out[0, len(p):].tolist())
    wall = time.perf_counter() - t0
    tgt, drf = meters[0], (meters[1] if len(meters) > 1 else None)
    new = sum(len(s) for s in seqs)
    if log:  # assisted / prompt lookup: every target forward verified a draft (the first one with the prompt)
        steps, accepted, committed = len(log), sum(a for _, a in log), new
        tries, accepts = _depth_counts(log)
    else:  # plain: the first forward of each prompt is its prefill
        steps = committed = tgt.forwards - len(prompts)
        accepted, tries, accepts = 0, [], []
    per_pos = [sum(n > i for n, _ in log) for i in range(max((n for n, _ in log), default=0))]
    m = dict(new_tokens=new, target_forwards=tgt.forwards, drafter_forwards=drf.forwards if drf else 0,
             steps=steps, committed=committed, accepted=accepted, depth_tries=tries, depth_accepts=accepts,
             draft_tokens=sum(n for n, _ in log), drafted_steps=sum(n > 0 for n, _ in log), depth_draft_tokens=per_pos,
             batched_steps=tgt.forwards, time_target_model=tgt.time, time_drafter_model=drf.time if drf else 0.0,
             time_engine=max(0.0, wall - tgt.time - (drf.time if drf else 0.0)), lossless=True,
             acceptance="greedy match" if log else "")
    return _Rep(wall, seqs, m)


# --- measuring mmspec ------------------------------------------------------------------------------------------------
def _mm_metrics(stats: list) -> dict:
    """Sum GenerationStats over the calls of one run. batched_steps = verification forwards (prefill excluded)."""
    s = lambda key: sum(getattr(x, key) for x in stats)  # noqa: E731
    depth = max((len(x.depth_tries) for x in stats), default=0)
    tries = [sum(x.depth_tries[d] for x in stats if d < len(x.depth_tries)) for d in range(depth)]
    accepts = [sum(x.depth_accepts[d] for x in stats if d < len(x.depth_accepts)) for d in range(depth)]
    per_pos = [sum(x.depth_draft_tokens[d] for x in stats if d < len(x.depth_draft_tokens)) for d in range(depth)]
    names = sorted({n for x in stats for n in x.acceptance.split("+") if n})
    return dict(new_tokens=s("new_tokens"), target_forwards=s("target_forwards"),
                drafter_forwards=s("drafter_forwards"),
                steps=s("steps"), committed=s("committed_tokens"), accepted=s("accepted_tokens"),
                draft_tokens=s("draft_tokens"), drafted_steps=s("drafted_steps"), depth_draft_tokens=per_pos,
                depth_tries=tries, depth_accepts=accepts,
                batched_steps=sum(max(x.target_forwards - 1, 0) for x in stats),
                time_target_model=s("time_target_model"), time_drafter_model=s("time_drafter_model"),
                time_draft=s("time_draft"), time_verify=s("time_verify"), time_accept=s("time_accept"),
                time_engine=s("time_engine"), time_prefill=s("time_prefill"), time_compile=s("time_compile"),
                lossless=all(x.lossless for x in stats), acceptance="+".join(names))


def _mm_run(dec: SpeculativeDecoder, prompts, bs: int, new_tokens: int) -> _Rep:
    seqs, stats = [], []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), bs):
        out = dec.generate(prompts[i: i + bs], max_new_tokens=new_tokens, temperature=0.0)
        seqs.extend(out.sequences)
        stats.append(out.stats)
    wall = time.perf_counter() - t0 - sum(x.time_compile for x in stats)  # compile time is reported apart
    return _Rep(wall, seqs, _mm_metrics(stats))


# --- summarising -----------------------------------------------------------------------------------------------------
def _median(reps: list[_Rep], key: str) -> float:
    return statistics.median(r.wall if key == "wall" else r.m.get(key, 0.0) for r in reps)


def _per_step(reps: list[_Rep], key: str | Callable[[dict], float]) -> float:
    """Median over repeats of (seconds in `key`, a metric name or a function of the metrics) / verification steps,
    in ms."""
    vals = []
    for r in reps:
        t = r.m.get(key, 0.0) if isinstance(key, str) else key(r.m)
        vals.append(1e3 * t / max(r.m["batched_steps"], 1))
    return statistics.median(vals)


# mmspec's engine time per phase, outside model forwards (time_engine = the sum of the four)
_PHASES: dict[str, Callable[[dict], float]] = {
    "draft_side": lambda x: x["time_draft"] - x["time_drafter_model"],
    "verify_side": lambda x: x["time_verify"] - x["time_target_model"],
    "accept": lambda x: x["time_accept"],
    "other": lambda x: (x["time_engine"] - (x["time_draft"] - x["time_drafter_model"])
                        - (x["time_verify"] - x["time_target_model"]) - x["time_accept"]),
}


def _row(name: str, bs: int, reps: list[_Rep], reference: list[list[int]], new_tokens: int) -> dict:
    m = reps[0].m
    wall = _median(reps, "wall")
    tries, accepts = m["depth_tries"], m["depth_accepts"]
    equal = all(r.sequences == reference for r in reps)
    full_length = all(len(s) == new_tokens for r in reps for s in r.sequences)
    mismatches = [i for i, (a, b) in enumerate(zip(reps[0].sequences, reference)) if a != b]
    split = name not in HF_METHODS  # transformers' loop has no draft / verify / accept phases to time
    return dict(
        method=name, notes=METHODS[name], batch=bs, hf=name in HF_METHODS,
        wall_s=wall, wall_s_all=[r.wall for r in reps], new_tokens=m["new_tokens"],
        wall_spread=max(r.wall for r in reps) / max(min(r.wall for r in reps), 1e-9),
        tokens_per_s=m["new_tokens"] / wall if wall else 0.0,
        tau=m["committed"] / m["steps"] if m["steps"] else 0.0,
        tau_minus_1=m["accepted"] / m["steps"] if m["steps"] else 0.0,
        draft_nodes_per_step=m["draft_tokens"] / m["steps"] if m["steps"] else 0.0,
        target_forwards=m["target_forwards"], target_forwards_per_token=m["target_forwards"] / max(m["new_tokens"], 1),
        alpha=[a / t if t else None for a, t in zip(accepts, tries)],
        # vLLM's names (mmspec.stats): per step that had a draft; null on rows without a drafter
        **_vllm_fields(m),
        drafter_forwards=m["drafter_forwards"], steps=m["steps"],
        overhead_ms=_per_step(reps, "time_engine"),
        **{f"{part}_ms": (_per_step(reps, fn) if split else None) for part, fn in _PHASES.items()},
        target_model_ms=_per_step(reps, "time_target_model"),
        drafter_model_ms=_per_step(reps, "time_drafter_model"),
        compile_s=sum(r.m.get("time_compile", 0.0) for r in reps),
        equal=bool(equal and full_length), mismatched_prompts=mismatches,
        deterministic=all(r.sequences == reps[0].sequences for r in reps),
        lossless=bool(m["lossless"]), acceptance=m["acceptance"],
    )


def _vllm_fields(m: dict) -> dict:
    """vLLM's metrics (mmspec.stats.vllm_metrics) for one row's counts; ratios null on rows that never drafted."""
    depth = len(m["depth_draft_tokens"])  # transformers' rows keep CHAIN_K depths of alpha even when drafts are shorter
    return vllm_metrics(m["drafted_steps"], m["draft_tokens"], m["accepted"], m["depth_accepts"][:depth],
                        m["depth_draft_tokens"], undefined=None)


@torch.inference_mode()
def standalone_costs(target, drafter, prompt: list[int], sizes, repeats: int = 15) -> dict:
    """Forward costs timed outside the decode loop, in seconds: the target's forward of M tokens for each M in
    `sizes` and the drafter's one-token forward, each over a cache holding `prompt` and each timed right after the
    other model's forward, as in the loop (on a CPU the other model's forward evicts this one's weights from the
    caches, which costs the next forward up to ~40% on the engine pair; timing each alone would hide it)."""
    from transformers import DynamicCache

    from .compat import cache_kwargs

    dev = model_device(target)
    ids = torch.tensor([prompt], device=dev)
    caches = {}
    for name, model in (("target", target), ("drafter", drafter)):
        caches[name] = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, caches[name]), use_cache=True)

    def forward(name: str, m: int) -> float:
        model = target if name == "target" else drafter
        block = ids[:, -1:].expand(1, m)
        t0 = sync_time(dev)
        model(block, **cache_kwargs(model, caches[name]), use_cache=True)
        dt = sync_time(dev) - t0
        caches[name].crop(-m)
        return dt

    out = {"target": {}, "drafter": None}
    for m in sizes:
        times = []
        for _ in range(repeats + 1):
            forward("drafter", 1)
            times.append(forward("target", m))
        out["target"][m] = statistics.median(times[1:])
    times = []
    for _ in range(repeats + 1):
        forward("target", 1)
        times.append(forward("drafter", 1))
    out["drafter"] = statistics.median(times[1:])
    return out


def _memory_probe(dec: SpeculativeDecoder, prompt: list[int], new_tokens: int, bytes_per_slot: int) -> dict:
    """One bs=1 generation; the target's (and drafter's) cache after it and its peak width during it."""
    out = dec.generate([prompt], max_new_tokens=new_tokens, temperature=0.0)
    kv = dec.target.kv
    res = dict(prompt_tokens=len(prompt), new_tokens=len(out.sequences[0]),
               live_slots=int(kv.length.max()), width=int(kv.width), peak_width=int(kv.peak_width),
               slot_bytes=int(kv.slot_bytes()), storage_slots=kv.slot_bytes() / bytes_per_slot,
               block_max=1 + int(getattr(dec.drafter, "max_nodes", 0)))
    runner = getattr(dec.drafter, "runner", None)
    if runner is not None and runner.kv is not None:
        res.update(drafter_live_slots=int(runner.kv.length.max()), drafter_peak_width=int(runner.kv.peak_width),
                   drafter_slot_bytes=int(runner.kv.slot_bytes()))
    return res


def _bytes_per_slot(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem  # keys + values, every layer, batch 1


# --- the benchmark ---------------------------------------------------------------------------------------------------
def _efficiency_alone(rows: list[dict], target, drafter, prompt: list[int]) -> None:
    """The bs=1 engine efficiency against forwards timed outside the loop (`standalone_costs`): measured speedup
    / (tau * t_fwd(1) / (t_fwd(block) + drafter forwards per step * t_draft)), block = 1 + draft nodes per step."""
    mine = [r for r in rows if not r["hf"] and r["batch"] == 1 and r["steps"] and not r["method"].endswith("-compiled")]
    sizes = sorted({1} | {1 + round(r["draft_nodes_per_step"]) for r in mine})
    costs = standalone_costs(target, drafter, prompt, sizes)
    for r in rows:
        r["ideal_speedup_alone"] = r["efficiency_alone"] = None
    for r in mine:
        per_step = (r["drafter_forwards"] / r["steps"]) if r["drafter_model_ms"] else 0.0
        busy = costs["target"][1 + round(r["draft_nodes_per_step"])] + per_step * costs["drafter"]
        r["ideal_speedup_alone"] = r["tau"] * costs["target"][1] / busy
        if r["speedup_vs_mmspec_plain"]:
            r["efficiency_alone"] = r["speedup_vs_mmspec_plain"] / r["ideal_speedup_alone"]


def compiled_decoders(target, drafter) -> dict[str, SpeculativeDecoder]:
    """The compiled twins of the COMPILED rows, sharing one target adapter and one drafter runner, so each model's
    shapes are compiled once for all of them."""
    tgt, runner = CausalLMTarget(target), CausalLMRunner(drafter)
    trees = {"mmspec-chain4": CHAIN_K, "mmspec-tree221": STATIC_TREE, "mmspec-eagle2": DYNAMIC_TREE}
    out = {"mmspec-plain-compiled": SpeculativeDecoder(tgt, None, compile=True)}
    out.update({f"{n}-compiled": SpeculativeDecoder(tgt, ModelDrafter(runner=runner, tree=t), compile=True)
                for n, t in trees.items()})
    return out


def run_engine_benchmark(out_dir="bench_out/engine", new_tokens: int = 128, n_prompts: int = 8,
                         batch_sizes=(1, 4), repeats: int = 3, quick: bool = False, progress: bool = True,
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         pair: dict | None = None, compile: bool | None = None) -> dict:
    """Run every method (see METHODS) greedily on the same prompts; write result.json / result.md into out_dir.

    HF rows run at batch size 1 (transformers' assisted generation takes one sequence); mmspec rows at each batch
    size. Each (method, batch size) is warmed up once on its first batch, then timed `repeats` times over all
    prompts, the repeats going round-robin over the methods; the median wall time is reported. quick=True shrinks
    everything for tests (16 tokens, 2 prompts, 1 repeat, batch sizes (1, 2)). device/dtype place the pair
    (greedy equality with transformers is only expected in float32); pair: keyword arguments for `layer_pair`
    (e.g. hidden=512, layers=8). compile: also run the compiled twins of the mmspec rows ("-compiled", compared
    with mmspec-plain-compiled; their compile time is reported apart, `compile_s`); None = on for CUDA. Returns the
    result dict (also written as JSON).
    """
    from tqdm.auto import tqdm

    if quick:
        new_tokens, n_prompts, repeats, batch_sizes = 16, 2, 1, (1, 2)
    batch_sizes = tuple(sorted({int(b) for b in batch_sizes} | {1}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    pair = dict(pair or {})
    target, drafter = (m.to(device=device, dtype=dtype) for m in layer_pair(**pair))
    vocab = target.config.vocab_size
    prompts = make_prompts(n_prompts, vocab)
    decoders = {
        "mmspec-plain": SpeculativeDecoder(target, None),
        "mmspec-chain4": SpeculativeDecoder(target, drafter, tree=CHAIN_K),
        "mmspec-tree221": SpeculativeDecoder(target, drafter, tree=STATIC_TREE),
        "mmspec-eagle2": SpeculativeDecoder(target, drafter, tree=DYNAMIC_TREE),
        "mmspec-ngram4": SpeculativeDecoder(target, NGramDrafter(k=CHAIN_K, max_ngram=3)),
    }
    compiled = resolve_compile(compile, target.device)
    if compiled:
        decoders.update(compiled_decoders(target, drafter))
    jobs = [(name, 1) for name in HF_METHODS] + [(name, bs) for name in decoders for bs in batch_sizes]
    saved_gen_cfg = drafter.generation_config
    assistant_cfg = copy.deepcopy(saved_gen_cfg)
    assistant_cfg.num_assistant_tokens = CHAIN_K
    assistant_cfg.num_assistant_tokens_schedule = "constant"  # a fixed k, like mmspec's chain
    assistant_cfg.assistant_confidence_threshold = 0.0  # no early stop on low draft confidence
    hf_extra = {"hf-greedy": {}, "hf-assisted": {"assistant_model": drafter},
                "hf-prompt-lookup": {"prompt_lookup_num_tokens": CHAIN_K}}

    def hf_run(name: str):
        def run(ps: list) -> _Rep:
            drafter.generation_config = assistant_cfg
            try:
                with _hf_step_log(log), _ForwardMeter(target) as tm, _ForwardMeter(drafter) as dm:
                    return _hf_run(target, ps, new_tokens, hf_extra[name], (tm, dm), log)
            finally:
                drafter.generation_config = saved_gen_cfg
        return run

    runs: dict[tuple[str, int], Callable[[list], _Rep]] = {}
    for name, bs in jobs:
        runs[(name, bs)] = hf_run(name) if name in HF_METHODS else (
            lambda ps, n=name, b=bs: _mm_run(decoders[n], ps, b, new_tokens))
    reps: dict[tuple[str, int], list[_Rep]] = {job: [] for job in jobs}
    job_s: dict[str, float] = {f"{n} bs={b}": 0.0 for n, b in jobs}
    warm_compile: dict[tuple[str, int], float] = {}  # compile seconds of each warm-up
    log: list = []
    bar = tqdm(total=len(jobs) * (1 + repeats) + 1, desc="engine bench", disable=not progress, leave=False)
    t_start = time.perf_counter()
    load_start = _load()
    try:
        with _quiet_transformers():
            # Warm up every method once, then time the repeats round-robin, so that drift in the machine's load
            # affects all methods alike instead of whichever happened to run last.
            for rep in range(-1, repeats):
                for name, bs in jobs:
                    bar.set_postfix_str(f"{name} bs={bs}" + (" warm-up" if rep < 0 else f" run {rep + 1}"))
                    t0 = time.perf_counter()
                    if rep < 0:
                        warm = runs[(name, bs)](prompts[:bs])  # warm-up on the first batch
                        warm_compile[(name, bs)] = warm.m.get("time_compile", 0.0)
                    else:
                        reps[(name, bs)].append(runs[(name, bs)](prompts))
                    job_s[f"{name} bs={bs}"] += time.perf_counter() - t0
                    bar.update(1)
            bar.set_postfix_str("memory")
            probe = max(prompts, key=len)
            bps = _bytes_per_slot(target)
            memory = {name: _memory_probe(decoders[name], probe, new_tokens, bps) for name in MEMORY_METHODS}
            bar.update(1)
    finally:
        drafter.generation_config = saved_gen_cfg
        bar.close()

    reference = reps[("hf-greedy", 1)][0].sequences
    rows = [_row(name, bs, reps[(name, bs)], reference, new_tokens) for name, bs in jobs]
    for r in rows:
        r["compile_s"] += warm_compile.get((r["method"], r["batch"]), 0.0)
    by = {(r["method"], r["batch"]): r for r in rows}
    plain1 = by[("mmspec-plain", 1)]
    t_fwd1 = plain1["target_model_ms"]  # = time_target_model / (target_forwards - 1), median over repeats
    for r in rows:
        base = by.get(("hf-greedy", r["batch"]), by[("hf-greedy", 1)])
        r["speedup_baseline"] = f"hf-greedy bs={base['batch']}"
        r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
        compiled_row = r["method"].endswith("-compiled")  # compared with plain decoding compiled alike
        plain_name = "mmspec-plain-compiled" if compiled_row else "mmspec-plain"
        plain = by.get((plain_name, r["batch"]))
        r["speedup_vs_mmspec_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
        own_fwd1 = by[(plain_name, 1)]["target_model_ms"]
        for key in ("overhead", "draft_side", "verify_side", "accept", "other"):
            r[f"{key}_pct"] = 100.0 * r[f"{key}_ms"] / own_fwd1 if (own_fwd1 and r[f"{key}_ms"] is not None) else None
        # ALGORITHMS.md §7: measured speedup / (tau * t_fwd(1) / (t_verify(k) + t_draft)), forwards only, bs=1
        busy = r["target_model_ms"] + r["drafter_model_ms"]
        r["ideal_speedup"] = r["tau"] * own_fwd1 / busy if (not r["hf"] and r["batch"] == 1 and busy) else None
        r["efficiency"] = (r["speedup_vs_mmspec_plain"] / r["ideal_speedup"]) if r["ideal_speedup"] else None
    _efficiency_alone(rows, target, drafter, prompts[0])

    plain_mem = memory["mmspec-plain"]
    for name, mem in memory.items():
        mem["live_equal_plain"] = mem["live_slots"] == plain_mem["live_slots"]
        mem["extra_storage_slots"] = mem["storage_slots"] - plain_mem["storage_slots"]
        mem["within_one_block"] = mem["extra_storage_slots"] <= mem["block_max"]

    all_equal = all(r["equal"] for r in rows)
    result = dict(
        config=dict(pair=f"mmspec.testing.pairs.layer_pair({', '.join(f'{k}={v}' for k, v in pair.items())})", vocab=vocab, hidden=target.config.hidden_size,
                    target_layers=target.config.num_hidden_layers, drafter_layers=drafter.config.num_hidden_layers,
                    dtype=str(next(target.parameters()).dtype), new_tokens=new_tokens, n_prompts=n_prompts,
                    prompt_lengths=[len(p) for p in prompts], batch_sizes=list(batch_sizes), repeats=repeats,
                    quick=quick, temperature=0.0, compile=compiled),
        environment=dict(torch=torch.__version__, transformers=_hf_version(), python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads(),
                         device=str(target.device), device_name=_device_name(target.device), cpus=os.cpu_count(), load_avg_start=load_start,
                         load_avg_end=_load()),
        reference_distinct_fraction=statistics.mean(distinct_fraction(s) for s in reference),
        t_fwd1_ms=t_fwd1, rows=rows, memory=memory, all_equal=all_equal,
        elapsed_s=time.perf_counter() - t_start, job_seconds=job_s,
    )
    result["notes"] = _notes(result)
    md = to_markdown(result)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "result.md").write_text(md)
    _maybe_chart(result, out / "speedup.png")
    print(md)
    if not all_equal:
        bad = sorted({f"{r['method']} bs={r['batch']}" for r in rows if not r["equal"]})
        msg = f"GREEDY OUTPUT DIFFERS FROM transformers' GREEDY for: {', '.join(bad)}"
        print("\n" + "!" * 100 + f"\n!!! {msg}\n" + "!" * 100, file=sys.stderr)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _load() -> float | None:
    """1-minute load average (None where the OS has none): other processes competing for the cores skew timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _hf_version() -> str:
    import transformers

    return transformers.__version__


def _notes(res: dict) -> list[str]:
    rows, mem = res["rows"], res["memory"]
    by = {(r["method"], r["batch"]): r for r in rows}
    notes = []
    bad = [f"{r['method']} bs={r['batch']}" for r in rows if not r["equal"]]
    notes.append("All rows reproduce transformers' plain greedy output token for token." if not bad else
                 f"**NOT EQUAL to transformers' greedy output: {', '.join(bad)}** — a lossless engine must match; "
                 "this is a bug (or an fp32 near-tie) to investigate.")
    if all(m["live_equal_plain"] for m in mem.values()):
        worst = max(mem.values(), key=lambda m: m["extra_storage_slots"])
        within = all(m["within_one_block"] for m in mem.values())
        notes.append(
            f"Memory: after generation every speculative target cache holds exactly the live slots of plain decoding "
            f"({mem['mmspec-plain']['live_slots']}); compaction leaves no rejected slot behind. Allocated storage is "
            f"at most {worst['extra_storage_slots']:.0f} slot(s) more than plain "
            f"({'within' if within else 'NOT within'} one verify block), because DynamicCache.crop keeps a view of "
            "the last block until the next append reallocates.")
    else:
        diff = [k for k, m in mem.items() if not m["live_equal_plain"]]
        notes.append(f"**Memory: live slots differ from plain decoding for {', '.join(diff)}.**")
    hf_a = by.get(("hf-assisted", 1))
    ch = by.get(("mmspec-chain4", 1))
    if hf_a and ch:
        notes.append(f"HF assisted generation with the same drafter and k={CHAIN_K}: tau {hf_a['tau']:.2f} vs mmspec "
                     f"chain {ch['tau']:.2f}; HF's tau counts its first (prompt + draft) forward as a step, and HF's "
                     "engine overhead is wall time outside model forwards per target forward, prefill included.")
    ng = by.get(("mmspec-ngram4", 1))
    if ng:
        notes.append(f"n-gram lookup accepts little here (tau {ng['tau']:.2f}): a random model has no induction "
                     "heads, so it does not copy the prompt's motifs; the row measures the cost of a cheap drafter "
                     "that is mostly wrong.")
    load, cpus = res["environment"]["load_avg_start"], res["environment"]["cpus"] or 1
    if load is not None and load > cpus:
        notes.append(f"**Busy machine**: 1-minute load average {load:.1f} on {cpus} CPU(s) when the benchmark started; "
                     "other processes competed for the cores, so timings are noisier than usual (counts are not).")
    unstable = [f"{r['method']} bs={r['batch']} ({r['wall_spread']:.1f}x)" for r in rows if r["wall_spread"] > 1.3]
    if unstable:
        notes.append("**Unstable timings** (slowest / fastest repeat > 1.3x; another process probably competed for the "
                     f"cores — rerun on an idle machine before quoting speedups): {', '.join(unstable)}.")
    notes.append("The pair is a tiny random LLaMA and its layer-truncated self-draft (an offline stand-in for a "
                 "trained pair): per-forward cost is mostly fixed overhead, so speedups say little about real models; "
                 "the per-step engine overhead carries over.")
    return notes


# --- reporting -------------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def to_markdown(result: dict) -> str:
    cfg, env, rows = result["config"], result["environment"], result["rows"]
    t_fwd1 = result["t_fwd1_ms"]
    lines = ["# mmspec engine benchmark", ""]
    if not result["all_equal"]:
        bad = ", ".join(f"{r['method']} bs={r['batch']}" for r in rows if not r["equal"])
        lines += [f"> **WARNING — GREEDY OUTPUT DIFFERS FROM transformers' GREEDY: {bad}**", ""]
    lines += [
        f"Pair: `{cfg['pair']}` — target {cfg['target_layers']} layers, drafter {cfg['drafter_layers']} layer, "
        f"hidden {cfg['hidden']}, vocab {cfg['vocab']}, {cfg['dtype']}. {cfg['n_prompts']} prompts "
        f"(lengths {cfg['prompt_lengths']}), {cfg['new_tokens']} new tokens each, greedy; median of "
        f"{cfg['repeats']} timed run(s) after one warm-up. torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['threads']} thread(s), {env['device']} ({env.get('device_name', '?')}).",
        "",
        f"t_fwd(1) = {t_fwd1:.2f} ms (mean target model time per step, mmspec plain, bs=1). Reference output: "
        f"{100 * result['reference_distinct_fraction']:.0f}% distinct tokens per sequence (not a repeating model).",
        "",
        "## Throughput and acceptance",
        "",
        "| method | batch | tokens/s | speedup vs HF greedy | vs mmspec plain | tau | tau-1 | target fwd / token | "
        "alpha d1..d4 | drafter fwd | overhead ms/step | overhead % t_fwd(1) | equal | lossless |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        alpha = " ".join(_f(a) for a in r["alpha"][:4]) or "-"
        eq = "yes" if r["equal"] else "**NO**"
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_hf']:.2f}x | "
            f"{_f(r['speedup_vs_mmspec_plain'], '{:.2f}x')} | {r['tau']:.2f} | {r['tau_minus_1']:.2f} | "
            f"{r['target_forwards_per_token']:.3f} | {alpha} | {r['drafter_forwards']} | {r['overhead_ms']:.2f} | "
            f"{_f(r['overhead_pct'], '{:.0f}%')} | {eq} | {'yes' if r['lossless'] else 'no'} |")
    compiled = [r for r in rows if r["method"].endswith("-compiled")]
    if compiled:
        lines += ["", "Compiled rows (`-compiled`) are compared with mmspec-plain-compiled; their overhead % and "
                  "efficiency use its t_fwd(1). Compile time, kept out of every timing above: "
                  + ", ".join(f"{r['method']} bs={r['batch']} {r['compile_s']:.1f} s" for r in compiled) + "."]
    lines += ["", "Methods:", ""] + [f"- `{k}`: {v}" for k, v in METHODS.items() if k in {r["method"] for r in rows}]
    lines += ["", "Speedup vs HF greedy uses HF greedy at the same batch size where it was run, else at bs=1. "
              "HF rows: overhead = wall time outside model forwards per target forward (prefill included)."]

    lines += ["", "## Memory (bs=1, longest prompt)", "",
              "| method | prompt | new | live slots | width | peak width | storage slots | slot_bytes (KiB) | "
              "extra storage vs plain | verify block | drafter live / peak |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in result["memory"].items():
        drafter = f"{m['drafter_live_slots']} / {m['drafter_peak_width']}" if "drafter_live_slots" in m else "-"
        lines.append(
            f"| {name} | {m['prompt_tokens']} | {m['new_tokens']} | {m['live_slots']} | {m['width']} | "
            f"{m['peak_width']} | {m['storage_slots']:.0f} | {m['slot_bytes'] / 1024:.1f} | "
            f"{m['extra_storage_slots']:+.0f} | {m['block_max']} | {drafter} |")

    lines += ["", "## Engine overhead per step (wall time outside target and drafter forwards)", "",
              "| method | batch | draft nodes / step | target fwd ms | drafter fwd ms | draft-side ms (% t_fwd) | "
              "verify-side ms (%) | accept/commit ms (%) | other ms (%) | total ms (%) | efficiency (§7) | "
              "efficiency vs forwards alone |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["hf"]:
            continue

        def cell(key):
            return f"{r[key + '_ms']:.2f} ({_f(r[key + '_pct'], '{:.0f}%')})"

        lines.append(f"| {r['method']} | {r['batch']} | {r['draft_nodes_per_step']:.1f} | {r['target_model_ms']:.2f} | "
                     f"{r['drafter_model_ms']:.2f} | "
                     f"{cell('draft_side')} | {cell('verify_side')} | {cell('accept')} | {cell('other')} | "
                     f"{cell('overhead')} | {_f(r['efficiency'])} | {_f(r.get('efficiency_alone'))} |")
    lines += ["", "Times are per verification step (one batched target forward). "
              "draft-side = time_draft - drafter model time; verify-side = time_verify - target model time "
              "(block, mask, positions); accept/commit = kernels + cache compaction; other = loop bookkeeping. "
              "Efficiency (bs=1) = measured speedup vs mmspec plain / (tau * t_fwd(1) / (target + drafter forward "
              "time per step)), with the forward times measured inside this run's loop; efficiency vs forwards "
              "alone uses forwards timed outside the loop instead (the target's block of 1 + draft nodes per step "
              "and one drafter token, each right after the other model's forward), so it also charges what the "
              "loop does to the forwards themselves (masks, positions, cache layout)."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None: plots are drawn only where matplotlib happens to be
    installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def _maybe_chart(result: dict, path: Path) -> None:
    """Bar chart of speedups vs HF greedy (only if matplotlib is installed)."""
    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    labels = [f"{r['method']}\nbs={r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["speedup_vs_hf"] for r in rows],
           color=["tab:gray" if r["hf"] else "tab:blue" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs HF greedy (tokens/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="mmspec engine benchmark (offline tiny pair, CPU-friendly)")
    ap.add_argument("--out-dir", default="bench_out/engine")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    run_engine_benchmark(a.out_dir, a.new_tokens, a.prompts, tuple(a.batch_sizes), a.repeats, a.quick,
                         not a.no_progress)


if __name__ == "__main__":
    main()
