"""Training an ImageHead on its LlamaGen target by self-distillation (EAGLE's recipe, as LANTERN trains its drafter).

Li et al. 2024, "EAGLE" (arXiv:2401.15077), section 4.2: the head reads the target's features teacher-forced and is
trained with L = SmoothL1(g_p, f_p) + w * CE(p_p, softmax(W_out g_p)) (EAGLE: w = 0.1), where p_p is the target's
next-token distribution. Jang et al. 2025, "LANTERN" (arXiv:2410.03355), trains the head on images the target
generated itself. Here:

* data: token grids sampled from the target (`generate_tokens`, temperature 1, the given guidance scale) for the
  given class labels, or grids given by the caller with their conditions;
* features: one no-cache forward of the target over [prefix; x_0 .. x_{N-2}] for the cond rows and, when guided,
  the uncond rows (null class / null caption) — the head runs both rows when drafting, so it learns both;
* loss: SmoothL1 on the features of both rows + w * KL(p || q) where p and q are the target's and the head's
  *guided* distributions `u + s (c - u)` (the pair the acceptance rule compares). KL = CE - H(p): same gradient.

Captions (t2i) are supported as conditions (B, L, C) with every caption token real (no padding mask).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import torch

from mmspec.eagle_loss import eagle_loss, full_distribution
from mmspec.errors import DatasetError, InvalidInputError
from mmspec.guidance import combine_logits

from .drafters.head import ImageHead
from .models.llamagen import LlamaGen, generate_tokens
from .target import check_guidance


@torch.no_grad()
def sample_grids(target_model: LlamaGen, cond: torch.Tensor, *, guidance_scale: float, batch_size: int,
                 generator: torch.Generator, temperature: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Token grids (S, N) sampled from the target for each condition of cond (S,) / (S, L, C)."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(cond), batch_size), desc="sampling grids", disable=not progress, leave=False):
        out.append(generate_tokens(target_model, cond[i:i + batch_size], guidance_scale=guidance_scale,
                                   temperature=temperature, generator=generator).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_teacher(target_model: LlamaGen, cond: torch.Tensor, *, guidance_scale: float, batch_size: int,
                   generator: torch.Generator, progress: bool = False):
    """Grids sampled from the target (temperature 1, no truncation) together with what `teacher` would compute on
    them, collected while sampling instead of by a second forward: grids (S, N), features (R, N, D) (R = 2S when
    guided: all cond rows, then all uncond rows, as `teacher` orders a batch) and the guided probabilities
    (S, N - 1, V) of tokens 1 .. N-1. On the KV cache the features equal the teacher-forced ones up to float
    rounding."""
    from tqdm.auto import tqdm

    grids, feats_c, feats_u, probs = [], [], [], []
    for i in tqdm(range(0, len(cond), batch_size), desc="sampling grids", disable=not progress, leave=False):
        g, f, p = _sample_batch(target_model, cond[i:i + batch_size], guidance_scale, generator)
        grids.append(g)
        feats_c.append(f[: len(g)])
        feats_u.append(f[len(g):])
        probs.append(p)
    return torch.cat(grids), torch.cat(feats_c + feats_u), torch.cat(probs)


def _sample_batch(model: LlamaGen, cond: torch.Tensor, guidance_scale: float, generator: torch.Generator):
    n, b = model.config.num_image_tokens, len(cond)
    guided = guidance_scale != 1.0
    rows = torch.cat([cond, model.null_cond(b).to(cond.dtype)]) if guided else cond
    cache = model.new_cache()
    out = model(None, rows.to(model.device), cache=cache)
    toks, feats, probs = [], [], []
    for i in range(n):
        feats.append(out.hidden[:, -1].cpu())  # (R, D): predicts token i
        logits = out.logits[:, -1]
        p = (combine_logits(logits, guidance_scale) if guided else logits).softmax(-1)  # (B, V)
        if i:
            probs.append(p.cpu())
        tok = torch.multinomial(p.cpu(), 1, generator=generator).view(-1)  # (B,)
        toks.append(tok)
        if i < n - 1:
            x = (torch.cat([tok, tok]) if guided else tok).to(model.device)
            out = model(x[:, None], input_pos=torch.full((len(x), 1), model.config.cls_token_num + i,
                                                         device=model.device), cache=cache)
    return torch.stack(toks, 1), torch.stack(feats, 1), torch.stack(probs, 1)


@torch.no_grad()
def teacher(target_model: LlamaGen, cond: torch.Tensor, tokens: torch.Tensor, guidance_scale: float):
    """Teacher-forced target for a batch of grids tokens (B, N).

    Returns features (R, N, D) with R = 2B ([cond; uncond]) when guided else B — features[:, j] is the feature that
    predicts token j — and the guided next-token probabilities (B, N - 1, V) of tokens 1 .. N-1."""
    model, n = target_model, target_model.config.cls_token_num
    guided = guidance_scale != 1.0
    if guided:
        cond = torch.cat([cond, model.null_cond(len(cond)).to(cond.dtype)])
        tokens = torch.cat([tokens, tokens])
    out = model(tokens[:, :-1], cond)  # (R, L + N - 1, ...)
    logits = out.logits[:, n:]  # (R, N - 1, V): after image tokens 0 .. N-2
    if guided:
        logits = combine_logits(logits, guidance_scale)  # (B, N - 1, V)
    return out.hidden[:, n - 1:], logits.softmax(-1)


def head_loss(head: ImageHead, tokens: torch.Tensor, feats: torch.Tensor, p: torch.Tensor, guidance_scale: float,
              w_cls: float, noise: float = 0.0, generator: torch.Generator | None = None) -> dict:
    """EAGLE's loss (`mmspec.eagle_loss`) on one batch: tokens (B, N), target features (R, N, D), target guided
    probabilities (B, N-1, V), which the head's guided distribution is trained to match (cross-entropy; the KL it
    differs from by the target's entropy is reported)."""
    n_cells, cls = tokens.shape[1], head.config.cls_token_num
    guided = guidance_scale != 1.0
    rows = torch.cat([tokens, tokens]) if guided else tokens  # (R, N)
    inputs = feats[:, :-1]  # (R, N - 1, D): pair j = (feature predicting token j, token j)
    if noise:  # EAGLE's feature noise against the drift of the head's own predictions while drafting
        u = torch.rand(inputs.shape, generator=generator,  # drawn where the generator lives (a CPU one on CUDA)
                       device=generator.device if generator is not None else inputs.device)
        inputs = inputs + (u.to(inputs.device, inputs.dtype) - 0.5) * 2 * noise
    pos = cls + torch.arange(n_cells - 1, device=tokens.device)  # each pair at its token's position
    pred = head(rows[:, :-1].to(head.device), inputs, pos)  # (R, N - 1, D) ~ features[:, 1:]
    logits = head.logits(pred)  # (R, N - 1, V)
    if guided:
        logits = combine_logits(logits, guidance_scale)  # (B, N - 1, V)
    ids, logp = full_distribution(p)
    loss, reg, ce = eagle_loss(pred, feats[:, 1:], logits, ids, logp, w_cls=w_cls)
    entropy = -(p * logp).sum(-1).mean()  # the target's: CE - H(p) = KL(p || q), what the history reports
    return {"loss": loss, "feature_loss": reg, "kl": ce - entropy}


