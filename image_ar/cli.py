"""`mmspec image` (the arguments are defined in mmspec.cli): generate images speculatively from the command line (a progress bar, the stats, the images).

    mmspec image --target llamagen_dir --vq vq_dir --drafter jacobi --class-label 3 --out out.png
    mmspec image --target ... --vq ... --class-label 1 2 3 --num-images 4 --acceptance lantern --out grid.png
    mmspec image --target continuous_dir --vae vae_dir --drafter draft_dir --acceptance cspd --class-label 3
    mmspec image --target zoo:llamagen --vq zoo:vq --drafter zoo:llamagen-head --class-label 0 4 7

Paths may name zoo models (`image_ar.zoo`): zoo:NAME, or zoo:NAME@quick for the quick variant.

One label and one image writes that image; several are laid out in a grid (a row per label). Next to the image
``<out>.json`` holds the stats, and ``<out>.acceptance.png`` the per-position acceptance map (and, for lossy rules,
``<out>.tv.png`` the measured TV map). Lossy rules are marked LOSSY in every line printed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mmspec.errors import InvalidInputError

from .pipeline import SpeculativeImagePipeline, is_continuous_dir


def run_image(args) -> int:
    from .zoo import resolve

    target = resolve(args.target)  # every path may be zoo:NAME (or zoo:NAME@quick)
    continuous = is_continuous_dir(Path(target))
    drafter = args.drafter or ("none" if continuous else "jacobi")
    tree = args.tree
    if args.window is not None:  # SJD's window: the pending token + the drafted tokens
        if tree is not None:
            raise InvalidInputError("--window and --tree both set the tokens drafted per step: pass --tree only")
        if args.window < 2:
            raise InvalidInputError(f"--window {args.window}: must be >= 2 (the pending token + >= 1 draft)")
        tree = args.window - 1
    pipe = SpeculativeImagePipeline.from_pretrained(
        target, vq=resolve(args.vq), drafter=None if drafter == "none" else resolve(drafter), device_map=args.device,
        tree=tree, compile=getattr(args, "compile", None),
        target_config=None if args.grid_size is None else {"grid_size": args.grid_size})
    out = pipe(class_labels=args.class_label, num_images_per_prompt=args.num_images,
               guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
               acceptance=args.acceptance, lantern_delta=args.lantern_delta, lantern_lambda=args.lantern_lambda,
               lantern_k=args.lantern_k, tv_budget=args.tv_budget, seed=args.seed, progress=True,
               guidance_schedule=args.guidance_schedule, prefill_ratio=args.prefill_ratio)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(out.images, rows=len(args.class_label)).save(path)
    st = out.stats
    path.with_suffix(".json").write_text(json.dumps({**st.as_dict(), "class_labels": args.class_label,
                                                     "acceptance_grid": st.acceptance_grid.tolist()}, indent=2))
    heatmap(st.acceptance_grid).save(path.with_suffix(".acceptance.png"))
    if st.tv_grid is not None:
        heatmap(st.tv_grid / max(st.tv_max, 1e-12)).save(path.with_suffix(".tv.png"))
    print(st.summary(), file=sys.stderr)
    print(f"wrote {path} ({len(out.images)} image(s)), {path.with_suffix('.json')}", file=sys.stderr)
    return 0


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
