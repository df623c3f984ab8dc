"""The speculative decode loop: prefill, propose, verify in one target forward, accept, commit, stream.

    prefill  -> first token from the target alone (exactly what plain decoding does)
    loop:    drafts = drafter.propose(budgets)             per request, ragged
             logits = target.verify(pending, drafts)       ONE forward, tree mask + explicit positions
             verdict = kernel(draft, p, q)                 pure acceptance rule per request
             target.commit / drafter.commit                compact both caches to the accepted path
EOS and max_new_tokens are honoured exactly: drafts never go deeper than the tokens left, and tokens after an EOS
are cut. Finished requests leave the batch. Every random draw uses the request's own generator.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .drafters.base import DraftContext, DrafterCounters, RowUpdate
from .inference import inference
from .errors import (ContextOverflowError, DeviceMismatchError, DraftError, EmptyPromptError, GenerationConfigError,
                     InvalidInputError, UnsupportedModelError)
from .checks import check_max_new_tokens, check_sampling, check_seed, check_tree
from .compile import bucket, resolve_compile
from .flat_acceptance import accept_chains, draw_coins, draw_from_cdf
from .kernels import Verdict, accept_greedy, greedy_walk, select_kernel
from .request import Request, as_request
from .sampling import SamplingSpec, check_finite, make_generators, probs_by_row, sample_from
from .state import capture, restore
from .stats import GenerationStats
from .target import CausalLMTarget, sync_time
from .tree import Draft, ancestor_mask


def model_time(component) -> float:
    """Seconds a target / drafter spent inside model forwards so far (0 for train-free drafters), compiling ones
    excluded."""
    runner = getattr(component, "runner", component)
    return float(getattr(runner, "forward_time", 0.0))


def compile_time(component) -> float:
    """Seconds a target / drafter spent in forwards that compiled a shape (`mmspec.compile`)."""
    runner = getattr(component, "runner", component)
    return float(getattr(runner, "compile_time", 0.0))


def compile_setting(value, target, drafter) -> bool:
    """Resolve `compile=` for a target and drafter: None = on for CUDA where both can; True where one cannot is an
    UnsupportedModelError naming it and why."""
    wanted = resolve_compile(value, target.device)
    if not wanted:
        return False
    for name, comp in (("target", target), ("drafter", getattr(drafter, "runner", None))):
        if comp is None:
            continue  # a drafter without a model runner (n-gram, none) has nothing to compile
        why = comp.cannot_compile() if hasattr(comp, "cannot_compile") else \
            f"{type(comp).__name__} has no compiled decode path"
        if why and value is None:
            return False
        if why:
            raise UnsupportedModelError(f"compile=True: the {name} cannot decode compiled: {why}; use compile=False")
    return True


_EMPTY = Draft.empty()


class NoDrafter:
    """Proposes nothing: the loop then is plain target-only decoding (the baseline)."""

    needs_hidden = False
    trusted = True
    max_nodes = max_depth = 0

    def __init__(self):
        self.counters = DrafterCounters()

    def check_target(self, target) -> None:
        return None

    def begin(self, ctx, prefill) -> None:
        return None

    def propose(self, budgets):
        return [_EMPTY] * len(budgets)  # one shared empty draft (a Draft is never mutated)

    def commit(self, updates, verify_out) -> None:
        return None

    def select_rows(self, rows) -> None:
        return None


@dataclass
class TokenEvent:
    request: int  # index of the request in the caller's batch
    tokens: list[int]  # newly committed tokens (ids; vectors (C,) for continuous-token targets)
    finished: bool
    finish_reason: str | None = None  # "eos" | "length"
    accepted: int = 0  # how many of `tokens` (leading) are accepted draft tokens; the rest came from the target
    drift: list[float] | None = None  # lossy rules that measure it: per token, the TV between the distribution it
    # was emitted from and the target's (ALGORITHMS.md section 5); None for lossless rules


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated token ids per request (prompt excluded)
    finish_reasons: list[str]
    stats: GenerationStats


@dataclass
class _Row:
    index: int
    history: list[int]
    spec: SamplingSpec
    generated: list[int] = field(default_factory=list)
    finish: str | None = None


def as_prompts(input_ids) -> list[list[int]]:
    """Accept a list of ids, a list of lists, or an integer tensor (T,) / (B, T) without padding."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InvalidInputError(f"input_ids has dtype {input_ids.dtype}; token ids must be an integer tensor")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise InvalidInputError(f"input_ids has shape {tuple(input_ids.shape)}; expected (T,) or (B, T)")
        return input_ids.tolist()
    if isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            raise EmptyPromptError("input_ids is empty: pass at least one prompt with at least one token")
        if all(isinstance(t, int) for t in input_ids):
            return [list(input_ids)]
        out = []
        for i, p in enumerate(input_ids):
            p = p.tolist() if isinstance(p, torch.Tensor) else p
            if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) for t in p):
                raise InvalidInputError(f"prompt {i} is {type(p).__name__}; expected a list of int token ids")
            out.append(list(p))
        return out
    raise InvalidInputError(f"input_ids of type {type(input_ids).__name__}: expected a list of ids, a list of lists "
                            "or an integer tensor")


