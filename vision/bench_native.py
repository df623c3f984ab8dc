"""`mmspec bench native`: the 2026 drafters side by side with transformers' own paths, on the same tiny models.

For each method transformers ships (`speculation_type="dflash"`, the Gemma 4 assistant, `use_mtp`) one run compares,
on the same greedy prompts: transformers' plain `generate`, transformers' speculative path, mmspec's plain loop and
mmspec with the same drafter weights, at batch 1 and at batch 4 (which transformers' assisted generation refuses:
the row shows its error). Target forwards are counted from outside (a forward hook on the target model), so both
sides are measured alike; wall time is the median of `repeats` runs, methods alternating.

The drafters are fitted for a few seconds to the target's own continuations of the benchmark prompts
(`fit_dflash`, `fit_assistant`): their acceptance is a controlled stand-in for a trained drafter, not a claim about
generalisation. The MTP layers are random: Qwen3.5's (transformers drops its weights and has no path to compare
with) and a tiny 61-layer DeepSeek-V3's, written under out_dir/checkpoints where transformers' `use_mtp` path looks
for it (`mmspec.testing.save_deepseek_v3_with_mtp`), so both sides run the same MTP weights.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from mmspec import SpeculativeDecoder

N_PROMPTS, PROMPT_LEN = 8, 12


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (PROMPT_LEN - i % 4,), generator=g).tolist() for i in range(N_PROMPTS)]


class _Forwards:
    """Counts a model's forward calls (the target's forwards, seen from outside)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))

    def close(self):
        self.handle.remove()


def _cases(new_tokens: int, fit_steps: int, workdir: Path):
    from transformers import AutoModelForCausalLM

    from mmspec.testing import save_deepseek_v3_with_mtp, tiny_gemma4, tiny_gemma4_assistant, tiny_llama, tiny_qwen3_5

    from .drafters import AssistantDrafter, DFlashDrafter, DFlashHead, EagleDrafter, MtpHead, MtpModelHead
    from .drafters.dflash import default_taps
    from .target import VLMTarget
    from .train import fit_dflash, lm_example
    from .train.assistant_fit import fit_assistant

    llama = tiny_llama(hidden=128, layers=4)
    prompts = _prompts(llama.config.vocab_size)
    torch.manual_seed(0)
    head = DFlashHead(llama, block_size=5)
    examples = [lm_example(llama, _greedy(llama, p, new_tokens), len(p), default_taps(4)) for p in prompts]
    fit_dflash(head, llama, examples, steps=fit_steps, lr=1e-2, batch_size=8, progress=False)
    yield ("DFlash (block of 4)", llama, llama, lambda h=head: DFlashDrafter(h.eval()),
           dict(assistant_model=head.model, speculation_type="dflash"), prompts)
    gemma = tiny_gemma4()
    a = tiny_gemma4_assistant()
    seqs = torch.tensor([_greedy(gemma, p[:8], new_tokens) for p in prompts])
    fit_assistant(a, gemma, seqs, 8, steps=fit_steps)
    yield ("Gemma 4 assistant (chain 3)", gemma, VLMTarget(gemma), lambda a=a: AssistantDrafter(a, 3),
           dict(assistant_model=a), [p[:8] for p in prompts])
    qwen = tiny_qwen3_5()
    torch.manual_seed(0)
    mtp = MtpHead(qwen)
    yield ("Qwen3.5 MTP layer (random, chain 3)", qwen, qwen, lambda h=mtp: EagleDrafter(h, 3), dict(use_mtp=True),
           prompts)
    # transformers' use_mtp reads the MTP layer from the checkpoint at every generate: it stays on disk meanwhile
    deepseek = AutoModelForCausalLM.from_pretrained(save_deepseek_v3_with_mtp(workdir / "deepseek-v3-mtp")).eval()
    mtp_model = MtpModelHead.from_target(deepseek)  # what transformers' use_mtp path loads
    yield ("DeepSeek-V3 MTP layer (random, chain 2)", deepseek, deepseek, lambda h=mtp_model: EagleDrafter(h, 2),
           dict(use_mtp=True), prompts)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0].tolist()


def _hf(model, prompts, new_tokens, extra):
    ids = torch.tensor(prompts) if len({len(p) for p in prompts}) == 1 else None
    if ids is None:  # left-pad a batch, as generate expects
        m = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (m - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (m - len(p)) + [1] * len(p) for p in prompts])
    else:
        mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, **extra)
    return [row[ids.shape[1]:].tolist() for row in out], None


def _ours(target, drafter_fn, prompts, new_tokens):
    out = SpeculativeDecoder(target, drafter_fn() if drafter_fn else None).generate(prompts, max_new_tokens=new_tokens)
    return out.sequences, out.stats


