"""MASSV-style distillation of an independent small draft VLM against the target: `distill_draft_vlm`,
`evaluate_draft_tau`.

MASSV (Dumitru et al. 2025, "Multimodal Adaptation and Self-Data Distillation for Speculative Decoding of
Vision-Language Models") turns a small VLM of the target's family into a better drafter in two phases, both on the
target's own (self-distilled) answers (`data.self_distill`):

* phase 1, ``train="projector"``: only the draft's multimodal projector moves (vision tower and language model
  frozen), aligning what the small LM reads at the image positions with what helps it predict the target;
* phase 2, ``train="all"``: the projector and the language model (LM head included) move; the vision tower stays
  frozen in both phases.

Data and loss. For each record the processor runs once on the full conversation (prompt + answer, chat template,
`features.encode`), the target runs once over it (`features.target_outputs`) and its next-token distribution is kept
as top-k log-probabilities, as `features.make_example` stores them. The draft takes the SAME processor inputs (same
tokenizer, same image placeholders and pixel tensors: `vision.testing.draft_vlm`) and is trained with the
cross-entropy from the target's top-k distribution, renormalised over those k ids, to the draft's full softmax
(`losses.token_ce`), averaged over the answer positions only (logits at t predict token t+1; t + 1 >= answer start).
Equivalently a forward KL(p_target^topk || q_draft) up to the target's constant entropy; k = 1 is a hard
cross-entropy to the target's greedy token, the quantity greedy speculative acceptance depends on.

Batches: ``batch_size`` examples are run one by one and their losses averaged before one optimizer step (gradient
accumulation), so any family's processor outputs (ragged pixel tensors, grids, token types) work unpadded. The
batch of step s is a pure function of (seed, s) (`eagle_trainer.batch_indices`).

Checkpoint: with ``out_dir``, the trained draft is written with its own ``save_pretrained`` (config.json +
model.safetensors) together with the processor (so ``SpeculativeVLM.from_pretrained(target, drafter=out_dir)``
works) and ``distill_report.json``; nothing is pickled.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from mmspec.errors import InvalidInputError

from .data import Record
from .eagle_trainer import _frozen, batch_indices
from .features import encode, target_outputs
from .losses import token_ce

TRAIN_MODES = ("all", "projector")
REPORT_FILE = "distill_report.json"
# Where families keep the vision -> text projector (LLaVA*, Gemma3, PaliGemma: multi_modal_projector; Idefics3 /
# SmolVLM: connector; InternVL (HF): multi_modal_projector; Qwen*-VL: the patch merger inside the vision tower).
_PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mlp1", "visual.merger")
_LM_NAMES = ("language_model", "text_model")


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def projector_of(model) -> torch.nn.Module:
    """The draft's multimodal projector (vision features -> LM embeddings)."""
    for root in (getattr(model, "model", None), model):
        for name in _PROJECTOR_NAMES:
            found = _get(root, name) if root is not None else None
            if isinstance(found, torch.nn.Module):
                return found
    raise InvalidInputError(f"{type(model).__name__} has no multimodal projector under any of {_PROJECTOR_NAMES}; "
                            "train='projector' needs one")


def language_model_of(model) -> list[torch.nn.Module]:
    """The draft's language model and its LM head."""
    out = []
    for root in (getattr(model, "model", None), model):
        for name in _LM_NAMES:
            found = getattr(root, name, None) if root is not None else None
            if isinstance(found, torch.nn.Module):
                out.append(found)
                break
        if out:
            break
    head = model.get_output_embeddings()
    if not out or head is None:
        raise InvalidInputError(f"{type(model).__name__}: no language model ({_LM_NAMES}) or LM head found")
    return out + [head]


def trainable_parameters(model, train: str) -> list[torch.nn.Parameter]:
    if train not in TRAIN_MODES:
        raise InvalidInputError(f"train={train!r}: valid values are {TRAIN_MODES}")
    modules = [projector_of(model)] + (language_model_of(model) if train == "all" else [])
    seen, params = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


# ---------------------------------------------------------------------------------------------- target examples
@torch.no_grad()
def target_example(target, processor, record: Record, topk: int) -> dict:
    """The processed conversation (shared by target and draft), the answer start and the target's top-k."""
    request, start = encode(processor, record)
    _, logits = target_outputs(target, request)
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(topk, dim=-1)  # (T, k)
    return {"request": request, "start": start, "topk_ids": ids.cpu(), "topk_logprobs": logprobs.cpu()}