def static_reserve(max_new: int, drafter, batch: int = 1) -> int:
    """Cache slots needed beyond the longest prompt.

    At a step the cache holds prompt + generated - 1 committed slots plus a block of 1 + N nodes; a chain's N is at
    most the budget max_new - generated - 1 and a tree adds at most max_nodes - 1 siblings, so one request needs
    max_new - 1 + extra. In a batch the block sits after the longest row while another row may still draft its
    full budget, so up to max_new - 1 more.
    """
    nodes, depth = getattr(drafter, "max_nodes", 0), getattr(drafter, "max_depth", 0)
    extra = 0 if nodes <= depth else nodes - 1
    return max_new - 1 + extra + (max_new - 1 if batch > 1 else 0)


DRAFTER_METHODS = ("check_target", "begin", "propose", "commit", "select_rows")  # the Drafter protocol


def check_drafter(drafter, name: str = "drafter", names: str = "'ngram'") -> None:
    """None, a name in `names` (checked by the caller), a torch model or a Drafter-protocol object; anything else is
    an InvalidInputError naming the value, raised before any model is touched."""
    if drafter is None or isinstance(drafter, torch.nn.Module):
        return
    if isinstance(drafter, str):
        if drafter != "ngram":
            raise InvalidInputError(f"{name}={drafter!r}: expected None, {names}, a model or a Drafter")
        return
    missing = [m for m in DRAFTER_METHODS if not callable(getattr(drafter, m, None))]
    if missing:
        raise InvalidInputError(f"{name}={drafter!r} (a {type(drafter).__name__}) is not a drafter: expected None, "
                                f"{names}, a torch model or an object with the Drafter methods "
                                f"({', '.join(DRAFTER_METHODS)}); it lacks {', '.join(missing)}")


def ngram_drafter(tree):
    """The n-gram drafter for `tree`: it drafts chains, so a chain (an int or a chain-shaped StaticTree) is its
    length; a branching or dynamic tree is refused rather than silently turned into a chain."""
    from .drafters import NGramDrafter
    from .tree import StaticTree

    if isinstance(tree, StaticTree) and tree.is_chain:
        return NGramDrafter(k=tree.depth)
    if not isinstance(tree, int):
        raise InvalidInputError(f"tree={tree!r}: the n-gram drafter drafts chains only; pass an int (the chain "
                                "length), or a model / feature drafter for a tree")
    return NGramDrafter(k=tree)


DEFAULT = object()  # stream(acceptance=...) not given: the decoder's rule
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # component -> the stream whose state it holds


def as_loop_requests(input_ids) -> list[Request]:
    """Requests from a list of :class:`Request` objects, or from token ids (see `as_prompts`)."""
    if isinstance(input_ids, Request):
        input_ids = [input_ids]
    if isinstance(input_ids, (list, tuple)) and input_ids and any(isinstance(r, Request) for r in input_ids):
        bad = [i for i, r in enumerate(input_ids) if not isinstance(r, Request)]
        if bad:
            raise InvalidInputError(f"request(s) {bad} are not Request objects; pass a list of Requests or a list "
                                    "of token-id lists, not a mix")
        for i, r in enumerate(input_ids):
            if not isinstance(r.prompt, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in r.prompt):
                raise InvalidInputError(f"request {i} has prompt of type {type(r.prompt).__name__}; expected a list "
                                        "of int token ids")
        return list(input_ids)
    return [as_request(p) for p in as_prompts(input_ids)]


