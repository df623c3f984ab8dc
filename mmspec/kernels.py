"""Acceptance rules: which draft nodes the target keeps, and the distribution the next token comes from.

Pure functions over tensors, no models (ALGORITHMS.md §1). Every rule has one signature::

    kernel(draft, p, *, generator=None, coin=None) -> Verdict

``p`` is (N + 1, V), already warped exactly as for sampling: row 0 is the target's distribution for the children of
the root, row ``i + 1`` its distribution after node ``i`` (for node i's children, and for the bonus token when the
accepted path ends at node i). The walks below go root-first; at a node with target distribution ``r`` they try the
children ``x_1, x_2, ...`` in node order:

* **Speculative sampling** (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding",
  Alg. 1 / Thm. 3.5; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling", Alg. 2): accept
  ``x_s`` with ``min(1, r(x_s) / q_s(x_s))``; on rejection ``r <- norm(max(0, r - q_s))``. For a chain this is the
  classic rule. With several i.i.d. siblings (``q_s = q``) it is SpecInfer's multi-step speculative sampling
  (Miao et al. 2024, ASPLOS, §4.2 "MSS"); with siblings drawn without replacement, ``q_s`` is ``q`` with the
  earlier siblings' tokens removed and renormalised, which is recursive rejection sampling (Jeon et al. 2024,
  "Recursive Speculative Decoding", §3, Eq. 3-4).
* **Point-mass verification** (EAGLE, Li et al. 2024, tree verification; vLLM's n-gram path, which passes q = 1):
  accept ``x_s`` with ``r(x_s)``; on rejection zero ``r(x_s)`` and renormalise. This is the rule above with
  ``q_s = onehot(x_s)``, and it is lossless for *any* proposal: P(y) = q(y) r(y) + r(y) sum_{x != y} q(x) = r(y).
* **Greedy** (temperature 0): accept ``x`` iff ``x == argmax r``; the next token is ``argmax`` at the end of the
  path. Computed without a walk: compare every node with its parent row's argmax, close over ancestors, take the
  deepest survivor.
* **Typical acceptance** (Cai et al. 2024, "Medusa", §2.3.1, LOSSY): accept ``x`` iff
  ``r(x) > min(epsilon, delta * exp(-H(r)))``; keep the longest accepted candidate path (ties: higher target
  likelihood), then sample from the p-row at its end.

If no child of the current node is accepted, the next token is drawn from the final ``r`` (the correction); if the
walk reaches a node without children, from that node's unmodified p-row (the bonus token). Both are exactly ``p``'s
next-token distribution given the accepted path, which is what makes the lossless rules lossless.

Randomness: ``coin(prob) -> bool`` is the only source of accept/reject randomness (tests inject it to enumerate
outcomes exactly); by default it is one uniform draw from ``generator`` per decision whose probability is strictly
between 0 and 1. Certain decisions draw nothing. When no ``coin`` is given, the next token is drawn by
:func:`finalize` with a separate draw from the same generator (ALGORITHMS.md §3.3); with a ``coin`` the verdict is
returned unsampled (``next_token is None``) so the caller can read ``residual``. Greedy needs no draw and always
fills ``next_token``.

Writing a rule (the plug-in API; image_ar's LANTERN and GSD are built this way): decorate
``fn(draft, p, *, generator=None, coin=None) -> Verdict`` with ``@kernel_rule(name, lossless)``; call
``check_kernel_inputs`` first; walk the tree with ``walk_tree(draft, p, try_children)``, deciding each child with
``flip_coin(coin or default_coin(p, generator), prob)`` and renormalising residuals with ``normalised``; end with
``finish_verdict(verdict, coin, generator)``. Pass the function as ``SpeculativeDecoder(acceptance=fn)``; the loop
names it in the stats and counts it as lossy unless ``lossless=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DraftError, GenerationConfigError, NonFiniteLogitsError
from .sampling import sample_from
from .tree import SIBLING_MODES, Draft

Coin = Callable[[float], bool]


@dataclass
class Verdict:
    """Outcome of verifying one draft.

    path: accepted node indices, root side first (empty when the root's children were all rejected).
    tokens: the draft tokens of `path`.
    residual: (V,) distribution of the next token — the correction after a rejection, or the p-row of the path's
      last node (the bonus). May be a view of `p`: do not modify it in place. None from `greedy_walk`, whose
      next token is certain.
    next_token: the token drawn from `residual`; None until :func:`finalize` runs (kernels called with a `coin`).
    bonus: True when the walk stopped because the last node has no children (residual is a p-row as-is);
      False when every child of the last node was rejected.
    """

    path: list[int]
    tokens: list[int]
    residual: torch.Tensor | None
    next_token: int | None = None
    bonus: bool = False

    @property
    def emitted(self) -> list[int]:
        """Tokens this step commits: the accepted draft tokens, then the next token (once finalized)."""
        return self.tokens + ([] if self.next_token is None else [self.next_token])


def finalize(verdict: Verdict, generator: torch.Generator | None = None) -> Verdict:
    """Draw `next_token` from `residual` with its own draw from the request's generator (in place; returns it)."""
    if verdict.next_token is None:
        verdict.next_token = sample_from(verdict.residual, generator)
    return verdict


def kernel_rule(name: str, lossless: bool):
    """Tag a rule so the loop, CLI and benchmark tables can name it and mark lossy rules as such."""
    def tag(fn):
        fn.name, fn.lossless = name, lossless
        return fn
    return tag


# --- input checks (cheap: shapes, one NaN reduction) ------------------------------------------------------------
def check_kernel_inputs(draft: Draft, p: torch.Tensor, what: str) -> None:
    n = len(draft)
    if p.dim() != 2 or p.shape[0] != n + 1:
        raise DraftError(f"{what}: p has shape {tuple(p.shape)}; a draft of {n} node(s) needs ({n + 1}, V) — "
                         "one target row for the root and one after each node")
    vocab = p.shape[1]
    if draft.q is not None and tuple(draft.q.shape) != (n, vocab):
        raise DraftError(f"{what}: draft q has shape {tuple(draft.q.shape)} but p has shape {tuple(p.shape)}; "
                         f"expected q of shape ({n}, {vocab})")
    toks = draft.token_list
    if toks and not (0 <= min(toks) and max(toks) < vocab):
        raise DraftError(f"{what}: draft tokens {toks} out of range for p's vocabulary of {vocab}")
    # NaN survives a sum, and one reduction is ~30x cheaper than isnan(p).any() on a (N+1, V) CPU tensor.
    # (The greedy path may be handed logits, whose -inf entries are legitimate and do not trip this.)
    if bool(p.sum().isnan()):
        raise NonFiniteLogitsError(f"{what}: target probabilities p {tuple(p.shape)} contain NaN")


def default_coin(p: torch.Tensor, generator: torch.Generator | None) -> Coin:
    return lambda prob: bool(torch.rand((), generator=generator, device=p.device, dtype=p.dtype) < prob)


def flip_coin(coin: Coin, prob: float) -> bool:
    # Certain outcomes draw nothing: fewer draws, and branches of probability 0 are never taken (which keeps the
    # zero-mass fallbacks below unreachable except through rounding).
    if prob >= 1.0:
        return True
    if prob <= 0.0:
        return False
    return bool(coin(prob))


def normalised(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """r / sum(r), or `fallback` when r has (numerically) no mass.

    In every call below, the unnormalised mass of r equals the probability of the rejection that produced it
    (sum max(0, r - q_s) = P(reject | r, q_s); for point mass, 1 - r(x)). So mass <= eps means this rejection has
    probability <= eps and is a rounding artefact (in exact arithmetic it has probability 0 and never happens);
    keeping the distribution we had changes the output by at most eps instead of dividing by ~0.
    """
    mass = float(r.sum())
    return r / mass if mass > torch.finfo(r.dtype).eps else fallback


# --- the walk shared by the stochastic rules ---------------------------------------------------------------------
# try_children(children, r) -> (accepted node or None, residual when none accepted)
TryChildren = Callable[[list[int], torch.Tensor], tuple[int | None, torch.Tensor | None]]


def walk_tree(draft: Draft, p: torch.Tensor, try_children: TryChildren) -> Verdict:
    path, node = [], -1
    while True:
        kids = draft.children[node + 1]
        if not kids:
            return _verdict(draft, path, p[node + 1], bonus=True)
        chosen, residual = try_children(kids, p[node + 1])
        if chosen is None:
            return _verdict(draft, path, residual, bonus=False)
        path.append(chosen)
        node = chosen


def _verdict(draft: Draft, path: list[int], residual: torch.Tensor, bonus: bool) -> Verdict:
    toks = draft.token_list
    return Verdict(path, [toks[i] for i in path], residual, None, bonus)


def finish_verdict(verdict: Verdict, coin: Coin | None, generator: torch.Generator | None) -> Verdict:
    return finalize(verdict, generator) if coin is None else verdict


# --- point mass (q = 1) ------------------------------------------------------------------------------------------
@kernel_rule("point_mass", lossless=True)
def accept_point_mass(draft: Draft, p: torch.Tensor, *, generator: torch.Generator | None = None,
                      coin: Coin | None = None) -> Verdict:
    """EAGLE / vLLM n-gram verification: lossless for any proposal; ignores draft.q."""
    check_kernel_inputs(draft, p, "accept_point_mass")
    flip = coin or default_coin(p, generator)
    toks = draft.token_list

    def try_children(kids, r):
        for c in kids:
            x = toks[c]
            if flip_coin(flip, float(r[x])):
                return c, None
            rest = r.clone()
            rest[x] = 0.0  # a rejected token can never be the outcome of this position any more
            r = normalised(rest, fallback=r)
        return None, r

    return finish_verdict(walk_tree(draft, p, try_children), coin, generator)


# --- speculative sampling (chains, SpecInfer i.i.d. siblings, RSD without replacement) --------------------------
def _proposal(q: torch.Tensor, c: int, tried: list[int], without_replacement: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """The distribution sibling c was really drawn from: q[c], minus earlier siblings' tokens when drawn WOR."""
    row = q[c].to(dtype)  # (V,) per row, so a float32 q never costs a full (N, V) copy
    if not (without_replacement and tried):
        return row
    qs = row.clone()
    qs[tried] = 0.0
    # No mass left means the drafter claims a sibling it could not have drawn; returning zeros sends that sibling to
    # the point-mass rule below, which is lossless whatever the proposal was.
    return normalised(qs, fallback=torch.zeros_like(qs))


@kernel_rule("speculative", lossless=True)
def accept_speculative(draft: Draft, p: torch.Tensor, *, generator: torch.Generator | None = None,
                       coin: Coin | None = None) -> Verdict:
    """Speculative sampling over a draft tree with draft probabilities (chain / SpecInfer / RSD)."""
    check_kernel_inputs(draft, p, "accept_speculative")
    if draft.q is None:
        raise DraftError("accept_speculative: draft.q is None; speculative sampling needs the distributions the "
                         "draft tokens were sampled from — use accept_point_mass for deterministic proposals")
    if draft.siblings not in SIBLING_MODES:
        raise DraftError(f"accept_speculative: draft siblings={draft.siblings!r}; expected one of {SIBLING_MODES}")
    if bool(draft.q.sum().isnan()):
        raise NonFiniteLogitsError(f"accept_speculative: draft q {tuple(draft.q.shape)} contains NaN")
    flip = coin or default_coin(p, generator)
    toks, wor = draft.token_list, draft.siblings == "without_replacement"

    def try_children(kids, r):
        tried: list[int] = []
        for c in kids:
            x = toks[c]
            qs = _proposal(draft.q, c, tried, wor, r.dtype)
            qx = float(qs[x])
            if qx <= 0.0:
                # q_s(x) = 0: the draft could not have proposed x from q_s. Verify it as a point mass instead
                # (q_s = onehot(x)), the one proposal for which x is certain; that rule is lossless for any proposal.
                qs, qx = torch.zeros_like(r), 1.0
                qs[x] = 1.0
            if flip_coin(flip, min(1.0, float(r[x]) / qx)):
                return c, None
            r = normalised((r - qs).clamp_min_(0.0), fallback=r)  # (V,) Leviathan's residual max(0, r - q_s)
            tried.append(x)
        return None, r

    return finish_verdict(walk_tree(draft, p, try_children), coin, generator)


# --- vectorised rules: greedy and typical ------------------------------------------------------------------------
def _along_paths(parent: torch.Tensor, ok: torch.Tensor, weights: torch.Tensor, depth: int):
    """Pointer doubling over the tree: for every node, AND of `ok` and the sums of `weights` (N, K) over its path.

    ceil(log2(depth)) rounds of gathers instead of a walk per node; slot 0 stands for the root (ok, weight 0) and is
    its own parent, so jumps past the root add nothing.
    """
    up = torch.cat([parent.new_zeros(1), parent + 1])  # (N+1,) slot of each slot's ancestor
    acc = torch.cat([ok.new_ones(1), ok])  # (N+1,)
    tot = torch.cat([weights.new_zeros(1, weights.shape[1]), weights])  # (N+1, K)
    for _ in range(max(depth - 1, 0).bit_length()):
        acc, tot, up = acc & acc[up], tot + tot[up], up[up]
    return acc[1:], tot[1:]


def _deepest(draft: Draft, ok: torch.Tensor, loglik: torch.Tensor | None = None) -> int:
    """Index of the deepest node whose whole path is `ok` (ties: higher `loglik`, then lower index), or -1."""
    w = ok.to(loglik.dtype if loglik is not None else torch.long).unsqueeze(1)  # (N, 1) depth counts ok nodes
    if loglik is not None:
        w = torch.cat([w, torch.where(ok, loglik, 0).unsqueeze(1)], dim=1)  # (N, 2); log 0 only where not ok
    acc, tot = _along_paths(draft.parent, ok, w, draft.max_depth())
    depth = torch.where(acc, tot[:, 0], 0)  # an accepted node's ancestors are all ok, so the count is its depth
    if loglik is None:
        best = depth.argmax()  # first maximum: the lowest node index
    else:
        best = torch.where(acc & (depth == depth.max()), tot[:, 1], -torch.inf).argmax()
    best, d = torch.stack([best.to(depth.dtype), depth[best]]).tolist()
    return int(best) if d > 0 else -1


def _vectorised_verdict(draft: Draft, last: int, residual: torch.Tensor) -> Verdict:
    return _verdict(draft, draft.path_to(last) if last >= 0 else [], residual,
                    bonus=not draft.children[last + 1])


@kernel_rule("greedy", lossless=True)
def accept_greedy(draft: Draft, p: torch.Tensor, *, generator: torch.Generator | None = None,
                  coin: Coin | None = None) -> Verdict:
    """Temperature 0: keep the longest draft path that matches the target's argmax; no random draws.

    One argmax over all rows and one host transfer; the walk itself is over Python ints (a step's draft is small),
    which is cheaper than any per-node tensor op. A duplicated sibling can only match after its first copy did.
    """
    check_kernel_inputs(draft, p, "accept_greedy")
    verdict = greedy_walk(draft, p.argmax(-1).tolist())
    verdict.residual = torch.zeros_like(p[0])
    verdict.residual[verdict.next_token] = 1.0
    return verdict


def greedy_walk(draft: Draft, top: list[int]) -> Verdict:
    """The greedy rule given the target's argmax per p-row (top[0] for the root, top[i + 1] after node i).

    The loop calls this directly with one batched argmax for all requests; `residual` is left None (the one-hot of
    next_token) since nothing downstream of a greedy step reads it."""
    toks, children = draft.token_list, draft.children
    path, node = [], -1
    while True:
        want = top[node + 1]
        for c in children[node + 1]:
            if toks[c] == want:
                path.append(c)
                node = c
                break
        else:
            break
    verdict = _verdict(draft, path, None, bonus=not children[node + 1])
    verdict.next_token = top[node + 1]
    return verdict


def typical(epsilon: float = 0.09, delta: float = 0.3):
    """Medusa's typical acceptance (LOSSY) with hard threshold `epsilon` and entropy factor `delta`.

    Defaults are Medusa's `posterior_threshold=0.09` and `posterior_alpha=0.3` (= sqrt(epsilon), as recommended
    there). Entropy uses 0 log 0 = 0 (Medusa's code adds 1e-5 inside the log). Like Medusa's `evaluate_posterior`,
    the longest accepted candidate path wins, ties broken by target log-likelihood.
    """
    if not (0 < epsilon <= 1 and delta > 0):
        raise GenerationConfigError(f"typical(epsilon={epsilon}, delta={delta}): need 0 < epsilon <= 1, delta > 0")

    @kernel_rule("typical", lossless=False)
    def accept_typical(draft: Draft, p: torch.Tensor, *, generator: torch.Generator | None = None,
                       coin: Coin | None = None) -> Verdict:
        check_kernel_inputs(draft, p, "accept_typical")
        last = -1
        if len(draft):
            entropy = torch.special.entr(p).sum(-1)  # (N+1,) -sum p log p, with 0 log 0 = 0
            threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)  # (N+1,)
            px = p[draft.parent + 1, draft.tokens]  # (N,) target prob of each node given its parent
            last = _deepest(draft, px > threshold[draft.parent + 1], loglik=px.log())
        return finish_verdict(_vectorised_verdict(draft, last, p[last + 1]), coin, generator)

    accept_typical.epsilon, accept_typical.delta = epsilon, delta
    return accept_typical


accept_typical = typical()

KERNELS: dict[str, Callable[..., Verdict]] = {
    k.name: k for k in (accept_greedy, accept_point_mass, accept_speculative, accept_typical)
}


def select_kernel(greedy: bool, has_q: bool, name: str | Callable | None = None) -> Callable[..., Verdict]:
    """The rule for a request: `name` if given; else greedy at temperature 0, speculative with draft
    probabilities, point mass without them. All defaults are lossless."""
    if callable(name):
        return name  # a plug-in rule with the kernel signature (set .name / .lossless on it)
    if name is not None:
        if name not in KERNELS:
            raise GenerationConfigError(f"acceptance rule {name!r} is unknown; choose one of {sorted(KERNELS)}")
        return KERNELS[name]
    if greedy:
        return accept_greedy
    return accept_speculative if has_q else accept_point_mass
