"""Supervised training of a whole VLM (or a text LM) on chat conversations: how the zoo's models learn to answer.

The feature drafters' trainers (`eagle_trainer`, `vlm_distill`) assume a target that already answers; this trains
one from conversations, as visual instruction tuning does (Liu et al. 2023, "Visual Instruction Tuning", stage 2:
the language model and projector learn next-token prediction on the assistant turns only). Conversations come from
a function `example(i) -> (images, messages)` so data can be generated on the fly (the zoo renders a fresh scene per
example, so nothing is seen twice); every example index is used once, in order, so a run is deterministic.

Each conversation is rendered with the processor's own chat template and run through the processor (pixel inputs
included); the loss is the cross-entropy of the tokens of every assistant turn (the turn's text and its end
marker), which is what generation samples. Rows are padded on the right; rows without images simply contribute no
pixels (a batch may mix image and text-only conversations). `autocast` trains in bfloat16 on CPUs and GPUs that
have it (the weights stay in their dtype). A text-only causal LM trains the same way with a tokenizer that has a
chat template (images must then be empty).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mmspec.errors import InvalidInputError

from ..images import load_images
from ..prompts import normalise_messages, process, render, take_message_images
from ..target import common_prefix


@dataclass
class Encoded:
    input_ids: list[int]
    targets: list[bool]  # targets[t]: token t is part of an assistant turn (predicted from t - 1)
    inputs: dict  # the processor's other outputs (pixel_values, ...)


def encode_conversation(processor, images, messages) -> Encoded:
    """Render and process a conversation; mark the tokens of every assistant turn."""
    msgs, ordered = take_message_images(normalise_messages(messages), list(images or []))
    pil = load_images(ordered)
    full = process(processor, render(processor, msgs, add_generation_prompt=False), pil)
    targets = [False] * len(full.input_ids)
    seen = 0
    for k, m in enumerate(msgs):
        seen += sum(p["type"] == "image" for p in m["content"])
        if m["role"] != "assistant":
            continue
        start = common_prefix(full.input_ids, _ids(processor, msgs[:k], pil[:seen], True))
        end = common_prefix(full.input_ids, _ids(processor, msgs[: k + 1], pil[:seen], False))
        for t in range(start, end):
            targets[t] = True
    if not any(targets):
        raise InvalidInputError("a training conversation has no assistant turn to learn from")
    return Encoded(full.input_ids, targets, full.inputs)


def _ids(processor, msgs, pil, generation_prompt: bool) -> list[int]:
    if not msgs:
        return []
    return process(processor, render(processor, msgs, add_generation_prompt=generation_prompt), pil).input_ids


def collate(batch: list[Encoded], pad_id: int) -> dict:
    """Right-padded ids, attention mask, target mask and the processors' tensors concatenated."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        targets[i, :n] = torch.tensor(e.targets)
    extra = {}
    for key in {k for e in batch for k in e.inputs}:
        parts = [e.inputs[key] for e in batch if key in e.inputs]
        if all(torch.is_tensor(p) for p in parts):
            extra[key] = torch.cat(parts)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, **extra}


def conversation_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the assistant tokens; (loss, number of tokens)."""
    targets = batch["targets"]
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    logits = model(**inputs).logits[:, :-1]  # (B, T - 1, V): position t predicts t + 1
    labels = batch["input_ids"][:, 1:].masked_fill(~targets[:, 1:], -100)
    n = int(targets[:, 1:].sum())
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100), n


def lr_schedule(step: int, steps: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to floor * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_conversations(model, processor, example: Callable[[int], tuple[list, list[dict]]], *, steps: int,
                        batch_size: int, lr: float, warmup: int = 100, weight_decay: float = 0.01,
                        grad_clip: float = 1.0, autocast: bool = True, params=None, progress: bool = True,
                        desc: str = "train", window: int = 50, group_by_length: int = 1) -> dict:
    """Train `model` in place on conversations example(0), example(1), ... (batch s takes s*B .. s*B + B - 1).

    group_by_length: pool this many batches' conversations, sort the pool by length and cut it into batches again
    (in a fixed shuffled order), so rows padded to their batch's longest waste less compute; every conversation is
    still used once and the run stays deterministic. params: the parameters to train (default all). Returns
    {"loss" (mean of the last `window` steps), "losses", "tokens" (assistant tokens trained on), "seconds", "steps"}."""
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"steps={steps!r}: must be a positive integer")
    if not isinstance(group_by_length, int) or group_by_length < 1:
        raise InvalidInputError(f"group_by_length={group_by_length!r}: must be a positive integer (1 = no grouping)")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_output_embeddings().weight.device
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    use_amp = autocast and (device.type == "cuda" or torch.backends.mkldnn.is_available())
    losses, tokens, t0, pool = [], 0, time.perf_counter(), {}
    model.train()
    try:
        with tqdm(range(steps), desc=desc, disable=not progress) as bar:
            for step in bar:
                batch = collate(_batch(processor, example, step, batch_size, group_by_length, pool), pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                for g in opt.param_groups:
                    g["lr"] = lr_schedule(step, steps, lr, warmup)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, n = conversation_loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                losses.append(loss.item())
                tokens += n
                bar.set_postfix(loss=f"{sum(losses[-window:]) / len(losses[-window:]):.3f}")
    finally:
        model.eval()
    recent = losses[-window:]
    return {"loss": sum(recent) / len(recent), "losses": losses, "tokens": tokens,
            "seconds": time.perf_counter() - t0, "steps": steps}


def _batch(processor, example, step: int, batch_size: int, group: int, pool: dict) -> list[Encoded]:
    """The conversations of batch `step`: consecutive indices, or with grouping a length-sorted slice of its pool."""
    if group == 1:
        return [_encode(processor, example, step * batch_size + j) for j in range(batch_size)]
    p = step // group
    if p not in pool:
        pool.clear()
        rows = sorted((_encode(processor, example, (p * group + j) * batch_size + i)
                       for j in range(group) for i in range(batch_size)), key=lambda e: len(e.input_ids))
        order = list(range(group))
        random.Random(p).shuffle(order)
        pool[p] = [rows[k * batch_size:(k + 1) * batch_size] for k in order]
    return pool[p][step % group]


def _encode(processor, example, i: int) -> Encoded:
    images, messages = example(i)
    return encode_conversation(processor, images, messages)
