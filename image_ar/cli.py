"""`mmspec image` (the arguments are defined in mmspec.cli): generate images speculatively from the command line (a progress bar, the stats, the images).

    mmspec image --target llamagen_dir --vq vq_dir --drafter jacobi --class-label 3 --out out.png
    mmspec image --target ... --vq ... --class-label 1 2 3 --num-images 4 --acceptance lantern --out grid.png
    mmspec image --target continuous_dir --vae vae_dir --drafter draft_dir --acceptance cspd --class-label 3
    mmspec image --target zoo:llamagen --vq zoo:vq --drafter zoo:llamagen-head --class-label 0 4 7

Paths may name zoo models (`image_ar.zoo`): zoo:NAME, or zoo:NAME@quick for the quick variant.

One label and one image writes that image; several are laid out in a grid (a row per label). Next to the image
``<out>.json`` holds the stats and every setting that reproduces the run (seed, guidance, sampling, acceptance,
drafter, models), and ``<out>.acceptance.png`` the per-position acceptance map (and, for lossy rules,
``<out>.tv.png`` the measured TV map). Lossy rules are marked LOSSY in every line printed.

Everything known up front (the output path and format, the device, the paths, every sampling and acceptance
setting) is checked before a model loads, so a mistake costs no generation; user errors are typed (`mmspec.errors`)
and `mmspec` prints them as one ``mmspec: error: ...`` line with exit code 2.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import torch

from mmspec.errors import InvalidInputError

from .pipeline import TOP_K, SpeculativeImagePipeline, check_settings, is_continuous_dir

_SETTING = re.compile(r"\b(acceptance|temperature|top_k|top_p|guidance_scale|guidance_schedule|tv_budget|lantern_k|"
                      r"lantern_delta|lantern_lambda|seed|prefill_ratio)=")


def run_image(args) -> int:
    from mmspec.checks import check_device, check_local_path

    from .zoo import resolve

    path = check_output_path(args.out)
    check_device(args.device)
    tree = _tree(args)
    drafter_given = args.drafter not in (None, "jacobi", "none")
    for flag, value in (("--target", args.target), ("--vq", args.vq)) + ((("--drafter", args.drafter),)
                                                                           if drafter_given else ()):
        check_local_path(value, flag)
    zoo = str(args.target).startswith("zoo:")
    continuous = None if zoo else is_continuous_dir(Path(args.target))
    if not zoo:
        _check_args(args, continuous, drafter_given)
    target = resolve(args.target)  # every path may be zoo:NAME (or zoo:NAME@quick); zoo models train on first use
    if zoo:
        continuous = is_continuous_dir(Path(target))
        _check_args(args, continuous, drafter_given)
    _check_grid_size(args.grid_size, Path(target))
    drafter = args.drafter or ("none" if continuous else "jacobi")
    pipe = SpeculativeImagePipeline.from_pretrained(
        target, vq=resolve(args.vq), drafter=None if drafter == "none" else resolve(drafter), device_map=args.device,
        dtype=getattr(torch, args.dtype), tree=tree, compile=getattr(args, "compile", None),
        target_config=None if args.grid_size is None else {"grid_size": args.grid_size})
    out = pipe(class_labels=args.class_label, num_images_per_prompt=args.num_images,
               guidance_scale=args.guidance_scale, temperature=args.temperature,
               top_k=TOP_K if args.top_k is None else args.top_k, top_p=args.top_p, acceptance=args.acceptance,
               lantern_delta=args.lantern_delta, lantern_lambda=args.lantern_lambda, lantern_k=args.lantern_k,
               tv_budget=args.tv_budget, seed=args.seed, progress=not args.quiet,
               guidance_schedule=args.guidance_schedule, prefill_ratio=args.prefill_ratio)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(out.images, rows=len(args.class_label)).save(path)
    st = out.stats
    settings = {"target": args.target, "vq": args.vq, "drafter": drafter, "grid_size": args.grid_size,
                "dtype": args.dtype, "device": args.device, "compile": getattr(args, "compile", None),
                "class_labels": list(args.class_label), "num_images": args.num_images, **st.settings}
    settings["drafter"] = drafter  # the CLI's spelling (a path or zoo:NAME), not the resolved one
    path.with_suffix(".json").write_text(json.dumps({"command": "image", **st.as_dict(), "settings": settings,
                                                     "class_labels": args.class_label,
                                                     "acceptance_grid": st.acceptance_grid.tolist()}, indent=2))
    heatmap(st.acceptance_grid).save(path.with_suffix(".acceptance.png"))
    if st.tv_grid is not None:
        heatmap(st.tv_grid / max(st.tv_max, 1e-12)).save(path.with_suffix(".tv.png"))
    print(st.summary(), file=sys.stderr)
    print(f"wrote {path} ({len(out.images)} image(s)), {path.with_suffix('.json')}", file=sys.stderr)
    return 0


def _tree(args) -> int | None:
    """--tree, or SJD's --window (the pending token + the drafted tokens) in its old form."""
    tree = args.tree
    if tree is not None and tree < 1:
        raise InvalidInputError(f"--tree {tree}: must be >= 1 (tokens drafted per step)")
    if args.window is not None:
        if tree is not None:
            raise InvalidInputError("--window and --tree both set the tokens drafted per step: pass --tree only")
        if args.window < 2:
            raise InvalidInputError(f"--window {args.window}: must be >= 2 (the pending token + >= 1 draft)")
        tree = args.window - 1
    return tree


