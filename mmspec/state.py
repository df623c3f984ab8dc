"""Per-stream state: a stream owns the state its generation leaves in the target and the drafter.

Targets, drafters and their runners keep one generation's state in attributes (a KV cache, per-row lengths and
positions, uncached tokens). When a stream takes a component over while another stream is half read, it captures the
other stream's state into that stream; when the other stream resumes, its state is put back. Capture and restore move
references, never tensors, so switching costs a few attribute writes. Attributes named in a class's
``persistent_attributes`` (counters, settings chosen at construction) belong to the component, not to a stream.

A component nested inside another (a target's or drafter's runner) is captured with it when its class derives from
:class:`StreamStateful`.
"""
from __future__ import annotations

import torch

PERSISTENT = frozenset({"forward_time", "counters"})


class StreamStateful:
    """Marks a component whose attributes hold one stream's state (see the module docstring)."""

    persistent_attributes: frozenset = frozenset()


class _Nested:
    __slots__ = ("obj", "state")

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


def _persistent(obj) -> frozenset:
    return PERSISTENT | frozenset(getattr(type(obj), "persistent_attributes", ()))


def capture(obj) -> dict:
    """The stream state held in `obj`'s attributes (nested stateful components included), by reference."""
    keep = _persistent(obj)
    out = {}
    for name, value in vars(obj).items():
        if name in keep or isinstance(value, torch.nn.Module):
            continue
        out[name] = _Nested(value, capture(value)) if isinstance(value, StreamStateful) and value is not obj else value
    return out


def restore(obj, state: dict) -> None:
    """Put a state from :func:`capture` back; stream attributes it does not have are removed."""
    keep = _persistent(obj)
    for name in [n for n, v in vars(obj).items()
                 if n not in state and n not in keep and not isinstance(v, (torch.nn.Module, StreamStateful))]:
        delattr(obj, name)
    for name, value in state.items():
        if isinstance(value, _Nested):
            restore(value.obj, value.state)
            value = value.obj
        setattr(obj, name, value)


def take_rows(obj, rows, *names: str) -> None:
    """Keep the given rows of each per-row list attribute `names` of `obj` (finished requests leave the batch): the
    one rule every component's select_rows applies to its per-row state."""
    rows = list(rows)
    for name in names:
        values = getattr(obj, name)
        setattr(obj, name, [values[r] for r in rows])
