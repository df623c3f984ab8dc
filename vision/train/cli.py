"""``mmspec train-drafter``: (optionally self-distil a dataset, then) train a feature drafter and report held-out tau.

    mmspec train-drafter --target llava-dir --data data/ --out eagle/ --steps 2000
    mmspec train-drafter ... --head dream --compressor attention_prune:0.25     # DREAM
    mmspec train-drafter ... --taps 2,12,-3 --unroll 7                          # EAGLE-1 head on EAGLE-3 taps
    mmspec train-drafter ... --head eagle3 --draft-vocab 32000 --unroll 7       # EAGLE-3, as vLLM / SGLang load it
    mmspec train-drafter ... --loss vispec --compressor vispec:4 --unroll 3     # ViSpec
    mmspec train-drafter ... --head dflash --block-size 8 --lr 3e-4             # DFlash: a block per forward
    mmspec train-drafter --target llava-dir --distill --images photos/ --prompts questions.txt --data data/ --out eagle/
    mmspec train-drafter ... --resume            # continue from the newest checkpoint in --out

`add_parser(subparsers)` registers the subcommand on the mmspec CLI's subparsers; the handler prints a JSON report
(training loss, acceptance estimate, held-out tau before and after training) and writes it to ``--out/report.json``.
The trained drafter loads with ``SpeculativeVLM.from_pretrained(target, drafter=out)`` or ``mmspec chat --drafter out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .eagle_trainer import MODES
    from .losses import LOSSES

    p = subparsers.add_parser("train-drafter", help="train an EAGLE / EAGLE-3 / DREAM / DFlash drafter for a VLM target "
                              "(optionally on the target's own answers)")
    p.add_argument("--target", required=True, help="VLM directory or id (AutoModelForImageTextToText + AutoProcessor)")
    p.add_argument("--data", required=True, help="dataset directory (data.jsonl + images); written by --distill")
    p.add_argument("--out", required=True, help="output directory: the trained head, checkpoints, feature cache")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (resumed steps included)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mode", choices=MODES, default="offline",
                   help="offline: target features computed once and cached in --out/features; online: every step")
    p.add_argument("--head", choices=["eagle", "eagle3", "dream", "dflash"], default="eagle",
                   help="eagle: one decoder layer (EAGLE); eagle3: EAGLE-3 as vLLM / SGLang serve it (taps, own draft "
                   "vocabulary: --draft-vocab); dream: self-attn / gated cross-attn / self-attn (DREAM); "
                   "dflash: a block of draft tokens per forward from the target's features at --taps (DFlash)")
    p.add_argument("--draft-vocab", type=int, help="eagle3: draft vocabulary size, the most frequent tokens of the "
                   "data (default: the target's whole vocabulary)")
    p.add_argument("--taps", help="EAGLE-3 / DFlash: comma-separated hidden-state indices to read, e.g. 2,12,-3 "
                   "(DFlash default: three spread over the layers)")
    p.add_argument("--block-size", type=int, default=8, help="dflash: the pending token + block_size - 1 drafted "
                   "slots")
    p.add_argument("--blocks", type=int, default=8, help="dflash: training blocks (anchors) per conversation")
    p.add_argument("--draft-layers", type=int, help="decoder layers of the drafter (default: eagle 1, dream 3, "
                   "dflash 2)")
    p.add_argument("--msd", action="store_true", help="MSD: image positions read a projection of their feature")
    p.add_argument("--compressor", help="the drafter's image compression, trained with it: avg_pool:S, "
                   "attention_prune:R, conv:S, resampler:N, vispec:N (N queries), or a JSON config")
    p.add_argument("--loss", choices=LOSSES, help="eagle: SmoothL1 + 0.1 CE; vispec: + prob. L1 + ranking; "
                   "dream: + intermediate-feature loss (default: dream for --head dream, else eagle)")
    p.add_argument("--unroll", type=int, default=1, help="passes on the head's own predictions (EAGLE-3 training-"
                   "time test / ViSpec self-feeding; 1 = teacher forcing)")
    p.add_argument("--noise", type=float, default=0.0, help="uniform noise half-width on the input features")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--distill", action="store_true", help="first make the dataset in --data from --images and "
                   "--prompts with the target's greedy answers (skipped if --data already holds data.jsonl)")
    p.add_argument("--images", help="--distill: directory of images (sorted by name)")
    p.add_argument("--prompts", help="--distill: text file, one prompt per line; image i gets prompt i mod n")
    p.add_argument("--max-new-tokens", type=int, default=256, help="--distill: answer length")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of records kept out of training")
    p.add_argument("--eval-records", type=int, default=32, help="held-out records used to measure tau")
    p.add_argument("--eval-tokens", type=int, default=64, help="new tokens per held-out record")
    p.add_argument("--tree", type=int, help="draft chain length used to measure tau (default 4; dflash: "
                   "block_size - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    p.add_argument("--accelerate", action="store_true", help="optimise through accelerate (multi-GPU: start the "
                   "command with `accelerate launch -m mmspec.cli train-drafter ...`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_drafter)
    return p


def cmd_train_drafter(args) -> int:
    from mmspec.errors import InvalidInputError
    from vision.drafters import DreamHead, EagleHead
    from vision.drafters.eagle import image_token_id_of

    from .data import DATA_FILE, load_dataset, self_distill, split
    from .eagle_trainer import evaluate_tau, train_eagle

    model, processor = load_target(args)
    if args.distill and not (Path(args.data) / DATA_FILE).is_file():
        images, prompts = distill_inputs(args.images, args.prompts)
        self_distill(model, processor, images, prompts, args.data, max_new_tokens=args.max_new_tokens,
                     progress=not args.quiet)
    train, held = split(load_dataset(args.data), held_out=args.held_out, seed=args.seed)
    held = held[: args.eval_records]
    taps = parse_taps(args.taps)
    if args.draft_vocab is not None and args.head != "eagle3":
        raise InvalidInputError(f"--draft-vocab applies to --head eagle3 only (got --head {args.head})")
    if args.head == "dflash":
        head, before, report, after = _train_dflash(args, model, processor, train, held, taps)
    elif args.head == "eagle3":
        head, before, report, after = _train_eagle3(args, model, processor, train, held, taps)
    else:
        image_id = image_token_id_of(model.config) if args.msd else None
        layers = {"layers": args.draft_layers} if args.draft_layers else {}
        head = (DreamHead if args.head == "dream" else EagleHead)(
            model, taps=taps, image_token_id=image_id, compressor=parse_compressor(args.compressor, model), **layers)
        tree = args.tree or 4
        before = evaluate_tau(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
        report = train_eagle(head, model, processor, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             mode=args.mode, loss=args.loss, unroll=args.unroll, noise=args.noise, seed=args.seed,
                             out_dir=args.out, accelerate=args.accelerate,
                             save_every=args.save_every, resume=args.resume, progress=not args.quiet)
        after = evaluate_tau(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
    report.pop("losses")
    summary = {"head": str(args.out), "train": report, "held_out": {"records": len(held), "untrained": before,
                                                                    "trained": after}}
    text = json.dumps(summary, indent=2)
    (Path(args.out) / "report.json").write_text(text)
    print(text)
    print(f"held-out tau: {before['tau']:.2f} untrained -> {after['tau']:.2f} trained; head saved in {args.out}",
          file=sys.stderr)
    return 0


def parse_taps(spec: str | None) -> tuple[int, ...] | None:
    """--taps "2,12,-3" -> (2, 12, -3); a malformed list is an InvalidInputError."""
    if not spec:
        return None
    from mmspec.errors import InvalidInputError

    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError as e:
        raise InvalidInputError(f"--taps {spec!r}: expected comma-separated integers, e.g. 2,12,-3") from e


def _train_eagle3(args, model, processor, train, held, taps):
    """--head eagle3: (head, untrained tau, training report, trained tau)."""
    from mmspec.errors import InvalidInputError
    from vision.drafters import Eagle3Head
    from vision.drafters.dflash import default_taps

    from .eagle_trainer import evaluate_tau, train_eagle

    unused = [flag for flag, on in (("--msd", args.msd), ("--compressor", args.compressor),
                                    ("--draft-layers", args.draft_layers), ("--loss", args.loss not in (None, "eagle")))
              if on]
    if unused:
        raise InvalidInputError(f"{', '.join(unused)} cannot be represented in an EAGLE-3 head (one decoder layer over "
                                "the target's taps, as vLLM and SGLang load it); drop them or use --head eagle")
    from mmspec.target import text_config

    n_layers = int(text_config(model).num_hidden_layers)
    head = Eagle3Head(model, taps=taps or default_taps(n_layers), draft_vocab=args.draft_vocab)
    tree = args.tree or 4
    before = evaluate_tau(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
    report = train_eagle(head, model, processor, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         mode=args.mode, unroll=args.unroll, noise=args.noise, seed=args.seed, out_dir=args.out,
                         accelerate=args.accelerate, save_every=args.save_every, resume=args.resume,
                         progress=not args.quiet)
    after = evaluate_tau(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
    return head, before, report, after


def _train_dflash(args, model, processor, train, held, taps):
    """--head dflash: (head, untrained tau, training report, trained tau)."""
    from mmspec.errors import InvalidInputError
    from vision.drafters import DFlashHead

    from .dflash_trainer import evaluate_dflash, train_dflash

    unused = [f"--{n}" for n, v in (("msd", args.msd), ("compressor", args.compressor), ("loss", args.loss),
                                    ("noise", args.noise)) if v]
    if args.unroll != 1:
        unused.append("--unroll")
    if unused:
        raise InvalidInputError(f"{', '.join(unused)} do not apply to --head dflash (it drafts a block from the "
                                "target's features; see --block-size, --blocks, --taps)")
    head = DFlashHead(model, layers=args.draft_layers or 2, block_size=args.block_size, taps=taps)
    tree = args.tree or args.block_size - 1
    before = evaluate_dflash(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
    report = train_dflash(head, model, processor, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          blocks=args.blocks, mode=args.mode, seed=args.seed, out_dir=args.out,
                          accelerate=args.accelerate, save_every=args.save_every, resume=args.resume,
                          progress=not args.quiet)
    after = evaluate_dflash(head, model, processor, held, tree=tree, max_new_tokens=args.eval_tokens)
    return head, before, report, after


def parse_compressor(spec: str | None, model):
    """--compressor: None, "type:value" shorthands, or a JSON config for vision.compressors.build_compressor."""
    if not spec:
        return None
    from mmspec.errors import InvalidInputError
    from vision.compressors import build_compressor

    if spec.lstrip().startswith("{"):
        try:
            return build_compressor(json.loads(spec))
        except ValueError as e:
            raise InvalidInputError(f"--compressor {spec!r} is not valid JSON ({e})") from e
    kind, _, value = spec.partition(":")
    h = model.config.get_text_config().hidden_size
    heads = model.config.get_text_config().num_attention_heads
    shorthands = {"avg_pool": ("stride", int, {}), "conv": ("stride", int, {"dim": h}),
                  "attention_prune": ("keep_ratio", float, {}),
                  "resampler": ("n_queries", int, {"dim": h, "heads": heads}),
                  "vispec": ("n_queries", int, {"dim": h, "heads": heads})}
    if kind not in shorthands:
        raise InvalidInputError(f"--compressor {spec!r}: expected one of {sorted(shorthands)} as TYPE[:VALUE], or "
                                "a JSON config")
    name, cast, extra = shorthands[kind]
    try:
        cfg = {"type": kind, **extra, **({name: cast(value)} if value else {})}
    except ValueError as e:
        raise InvalidInputError(f"--compressor {spec!r}: {name} must be a {cast.__name__}") from e
    return build_compressor(cfg)


def load_target(args):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmspec.checkpoint import load_pretrained
    from mmspec.checks import check_device

    check_device(args.device)
    dtype = getattr(torch, args.dtype)
    kw = dict(trust_remote_code=args.trust_remote_code)
    model = load_pretrained(AutoModelForImageTextToText, args.target, "--target", dtype=dtype, **kw)
    model = model.to(args.device).eval()
    processor = load_pretrained(AutoProcessor, args.target, "--target", **kw)
    return model, processor


def distill_inputs(images_dir, prompts_file) -> tuple[list[Path], list[str]]:
    """The images of a directory (sorted) and one prompt per image (the file's lines, cycled)."""
    from mmspec.errors import DatasetError

    if not images_dir or not prompts_file:
        raise DatasetError("--distill needs --images DIR and --prompts FILE")
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"--images {images_dir!r} is not a directory")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"--images {images_dir!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        prompts = [line.strip() for line in Path(prompts_file).read_text(encoding="utf-8").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"--prompts {prompts_file!r} cannot be read as UTF-8 text ({e})") from e
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DatasetError(f"--prompts {prompts_file!r} holds no prompt (one per line)")
    return images, [prompts[i % len(prompts)] for i in range(len(images))]