def _measure(model, run, repeats: int) -> dict:
    """Median wall time of `run()` over repeats (after a warm-up), target forwards and the outputs."""
    try:
        seqs, stats = run()
    except Exception as e:  # a batch size or model transformers refuses: reported, never hidden
        return {"error": f"{type(e).__name__}: {e}"}
    times = []
    for _ in range(repeats):
        counter = _Forwards(model)
        t0 = time.perf_counter()
        seqs, stats = run()
        times.append(time.perf_counter() - t0)
        counter.close()
    tokens = sum(len(s) for s in seqs)
    return {"seconds": statistics.median(times), "tokens": tokens, "forwards_per_token": counter.n / tokens,
            "ms_per_token": 1000 * statistics.median(times) / tokens, "seqs": seqs,
            "tau": stats.tau if stats is not None else None,
            # vLLM's names (mmspec.stats); null for transformers' rows and plain decoding
            **(stats.vllm_metrics() if stats is not None and stats.num_drafts else
               dict(mean_acceptance_length=None, draft_acceptance_rate=None, acceptance_rate_per_position=None))}


def run_native_benchmark(out_dir="bench_out/native", new_tokens: int = 32, repeats: int = 3, fit_steps: int = 150,
                         progress: bool = True) -> dict:
    """Run the side-by-side (module docstring); prints and writes result.json and result.md under out_dir.
    fit_steps: optimizer steps fitting the DFlash and assistant drafters."""
    from tqdm.auto import tqdm

    rows = []
    out = Path(out_dir)
    cases = list(_cases(new_tokens, fit_steps, out / "checkpoints"))
    for name, model, target, drafter_fn, hf_extra, prompts in tqdm(cases, desc="bench native", disable=not progress):
        one, four = prompts[:1], prompts[:4]
        runs = [("transformers generate", 1, lambda: _hf(model, one, new_tokens, {})),
                (f"transformers {_hf_name(hf_extra)}", 1, lambda: _hf(model, one, new_tokens, hf_extra)),
                ("mmspec plain", 1, lambda: _ours(target, None, one, new_tokens)),
                (f"mmspec {name}", 1, lambda: _ours(target, drafter_fn, one, new_tokens)),
                (f"transformers {_hf_name(hf_extra)}", 4, lambda: _hf(model, four, new_tokens, hf_extra)),
                ("mmspec plain", 4, lambda: _ours(target, None, four, new_tokens)),
                (f"mmspec {name}", 4, lambda: _ours(target, drafter_fn, four, new_tokens))]
        refs = {1: [_hf(model, [p], new_tokens, {})[0][0] for p in one],
                4: [_hf(model, [p], new_tokens, {})[0][0] for p in four]}  # transformers' greedy, one at a time
        measured = [(label, b, _measure(model, fn, repeats)) for label, b, fn in runs]
        base = {b: m for label, b, m in measured if label in ("transformers generate",) or
                (label == "mmspec plain" and b == 4)}
        for label, b, m in measured:
            row = {"case": name, "method": label, "batch": b, **{k: v for k, v in m.items() if k != "seqs"}}
            if "seqs" in m:
                plain = base.get(b)
                row["speedup"] = plain["ms_per_token"] / m["ms_per_token"] if plain and "ms_per_token" in plain \
                    else None
                row["equal"] = m["seqs"] == refs[b]
            rows.append(row)
    result = {"config": {"new_tokens": new_tokens, "repeats": repeats, "prompts": N_PROMPTS, "greedy": True,
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                         "date": time.strftime("%Y-%m-%d")}, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    md = _markdown(result)
    (out / "result.md").write_text(md)
    print(md)
    return result


def _hf_name(extra: dict) -> str:
    if extra.get("speculation_type"):
        return f"speculation_type={extra['speculation_type']!r}"
    return "use_mtp=True" if extra.get("use_mtp") else "assistant_model=assistant"


def _markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# `mmspec bench native` ({c['date']}; greedy, {c['new_tokens']} new tokens, median of {c['repeats']}; "
             f"{c['cpu']}, {c['threads']} threads, torch {c['torch']}, transformers {c['transformers']})", "",
             "| case | method | batch | tau | target fwd / token | ms / token | speedup vs plain (same batch) | "
             "equal to generate |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | {r['batch']} | raises: {r['error'][:90]} | | | | |")
            continue
        tau = f"{r['tau']:.2f}" if r.get("tau") else "-"
        sp = f"**{r['speedup']:.2f}x**" if r.get("speedup") else "-"
        eq = "yes" if r.get("equal") else "no"
        lines.append(f"| {r['case']} | {r['method']} | {r['batch']} | {tau} | {r['forwards_per_token']:.3f} | "
                     f"{r['ms_per_token']:.2f} | {sp} | {eq} |")
    lines += ["", "Speedup: against transformers' plain generate at batch 1 and mmspec's plain loop at batch 4 (which "
              "transformers' assisted generation refuses). Target forwards are counted by a hook on the target "
              "model (prefill included). The DFlash and assistant drafters are fitted to the prompts' own "
              "continuations (controlled acceptance); the MTP layers are random (the same weights on both sides)."]
    return "\n".join(lines) + "\n"
