"""A cheap `torch.inference_mode` decorator for the decode loop's hot paths.

`@torch.inference_mode()` enters and leaves the mode on every call, a few microseconds each; the loop calls its
runners several times per step, and it already runs each step inside inference mode. `inference` skips the context
when the mode is already on and otherwise behaves like `@torch.inference_mode()`.
"""
from __future__ import annotations

import functools

import torch


def inference(fn):
    """Run `fn` in inference mode, entering the mode only if it is not on already."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper
