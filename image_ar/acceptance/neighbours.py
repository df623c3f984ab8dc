"""Latent neighbourhoods of a VQ codebook: for every code, the other codes by distance (LANTERN's proximity sets).

LANTERN (Jang et al. 2024, "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding",
ICLR 2025, §3.2) relaxes acceptance over the codes nearest to a drafted code in the VQ latent space; the reference
code (jadohu/LANTERN, ``entrypoints/generate_codebook.py``) ranks all other codes by L2 distance between codebook
rows (self excluded). GSD (So et al. 2025) groups tokens whose embeddings lie within a squared distance.

Geometry. Distances are plain L2 between the rows *as passed*: hand in the codebook in the geometry the quantiser
uses for its lookup. LlamaGen's ``VectorQuantizer`` l2-normalises both latents and codebook before the nearest-code
search (pass ``F.normalize(weight, dim=-1)``); Chameleon/Anole/Lumina-mGPT's VQGAN looks up raw weights (pass the
weight as is; this is also what LANTERN's script ranks for every model).

Memory. Distances are computed ``chunk_size`` rows at a time in float64 (a (chunk, V) block: 64 MiB for the default
chunk of 512 rows and V = 16384, times a few temporaries), so the (V, V) matrix never exists; only the (V, k) table
is kept (int64: 128 MiB for V = 16384, k = 1000).

Caching. Tables are memoised in memory by (sha256 of the codebook's bytes, dtype, shape, k, device) — a bounded memo
of a pure function, like ``mmspec.tree``'s mask memo — and optionally stored as safetensors in ``cache_dir``
(``neighbours-<hash>-k<k>.safetensors``, verified against the hash and shape on load).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch

from mmspec.errors import InvalidInputError

_MEMO: OrderedDict = OrderedDict()
_MEMO_SIZE = 8  # a handful of (codebook, k) tables; a 16384 x 1000 table is 128 MiB


def codebook_hash(codebook: torch.Tensor) -> str:
    """sha256 of the codebook's values (dtype and shape included), independent of device and strides."""
    t = codebook.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_codebook(codebook, what: str) -> None:
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
        shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise InvalidInputError(f"{what}: codebook must be a 2-D float tensor (V, D), got {shape}")
    if codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise InvalidInputError(f"{what}: codebook {tuple(codebook.shape)} is empty; need V >= 1 codes of D >= 1")
    if not bool(torch.isfinite(codebook).all()):
        raise InvalidInputError(f"{what}: codebook {tuple(codebook.shape)} contains NaN or inf")


def latent_neighbours(codebook: torch.Tensor, k: int, *, chunk_size: int = 512,
                      cache_dir: str | Path | None = None, progress: bool = False) -> torch.Tensor:
    """(V, k) long: row v lists the k codes nearest to code v (v itself excluded), nearest first.

    codebook: (V, D) embeddings in the quantiser's lookup geometry (see the module docstring).
    k: 0 <= k <= V - 1. LANTERN's rule zeroes ``k + 1`` neighbours on rejection, so build the table with one
      column more than the ``k`` you relax over to reproduce it exactly (``lantern`` uses what the table has).
    Equal distances are ordered by code index (also at the k-th place: the lowest indices make the cut).
    The returned tensor is shared with the memo: do not modify it.
    progress: a tqdm bar over the codes while a table is computed (about 11 s for V = 16384, k = 1000 on a CPU);
      none when it comes from the memo or cache_dir.
    """
    _check_codebook(codebook, "latent_neighbours")
    vocab = codebook.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab - 1:
        raise InvalidInputError(f"latent_neighbours: k={k!r} must be an int in [0, V - 1] = [0, {vocab - 1}] "
                                f"for a codebook of {vocab} codes")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError(f"latent_neighbours: chunk_size={chunk_size!r} must be an int >= 1")
    digest = codebook_hash(codebook)
    key = (digest, k, str(codebook.device))
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    table = _load(cache_dir, digest, vocab, k) if cache_dir is not None else None
    if table is None:
        table = _compute(codebook, k, chunk_size, progress)
        if cache_dir is not None:
            _save(cache_dir, digest, table)
    table = table.to(codebook.device)
    _MEMO[key] = table
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return table


def _compute(codebook: torch.Tensor, k: int, chunk_size: int, progress: bool = False) -> torch.Tensor:
    from tqdm.auto import tqdm

    e = codebook.detach().to(torch.float64)  # (V, D) float64: near-equal distances keep their order
    vocab = e.shape[0]
    sq = (e * e).sum(-1)  # (V,)
    out = torch.empty(vocab, k, dtype=torch.long, device=e.device)
    if k == 0:
        return out.cpu()
    bar = tqdm(total=vocab, desc=f"LANTERN neighbour table ({vocab} codes, k={k})", unit="code",
               disable=not progress, leave=False)
    for start in range(0, vocab, chunk_size):
        rows = slice(start, min(start + chunk_size, vocab))
        d = (sq[rows, None] + sq[None, :] - 2.0 * e[rows] @ e.T).clamp_min_(0.0)  # (c, V) squared L2
        n = d.shape[0]
        d[torch.arange(n, device=d.device), torch.arange(start, start + n, device=d.device)] = torch.inf
        dist, idx = d.topk(k, dim=1, largest=False, sorted=True)  # (c, k)
        # Deterministic order among equal distances: sort by index, then stably by distance.
        idx, perm = idx.sort(dim=1)
        dist = dist.gather(1, perm)
        order = dist.sort(dim=1, stable=True).indices
        idx = idx.gather(1, order)
        # Rows where codes tie with the k-th distance but missed the cut (topk picks among them arbitrarily): redo
        # them with a stable sort of the whole row, so the lowest indices win (rare: duplicated codes).
        kth = dist.max(dim=1, keepdim=True).values  # (c, 1)
        cut = ((d == kth).sum(1) > (dist == kth).sum(1)).nonzero().flatten()
        if cut.numel():
            idx[cut] = d[cut].sort(dim=1, stable=True).indices[:, :k]
        out[rows] = idx
        bar.update(n)
    bar.close()
    return out.cpu()


def _path(cache_dir, digest: str, k: int) -> Path:
    return Path(cache_dir) / f"neighbours-{digest[:24]}-k{k}.safetensors"


def _load(cache_dir, digest: str, vocab: int, k: int) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = _path(cache_dir, digest, k)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("neighbours")
    except (SafetensorError, OSError, KeyError):
        return None  # unreadable: recompute and overwrite
    if meta.get("sha256") != digest or tuple(table.shape) != (vocab, k):
        return None  # another codebook's table under a colliding name prefix, or a truncated write
    return table.long()


def _save(cache_dir, digest: str, table: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path = _path(cache_dir, digest, table.shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    small = table.to(torch.int32) if table.shape[0] < 2**31 else table
    tmp = path.with_suffix(".tmp")
    save_file({"neighbours": small.contiguous()}, str(tmp), metadata={"sha256": digest})
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def squared_distance(embeddings: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """||E[i] - E[j]||^2 elementwise for index tensors i, j of one shape (GSD's embedding condition).

    Computed from differences, not from norms, so identical rows give exactly 0."""
    diff = embeddings[i].to(torch.float64) - embeddings[j].to(torch.float64)  # (..., D)
    return (diff * diff).sum(-1)