def train_head(target_model: LlamaGen, head: ImageHead, *, class_labels=None, tokens: torch.Tensor | None = None,
               samples: int = 256, steps: int = 500, lr: float = 1e-3, batch_size: int = 16,
               guidance_scale: float = 4.0, w_cls: float | None = None, noise: float | None = None,
               weight_decay: float = 0.0, seed: int | None = 0, generator: torch.Generator | None = None,
               progress: bool = True, ce_weight: float | None = None,
               feature_noise: float | None = None) -> dict[str, list[float]]:
    """Train `head` (in place) on its frozen target; returns the per-step losses {"loss", "feature_loss", "kl"}.

    Data: `tokens` (S, N) grids with their conditions `class_labels` (S,) labels or (S, L, C) captions; or, without
    tokens, grids sampled from the target at temperature 1 for `class_labels` (default: `samples` random classes).
    guidance_scale: the scale the head will draft at (1.0 trains unguided, cond rows only). w_cls: weight of the
    KL term (EAGLE: 0.1). noise: half-width of uniform noise on the input features (EAGLE: 0.2 on unnormalised
    features; default 0, off). The names are those of `vision.train.train_eagle`; ``ce_weight`` and
    ``feature_noise`` are their old spellings, still accepted. generator / seed: every random draw (sampling,
    batching, noise).
    """
    from mmspec.compat import renamed

    w_cls = renamed("w_cls", w_cls, "ce_weight", ce_weight, default=0.1)
    noise = renamed("noise", noise, "feature_noise", feature_noise, default=0.0)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name}={value!r}: must be an int >= 1")
    for name, value in (("lr", lr), ("w_cls", w_cls), ("noise", noise),
                        ("weight_decay", weight_decay), ("guidance_scale", guidance_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"{name}={value!r}: must be a finite number >= 0")
    if lr <= 0:
        raise InvalidInputError(f"lr={lr!r}: must be > 0")
    check_guidance(target_model, guidance_scale)  # a scale != 1 needs the null class / caption
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
    model = target_model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]  # restored after training: no lasting side effect
    model.requires_grad_(False)
    try:
        return _train(model, head, class_labels, tokens, samples, steps, lr, batch_size, guidance_scale, w_cls,
                      noise, weight_decay, generator, progress)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)