def _check_args(args, continuous: bool, drafter_given: bool) -> None:
    """The call's settings, checked as the pipeline will check them, before any model loads."""
    if continuous and args.drafter == "jacobi":
        raise InvalidInputError("--drafter jacobi: SJD drafts discrete tokens; a continuous-token target takes "
                                "'none' or a ContinuousAR directory")
    if (args.tree is not None or args.window is not None) and args.drafter == "none":
        raise InvalidInputError(f"--{'tree' if args.tree is not None else 'window'}: sets the tokens drafted per "
                                "step, and --drafter none drafts nothing")
    try:
        check_settings(continuous=continuous, continuous_drafter=continuous and drafter_given,
                       target_name="ContinuousAR" if continuous else "LlamaGen", acceptance=args.acceptance,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       guidance_scale=args.guidance_scale, tv_budget=args.tv_budget, lantern_k=args.lantern_k,
                       lantern_delta=args.lantern_delta, lantern_lambda=args.lantern_lambda, seed=args.seed,
                       guidance_schedule=args.guidance_schedule, prefill_ratio=args.prefill_ratio)
    except InvalidInputError as e:  # the pipeline's names (temperature=inf) as the flags given (--temperature inf)
        raise type(e)(_SETTING.sub(lambda m: f"--{m.group(1).replace('_', '-')} ", str(e))) from None
    if args.num_images < 1:
        raise InvalidInputError(f"--num-images {args.num_images}: must be >= 1")


def _check_grid_size(grid_size, target: Path) -> None:
    """--grid-size says what a reference checkpoint file does not; a directory records its own."""
    if grid_size is None:
        return
    if grid_size < 1:
        raise InvalidInputError(f"--grid-size {grid_size}: must be >= 1 (tokens per side)")
    config = target / "config.json"
    if target.is_dir() and config.is_file():
        try:
            recorded = json.loads(config.read_text()).get("grid_size")
        except (OSError, ValueError):
            return  # the loader reports a broken config, naming the file
        if recorded is not None and recorded != grid_size:
            raise InvalidInputError(f"--grid-size {grid_size}: the target directory {str(target)!r} was saved with "
                                    f"grid_size {recorded}; --grid-size is for reference checkpoint files (drop it)")


def check_output_path(out) -> Path:
    """--out: an image file name PIL can write, in a folder that exists (or can be made) and is writable, whose
    companions (<out>.json, <out>.acceptance.png, <out>.tv.png) are not folders: checked before any work."""
    from PIL import Image

    from mmspec.checks import check_writable

    text = str(out)
    path = Path(os.path.expanduser(text))
    example = "e.g. --out out.png"
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise InvalidInputError(f"--out {text!r} is a folder: give an image file name in it ({example}; the stats go "
                                "next to it)")
    if not path.suffix:
        raise InvalidInputError(f"--out {text!r} has no extension: give an image file name ({example}, .jpg, .webp)")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE or not _can_write(fmt):
        raise InvalidInputError(f"--out {text!r}: {path.suffix!r} is not an image format PIL can write in RGB "
                                "(use .png, .jpg, .webp, .bmp or .tiff)")
    check_writable(text, file=True)
    for p in (path, path.with_suffix(".json"), path.with_suffix(".acceptance.png"), path.with_suffix(".tv.png")):
        if p.is_dir() or (p.exists() and not os.access(p, os.W_OK)):
            raise InvalidInputError(f"--out {text!r}: {str(p)!r} is {'a folder' if p.is_dir() else 'not writable'}")
    return path


def _can_write(fmt: str) -> bool:
    from PIL import Image

    try:
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


def image_grid(images: list, rows: int = 1):
    """PIL images of one size laid out row-major in `rows` rows."""
    from PIL import Image

    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def heatmap(values: torch.Tensor, cell: int = 16):
    """A (rows, cols) tensor in [0, 1] as a grey PIL image, `cell` pixels per position."""
    from PIL import Image

    v = (values.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(v.numpy()).resize((v.shape[1] * cell, v.shape[0] * cell), Image.NEAREST)