def draft_loss(draft_model, example: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    """(top-k CE over the answer positions, (top-1 hits, positions)) for one example."""
    device = draft_model.get_output_embeddings().weight.device
    req = example["request"]
    ids = torch.tensor([req.input_ids], device=device)
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in req.inputs.items()}
    logits = draft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0]  # (T, V)
    first = max(example["start"] - 1, 0)  # logits at t predict t + 1; answer tokens are t + 1 >= start
    last = len(req.input_ids) - 1  # the final position predicts past the conversation: not trained
    if last <= first:
        return logits.sum() * 0.0, (0, 0)
    sel = logits[first:last]
    tk_ids = example["topk_ids"][first:last].to(device)
    tk_lp = example["topk_logprobs"][first:last].to(device)
    loss = token_ce(sel[None], tk_ids[None], tk_lp[None])[0].mean()
    hits = int((sel.argmax(-1) == tk_ids[:, 0]).sum())
    return loss, (hits, last - first)


# ------------------------------------------------------------------------------------------------------ training
def distill_draft_vlm(draft_model, target, processor, records: Sequence[Record], *, steps: int, lr: float,
                      batch_size: int = 1, topk: int = 8, out_dir=None, seed: int = 0, progress: bool = True,
                      train: str = "all", grad_clip: float | None = 1.0, window: int = 50) -> dict:
    """Distil `draft_model` (in place) towards `target` on `records` for `steps` AdamW steps (module docstring).

    Returns {"step", "loss" (mean of the last `window` steps), "losses" (per step), "acceptance" (top-1 agreement
    with the target's greedy token on answer positions over the last `window` steps), "seconds", "examples",
    "train", "trainable_parameters", "topk", "out_dir"}."""
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps={steps!r}: must be a positive integer")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size!r}: must be a positive integer")
    if not lr > 0:
        raise InvalidInputError(f"lr={lr!r}: must be positive")
    if not isinstance(topk, int) or topk < 1:
        raise InvalidInputError(f"topk={topk!r}: must be a positive integer")
    if not records:
        raise InvalidInputError("records is empty: nothing to distil on")
    vt = target.get_output_embeddings().weight.shape[0]
    vd = draft_model.get_output_embeddings().weight.shape[0]
    if vt != vd:
        raise InvalidInputError(f"the draft's vocabulary ({vd}) differs from the target's ({vt}); the draft must "
                                "share the target's tokenizer and processor")
    params = trainable_parameters(draft_model, train)
    from tqdm.auto import tqdm

    with torch.no_grad():
        examples = [target_example(target, processor, r, topk)
                    for r in tqdm(records, desc="target distributions", disable=not progress)]
    flags = [(p, p.requires_grad) for p in draft_model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, agree, t0 = [], [], time.perf_counter()
    draft_model.train()
    try:
        with _frozen(target), tqdm(total=steps, desc=f"distil draft ({train})", disable=not progress) as bar:
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                total, hits, n = 0.0, 0, 0
                for i in batch_indices(step, len(examples), batch_size, seed):
                    loss, (h, m) = draft_loss(draft_model, examples[i])
                    if loss.requires_grad:  # a text-only example does not reach the projector
                        (loss / batch_size).backward()
                    total, hits, n = total + loss.item() / batch_size, hits + h, n + m
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                history.append(total)
                agree.append((hits, n))
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
    finally:
        draft_model.eval()
        for p, flag in flags:
            p.requires_grad_(flag)
    recent, recent_agree = history[-window:], agree[-window:]
    report = {"step": steps, "loss": sum(recent) / len(recent), "losses": history,
              "acceptance": sum(h for h, _ in recent_agree) / max(1, sum(n for _, n in recent_agree)),
              "seconds": time.perf_counter() - t0, "examples": len(examples), "train": train,
              "trainable_parameters": sum(p.numel() for p in params), "topk": topk, "lr": lr,
              "batch_size": batch_size, "seed": seed, "out_dir": None if out_dir is None else str(out_dir)}
    if out_dir is not None:
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        draft_model.save_pretrained(root, safe_serialization=True)
        if hasattr(processor, "save_pretrained"):
            processor.save_pretrained(root)
        (root / REPORT_FILE).write_text(json.dumps({k: v for k, v in report.items()}, indent=1))
    return report


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_draft_tau(draft_model, target, processor, records: Sequence[Record], tree=4, max_new_tokens: int = 32,
                       batch_size: int = 8) -> dict:
    """Greedy speculative decoding of the records' prompts with `SpeculativeVLM(target, processor, draft_model,
    tree=tree)`: {"tau" (committed tokens per verification step), "alpha" (acceptance per draft depth),
    "acceptance", "new_tokens", "requests", "sequences" (the generated ids, the target's own: lossless)}."""
    from vision import SpeculativeVLM

    from .evaluate import measure_tau

    return measure_tau(SpeculativeVLM(target, processor, draft_model, tree=tree), draft_model, records,
                       max_new_tokens, batch_size)