def _train(model, head, class_labels, tokens, samples, steps, lr, batch_size, guidance_scale, w_cls,
           noise, weight_decay, gen, progress) -> dict[str, list[float]]:
    from tqdm.auto import tqdm

    cond, grids = dataset(model, class_labels, tokens, samples, guidance_scale, batch_size, gen, progress)
    head.train().requires_grad_(True)
    # AdamW's default eps (1e-8) underflows to 0 in float16, and a parameter with no gradient yet divides 0 by 0
    eps = 1e-4 if head.fc.weight.dtype == torch.float16 else 1e-8
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, eps=eps)
    history: dict[str, list[float]] = {"loss": [], "feature_loss": [], "kl": []}
    order = torch.randperm(len(grids), generator=gen)
    cursor = 0
    bar = tqdm(range(steps), desc="training head", disable=not progress)
    for _ in bar:
        if cursor + batch_size > len(order):  # a new epoch
            order, cursor = torch.randperm(len(grids), generator=gen), 0
        idx = order[cursor: cursor + batch_size]
        cursor += batch_size
        toks = grids[idx].to(model.device)  # (B, N)
        feats, p = teacher(model, cond[idx].to(model.device), toks, guidance_scale)
        losses = head_loss(head, toks, feats, p, guidance_scale, w_cls, noise, gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        for k, v in losses.items():
            history[k].append(float(v.detach()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", kl=f"{history['kl'][-1]:.4f}")
    head.eval()
    return history


def dataset(model: LlamaGen, class_labels, tokens, samples: int, guidance_scale: float, batch_size: int,
            gen: torch.Generator, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditions (S, ...), grids (S, N) long), validated; sampled from the target when tokens is None."""
    cfg = model.config
    if class_labels is None:
        if tokens is not None:
            raise DatasetError("token grids were given without their conditions: pass class_labels (S,) or caption "
                               "embeddings (S, L, C), one per grid")
        if cfg.model_type != "c2i":
            raise DatasetError("a text-conditional target needs caption embeddings: pass class_labels=(S, L, C)")
        class_labels = torch.randint(0, cfg.num_classes, (samples,), generator=gen)
    cond = torch.as_tensor(class_labels)
    if cfg.model_type == "c2i":
        cond = model.check_class_labels(cond.reshape(-1).cpu())
    elif cond.dim() != 3 or cond.shape[1:] != (cfg.cls_token_num, cfg.caption_dim):
        raise DatasetError(f"caption conditions must be (S, {cfg.cls_token_num}, {cfg.caption_dim}); got "
                           f"{tuple(cond.shape)}")
    if len(cond) == 0:
        raise DatasetError("no training conditions: class_labels is empty")
    if tokens is None:
        return cond, sample_grids(model, cond, guidance_scale=guidance_scale, batch_size=batch_size, generator=gen,
                                  progress=progress)
    grids = torch.as_tensor(tokens)
    if grids.dim() != 2 or grids.shape != (len(cond), cfg.num_image_tokens) or grids.is_floating_point():
        raise DatasetError(f"token grids must be integer (S, N) = ({len(cond)}, {cfg.num_image_tokens}) (one "
                           f"{cfg.grid_size}x{cfg.grid_size} grid per condition); got {grids.dtype} "
                           f"{tuple(grids.shape)}")
    if bool(((grids < 0) | (grids >= cfg.vocab_size)).any()):
        raise DatasetError(f"token grids hold codes outside the codebook [0, {cfg.vocab_size})")
    return cond, grids.long().cpu()


def build_parser(prog: str = "python -m image_ar.train") -> argparse.ArgumentParser:
    """The options of `mmspec train-image-head` (and ``python -m image_ar.train``)."""
    ap = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    ap.add_argument("--target", required=True, help="LlamaGen checkpoint (save_pretrained directory or reference file)")
    ap.add_argument("--out", required=True, help="directory to write the head to (config.json + model.safetensors)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples", type=int, default=256, help="grids sampled from the target (random classes)")
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--n-layer", type=int, default=1, help="transformer blocks of the head")
    ap.add_argument("--w-cls", "--ce-weight", dest="w_cls", type=float, default=0.1,
                    help="weight of the distribution term (EAGLE: 0.1); --ce-weight is its old name")
    ap.add_argument("--noise", type=float, default=0.0, help="uniform noise half-width on the input features")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the target and the head run: cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the target's weights and of the head trained on it (default float32)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None, prog: str = "python -m image_ar.train") -> int:
    """Train an ImageHead drafter on grids the target generates itself, and save it (config.json + safetensors)."""
    from mmspec.checks import check_device, check_local_path, check_seed

    args = build_parser(prog).parse_args(argv)
    # everything known up front, before the target loads or a grid is sampled
    check_device(args.device)
    check_seed(args.seed, "--seed")
    check_local_path(args.target, "--target")
    out = _check_out_dir(args.out)
    target = LlamaGen.from_pretrained(args.target, dtype=getattr(torch, args.dtype)).to(args.device)
    head = ImageHead(target, n_layer=args.n_layer)
    hist = train_head(target, head, samples=args.samples, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      guidance_scale=args.guidance_scale, w_cls=args.w_cls, noise=args.noise, seed=args.seed,
                      progress=not args.quiet)
    head.save_pretrained(out)
    print(f"trained {args.steps} steps: loss {hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f}, "
          f"kl {hist['kl'][0]:.4f} -> {hist['kl'][-1]:.4f}; saved to {args.out}")
    return 0


def _check_out_dir(out) -> Path:
    """--out: a directory that exists or can be made, and can be written (checked before any training)."""
    import os

    path = Path(os.path.expanduser(str(out)))
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"--out {str(out)!r} is a file: give a directory for the head (config.json + "
                                "model.safetensors)")
    from mmspec.checks import check_writable

    check_writable(out)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
