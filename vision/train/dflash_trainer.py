"""Training a DFlash block drafter (`vision.drafters.DFlashHead`) on a (VLM) target: `train_dflash`, `block_batch`.

DFlash (Chen et al. 2026) trains the drafter to fill a block at once. For a conversation x_0..x_{T-1} with the
target's tapped features f_0..f_{T-1} (`features.Example`, taps = the head's), an anchor a is a position inside the
answer; the drafter reads the context f_0..f_{a-1} and the block [x_a, MASK, ..., MASK] at positions a..a+n-1, and
slot j >= 1 learns the target's greedy token at a + j (the target's top-1 next token at a + j - 1: what verification
would accept). Several anchors per conversation train in one forward: each block attends to the context before its
own anchor and to itself, never to another block. Slot j's cross-entropy weighs ``decay ** (j - 1)`` (early slots
decide how much of a block is accepted). Image positions are context like any other: the image reaches the drafter
through the target's features there.

The loop, checkpoints (safetensors, resumable bit for bit), accelerate support and the offline feature cache are the
EAGLE trainer's (`eagle_trainer._run`); only the step differs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mmspec.errors import InvalidInputError

from .data import Record
from .eagle_trainer import (MODES, _examples, _frozen, _run, _step_seed, batch_indices, check_run, lr_at,
                            optimizer_step)
from .features import Example

IGNORE = -100
RESUMABLE = ("lr", "batch_size", "blocks", "decay", "warmup", "grad_clip", "seed", "examples", "block_size")


@dataclass
class BlockBatch:
    """Blocks of B examples in one forward: Q = blocks * block_size query slots per row, K = T + Q keys."""

    context: torch.Tensor  # (B, T, F) the target's tapped features, right-padded
    noise_ids: torch.Tensor  # (B, Q) each block: its anchor token, then mask ids
    position_ids: torch.Tensor  # (B, T + Q) context positions 0..T-1, then each block's a..a+n-1
    mask: torch.Tensor  # (B, 1, Q, T + Q) additive
    labels: torch.Tensor  # (B, Q) the target's greedy token per slot; IGNORE on anchors and past the end
    weights: torch.Tensor  # (B, Q) decay ** (j - 1) on labelled slots, 0 elsewhere
    first: torch.Tensor  # (B, Q) bool: slot 1 of a block (the first drafted token: the acceptance estimate)

    def to(self, device) -> "BlockBatch":
        return BlockBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def anchors(e: Example, count: int, generator: torch.Generator) -> list[int]:
    """Up to `count` distinct anchor positions inside the answer (a >= answer_start, a + 1 < T), sorted; the
    whole conversation (a >= 1) when the answer leaves no room."""
    t = len(e.input_ids)
    lo = e.answer_start if e.answer_start < t - 1 else 1
    pool = torch.arange(max(1, lo), t - 1)
    if len(pool) == 0:
        return []
    pick = torch.randperm(len(pool), generator=generator)[:count]
    return sorted(pool[pick].tolist())


def block_batch(examples: Sequence[Example], block_size: int, blocks: int, mask_token_id: int,
                generator: torch.Generator, decay: float = 0.8) -> BlockBatch:
    """The training blocks of a batch (see the module docstring); anchors drawn with `generator`."""
    n, q = block_size, blocks * block_size
    t_max = max(len(e.input_ids) for e in examples)
    b = len(examples)
    feats = examples[0].features
    context = feats.new_zeros(b, t_max, feats.shape[-1])
    noise = torch.full((b, q), mask_token_id, dtype=torch.long)
    pos = torch.zeros(b, t_max + q, dtype=torch.long)
    allowed = torch.zeros(b, q, t_max + q, dtype=torch.bool)
    labels = torch.full((b, q), IGNORE, dtype=torch.long)
    weights = torch.zeros(b, q)
    first = torch.zeros(b, q, dtype=torch.bool)
    slot_w = decay ** torch.arange(n - 1, dtype=torch.float32)
    for r, e in enumerate(examples):
        t = len(e.input_ids)
        context[r, :t] = e.features
        pos[r, :t_max] = torch.arange(t_max)
        greedy = e.topk_ids[:, 0]  # the target's next token at each position
        for i, a in enumerate(anchors(e, blocks, generator)):
            s = i * n
            noise[r, s] = e.input_ids[a]
            pos[r, t_max + s: t_max + s + n] = torch.arange(a, a + n)
            allowed[r, s: s + n, :a] = True  # the context before the anchor
            allowed[r, s: s + n, t_max + s: t_max + s + n] = True  # the block itself, both ways
            m = min(n - 1, t - 1 - a)  # labelled slots: positions a + 1 .. a + m exist
            labels[r, s + 1: s + 1 + m] = greedy[a: a + m]
            weights[r, s + 1: s + 1 + m] = slot_w[:m]
            first[r, s + 1] = m >= 1
        allowed[r, :, t_max:] |= ~allowed[r, :, t_max:].any(-1, keepdim=True)  # unused slots: see themselves
    mask = torch.zeros(allowed.shape, dtype=feats.dtype).masked_fill_(~allowed, torch.finfo(feats.dtype).min)
    return BlockBatch(context, noise, pos, mask[:, None], labels, weights, first)


def dflash_step(head, opt, data, step: int, config: dict, device, acc=None) -> tuple[float, tuple[int, int]]:
    """One optimizer step on the batch of `step`: (loss, (slot-1 agreements, slot-1 labels))."""
    idx = batch_indices(step, len(data), config["batch_size"], config["seed"])
    if acc is not None and acc.num_processes > 1:
        idx = idx[acc.process_index:: acc.num_processes] or idx[:1]
    g = torch.Generator().manual_seed(_step_seed(config["seed"], step, salt=2))
    batch = block_batch([data[i] for i in idx], head.block_size, config["blocks"], head.mask_token_id, g,
                        config["decay"]).to(device)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, config["lr"], config["warmup"])
    logits = head(batch.noise_ids, batch.context, batch.position_ids, batch.mask)  # (B, Q, V)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE,
                         reduction="none")
    w = batch.weights.flatten().to(ce.dtype)
    loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
    optimizer_step(head, opt, loss, config["grad_clip"], acc)
    hits = ((logits.argmax(-1) == batch.labels) & batch.first).sum()
    return loss.item(), (int(hits), int(batch.first.sum()))


def train_dflash(head, target, processor, train_records: Sequence[Record], *, steps: int, mode: str = "offline",
                 out_dir=None, cache_dir=None, progress: bool = True, **kw) -> dict:
    """Train a DFlashHead in place on a VLM's conversations for `steps` optimizer steps (resumed steps included):
    the target's tapped features come from `mode` "offline" (computed once into `cache_dir`, default
    out_dir/features) or "online" (every step); the rest is `fit_dflash` (keyword arguments passed on)."""
    if mode not in MODES:
        raise InvalidInputError(f"mode={mode!r}: valid modes are {MODES}")
    if not train_records:
        raise InvalidInputError("train_records is empty: nothing to train on")
    with contextlib.ExitStack() as stack:
        data = _examples(stack, target, processor, train_records, mode, 1, out_dir, cache_dir, progress,
                         {"taps": head.taps, "mid_features": False})
        return fit_dflash(head, target, data, steps=steps, out_dir=out_dir, progress=progress, mode=mode, **kw)


def fit_dflash(head, target, data: Sequence[Example], *, steps: int, lr: float = 3e-4, batch_size: int = 4,
               blocks: int = 8, decay: float = 0.8, warmup: int = 0, grad_clip: float | None = 1.0, seed: int = 0,
               out_dir=None, save_every: int | None = None, keep: int | None = 2, resume: bool = False,
               window: int = 50, progress: bool = True, accelerate: bool = False, mode: str = "examples") -> dict:
    """Train a DFlashHead in place on `data` (Examples with the head's taps as features: `features.make_example`,
    or `lm_example` for a text LM); `blocks` anchors per conversation each step. Checkpoints and the report are
    `train_eagle`'s ("acceptance": the running rate at which slot 1, the first drafted token, equals the target's
    greedy token)."""
    if not isinstance(blocks, int) or blocks < 1:
        raise InvalidInputError(f"blocks={blocks!r}: must be a positive integer (anchors per conversation)")
    if not 0 < decay <= 1:
        raise InvalidInputError(f"decay={decay!r}: must be in (0, 1]")
    config = dict(lr=lr, batch_size=batch_size, blocks=blocks, decay=decay, warmup=warmup, grad_clip=grad_clip,
                  seed=seed, steps=steps, mode=mode, block_size=head.block_size, examples=len(data))
    check_run(config, data, out_dir, resume, what="data")
    with _frozen(target):
        return _run(head, target, data, config, out_dir, save_every, keep, resume, window, progress, accelerate,
                    step_fn=dflash_step, resumable=RESUMABLE)


@torch.no_grad()
def lm_example(model, ids: Sequence[int], answer_start: int, taps) -> Example:
    """A text LM's Example for `ids` (one forward): features = the hidden states at `taps` concatenated, topk_ids
    = the model's greedy next token at each position."""
    from mmspec.target import select_hidden

    x = torch.tensor([list(ids)], device=model.get_output_embeddings().weight.device)
    out = model(input_ids=x, output_hidden_states=True)
    logprobs, top = torch.log_softmax(out.logits[0].float(), dim=-1).topk(1, dim=-1)
    return Example(x[0].cpu(), select_hidden(out.hidden_states, tuple(taps))[0].cpu(), top.cpu(), logprobs.cpu(),
                   int(answer_start))


@torch.no_grad()
def evaluate_dflash(head, target, processor, records: Sequence[Record], tree=None, max_new_tokens: int = 32,
                    batch_size: int = 8) -> dict:
    """`evaluate_tau` for a DFlash head: greedy speculative decoding with `DFlashDrafter(head, tree)` (default: a
    chain of block_size - 1)."""
    from vision import SpeculativeVLM
    from vision.drafters import DFlashDrafter

    from .evaluate import measure_tau

    out = measure_tau(SpeculativeVLM(target, processor, DFlashDrafter(head, tree)), head, records, max_new_tokens,
                      batch_size)
    out.pop("sequences")
    return out
