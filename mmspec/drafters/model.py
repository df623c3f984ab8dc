"""An independent small draft model sharing the target's tokenizer (Leviathan et al. 2023; Chen et al. 2023).

The drafter keeps its own KV cache over the same ragged layout as the target. Each step it first feeds the tokens
committed since its last step (at least the pending correction/bonus token), then drafts level by level: a chain
(k forwards for k tokens), a static tree of child ranks (one forward per level; siblings are the top ranks, or
draws without replacement when sampling), or an EAGLE-2 dynamic tree (Li et al. 2024). Only nodes that get
children are fed. After verification the accepted nodes whose slots already follow the committed ones are kept;
any later accepted tokens are fed again with the next round's uncached block (no keys are moved). Greedy static
trees of one request run a precompiled plan (`tree_plan.TreePlan`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import ContextOverflowError, DeviceMismatchError, UnsupportedModelError, VocabularyMismatchError
from ..request import Request
from ..sampling import probs_by_row
from ..state import take_rows
from ..target import BlockOutput, CausalLMRunner, chain_offsets
from ..tree import Draft, DynamicTree, StaticTree, expand_dynamic, tree_draft
from .base import DraftContext, DrafterCounters, RowUpdate
from .tree_plan import TreePlan


def drafter_requests(ctx: DraftContext) -> list[Request]:
    """Each row's request as the drafter's runner prefills it: its view of the prompt (never empty: a view that
    drops every token keeps the prompt's last one) and the drafter's inputs."""
    reqs = ctx.requests or [Request(h[:-1]) for h in ctx.history]
    views = [r.for_drafter() for r in reqs]
    for v, h in zip(views, ctx.history):
        if not v.prompt:
            v.prompt = list(h[-2:-1])
    return views


@dataclass
class _Round:
    """Bookkeeping of one propose() call: where the fed tokens went in the drafter's cache."""

    start: int  # cache width before the uncached block
    n_uncached: list[int]
    slot: list[dict] = field(default_factory=list)  # per row: node id -> cache slot
    length: list[int] | None = None  # committed slots per row at the start of the round


class ModelDrafter:
    needs_hidden = False
    lean_chain = True  # greedy chains of one request may take `_greedy_chain` (no per-token host round trip)
    lean_tree = True  # greedy static trees of one request may take the compiled `TreePlan` (`_propose_planned`)
    trusted = True  # its drafts are well-formed and within the budgets by construction: the loop skips checking them
    feeds_features = False  # a feature drafter (EAGLE): every fed block takes `inputs` (its features) and returns the
    # model's predicted features, kept in `fed_features` (B, M, H) until the next feed

    def __init__(self, model: torch.nn.Module | None = None, tree: StaticTree | DynamicTree | int = 4,
                 cache: str = "dynamic", *, runner: CausalLMRunner | None = None,
                 shared_tokenizer: bool = False):
        """model: the draft LM (or pass a prebuilt `runner`, e.g. a VLM runner that feeds the images). It prefills
        each request's drafter view (`Request.draft_prompt` and `draft_inputs`: e.g. a text-only drafter of a VLM
        sees the prompt without image placeholders); generated tokens are fed as they are.
        shared_tokenizer: the caller has checked that the drafter's tokenizer gives the target's ids; the two
        vocabularies may then differ in size (padded embeddings, added image tokens) and logits are cut / padded
        with -inf to the target's size. Without it a size difference is a VocabularyMismatchError."""
        self.tree = StaticTree.chain(tree) if isinstance(tree, int) else tree
        if isinstance(self.tree, StaticTree):  # the shape is fixed: derive its structure once
            self._shape = (self.tree.parent, self.tree.rank, *self.tree.topology(), self.tree.levels())
        if (model is None) == (runner is None):
            raise TypeError("ModelDrafter takes exactly one of model= or runner=")
        self.runner = runner if runner is not None else CausalLMRunner(model, cache=cache)
        if self.runner.recurrent_layers:
            raise UnsupportedModelError(
                f"{type(self.runner.model).__name__} has linear-attention layers: as a draft model its recurrent "
                "state would be needed per tree level across feeds, which ModelDrafter does not keep; use it as the "
                "target, with an n-gram, EAGLE or MTP drafter")
        self._plan = TreePlan.build(self.tree, self.runner.device) if isinstance(self.tree, StaticTree) else None
        self._plan_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (level, n_uncached) -> mask, offsets
        self.shared_tokenizer = shared_tokenizer
        self.counters = DrafterCounters()
        self._parents: dict[int, torch.Tensor] = {}  # chain length -> parent tensor
        self._templates: dict[tuple, torch.Tensor] = {}  # tree-level shape -> mask over the round's drafted slots
        self.vocab_size = self.runner.vocab_size

    @property
    def max_depth(self) -> int:
        return self.tree.depth

    @property
    def max_nodes(self) -> int:
        return len(self.tree) if isinstance(self.tree, StaticTree) else self.tree.total

    def check_target(self, target) -> None:
        if self.shared_tokenizer and self.runner.vocab_size != target.vocab_size:
            self.runner.out_vocab = target.vocab_size
        elif self.runner.vocab_size != target.vocab_size:
            raise VocabularyMismatchError(
                f"drafter vocabulary has {self.runner.vocab_size} entries but the target's has {target.vocab_size}; "
                "a draft model must share the target's tokenizer and output vocabulary (use the n-gram drafter, or "
                "a drafter trained for this target)")
        if self.runner.device != target.device:
            raise DeviceMismatchError(
                f"drafter is on {self.runner.device} but the target is on {target.device}; move the drafter with "
                f"drafter.to('{target.device}') (or load it with the same device_map)")

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def begin(self, ctx: DraftContext, prefill: BlockOutput) -> None:
        self.ctx = ctx
        views = drafter_requests(ctx)
        limit = self.runner.max_positions
        if limit and max(len(v.prompt) for v in views) >= limit:
            raise ContextOverflowError(
                f"the drafter's context is {limit} positions but a prompt has {max(len(v.prompt) for v in views)} "
                "tokens; use a drafter with a longer context (or the n-gram drafter)")
        self.runner.prefill(views, reserve=0)
        if ctx.compiled:
            self.runner.compile_decode(ctx.reserve)
        self.counters.forwards += 1
        self.uncached = [[h[-1]] for h in ctx.history]
        self.round: _Round | None = None

    def propose(self, budgets: Sequence[int]) -> list[Draft]:
        caps = [min(self.max_depth, int(b)) for b in budgets]
        limit = self.runner.max_positions
        if limit:  # never run past the drafter's own context: node position = next_pos + uncached - 1 + depth
            room = [limit - p - len(u) for p, u in zip(self.runner.next_positions, self.uncached)]
            caps = [0 if min(room) < 0 else min(c, r + 1) for c, r in zip(caps, room)]
        if max(caps, default=0) <= 0:
            self.round = None
            return [Draft.empty() for _ in caps]
        root_logits = self._feed_uncached()
        if isinstance(self.tree, DynamicTree):
            return self._propose_dynamic(root_logits, caps)
        if len(caps) == 1 and self.tree.is_chain:
            if self.ctx.spec_of(0).greedy and self.lean_chain:
                return [self._greedy_chain(root_logits, caps[0])]
            return [self._propose_chain(root_logits[0], caps[0])]
        if (len(caps) == 1 and self._plan is not None and self.lean_tree and caps[0] >= self.tree.depth
                and self.ctx.spec_of(0).greedy and not self.runner.kv.static
                and self.round.length[0] == self.round.start):
            return [self._propose_planned(root_logits)]
        return self._propose_static(root_logits, caps)

    def commit(self, updates: Sequence[RowUpdate], verify_out: BlockOutput | None) -> None:
        rnd = self.round
        if rnd is None:
            for u, upd in zip(self.uncached, updates):
                u.extend(upd.tokens)
            return
        keep = []
        for b, upd in enumerate(updates):
            slots = [rnd.start + j for j in range(rnd.n_uncached[b])]
            fed = 0
            for node in upd.path[: len(upd.tokens)]:
                slot = rnd.slot[b].get(node)
                if slot is None or (slots and slot != slots[-1] + 1):
                    # Not fed, or fed away from the previous kept slot (a tree's later level): from here on the
                    # accepted tokens are fed again next round, in the uncached block, rather than their keys moved
                    # (a block of a few tokens costs about one token's forward; a move costs ops on every layer).
                    break
                slots.append(slot)
                fed += 1
            keep.append(slots)
            self.uncached[b] = list(upd.tokens[fed:])
        self.runner.kv.compact(keep)
        self.runner.next_positions = [p + len(k) for p, k in zip(self.runner.next_positions, keep)]
        self.round = None

    def select_rows(self, rows: Sequence[int]) -> None:
        self.runner.select_rows(rows)
        take_rows(self, rows, "uncached")

    # --- drafting -----------------------------------------------------------------------------------------------
    def _run(self, tokens, offsets, allowed, inputs: dict | None, **kw):
        """One forward of the drafter's model over a block; a feature drafter's `inputs` go with it and the model's
        predicted features come back into `fed_features`."""
        out = self.runner.forward_block(tokens, offsets, allowed, want_hidden=self.feeds_features, inputs=inputs,
                                        **kw)
        self.fed_features = out.hidden
        return out

    def _feed_uncached(self, inputs: dict | None = None) -> torch.Tensor:
        """Feed every row's not-yet-cached committed tokens; returns logits (B, V) at the last of them. inputs:
        more model inputs for the block (a feature drafter's features of those tokens)."""
        kv = self.runner.kv
        n = [len(u) for u in self.uncached]
        b, m = len(n), max(n)
        if b == 1 and m == 1 and not kv.static and not self.feeds_features:  # the usual chain step: the lean path
            self.round = _Round(kv.width, n, [dict()], kv.lengths)
            runner = self.runner
            logits = runner.forward_token(torch.tensor([self.uncached[0]], device=runner.device),
                                          runner.position_slice(runner.next_positions[0], 1))
            self.counters.forwards += 1
            return logits[0]  # (1, V)
        tokens = torch.tensor([u + [0] * (m - len(u)) for u in self.uncached], dtype=torch.long)
        allowed = None  # one request: plain causal block over a hole-free cache
        if b > 1:
            lens = torch.tensor(n)
            q_idx, k_idx = torch.arange(m)[:, None], torch.arange(m)[None, :]
            causal = (k_idx <= q_idx).unsqueeze(0)
            allowed = causal & ((k_idx.unsqueeze(0) < lens[:, None, None]) | (q_idx == k_idx).unsqueeze(0))
        self.round = _Round(kv.width, n, [dict() for _ in range(b)], kv.lengths)
        keep = m - min(n) + 1  # logits only at each row's last uncached token
        out = self._run(tokens, chain_offsets(m).expand(b, m), allowed, inputs, keep_last=keep)
        self.counters.forwards += 1
        if b == 1:
            return out.logits[:, -1]  # (1, V)
        last = torch.tensor(n, device=out.logits.device) - 1 - (m - keep)
        return out.logits[torch.arange(b, device=out.logits.device), last]  # (B, V)

    def _feed_nodes(self, feed: list[list[tuple[int, int, list[int]]]],
                    inputs: dict | None = None) -> list[torch.Tensor]:
        """Feed draft nodes. feed[b] = [(node id, token, ancestor node ids)]; node depth = len(ancestors) + 1.

        Each node sees its row's committed prefix, its uncached block, its fed ancestors and itself. Returns per row
        the logits (F_b, V) of the fed nodes, in order.
        """
        rnd, runner = self.round, self.runner
        b, m = len(feed), max(len(f) for f in feed)
        start = runner.kv.width
        if b == 1 and m == 1 and len(feed[0][0][2]) == len(rnd.slot[0]):
            # A chain step of one request: the node sees every slot written so far, so no mask is needed.
            node, tok, anc = feed[0][0]
            out = self._run(torch.tensor([[tok]]), torch.tensor([[rnd.n_uncached[0] + len(anc)]]), None, inputs,
                            existing="all")
            self.counters.forwards += 1
            rnd.slot[0][node] = start
            return [out.logits[0, :1]]
        if b == 1 and rnd.length[0] == rnd.start and not runner.kv.static:
            return self._feed_nodes_one(feed[0], start, inputs)
        tokens = [[0] * m for _ in range(b)]
        offsets = [[0] * m for _ in range(b)]
        allowed = runner.empty_mask(b, m)  # (B, M, K) bool, all False
        ii, jj, kk = [], [], []
        for i, row in enumerate(feed):
            allowed[i, :, : rnd.length[i]] = True  # committed prefix
            allowed[i, :, rnd.start: rnd.start + rnd.n_uncached[i]] = True  # this round's uncached block
            for j, (node, tok, anc) in enumerate(row):
                tokens[i][j], offsets[i][j] = tok, rnd.n_uncached[i] + len(anc)
                slots = [rnd.slot[i][a] for a in anc] + [start + j]
                ii += [i] * len(slots)
                jj += [j] * len(slots)
                kk += slots
            for j in range(len(row), m):  # padding sees only itself
                ii.append(i), jj.append(j), kk.append(start + j)
        allowed[ii, jj, kk] = True
        out = self._run(torch.tensor(tokens), torch.tensor(offsets), None, inputs, full_mask=allowed)
        self.counters.forwards += 1
        for i, row in enumerate(feed):
            for j, (node, _, _) in enumerate(row):
                rnd.slot[i][node] = start + j
        return [out.logits[i, : len(row)] for i, row in enumerate(feed)]

    def _feed_nodes_one(self, row: list[tuple[int, int, list[int]]], start: int,
                        inputs: dict | None = None) -> list[torch.Tensor]:
        """`_feed_nodes` for one request over a hole-free cache: every node sees all slots before this round's
        drafted ones; the part over the drafted slots and the position offsets depend only on the tree's shape, so
        they are built once per shape (an additive float template on the device) and reused."""
        rnd, runner = self.round, self.runner
        nu = rnd.n_uncached[0]
        visible = rnd.start + nu  # committed prefix + this round's uncached block
        rel = tuple(tuple(rnd.slot[0][a] - visible for a in anc) + (start - visible + j,)
                    for j, (_, _, anc) in enumerate(row))
        key = (start - visible + len(row), nu, rel)
        templates = self._templates
        entry = templates.get(key)
        if entry is None:
            if len(templates) >= 512:  # dynamic trees make many shapes: keep the cache bounded
                templates.clear()
            t = torch.zeros(1, len(row), key[0], dtype=torch.bool)
            for j, slots in enumerate(rel):
                t[0, j, list(slots)] = True
            offsets = torch.tensor([[nu + len(anc) for _, _, anc in row]])
            entry = templates[key] = (runner.additive(t).unsqueeze(1), offsets)
        m = len(row)
        allowed = torch.cat([runner.open_prefix(1, m, visible), entry[0]], dim=-1)  # (1, 1, M, K) additive
        out = self._run(torch.tensor([[tok for _, tok, _ in row]]), entry[1], None, inputs, full_mask=allowed)
        self.counters.forwards += 1
        for j, (node, _, _) in enumerate(row):
            rnd.slot[0][node] = start + j
        return [out.logits[0, :m]]

    def _children(self, logits: torch.Tensor, n: int, rows: list[int]) -> tuple[list[list[int]], torch.Tensor | None]:
        """First n children for each of P nodes from their draft logits (P, V): top ranks (greedy) or draws without
        replacement from the warped q (sampling, with each request's generator). Returns tokens and q (P, V)."""
        specs = [self.ctx.spec_of(r) for r in rows]
        if all(s.greedy for s in specs):
            return logits.topk(n, dim=-1).indices.tolist(), None
        q = probs_by_row(specs, logits)  # (P, V)
        support = (q > 0).sum(-1).tolist()
        picks = [logits[i].topk(n).indices.tolist() if s.greedy else
                 torch.multinomial(q[i], min(n, support[i]), replacement=False,
                                   generator=self.ctx.generators[r]).tolist()
                 for i, (r, s) in enumerate(zip(rows, specs))]
        if any(s.greedy for s in specs):  # a greedy row among sampled ones: its top ranks, a deterministic draft
            q = [None if s.greedy else q[i] for i, s in enumerate(specs)]
        return picks, q

    def _propose_chain(self, logits: torch.Tensor, cap: int) -> Draft:
        """One request, chain draft: the lean path (no masks, no per-level bookkeeping), k - 1 single-token feeds."""
        spec, rnd, runner = self.ctx.spec_of(0), self.round, self.runner
        toks, qs = [], []
        for depth in range(1, cap + 1):
            if spec.greedy:
                tok = int(logits.argmax())
            else:
                q = spec.probs(logits)
                tok = int(torch.multinomial(q, 1, generator=self.ctx.generators[0]))
                qs.append(q)
            toks.append(tok)
            if depth < cap:
                rnd.slot[0][depth - 1] = runner.kv.width
                logits = self._chain_feed(tok, rnd.n_uncached[0] + depth - 1)
                self.counters.forwards += 1
        return Draft(torch.tensor(toks), torch.arange(-1, len(toks) - 1), torch.stack(qs) if qs else None,
                     siblings="without_replacement")

    def _chain_feed(self, tok: int, offset: int, inputs: dict | None = None) -> torch.Tensor:
        """Feed one chain node (it sees every slot written so far); its logits (V,)."""
        out = self._run(torch.tensor([[tok]]), torch.tensor([[offset]]), None, inputs, existing="all")
        return out.logits[0, 0]

    def _greedy_chain(self, logits: torch.Tensor, cap: int) -> Draft:
        """Greedy chain of one request from its root logits (1, V), with no host round trip per token: each argmax
        stays on the device and is fed as the next (1, 1) input; the tokens come back in one transfer at the end.
        Every tensor op counts here (each costs several microseconds after a model forward), so there are few."""
        rnd, runner = self.round, self.runner
        base = runner.kv.width
        first = runner.next_positions[0] + rnd.n_uncached[0]  # absolute position of the depth-1 node
        toks = [logits.argmax(-1, keepdim=True)]  # (1, 1)
        for depth in range(1, cap):
            rnd.slot[0][depth - 1] = base + depth - 1
            out = runner.forward_token(toks[-1], runner.position_slice(first + depth - 1, 1))  # (1, 1, V)
            self.counters.forwards += 1
            toks.append(out.argmax(-1))
        tokens = torch.cat(toks, dim=1)[0] if cap > 1 else toks[0][0]
        if tokens.device.type != "cpu":
            tokens = tokens.cpu()
        return Draft.chain_of(tokens, self._chain_parent(cap))

    def _chain_parent(self, n: int) -> torch.Tensor:
        cache = self._parents
        if n not in cache:
            cache[n] = torch.arange(-1, n - 1)
        return cache[n]

    def _propose_planned(self, root_logits: torch.Tensor) -> Draft:
        """The whole static tree for one request, greedily, over a hole-free cache: `_propose_static`'s result with
        the shape's bookkeeping precompiled (see `TreePlan`). Siblings are the parent's top ranks, as there."""
        plan, rnd, runner = self._plan, self.round, self.runner
        nu = rnd.n_uncached[0]
        visible = rnd.start + nu  # committed prefix + this round's uncached block
        logits, level_tokens = root_logits, []  # logits: (P, V) of the level's parents, in order
        for li, level in enumerate(plan.levels):
            cands = logits.topk(level.width, dim=-1).indices.view(-1)
            tokens = cands if level.pick is None else cands[level.pick]
            level_tokens.append(tokens)
            if not level.n_fed:
                break
            fed = tokens if level.fed is None else tokens[level.fed]
            mask, offsets = self._plan_mask(li, level, nu)
            allowed = torch.cat([runner.open_prefix(1, level.n_fed, visible), mask], dim=-1)
            out = runner.forward_block(fed.view(1, -1), offsets, None, full_mask=allowed)
            self.counters.forwards += 1
            logits = out.logits[0]
        rnd.slot[0] = {node: visible + rel for node, rel in plan.slot.items()}
        return plan.draft(level_tokens)

    def _plan_mask(self, li: int, level, nu: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive mask over the drafted slots (1, 1, F, K) and position offsets (1, F) of a plan level's feed."""
        key = (li, nu)
        got = self._plan_masks.get(key)
        if got is None:
            got = self._plan_masks[key] = (self.runner.additive(level.visible).unsqueeze(1), level.depth_before + nu)
        return got

    def _propose_static(self, root_logits: torch.Tensor, caps: list[int]) -> list[Draft]:
        parent, rank, n_children, ancestors, levels = self._shape
        b = len(caps)
        node_logits: list[dict] = [dict() for _ in range(b)]
        toks: list[dict] = [dict() for _ in range(b)]
        qs: list[dict] = [dict() for _ in range(b)]
        for level, nodes in enumerate(levels):
            depth = level + 1
            # One batched top-k (or warp) for every (row, parent) that gets children at this level.
            pairs = [(r, p) for r in range(b) if caps[r] >= depth
                     for p in dict.fromkeys(parent[n] for n in nodes) if p < 0 or p in toks[r]]
            if not pairs:
                break
            stacked = torch.stack([root_logits[r] if p < 0 else node_logits[r][p] for r, p in pairs])  # (P, V)
            width = max(n_children[p + 1] for _, p in pairs)
            cands, q = self._children(stacked, width, [r for r, _ in pairs])
            picked = {pair: (cands[i], None if q is None else q[i]) for i, pair in enumerate(pairs)}
            feed = [[] for _ in range(b)]
            for r in range(b):
                for node in nodes:
                    got = picked.get((r, parent[node]))
                    if got is None or rank[node] >= len(got[0]):
                        continue  # row capped, parent dropped, or fewer candidates than ranks
                    toks[r][node], qs[r][node] = got[0][rank[node]], got[1]
                    if depth < caps[r] and n_children[node + 1]:
                        feed[r].append((node, toks[r][node], ancestors[node]))
            if any(feed):
                for r, lg in enumerate(self._feed_nodes(feed)):
                    for j, (node, _, _) in enumerate(feed[r]):
                        node_logits[r][node] = lg[j]
        return [self._make_draft(toks[r], qs[r], parent, self.round, r) for r in range(b)]

    def _make_draft(self, toks: dict, qs: dict, parent: list[int], rnd: _Round, row: int) -> Draft:
        remap = {n: i for i, n in enumerate(sorted(toks))}  # tree_draft's renumbering, for the cache slots
        rnd.slot[row] = {remap[n]: s for n, s in rnd.slot[row].items() if n in remap}
        return tree_draft(toks, qs, parent)

    def _propose_dynamic(self, root_logits: torch.Tensor, caps: list[int]) -> list[Draft]:
        def logprobs(logits: torch.Tensor, row: int) -> torch.Tensor:
            spec = self.ctx.spec_of(row)
            if spec.greedy:
                return torch.log_softmax(logits.float(), -1)
            return spec.probs(logits).log()

        def step(tokens, parents, frontier):
            feed = []
            for r in range(len(tokens)):
                row = []
                for f in frontier[r]:
                    anc, a = [], parents[r][f]
                    while a >= 0:
                        anc.append(a)
                        a = parents[r][a]
                    row.append((f, tokens[r][f], anc[::-1]))
                feed.append(row)
            return [logprobs(lg, r) for r, lg in enumerate(self._feed_nodes(feed))]

        root = torch.stack([logprobs(root_logits[r], r) for r in range(len(caps))])
        trees = expand_dynamic(self.tree, root, step, caps)
        drafts = []
        for r, (tokens, parents, kept) in enumerate(trees):
            remap = {old: new for new, old in enumerate(kept)}
            self.round.slot[r] = {remap[n]: s for n, s in self.round.slot[r].items() if n in remap}
            drafts.append(Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)))
        return drafts
