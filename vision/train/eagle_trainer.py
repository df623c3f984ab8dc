"""Training an EAGLE head on a (VLM) target, and measuring what it buys: `train_eagle`, `evaluate_tau`.

EAGLE (Li et al. 2024): teacher forcing on the target's own features. Each step takes a batch of conversations
(`features.Example`), feeds the head the pairs (x_{t+1}, f_t) with uniform noise U(-noise, noise) added to f_t (the
paper's robustness trick: at inference the head reads its own, imperfect, features), and minimises
SmoothL1(f̂, f) + w_cls * CE (`losses.drafter_loss`; loss="vispec" adds ViSpec's probability L1). Only
`head.trainable_parameters()` move: the target, whose embeddings and LM head the head shares, is frozen.

Determinism and resuming: the batch of step s and its noise are pure functions of (seed, s) — every epoch is a seeded
permutation of the examples — so a run resumed from a checkpoint takes exactly the batches the uninterrupted run would
have, and with the optimizer state restored it ends with the same weights. A checkpoint (every `save_every` steps
and at the end) is a directory ``out_dir/checkpoints/step-NNNNNNN/`` with the head (``save_pretrained``: safetensors +
config.json), ``optimizer.safetensors`` (AdamW moments, tensors only) and ``trainer_state.json`` (step, settings,
running metrics); nothing is pickled. The final head is also saved in ``out_dir`` itself, so
``EagleHead.from_pretrained(out_dir, target)`` loads it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import torch

from mmspec.checkpoint import read_kind_config, read_safetensors
from mmspec.errors import CheckpointError, InvalidInputError, UnsupportedModelError

from .data import Record
from .draft_vocab import choose_draft_vocab, coverage, token_counts
from .features import OnlineFeatures, collate, compress_pairs, precompute
from .losses import LOSSES, agreement, drafter_loss

MODES = ("offline", "online")
STATE_FILE, OPTIMIZER_FILE, STATE_KIND = "trainer_state.json", "optimizer.safetensors", "mmspec.eagle-trainer"
# Settings a resumed run must share with the run it continues (anything else would change the result).
RESUMABLE = ("lr", "batch_size", "loss", "w_cls", "w_prob", "w_rank", "w_mid", "noise", "context_weight", "topk",
             "warmup", "grad_clip", "seed", "examples", "unroll", "unroll_decay")


def train_eagle(head, target, processor, train_records: Sequence[Record], *, steps: int, lr: float = 1e-4,
                batch_size: int = 1, mode: str = "offline", loss: str | None = None, w_cls: float = 0.1,
                w_prob: float = 1.0, w_rank: float = 0.1, w_mid: float = 0.1, unroll: int = 1,
                unroll_decay: float = 0.8, noise: float = 0.0, context_weight: float = 0.1, topk: int = 8,
                warmup: int = 0, grad_clip: float | None = 0.5, seed: int = 0, out_dir=None,
                save_every: int | None = None, keep: int | None = 2, resume: bool = False, cache_dir=None,
                window: int = 50, progress: bool = True, accelerate: bool = False) -> dict:
    """Train `head` in place for `steps` optimizer steps in total (resumed steps included).

    head: an EagleHead (EAGLE-1; EAGLE-3 with taps; MSD with image_token_id) or a DreamHead; its compressor, if it
    has one, is trained with it on the drafter's compressed view of each image. loss: "eagle" (SmoothL1 + w_cls CE),
    "vispec" (+ w_prob probability L1 + w_rank ranking), "dream" (+ w_mid intermediate-feature loss); default
    "dream" for a DreamHead, else "eagle". unroll: steps of training on the head's own predicted features (EAGLE-3's
    training-time test, ViSpec's self-feeding; 1 = teacher forcing only), step s weighted unroll_decay**s.
    accelerate: run the optimisation through `accelerate.Accelerator` (launch with ``accelerate launch`` for several
    GPUs: each process takes its own share of every step's batch, gradients are averaged, the main process
    checkpoints); with one process it computes exactly what the plain loop does.
    mode "offline" computes the target's features once into `cache_dir` (default out_dir/features, else a temporary
    directory), "online" runs the target on each batch. With `out_dir`, a checkpoint is written every `save_every`
    steps and at the end (the newest `keep` are kept; None: all) and the final head is saved in out_dir. Returns
    {"step", "start_step", "loss" (mean over the last `window` steps), "acceptance" (running top-1 agreement with
    the target's next token inside the answers), "losses" (this call's per-step losses), "seconds", "examples",
    "mode", "out_dir"}."""
    from vision.drafters import DreamHead

    loss = loss or ("dream" if isinstance(head, DreamHead) else "eagle")
    config = dict(lr=lr, batch_size=batch_size, loss=loss, w_cls=w_cls, w_prob=w_prob, w_rank=w_rank, w_mid=w_mid,
                  unroll=unroll, unroll_decay=unroll_decay, noise=noise, context_weight=context_weight, topk=topk,
                  warmup=warmup, grad_clip=grad_clip, seed=seed, steps=steps, mode=mode)
    _check_args(config, train_records, out_dir, resume)
    if loss == "dream" and not isinstance(head, DreamHead):
        raise InvalidInputError(f"loss='dream' trains a DreamHead's cross-attention; got {type(head).__name__}")
    if getattr(head, "draft_vocab_size", None) is not None and loss != "eagle":
        raise InvalidInputError(f"loss={loss!r}: an EAGLE-3 head (its own draft vocabulary) trains with loss='eagle'")
    options = {"taps": head.taps, "mid_features": loss == "dream"}
    if getattr(head, "target_positions", False):  # the head numbers pairs as the target does (M-RoPE)
        options["positions"] = True
    with contextlib.ExitStack() as stack:
        data = _examples(stack, target, processor, train_records, mode, topk, out_dir, cache_dir, progress, options)
        config["examples"] = len(data)
        if getattr(head, "vocab_chosen", True) is False:  # EAGLE-3: the N most frequent tokens of the data
            counts = token_counts(data, head.target_vocab, progress)
            head.set_draft_vocab(choose_draft_vocab(counts, head.draft_vocab_size))
            config["draft_vocab_coverage"] = coverage(counts, head.draft_ids.cpu())
        stack.enter_context(_frozen(target))
        report = _run(head, target, data, config, out_dir, save_every, keep, resume, window, progress, accelerate)
    if "draft_vocab_coverage" in config:  # share of the data's answer tokens the draft vocabulary holds
        report["draft_vocab_coverage"] = config["draft_vocab_coverage"]
    return report


def _check_args(config: dict, records, out_dir, resume: bool) -> None:
    check_run(config, records, out_dir, resume)
    if config["mode"] not in MODES:
        raise InvalidInputError(f"mode={config['mode']!r}: valid modes are {MODES}")
    if config["loss"] not in LOSSES:
        raise InvalidInputError(f"loss={config['loss']!r}: valid losses are {LOSSES}")
    if not isinstance(config["unroll"], int) or config["unroll"] < 1:
        raise InvalidInputError(f"unroll={config['unroll']!r}: must be an integer >= 1 (1: teacher forcing only)")
    if not 0 < config["unroll_decay"] <= 1:
        raise InvalidInputError(f"unroll_decay={config['unroll_decay']!r}: must be in (0, 1]")


def check_run(config: dict, examples, out_dir, resume: bool, what: str = "train_records") -> None:
    """The settings every drafter trainer shares (steps, batch size, lr, data, resume / out_dir), checked before
    any work; `examples` are the records or examples to train on, named `what` in the error."""
    if not isinstance(config["steps"], int) or config["steps"] < 1:
        raise InvalidInputError(f"steps={config['steps']!r}: must be a positive integer")
    if not isinstance(config["batch_size"], int) or config["batch_size"] < 1:
        raise InvalidInputError(f"batch_size={config['batch_size']!r}: must be a positive integer")
    if not config["lr"] > 0:
        raise InvalidInputError(f"lr={config['lr']!r}: must be positive")
    if not len(examples):
        raise InvalidInputError(f"{what} is empty: nothing to train on")
    if resume and out_dir is None:
        raise InvalidInputError("resume=True needs out_dir (where the checkpoints are)")
    if not resume and out_dir is not None and _checkpoints(Path(out_dir)):
        raise InvalidInputError(f"{str(out_dir)!r} already holds checkpoints of a run; pass resume=True to "
                                "continue it, or choose another out_dir")


def _examples(stack, target, processor, records, mode, topk, out_dir, cache_dir, progress, options):
    if mode == "online":
        return OnlineFeatures(target, processor, records, topk, **options)
    if cache_dir is None:
        cache_dir = Path(out_dir) / "features" if out_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mmspec-features-"))
    return precompute(target, processor, records, cache_dir, topk=topk, progress=progress, **options)


@contextlib.contextmanager
def _frozen(target):
    """No gradient flows into the target (its embeddings and LM head run inside the head's forward)."""
    params = list(target.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------------------- the loop
def _run(head, target, data, config, out_dir, save_every, keep, resume, window, progress, accelerate,
         step_fn=None, resumable=RESUMABLE) -> dict:
    """The optimisation loop every drafter trainer shares: `step_fn` (default `train_step`, same signature) takes
    one optimizer step; `resumable` are the settings a resumed run must share with the run it continues."""
    from tqdm.auto import tqdm

    step_fn = step_fn or train_step

    device = target.get_output_embeddings().weight.device
    opt = torch.optim.AdamW(head.trainable_parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    acc = _accelerator(device) if accelerate else None
    state = {"step": 0, "losses": [], "agreement": []}  # running windows (restored on resume)
    if resume:
        state = _load_latest(Path(out_dir), head, target, opt, config, resumable) or state
    start, steps = state["step"], config["steps"]
    if start > steps:
        raise InvalidInputError(f"the newest checkpoint in {str(out_dir)!r} is at step {start}, past steps={steps}; "
                                "pass steps >= that to continue")
    losses, agree = deque(state["losses"], maxlen=window), deque(state["agreement"], maxlen=window)
    history, t0 = [], time.perf_counter()
    head.train()
    if acc is not None:
        opt = acc.prepare(opt)  # the head is not DDP-wrapped (its forward is ours): gradients are averaged below
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            for p in head.trainable_parameters():  # every process starts from the main process's weights
                p.data.copy_(broadcast(p.data.clone(), from_process=0))
        progress = progress and acc.is_main_process
    with tqdm(total=steps, initial=start, desc=f"train {type(head).__name__}", disable=not progress) as bar:
        for step in range(start, steps):
            value, hits = step_fn(head, opt, data, step, config, device, acc)
            history.append(value)
            losses.append(value)
            agree.append(hits)
            running = sum(h for h, _ in agree) / max(1, sum(n for _, n in agree))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", acc=f"{running:.3f}")
            done = step + 1
            main = acc is None or acc.is_main_process
            if main and out_dir is not None and ((save_every and done % save_every == 0) or done == steps):
                _save_checkpoint(Path(out_dir), head, opt, config, done, list(losses), list(agree), keep)
    head.eval()
    if out_dir is not None and (acc is None or acc.is_main_process):
        head.save_pretrained(out_dir)
    return {"step": steps, "start_step": start, "loss": sum(losses) / max(1, len(losses)),
            "acceptance": sum(h for h, _ in agree) / max(1, sum(n for _, n in agree)), "losses": history,
            "seconds": time.perf_counter() - t0, "examples": len(data), "mode": config["mode"],
            "out_dir": None if out_dir is None else str(out_dir)}


def train_step(head, opt, data, step: int, config: dict, device, acc=None) -> tuple[float, tuple[int, int]]:
    """One optimizer step on the batch of `step`; (loss, (agreeing positions, answer positions)). With an
    accelerator of n processes, process i takes examples i, i + n, ... of the batch."""
    idx = batch_indices(step, len(data), config["batch_size"], config["seed"])
    if acc is not None and acc.num_processes > 1:
        idx = idx[acc.process_index:: acc.num_processes] or idx[:1]
    batch = collate([data[i] for i in idx], config["context_weight"], view=_view_of(head)).to(device)
    feats = batch.features
    if config["noise"]:
        g = torch.Generator().manual_seed(_step_seed(config["seed"], step, salt=1))
        u = torch.rand(feats.shape, generator=g, dtype=torch.float32)  # (B, L, H) in [0, 1)
        feats = feats + ((2 * u - 1) * config["noise"]).to(device=device, dtype=feats.dtype)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, config["lr"], config["warmup"])
    loss, first = 0.0, None
    for s, (out, weights) in enumerate(unrolled(head, batch.input_ids, feats, batch.weights, config["unroll"],
                                                batch.positions)):
        part, _ = drafter_loss(out.hidden_states[0], out.logits, batch, config["loss"], config["w_cls"],
                               config["w_prob"], w_reg=getattr(head, "w_reg", 1.0), w_rank=config["w_rank"],
                               w_mid=config["w_mid"],
                               cross_hidden=getattr(out, "cross_hidden", None), weights=weights)
        loss = loss + part * config["unroll_decay"] ** s
        first = out if s == 0 else first  # teacher-forced pass: the running acceptance estimate
    optimizer_step(head, opt, loss, config["grad_clip"], acc)
    return loss.item(), agreement(first.logits, batch)


def optimizer_step(head, opt, loss, grad_clip: float | None, acc=None) -> None:
    """Backward, (with several accelerate processes) average the head's gradients, clip, step."""
    opt.zero_grad(set_to_none=True)
    if acc is None:
        loss.backward()
    else:
        acc.backward(loss)
        if acc.num_processes > 1:  # average the head's gradients over processes (its forward is not DDP-wrapped)
            for p in head.trainable_parameters():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(head.trainable_parameters(), grad_clip)
    opt.step()


def _accelerator(device):
    try:
        from accelerate import Accelerator
    except ImportError as e:  # a declared dependency, but say what to do if it is missing
        raise InvalidInputError("accelerate=True needs the accelerate package (pip install accelerate)") from e
    return Accelerator(cpu=torch.device(device).type == "cpu")


def _view_of(head):
    """The drafter's compressed view of images when the head has a compressor (trained with it), else None."""
    if head.compressor is None:
        return None
    image_id = head.image_token_id if head.image_token_id is not None else head.target_image_token_id
    if image_id is None:
        raise UnsupportedModelError("the head has a compressor but its target's config names no image token id; "
                                    "pass image_token_id to the head")
    return functools.partial(compress_pairs, compressor=head.compressor, image_token_id=image_id, to_head=head.tap_fc)


def unrolled(head, ids: torch.Tensor, feats: torch.Tensor, weights: torch.Tensor, steps: int,
             positions: torch.Tensor | None = None):
    """Yield (head output, loss weights) for `steps` passes over a batch of pairs (EAGLE-3's training-time test).

    Pass 0 is teacher forcing. In pass s the pair at index t reads the feature the head predicted at t - 1 in pass
    s - 1 and attends, as it would while drafting s tokens ahead, to the true-feature keys of pass 0 up to t - s,
    to its own chain (pass i at index t - s + i, 0 < i < s) and to itself. Positions t < s have no such context and
    weigh 0. One KV cache holds every pass's keys, so each pass costs one forward over L pairs."""
    from transformers import DynamicCache

    b, n = ids.shape
    dev = ids.device
    pos = torch.arange(n, device=dev).expand(b, n) if positions is None else positions.permute(2, 0, 1)  # (3, B, L)
    cache = DynamicCache(config=head.config) if steps > 1 else None
    out = head(ids, feats, position_ids=pos, cache=cache, use_cache=steps > 1)
    yield out, weights
    t = torch.arange(n, device=dev)
    for s in range(1, steps):
        prev = out.hidden_states[0]  # (B, L, H) predicted features of pass s - 1
        feats_s = torch.cat([prev.new_zeros(b, 1, prev.shape[-1]), prev[:, :-1]], dim=1)  # index t reads t - 1
        blocks = [t[None, :] <= (t[:, None] - s)]  # (L, L) pass 0: true features up to t - s
        blocks += [t[None, :] == (t[:, None] - s + i) for i in range(1, s + 1)]  # passes 1..s: the chain, itself
        allowed = torch.cat(blocks, dim=1)  # (L, (s + 1) L)
        mask = torch.where(allowed, 0.0, torch.finfo(prev.dtype).min).to(prev.dtype)[None, None].expand(b, 1, -1, -1)
        out = head(ids, feats_s, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        yield out, weights * (t >= s).to(weights.dtype)[None, :]


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


def _step_seed(seed: int, n: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + n * 7_919 + salt * 104_729) % (2 ** 63 - 1)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Examples of `step`: positions step*B .. step*B + B - 1 of an endless stream of seeded epoch permutations."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(_step_seed(seed, epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][pos % n])
    return out


# -------------------------------------------------------------------------------------------------- checkpoints
def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _save_checkpoint(out_dir: Path, head, opt, config, step, losses, agree, keep) -> Path:
    """Write to a temporary directory, then rename: a crash never leaves a half checkpoint that looks complete."""
    from safetensors.torch import save_file

    final = out_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    head.save_pretrained(tmp)
    tensors, groups = optimizer_to_tensors(opt)
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    state = {"kind": STATE_KIND, "step": step, "config": config, "param_groups": groups, "losses": losses,
             "agreement": [list(a) for a in agree]}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        for _, old in _checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_latest(out_dir: Path, head, target, opt, config, resumable=RESUMABLE) -> dict | None:
    """Restore head, optimizer and running metrics from the newest checkpoint; None when there is none."""
    found = _checkpoints(out_dir)
    if not found:
        return None
    step, path = found[-1]
    state = read_kind_config(path / STATE_FILE, STATE_KIND, "the EAGLE trainer")
    diff = {k: (state["config"].get(k), config[k]) for k in resumable if state["config"].get(k) != config[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {str(path)!r}: it was trained with different settings (" + ", ".join(
            f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items()) + "); resume with the same settings or "
            "start a new out_dir")
    head.load_state_dict(type(head).from_pretrained(path, target).state_dict())
    opt.load_state_dict(optimizer_from_tensors(read_safetensors(path / OPTIMIZER_FILE, "optimizer state"), state["param_groups"]))
    return {"step": step, "losses": state["losses"], "agreement": [tuple(a) for a in state["agreement"]]}


def optimizer_to_tensors(opt) -> tuple[dict, list]:
    """An optimizer's state_dict as (flat tensors for safetensors, JSON-able param_groups)."""
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu() for i, s in sd["state"].items() for k, v in s.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def optimizer_from_tensors(tensors: dict, groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_tau(head, target, processor, records: Sequence[Record], tree=4, max_new_tokens: int = 32,
                 batch_size: int = 8) -> dict:
    """Greedy speculative decoding of the records' prompts (their messages without the final answer) with
    `EagleDrafter(head, tree)`: {"tau" (committed tokens per verification step), "alpha" (acceptance per draft
    depth), "acceptance" (accepted / drafted tokens), "new_tokens", "requests"}. The answers are the target's own
    (lossless), so only the speed statistics depend on the head."""
    from vision import SpeculativeVLM
    from vision.drafters import EagleDrafter

    from .evaluate import measure_tau

    out = measure_tau(SpeculativeVLM(target, processor, EagleDrafter(head, tree)), head, records, max_new_tokens,
                      batch_size)
    out.pop("sequences")
    return out