def as_eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(eos_token_id, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise GenerationConfigError(f"eos_token_id={eos_token_id!r}: expected an int token id or a list of them")
    return set(ids)


class SpeculativeDecoder:
    """Speculative decoding for one target and one drafter.

    target: a transformers causal LM or a Target adapter. drafter: None (plain decoding), "ngram", a transformers
    causal LM sharing the target's tokenizer, or any object implementing the Drafter protocol. tree: chain length
    (int), StaticTree or DynamicTree for model drafters. acceptance: None picks the lossless rule for the sampling
    mode; "typical" opts into Medusa's lossy typical acceptance; a callable with the kernel signature is a plug-in
    (it counts as lossy unless it sets ``lossless = True``). batched_acceptance: sampled chains are accepted for the
    whole batch in one call without a host sync (`mmspec.flat_acceptance`) instead of walked per request; None =
    on for accelerators, off on CPU, where the per-request walk costs fewer ops. The two draw alike (same coins),
    so the choice never changes an output.
    compile: after the prefill, decode over a static cache with the model forwards compiled at bucketed block
    lengths (`mmspec.compile`; CUDA graphs on GPU); None = on for CUDA, off elsewhere (and off for components that
    cannot, where True raises). Outputs are the same either way; compile time is reported apart
    (`stats.time_compile`) and paid once per shape and model.
    """

    def __init__(self, target, drafter=None, *, tree=4, acceptance: str | None = None, cache: str = "dynamic",
                 batched_acceptance: bool | None = None, compile: bool | None = None):
        from .drafters import ModelDrafter

        check_tree(tree)
        check_drafter(drafter)
        if acceptance is not None:
            select_kernel(False, False, acceptance)  # validate the name before anything is built
        if isinstance(drafter, str):
            drafter = ngram_drafter(tree)
        self.target = target if hasattr(target, "verify") else CausalLMTarget(target, cache=cache)
        if drafter is None:
            drafter = NoDrafter()
        elif isinstance(drafter, torch.nn.Module):
            drafter = ModelDrafter(drafter, tree)
        drafter.check_target(self.target)
        self.drafter = drafter
        self.acceptance = acceptance
        if batched_acceptance is not None and not isinstance(batched_acceptance, bool):
            raise InvalidInputError(f"batched_acceptance={batched_acceptance!r}: expected True, False or None (auto)")
        self.batched_acceptance = (torch.device(self.target.device).type != "cpu" if batched_acceptance is None
                                   else batched_acceptance)
        self.compile = compile_setting(compile, self.target, self.drafter)

    def generate(self, input_ids, **kwargs) -> GenerationOutput:
        stream = self.stream(input_ids, **kwargs)
        with torch.inference_mode():  # nothing runs between the steps here: one mode switch for the whole decode
            for _ in stream:
                pass
        return stream.output

    def stream(self, input_ids, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id=None, seed: int | None = None,
               generator=None, acceptance=DEFAULT) -> "Stream":
        """A stream over `input_ids`: token ids (see `as_prompts`) or a list of :class:`~mmspec.request.Request`
        (prompts with the target's and drafter's other inputs). Every argument applies to this stream only;
        acceptance: the rule for this stream (None = the lossless rule for the sampling mode; default: the
        decoder's). Streams on one decoder may be read interleaved: each owns the state it leaves in the target and
        drafter (`mmspec.state`)."""
        check_max_new_tokens(max_new_tokens)
        check_sampling(temperature, top_k, top_p, repetition_penalty)
        check_seed(seed)
        requests = as_loop_requests(input_ids)
        prompts = [r.prompt for r in requests]
        vocab = self.target.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise EmptyPromptError(f"prompt {i} has no tokens; every request needs at least one token")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                raise InvalidInputError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the target's "
                                        f"vocabulary [0, {vocab})")
        limit = getattr(self.target, "max_positions", None)
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new_tokens > limit:
            raise ContextOverflowError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                                       f"model's context of {limit} positions; shorten the prompt or max_new_tokens")
        spec = SamplingSpec(temperature, top_k, top_p, repetition_penalty)
        bad = [i for i, r in enumerate(requests) if r.sampling is not None and not isinstance(r.sampling, SamplingSpec)]
        if bad:
            raise GenerationConfigError(f"request(s) {bad} have sampling of another type; pass a "
                                        "mmspec.SamplingSpec(temperature=..., top_k=..., top_p=...) or None")
        gens = make_generators(seed, len(prompts), self.target.device, generator)
        gens = [g if r.generator is None else r.generator for g, r in zip(gens, requests)]
        for g in gens:
            if torch.device(g.device).type != torch.device(self.target.device).type:
                raise DeviceMismatchError(f"generator is on {g.device} but the target runs on {self.target.device}; "
                                          f"create it with torch.Generator(device='{self.target.device}') or pass seed=")
        eos = as_eos_set(eos_token_id)
        if acceptance is DEFAULT:
            acceptance = self.acceptance
        elif acceptance is not None:
            select_kernel(False, False, acceptance)  # validate the name before anything runs
        return Stream(self, requests, max_new_tokens, spec, gens, eos, acceptance)


