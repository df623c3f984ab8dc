"""Draft trees: the ragged token/parent layout, verification masks, depth-based positions, and tree shapes.

A draft for one request is a set of N nodes in topological order: ``tokens[N]`` and ``parent[N]`` with
``parent[i] < i`` and ``-1`` meaning "child of the last committed token" (the root). A chain has
``parent = [-1, 0, 1, ...]``. Batches keep one :class:`Draft` per request; :func:`cu_offsets` gives vLLM's
``cu_num_draft_tokens``-style offsets for code that wants the flat layout.

Shapes supported: chains, static trees given as Medusa/EAGLE "choices" (paths of child ranks), and EAGLE-2 dynamic
expansion (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Callable, Sequence

import torch

from .errors import DraftError

SIBLING_MODES = ("iid", "without_replacement")


@dataclass
class Draft:
    """Proposal for one request.

    tokens: (N,) long. parent: (N,) long, parent[i] < i, -1 for children of the root.
    q: (N, V) float or None — row i is the distribution node i was sampled from (its parent's draft
       distribution, already warped). None means the proposal is deterministic (verified with q = 1).
    siblings: how siblings were drawn from q: "iid" or "without_replacement" (Gumbel-top-k / SWOR).
    """

    tokens: torch.Tensor
    parent: torch.Tensor
    q: torch.Tensor | None = None
    siblings: str = "iid"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty(device="cpu") -> "Draft":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return Draft(z, z.clone())

    @staticmethod
    def chain(tokens: Sequence[int] | torch.Tensor, q: torch.Tensor | None = None, device="cpu") -> "Draft":
        t = torch.as_tensor(tokens, dtype=torch.long, device=device).reshape(-1)
        return Draft(t, torch.arange(-1, len(t) - 1, device=t.device), q)

    @staticmethod
    def chain_of(tokens: torch.Tensor, parent: torch.Tensor) -> "Draft":
        """A greedy chain from a (N,) CPU token tensor and a shared parent tensor arange(-1, N - 1) (hot path)."""
        d = Draft(tokens, parent)
        d._cache["tokens"] = tokens.tolist()
        d._cache["parent"] = list(range(-1, len(d._cache["tokens"]) - 1))
        return d

    def validate(self, vocab_size: int) -> None:
        n = len(self)
        if self.tokens.dim() != 1 or self.parent.shape != self.tokens.shape:
            raise DraftError(f"draft tokens {tuple(self.tokens.shape)} and parent {tuple(self.parent.shape)} "
                             "must both be 1-D of the same length")
        for name, t in (("tokens", self.tokens), ("parent", self.parent)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise DraftError(f"draft {name} have dtype {t.dtype}; expected integer ids (torch.long)")
        if any(not (-1 <= p < i) for i, p in enumerate(self.parent_list)):
            raise DraftError(f"draft parent={self.parent_list}: each parent must be -1 or an earlier node index")
        if n and not (0 <= min(self.token_list) and max(self.token_list) < vocab_size):
            raise DraftError(f"draft tokens {self.token_list} out of range for a vocabulary of {vocab_size}")
        if self.q is not None and tuple(self.q.shape) != (n, vocab_size):
            raise DraftError(f"draft q has shape {tuple(self.q.shape)}; expected ({n}, {vocab_size})")
        if self.siblings not in SIBLING_MODES:
            raise DraftError(f"draft siblings={self.siblings!r}: expected one of {SIBLING_MODES}")

    # --- derived structure (cached; a Draft is not mutated after construction) -------------------------------
    @property
    def parent_list(self) -> list[int]:
        if "parent" not in self._cache:
            self._cache["parent"] = self.parent.tolist()
        return self._cache["parent"]

    @property
    def token_list(self) -> list[int]:
        if "tokens" not in self._cache:
            self._cache["tokens"] = self.tokens.tolist()
        return self._cache["tokens"]

    @property
    def depth(self) -> list[int]:
        """Depth of each node, 1 for children of the root."""
        if "depth" not in self._cache:
            d: list[int] = []
            for p in self.parent_list:
                d.append(1 if p < 0 else d[p] + 1)
            self._cache["depth"] = d
        return self._cache["depth"]

    @property
    def children(self) -> list[list[int]]:
        """children[0] = children of the root; children[i + 1] = children of node i, in node order."""
        if "children" not in self._cache:
            ch: list[list[int]] = [[] for _ in range(len(self) + 1)]
            for i, p in enumerate(self.parent_list):
                ch[p + 1].append(i)
            self._cache["children"] = ch
        return self._cache["children"]

    @property
    def is_chain(self) -> bool:
        if "chain" not in self._cache:
            self._cache["chain"] = self.parent_list == list(range(-1, len(self) - 1))
        return self._cache["chain"]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (inclusive)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parent_list[node]
        return path[::-1]

    def max_depth(self) -> int:
        return max(self.depth, default=0)


def tree_draft(toks: dict[int, int], qs: dict, parent: Sequence[int]) -> Draft:
    """A Draft from the drafted nodes of a static tree: `toks` node id -> token, `qs` node id -> the distribution it
    was drawn from (None: deterministic), `parent` the tree's parent ids. Nodes are renumbered in id order (parents
    come first); siblings are draws without replacement."""
    ids = sorted(toks)
    remap = {n: i for i, n in enumerate(ids)}
    parents = [remap[parent[n]] if parent[n] >= 0 else -1 for n in ids]
    q = torch.stack([qs[n] for n in ids]) if ids and qs.get(ids[0]) is not None else None
    return Draft(torch.tensor([toks[n] for n in ids], dtype=torch.long), torch.tensor(parents, dtype=torch.long), q,
                 siblings="without_replacement")


def ancestor_mask(parent: Sequence[int], device="cpu") -> torch.Tensor:
    """(N, N) bool, [i, j] = node j is node i or one of its ancestors (the tree-attention pattern)."""
    return _ancestor_mask(tuple(parent)).to(device, copy=True)  # callers may edit it; the memo must not change


@lru_cache(maxsize=256)
def _ancestor_mask(parent: tuple[int, ...]) -> torch.Tensor:
    # Static trees repeat the same shape every step: build each shape once.
    n = len(parent)
    rows = [0] * n  # bitsets of ancestors
    for i, p in enumerate(parent):
        rows[i] = (rows[p] if p >= 0 else 0) | (1 << i)
    bits = torch.tensor([[(r >> j) & 1 for j in range(n)] for r in rows], dtype=torch.bool)
    return bits.reshape(n, n)


def cu_offsets(drafts: Sequence[Draft], device="cpu") -> torch.Tensor:
    """(B + 1,) cumulative node counts: the nodes of request b are flat[cu[b]:cu[b + 1]]."""
    counts = torch.tensor([0] + [len(d) for d in drafts], dtype=torch.long)
    return counts.cumsum(0).to(device)


# --- tree shapes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StaticTree:
    """A fixed tree given by paths of child ranks (Medusa / EAGLE-1 "choices"), e.g. [[0], [1], [0, 0]].

    Node i's token is the rank-th proposal of its parent's draft distribution (rank = choices[i][-1]). Nodes are
    numbered in depth-first preorder (the paths sorted lexicographically): every parent comes before its children,
    siblings keep rank order, and the all-top-rank path is nodes 0, 1, 2, ... — the path greedy verification accepts
    most often lands in contiguous cache slots, so committing it moves no keys.
    """

    choices: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = sorted({tuple(int(r) for r in c) for c in self.choices})  # depth-first preorder
        if not paths or any(len(c) == 0 or min(c) < 0 for c in paths):
            raise DraftError(f"tree choices {self.choices!r}: need non-empty paths of ranks >= 0")
        known = set(paths)
        ranks: dict[tuple[int, ...], list[int]] = {}
        for c in paths:
            if len(c) > 1 and c[:-1] not in known:
                raise DraftError(f"tree choice {list(c)} has no parent path {list(c[:-1])} in the tree")
            ranks.setdefault(c[:-1], []).append(c[-1])
        for prefix, rs in ranks.items():
            if sorted(rs) != list(range(len(rs))):
                # Children are the parent's top ranks (or its first draws without replacement): a gap would need a
                # candidate that is never drafted, and a sampled q would no longer describe the draws.
                raise DraftError(f"tree choices under {list(prefix)} have ranks {sorted(rs)}; expected 0..{len(rs) - 1}")
        object.__setattr__(self, "choices", tuple(paths))

    @staticmethod
    def chain(k: int) -> "StaticTree":
        if k < 1:
            raise DraftError(f"chain length k={k}: must be >= 1")
        return StaticTree(tuple((0,) * d for d in range(1, k + 1)))

    @staticmethod
    def full(branching: Sequence[int]) -> "StaticTree":
        """Complete tree: branching[d] children per node at depth d + 1 (e.g. (2, 2, 1))."""
        paths: list[tuple[int, ...]] = [()]
        out = []
        for b in branching:
            paths = [p + (r,) for p in paths for r in range(b)]
            out.extend(paths)
        return StaticTree(tuple(out))

    @property
    def parent(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.choices)}
        return [index[c[:-1]] if len(c) > 1 else -1 for c in self.choices]

    @property
    def rank(self) -> list[int]:
        return [c[-1] for c in self.choices]

    @cached_property  # a StaticTree is frozen: derived values are computed once (read every step by drafters)
    def depth(self) -> int:
        return max(len(c) for c in self.choices)

    @cached_property
    def is_chain(self) -> bool:
        return all(c == (0,) * len(c) for c in self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def topology(self) -> tuple[list[int], list[list[int]]]:
        """(n_children, ancestors): n_children[0] for the root, n_children[i + 1] for node i; ancestors[i] the node
        ids above node i, root side first."""
        n_children = [0] * (len(self) + 1)
        ancestors: list[list[int]] = []
        for p in self.parent:
            n_children[p + 1] += 1
            ancestors.append([] if p < 0 else ancestors[p] + [p])
        return n_children, ancestors

    def levels(self) -> list[list[int]]:
        """Node indices grouped by depth (level d holds nodes of depth d + 1)."""
        out: list[list[int]] = [[] for _ in range(self.depth)]
        for i, c in enumerate(self.choices):
            out[len(c) - 1].append(i)
        return out

    def truncated(self, max_depth: int) -> "StaticTree | None":
        kept = tuple(c for c in self.choices if len(c) <= max_depth)
        return StaticTree(kept) if kept else None


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2 dynamic expansion: `topk` children per frontier node, `depth` levels, keep the best `total` nodes."""

    topk: int = 8
    depth: int = 6
    total: int = 60

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.topk, self.depth, self.total)) or \
                self.topk < 1 or self.depth < 1 or self.total < 1:
            raise DraftError(f"DynamicTree(topk={self.topk}, depth={self.depth}, total={self.total}): all must be >= 1")


