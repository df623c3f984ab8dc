"""Argument checks shared by every entry point (the engine, the VLM and image pipelines, the CLI), run before any
work starts, as diffusers' ``check_inputs`` does: each raises a typed error that names the argument, the value it
got and what would be valid. One rule per concept, so ``seed`` (say) is refused the same way everywhere."""
from __future__ import annotations

import math
from numbers import Real

from .errors import GenerationConfigError, InvalidInputError


def check_seed(seed, name: str = "seed") -> None:
    """None (fresh randomness) or an int (request b gets seed + b); bools and strings are refused."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationConfigError(f"{name}={seed!r}: must be an int (or None for fresh randomness)")


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 error: type[InvalidInputError] = GenerationConfigError) -> None:
    """A finite real (an int with integer=True) within [low, high] (an open end with low_open / high_open)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if integer:
        ok = ok and float(value) == int(value) and not isinstance(value, float)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        span = f" in {lo or '(-inf'}, {hi or 'inf)'}" if low is not None or high is not None else ""
        kind = "an integer" if integer else "a finite number"
        raise error(f"{name}={value!r}: must be {kind}{span}")


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> None:
    """The sampling arguments every entry point takes (`SamplingSpec`'s rule): temperature a finite number >= 0
    (0 = greedy), top_k an int >= 0 (0 = off), top_p in (0, 1] (1 = off), repetition_penalty a finite number > 0."""
    check_number(temperature, "temperature", low=0)
    check_number(top_k, "top_k", low=0, integer=True)
    check_number(top_p, "top_p", low=0, low_open=True, high=1)
    check_number(repetition_penalty, "repetition_penalty", low=0, low_open=True)


def check_max_new_tokens(value, name: str = "max_new_tokens") -> None:
    check_number(value, name, low=1, integer=True)


def check_tree(tree, name: str = "tree") -> None:
    """A draft shape: an int K >= 1 (a chain of K), a `StaticTree` or a `DynamicTree`."""
    from .tree import DynamicTree, StaticTree

    if isinstance(tree, (StaticTree, DynamicTree)):
        return
    if isinstance(tree, bool) or not isinstance(tree, int) or tree < 1:
        raise InvalidInputError(f"{name}={tree!r}: expected an int K >= 1 (a chain of K drafted tokens), "
                                "mmspec.StaticTree.full((B1, B2, ...)) or mmspec.DynamicTree(topk, depth, total)")


# --- local paths ---------------------------------------------------------------------------------------------------
def is_path_like(spec) -> bool:
    """Whether a model reference names the local filesystem rather than a hub id ("org/name" or "name").

    Path-like: a `Path`; anything that exists; a string starting with "/", ".", "~" or a drive letter; one with a
    backslash, with more than one "/", ending with "/", or with a checkpoint file's extension; and "dir/name" whose
    "dir" exists here (``models/llava_targt`` when ``models/`` exists). "zoo:NAME" is not a path."""
    import os
    import re
    from pathlib import Path

    if isinstance(spec, os.PathLike):
        return True
    if not isinstance(spec, str) or not spec or spec.startswith("zoo:"):
        return False
    if os.path.exists(os.path.expanduser(spec)):
        return True
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.endswith("/") or re.match(r"^[A-Za-z]:", spec):
        return True
    if spec.count("/") > 1 or spec.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")):
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and Path(head).is_dir()


def check_local_path(spec, name: str) -> None:
    """A path-like `spec` (see `is_path_like`) must exist: a CheckpointError naming it (and what its folder holds)
    otherwise, before anything is loaded and without asking the hub. Hub ids and "zoo:NAME" pass through."""
    import difflib
    import os
    from pathlib import Path

    from .errors import CheckpointError

    if not is_path_like(spec):
        return
    path = Path(os.path.expanduser(str(spec)))
    if path.exists():
        return
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    if parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
        hint = f"; did you mean {', '.join(repr(str(parent / n)) for n in near)}?" if near else \
            f"; {str(parent)!r} exists but has no entry of that name"
    else:
        hint = f"; its folder {str(parent)!r} does not exist either"
    raise CheckpointError(f"{name} {str(spec)!r}: no such file or directory (a local path: it is not looked up on "
                          f"the model hub){hint}")


def check_device(device, name: str = "--device") -> None:
    """A torch device string this machine has: 'cpu', 'cuda', 'cuda:1', 'mps', ...; an unknown or unavailable one
    is an InvalidInputError naming it."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"{name} {device!r}: not a device ({e}); use cpu, cuda, cuda:N, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{name} {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                    "device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"{name} {device!r}: MPS is not available on this machine; use --device cpu")


def check_writable(path, flag: str = "--out", *, file: bool = False) -> None:
    """`path` (a folder to be written, or with file=True a file) can be made: the nearest existing folder above it
    (itself included for a folder) is a writable folder."""
    import os
    from pathlib import Path

    folder = Path(os.path.expanduser(str(path))).absolute()
    folder = folder.parent if file else folder
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidInputError(f"{flag} {str(path)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{flag} {str(path)!r}: {str(folder)!r} is not writable")