class Stream:
    """Iterator of TokenEvents; `.output` holds the sequences and stats once it is exhausted."""

    def __init__(self, dec: SpeculativeDecoder, requests: list[Request], max_new: int, spec: SamplingSpec, gens,
                 eos: set[int], acceptance=None):
        self.dec, self.requests, self.max_new, self.spec, self.gens, self.eos = dec, requests, max_new, spec, gens, eos
        self.prompts = [r.prompt for r in requests]
        self.specs = [spec if r.sampling is None else r.sampling for r in requests]  # per request
        self.acceptance = acceptance
        self.stats = GenerationStats(requests=len(requests))
        self.output: GenerationOutput | None = None
        self._sequences: list = [None] * len(requests)
        self._reasons: list = [None] * len(requests)
        self._holds: list = []  # the components this stream's state lives in, once it has prefilled
        self._saved: dict[int, dict] = {}  # id(component) -> this stream's state, while another stream holds it
        self._it = self._run()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        if self._holds:
            self._own(*self._holds)
        try:
            return next(self._it)
        except BaseException:
            self._holds, self._saved = [], {}  # finished or failed: nothing left to resume
            raise

    def _own(self, *components) -> None:
        """Make `components` (target, drafter) hold this stream's state: a half-read stream that holds them now
        keeps its state (captured by reference), and this stream's own, if it was set aside, is put back."""
        held = []
        for c in components:
            try:
                owner = _OWNERS.get(c)
            except TypeError:  # a component that cannot be weakly referenced cannot be shared between streams
                continue
            if owner is not self:
                if owner is not None and owner._holds:
                    owner._saved[id(c)] = capture(c)
                state = self._saved.pop(id(c), None)
                if state is not None:
                    restore(c, state)
                _OWNERS[c] = self
            held.append(c)
        self._holds = held

    # -------------------------------------------------------------------------------------------------------------
    def _sync(self) -> float:
        return sync_time(self.dec.target.device)

    def _probs(self, logits: torch.Tensor, history: list[int], draft: Draft | None,
               argmax_only: bool = True, spec: SamplingSpec | None = None) -> torch.Tensor:
        """p for the root (row 0) and after each draft node: (N + 1, V), under `spec` (the row's; default: the
        stream's). History-dependent processors use each node's own prefix (ALGORITHMS.md §3.1). With a greedy spec
        and `argmax_only`, processed logits are returned (their argmax is all the greedy rule reads)."""
        spec = spec or self.spec
        seen = None
        if spec.uses_history:
            v = logits.shape[-1]
            root = torch.zeros(v, dtype=torch.bool, device=logits.device)
            root[torch.tensor(history, device=logits.device)] = True
            seen = root.repeat(logits.shape[0], 1)
            if draft is not None and len(draft):
                anc = ancestor_mask(draft.parent_list, logits.device).float()  # (N, N)
                onehot = torch.nn.functional.one_hot(draft.tokens.to(logits.device), v).float()  # (N, V)
                seen[1:] |= (anc @ onehot) > 0
        if spec.greedy and argmax_only:
            return spec.processed_logits(logits, seen)
        return spec.probs(logits, seen)

    def _batched_argmax(self, logits: torch.Tensor, rows: list[_Row]) -> list[list[int]] | None:
        """Greedy without history-dependent processors: one argmax and one host transfer for the whole batch."""
        if self.acceptance is not None or not all(r.spec.greedy and not r.spec.uses_history for r in rows):
            return None
        values, top = logits.max(-1)  # a NaN row's max is NaN and a +inf logit is its row's max, so the sum of the
        total = sum(map(sum, values.tolist()))  # maxima (in float64: no overflow) is NaN or +inf when any logit is
        if total != total or total == math.inf:
            check_finite(logits)  # raises NonFiniteLogitsError with the count
        return top.tolist()  # (B, M)

    def _batched_sampling(self, logits: torch.Tensor, drafts: list[Draft], gens,
                          rows: list[_Row]) -> dict[int, tuple[int, int]] | None:
        """Sampling over chains with the lossless rules: one batched call (`mmspec.flat_acceptance`) for every row
        that drafted, with that row's own coins; {row: (accepted, next token)} after one host transfer. Rows that
        drafted nothing sample as target-only decoding does (one multinomial draw), so a request draws the same
        alone and in any batch. None where the per-row walk applies (greedy, trees, history-dependent processors,
        plug-in or relaxed rules)."""
        specs = [r.spec for r in rows]
        if (not self.dec.batched_acceptance or all(s.greedy for s in specs) or any(s.uses_history for s in specs)
                or self.acceptance is not None or self._vector_rule is not None):
            return None
        live = [i for i, d in enumerate(drafts) if len(d)]
        if not live or not all(drafts[i].is_chain for i in live):
            return None
        k = max(len(drafts[i]) for i in live)
        num = [len(drafts[i]) for i in live]
        dev = logits.device
        tokens = torch.zeros(len(live), k, dtype=torch.long, device=dev)
        for j, i in enumerate(live):
            tokens[j, : num[j]] = drafts[i].tokens.to(dev)
        block = logits[live, : k + 1]
        total = block.float().sum()  # NaN / +inf anywhere shows here; read with the tokens, not before
        mine = [specs[i] for i in live]
        p = probs_by_row(mine, block, check=False)  # (L, K + 1, V), each row under its own settings
        greedy = torch.tensor([s.greedy for s in mine], device=dev)
        q = None
        if any(drafts[i].q is not None for i in live):  # a point-mass row is the one-hot proposal of its tokens
            q = torch.zeros(len(live), k, p.shape[-1], device=dev)
            for j, i in enumerate(live):
                d = drafts[i]
                q[j, : num[j]] = d.q.to(dev, torch.float32) if d.q is not None else \
                    torch.nn.functional.one_hot(d.tokens.to(dev), p.shape[-1]).float()
        coins = draw_coins([gens[i] for i in live], num, k, dev)
        n_acc, nxt = accept_chains(tokens, torch.tensor(num, device=dev), p, q, coins, greedy)
        host = torch.cat([n_acc.double(), nxt.double(), total.double().view(1)]).tolist()  # the step's one transfer
        if host[-1] != host[-1] or host[-1] == math.inf:
            check_finite(block)  # raises NonFiniteLogitsError with the count
        m = len(live)
        return {i: (int(host[j]), int(host[m + j])) for j, i in enumerate(live)}

    def _walk(self, kernel, d: Draft, p: torch.Tensor, gen, spec: SamplingSpec) -> Verdict:
        """A per-row tree walk. Sampling over a non-empty draft takes the coins the batched kernel would: N + 1
        uniforms from the row's generator, the uncertain decisions using them in order and the next token the
        last one (inverse CDF), so both paths draw alike. Greedy rows and empty drafts keep their own draws (an
        empty draft samples as target-only decoding does: one multinomial draw)."""
        n = len(d)
        if spec.greedy or n == 0:
            return kernel(d, p, generator=gen)
        coins = torch.rand(n + 1, generator=gen, device=gen.device if gen is not None else p.device)
        decisions = iter(coins[:n].tolist())

        def coin(prob: float) -> bool:  # a plug-in rule asking for more than N decisions draws the rest afresh
            u = next(decisions, None)
            return (float(torch.rand((), generator=gen, device=coins.device)) if u is None else u) < prob

        verdict = kernel(d, p, generator=gen, coin=coin)
        if verdict.next_token is None:
            verdict.next_token = int(draw_from_cdf(verdict.residual, coins[n]))
        return verdict

    @property
    def _vector_rule(self):
        """The acceptance rule of a continuous-token target (vector tokens; its 'logits' are the rule's inputs), or
        None for categorical tokens."""
        rule = self.acceptance
        return rule if getattr(rule, "continuous", False) else None

    def _first_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        rule = self._vector_rule
        if rule is not None:  # one batched draw for every request
            return list(rule.first_rows(logits.reshape(len(rows), -1, logits.shape[-1])[:, -1], self.gens))
        out = []
        for i, row in enumerate(rows):
            p = self._probs(logits[i: i + 1], row.history, None, spec=row.spec)[0]
            out.append(int(p.argmax()) if row.spec.greedy else sample_from(p, self.gens[i]))
        return out

    def _cut(self, row: _Row, tokens: list[int]) -> list[int]:
        """Apply EOS and max_new_tokens to newly committed tokens; sets row.finish."""
        room = self.max_new - len(row.generated)
        kept = []
        for t in tokens[:room]:
            kept.append(t)
            if self.eos and t in self.eos:
                row.finish = "eos"
                return kept
        if len(row.generated) + len(kept) >= self.max_new:
            row.finish = "length"
        return kept

    def _run(self) -> Iterator[TokenEvent]:
        dec, st = self.dec, self.stats
        target, drafter = dec.target, dec.drafter
        f0 = drafter.counters.forwards
        t_start = self._sync()
        rows = [_Row(i, list(p), s) for i, (p, s) in enumerate(zip(self.prompts, self.specs))]
        reserve = static_reserve(self.max_new, drafter, len(self.prompts))
        self._own(target, drafter)
        pre = target.prefill(self.requests, want_hidden=drafter.needs_hidden, reserve=reserve)
        if dec.compile:  # room for the blocks' padding too (a block is at most 1 + the drafter's nodes)
            reserve += bucket(1 + max(getattr(drafter, "max_nodes", 0), getattr(drafter, "max_depth", 0)))
            target.compile_decode(reserve)
        st.target_forwards += 1
        for row, tok in zip(rows, self._first_tokens(pre.logits, rows)):
            row.history.append(tok)
            row.generated.extend(self._cut(row, [tok]))
            st.new_tokens += len(row.generated)
        ctx = DraftContext(self.spec, list(self.gens), [r.history for r in rows], list(self.requests),
                           [r.spec for r in rows], compiled=dec.compile, reserve=reserve,
                           target_cache=getattr(getattr(target, "runner", target), "kv", None))
        drafter.begin(ctx, pre)
        st.time_prefill = self._sync() - t_start
        tm0, dm0, c0 = model_time(target), model_time(drafter), self._compiling()
        for row in rows:
            yield TokenEvent(row.index, list(row.generated), row.finish is not None, row.finish)
        rows = self._drop_finished(rows, ctx)
        while rows:
            events = self._step(rows, ctx)  # in inference mode; the events are yielded outside it, so a streaming
            yield from events  # caller's code never runs in inference mode
            rows = self._drop_finished(rows, ctx)
        st.drafter_forwards = drafter.counters.forwards - f0
        st.time_target_model, st.time_drafter_model = model_time(target) - tm0, model_time(drafter) - dm0
        st.time_compile = self._compiling() - c0
        st.time_total = self._sync() - t_start - st.time_compile
        self.output = GenerationOutput(self._sequences, self._reasons, st)

    def _compiling(self) -> float:
        """Compile seconds of the target and drafter so far (0 without `compile`)."""
        dec = self.dec
        return compile_time(dec.target) + compile_time(dec.drafter) if dec.compile else 0.0

    def _drop_finished(self, rows: list[_Row], ctx: DraftContext) -> list[_Row]:
        for r in rows:
            if r.finish:
                self._sequences[r.index], self._reasons[r.index] = r.generated, r.finish
        keep = [i for i, r in enumerate(rows) if not r.finish]
        if len(keep) < len(rows) and keep:
            self.dec.target.select_rows(keep)
            self.dec.drafter.select_rows(keep)
            ctx.history[:] = [ctx.history[i] for i in keep]
            ctx.generators[:] = [ctx.generators[i] for i in keep]
            ctx.requests[:] = [ctx.requests[i] for i in keep]
            ctx.specs[:] = [ctx.specs[i] for i in keep]
        return [rows[i] for i in keep]

    @inference  # one mode switch per step (the runners' own are then skipped); none under generate(), which keeps
    def _step(self, rows: list[_Row], ctx: DraftContext) -> list[TokenEvent]:  # the mode on for the whole decode
        dec, st = self.dec, self.stats
        budgets = [self.max_new - len(r.generated) - 1 for r in rows]
        c0 = self._compiling()
        t0 = self._sync()
        drafts = dec.drafter.propose(budgets)
        t1, c1 = self._sync(), self._compiling()
        vocab = dec.target.vocab_size
        if len(drafts) != len(rows):
            raise DraftError(f"drafter returned {len(drafts)} draft(s) for {len(rows)} request(s)")
        if not getattr(dec.drafter, "trusted", False):  # built-in drafters draft well-formed and within budgets
            for d, budget in zip(drafts, budgets):
                d.validate(vocab)
                if d.max_depth() > budget:
                    raise DraftError(f"drafter proposed depth {d.max_depth()} with only {budget} token(s) left")
        out = dec.target.verify([r.history[-1] for r in rows], drafts, want_hidden=dec.drafter.needs_hidden)
        t2, c2 = self._sync(), self._compiling()
        st.target_forwards += 1
        paths, updates, events = [], [], []
        top = self._batched_argmax(out.logits, rows)
        flat = self._batched_sampling(out.logits, drafts, ctx.generators, rows)
        rule, verdicts = self._vector_rule, None
        if rule is not None:  # continuous tokens: the rule reads the target's rows as they are, for the whole batch
            verdicts = rule.verify_rows(drafts, [out.logits[i, : len(d) + 1] for i, d in enumerate(drafts)],
                                        ctx.generators)  # at once, and returns the tokens
        for i, (row, d) in enumerate(zip(rows, drafts)):
            n = len(d)
            kernel = select_kernel(row.spec.greedy, d.q is not None, self.acceptance)
            if n:
                st.note_kernel(getattr(kernel, "name", "custom"), getattr(kernel, "lossless", False))
            if verdicts is not None:
                verdict = verdicts[i]
                toks = verdict.tokens + [verdict.next_token]
            elif kernel is accept_greedy and top is not None:
                verdict = greedy_walk(d, top[i][: n + 1])
                toks = [d.token_list[j] for j in verdict.path] + [verdict.next_token]
            elif flat is not None and i in flat:
                accepted, nxt = flat[i]
                verdict = Verdict(list(range(accepted)), d.token_list[:accepted], None, nxt)
                toks = verdict.tokens + [nxt]
            else:
                p = self._probs(out.logits[i, : n + 1], row.history, d, argmax_only=kernel is accept_greedy,
                                spec=row.spec)
                verdict = self._walk(kernel, d, p, ctx.generators[i], row.spec)
                toks = [d.token_list[j] for j in verdict.path] + [verdict.next_token]
            kept = self._cut(row, toks)
            st.record_step(d.depth, len(verdict.path), len(kept), n)
            row.history.extend(kept)
            row.generated.extend(kept)
            paths.append(verdict.path)
            updates.append(RowUpdate(list(verdict.path), kept))
            drift = getattr(verdict, "tv", None)
            events.append(TokenEvent(row.index, kept, row.finish is not None, row.finish,
                                     accepted=min(len(verdict.path), len(kept)),
                                     drift=None if drift is None else list(drift[: len(kept)])))
        dec.target.commit(paths)
        dec.drafter.commit(updates, out)
        t3 = self._sync()
        st.time_draft += t1 - t0 - (c1 - c0)  # compile time is reported apart (stats.time_compile)
        st.time_verify += t2 - t1 - (c2 - c1)
        st.time_accept += t3 - t2
        st.new_tokens += sum(len(e.tokens) for e in events)
        return events