def expand_dynamic(spec: DynamicTree, root_logprobs: torch.Tensor,
                   step: Callable[[list[list[int]], list[list[int]], list[list[int]]], list[torch.Tensor]],
                   max_depth: Sequence[int]) -> list[tuple[list[int], list[int], list[int]]]:
    """EAGLE-2 tree expansion for a batch (Li et al. 2024, §4.1 expansion, §4.2 reranking).

    root_logprobs: (B, V) draft log-probs for each row's root children. max_depth[b]: depth cap of row b (0 = no
    draft). step(tokens, parents, frontier) gets, per row, all nodes so far (creation order) and the indices of the
    frontier to expand (possibly empty), runs the drafter over the frontier nodes, and returns per row the draft
    log-probs (F_b, V) of their children. Each level keeps the global top-k of (frontier score + child log-prob).
    Scores are cumulative draft log-probs, so a child never outscores its parent; ties go to the earlier node, which
    keeps the final top-`total` set closed under ancestors. Returns per row (tokens, parents, kept) in topological
    order, `kept` giving each kept node's index in creation order (the order `step` saw them).
    """
    b = root_logprobs.shape[0]
    k0 = min(spec.topk, root_logprobs.shape[-1])
    lp, tok = root_logprobs.float().topk(k0, dim=-1)
    tokens = [tok[i].tolist() if max_depth[i] > 0 else [] for i in range(b)]
    parents = [[-1] * len(t) for t in tokens]
    scores = [lp[i].tolist() if max_depth[i] > 0 else [] for i in range(b)]
    frontier = [list(range(len(t))) for t in tokens]
    for level in range(1, min(spec.depth, max(max_depth, default=0))):
        frontier = [f if max_depth[i] > level else [] for i, f in enumerate(frontier)]
        if not any(frontier):
            break
        child_lp = step(tokens, parents, frontier)
        for i in range(b):
            if not frontier[i]:
                continue
            k = min(spec.topk, child_lp[i].shape[-1])
            top_lp, top_tok = child_lp[i].float().topk(k, dim=-1)  # (F, k)
            base = torch.tensor([scores[i][f] for f in frontier[i]], dtype=torch.float32, device=top_lp.device)
            cand = (base[:, None] + top_lp).flatten()
            best = cand.topk(min(spec.topk, cand.numel())).indices.tolist()
            cand, top_tok = cand.tolist(), top_tok.flatten().tolist()
            new = []
            for flat in best:
                tokens[i].append(top_tok[flat])
                parents[i].append(frontier[i][flat // k])
                scores[i].append(cand[flat])
                new.append(len(tokens[i]) - 1)
            frontier[i] = new
    out = []
    for i in range(b):
        order = sorted(range(len(tokens[i])), key=lambda j: (-scores[i][j], j))[: spec.total]
        keep = sorted(order)
        remap = {old: new for new, old in enumerate(keep)}
        out.append(([tokens[i][j] for j in keep],
                    [remap[parents[i][j]] if parents[i][j] >= 0 else -1 for j in keep], keep))
    return out
