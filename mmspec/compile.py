"""Compiled decode steps over a preallocated cache (gpt-fast's recipe: a static KV cache, blocks padded to a few
fixed lengths, the model's forward compiled with ``torch.compile``; CUDA graphs on GPU).

After the prefill (eager: prompts come in every length), a runner moves its cache into a static one with room for
the whole generation (`CausalLMRunner.compile_decode`). From then on every block it appends — the one-token draft
step, a tree level's feed, the verify block — is padded at the end to the next bucket length (`bucket`), so a
decode touches a handful of shapes, each compiled (and on GPU graph-captured) once per runner and reused by every
later generation. Padding slots see only themselves and are never kept: the static cache's write pointer is moved
back over them after the forward, so the next block overwrites them, and every mask hides slots at or beyond the
cache's width.

Shapes are compiled with torch's automatic dynamic shapes: the first shape gets a specialised graph, a second one a
graph generic in the dimensions that changed (batch rows leaving, other bucket lengths), so a decode compiles a few
times per runner whatever its batch. A runner's static cache keeps one capacity across generations (`cache_capacity`)
so the mask width stays put. Compile time is kept apart from decode time: :class:`CompiledForward` counts a
call as compiling when torch compiled a graph during it (and, under CUDA graphs, for the first two calls of each
shape, which warm up and then record) and the caller keeps those seconds out of its forward time.
"""
from __future__ import annotations

import time

import torch
from torch._dynamo.utils import counters

from .errors import InvalidInputError

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(m: int) -> int:
    """The padded length of an m-token block: the smallest bucket >= m (multiples of 256 past the last)."""
    for size in BUCKETS:
        if m <= size:
            return size
    return -(-m // BUCKETS[-1]) * BUCKETS[-1]


def cache_capacity(need: int, previous: int = 0) -> int:
    """Slots of a runner's static cache: `need` rounded up to a multiple of 256, and never less than the runner's
    previous capacity, so later generations (other prompt lengths) keep the compiled mask width."""
    return max(previous, -(-need // 256) * 256)


def resolve_compile(value, device) -> bool:
    """The `compile=` setting: True / False, or None = on for CUDA devices, off elsewhere."""
    if value is None:
        return torch.device(device).type == "cuda"
    if not isinstance(value, bool):
        raise InvalidInputError(f"compile={value!r}: expected True, False or None (on for CUDA, off elsewhere)")
    return value


def compile_mode(device) -> str | None:
    """torch.compile's mode for a device: CUDA graphs on GPU ("reduce-overhead"), inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def _signature(kwargs: dict) -> tuple:
    """What a compiled graph is specialised on: every tensor's shape and dtype, every other argument's value."""
    return tuple((k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v) for k, v in sorted(kwargs.items())
                 if not k.endswith("cache") and k != "past_key_values")


class CompiledForward:
    """A model's forward under ``torch.compile``, made once per model, with compile time measured apart.

    Calls return the model's output with its tensors cloned under CUDA graphs (a captured graph overwrites its
    outputs on the next replay, while a drafter keeps one level's logits across the next level's forward)."""

    def __init__(self, model: torch.nn.Module, device):
        self.mode = compile_mode(device)
        # Every model's graphs are entries of one code object (the forward of its class, shared by a target and a
        # drafter of one family): leave room for a few per model and bucket, so no shape falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.fn = torch.compile(model.forward, mode=self.mode)
        self.calls: dict[tuple, int] = {}  # shape signature -> calls so far
        self.compile_time = 0.0  # seconds spent in calls that compiled or captured a shape

    def __call__(self, device, **kwargs):
        """(output, seconds, compiling): the forward's output, its wall time, and whether it counted as compile."""
        key = _signature(kwargs)
        n = self.calls.get(key, 0)
        self.calls[key] = n + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        frames = counters["frames"]["total"]
        t0 = time.perf_counter()
        out = self.fn(**kwargs)
        if self.mode == "reduce-overhead":
            for name in ("logits", "hidden_states"):
                value = getattr(out, name, None)
                if value is not None:
                    setattr(out, name, value.clone() if torch.is_tensor(value) else tuple(h.clone() for h in value))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        compiling = counters["frames"]["total"] != frames or (self.mode == "reduce-overhead" and n < 2)
        if compiling:
            self.compile_time += seconds
        return out, seconds, compiling


def pad_block(inputs: dict, width: int, size: int) -> dict:
    """A forward's inputs for an m-token block appended at slot `width`, padded to `size` tokens: every per-token
    tensor (B, M, ...) (ids, embeddings, a drafter's features) with zeros, `position_ids` ((B, M), or (R, B, M) for
    M-RoPE) repeating the last position, and the additive `attention_mask` (B, 1, M, K) with rows that see only their
    own slot. Real tokens never see a padding slot (it lies past their block)."""
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    b, _, m, k = mask.shape
    p = size - m
    if p <= 0:
        return inputs
    out = {name: torch.cat([v, v.new_zeros(v.shape[0], p, *v.shape[2:])], dim=1)
           if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (b, m) else v for name, v in inputs.items()}
    out["position_ids"] = torch.cat([positions, positions[..., -1:].expand(*positions.shape[:-1], p)], dim=-1)
    rows = mask.new_full((b, 1, p, k), torch.finfo(mask.dtype).min)
    own = torch.arange(p, device=mask.device)
    rows[:, :, own, width + m + own] = 0
    out["attention_mask"] = torch.cat([mask, rows], dim=2)
    return out
