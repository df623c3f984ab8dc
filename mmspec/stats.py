"""Statistics recorded on every generation (ALGORITHMS.md §7).

tau: tokens committed per verification forward, bonus included; tau_minus_1: accepted draft tokens per step
(ViSpec's convention); alpha[d]: acceptance at depth d given the path reached depth d - 1 and the draft had a node
there; forwards of target and drafter; wall time split into prefill / draft / verify / accept (kernels) / other.

The same counts under vLLM's names, with vLLM's definitions (``vllm/v1/spec_decode/metrics.py``: SpecDecodingStats,
observe_draft and SpecDecodingLogging.log; the scheduler observes a request's step only when it had draft tokens):

- num_drafts: row-steps (one request, one verification forward) whose draft had at least one token;
- num_draft_tokens: draft tokens proposed (tree drafts: every node);
- num_accepted_tokens: draft tokens accepted (counted before an EOS or max_new_tokens cut, as vLLM does);
- num_accepted_tokens_per_pos[i]: drafts whose position (depth) i + 1 was accepted;
  num_draft_tokens_per_pos[i]: draft tokens at position i + 1 (tree drafts: the nodes at that depth);
- mean_acceptance_length = 1 + num_accepted_tokens / num_drafts (the bonus / correction token included);
- draft_acceptance_rate = num_accepted_tokens / num_draft_tokens (a fraction; vLLM's log prints it as a percent);
- acceptance_rate_per_position[i] = num_accepted_tokens_per_pos[i] / num_drafts: the share of drafts whose position
  i + 1 was accepted, unconditional (alpha[i] is conditional on reaching depth i; the rate at i is the product of
  alpha[0..i] for chains of full length).

Relation to tau: tau = committed_tokens / steps counts every row-step, draftless ones included (a drafter that
proposes nothing, the last token of a budget), and the tokens actually kept after an EOS or max_new_tokens cut;
mean_acceptance_length counts only steps with a draft and the tokens accepted before the cut. The two agree when
every step drafted and nothing was cut; tau_minus_1 * steps == num_accepted_tokens always. For tree drafts,
draft_acceptance_rate divides by every node, so it is lower than a chain's at the same mean_acceptance_length.
Undefined ratios (no draft, no draft token) read 0.0. acceptance_length_histogram[n]: the steps that committed n
tokens (n - 1 accepted drafts + the correction or bonus token).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field


def _sum_lists(lists: Iterable[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for xs in lists:
        out += [0] * (len(xs) - len(out))
        for i, x in enumerate(xs):
            out[i] += x
    return out


def vllm_metrics(num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int,
                 num_accepted_tokens_per_pos: Sequence[int], num_draft_tokens_per_pos: Sequence[int] | None = None,
                 undefined: float | None = 0.0) -> dict:
    """vLLM's speculative-decoding metrics from raw counts (definitions in the module docstring), as one dict with
    vLLM's names; benchmarks that count drafts themselves (transformers' assisted generation) use it directly.
    undefined: what a ratio reads without a draft (benchmark rows pass None: JSON null for rows that never drafted)."""
    out = dict(num_drafts=num_drafts, num_draft_tokens=num_draft_tokens, num_accepted_tokens=num_accepted_tokens,
               num_accepted_tokens_per_pos=list(num_accepted_tokens_per_pos),
               mean_acceptance_length=1.0 + num_accepted_tokens / num_drafts if num_drafts else undefined,
               draft_acceptance_rate=num_accepted_tokens / num_draft_tokens if num_draft_tokens else undefined,
               acceptance_rate_per_position=[a / num_drafts if num_drafts else undefined
                                             for a in num_accepted_tokens_per_pos])
    if num_draft_tokens_per_pos is not None:
        out["num_draft_tokens_per_pos"] = list(num_draft_tokens_per_pos)
    return out


def vllm_metrics_of(stats: Iterable["GenerationStats"], undefined: float | None = 0.0) -> dict:
    """vLLM's metrics over several generations (the counts summed first, then the ratios, as vLLM aggregates)."""
    stats = list(stats)
    return vllm_metrics(sum(s.num_drafts for s in stats), sum(s.draft_tokens for s in stats),
                        sum(s.accepted_tokens for s in stats), _sum_lists(s.depth_accepts for s in stats),
                        _sum_lists(s.depth_draft_tokens for s in stats), undefined=undefined)


@dataclass
class GenerationStats:
    requests: int = 0
    new_tokens: int = 0
    steps: int = 0  # row-steps: one per request per verification forward
    target_forwards: int = 0  # batched forwards, prefill included
    drafter_forwards: int = 0
    draft_tokens: int = 0  # nodes proposed, summed over row-steps
    accepted_tokens: int = 0  # draft tokens accepted, summed over row-steps
    committed_tokens: int = 0  # tokens committed by verification steps (accepted + correction/bonus)
    drafted_steps: int = 0  # row-steps whose draft had at least one token (vLLM's num_drafts)
    depth_tries: list[int] = field(default_factory=list)
    depth_accepts: list[int] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_total: float = 0.0  # decode wall time, compile time excluded
    time_compile: float = 0.0  # forwards that compiled (or captured) a shape under `compile` (`mmspec.compile`)
    time_target_model: float = 0.0  # inside the target's forwards during decoding steps (prefill excluded)
    time_drafter_model: float = 0.0  # inside the drafter's forwards during decoding steps
    acceptance: str = ""
    lossless: bool = True
    acceptance_length_histogram: list[int] = field(default_factory=list)
    depth_draft_tokens: list[int] = field(default_factory=list)  # draft tokens (nodes) at each depth, over row-steps

    @property
    def tau(self) -> float:
        return self.committed_tokens / self.steps if self.steps else 0.0

    @property
    def tau_minus_1(self) -> float:
        return self.accepted_tokens / self.steps if self.steps else 0.0

    # --- vLLM's names (module docstring) ----------------------------------------------------------------------------
    @property
    def num_drafts(self) -> int:
        return self.drafted_steps

    @property
    def num_draft_tokens(self) -> int:
        return self.draft_tokens

    @property
    def num_accepted_tokens(self) -> int:
        return self.accepted_tokens

    @property
    def num_accepted_tokens_per_pos(self) -> list[int]:
        return list(self.depth_accepts)

    @property
    def num_draft_tokens_per_pos(self) -> list[int]:
        return list(self.depth_draft_tokens)

    @property
    def mean_acceptance_length(self) -> float:
        return self.vllm_metrics()["mean_acceptance_length"]

    @property
    def draft_acceptance_rate(self) -> float:
        return self.vllm_metrics()["draft_acceptance_rate"]

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return self.vllm_metrics()["acceptance_rate_per_position"]

    def vllm_metrics(self) -> dict:
        """num_drafts, num_draft_tokens, num_accepted_tokens, num_accepted_tokens_per_pos, num_draft_tokens_per_pos,
        mean_acceptance_length, draft_acceptance_rate, acceptance_rate_per_position (vLLM's names)."""
        return vllm_metrics(self.num_drafts, self.draft_tokens, self.accepted_tokens, self.depth_accepts,
                            self.depth_draft_tokens)

    @property
    def alpha(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.depth_accepts, self.depth_tries)]

    @property
    def time_other(self) -> float:
        """Engine overhead: wall time outside prefill, drafting and the verification forward."""
        return max(0.0, self.time_total - self.time_prefill - self.time_draft - self.time_verify)

    @property
    def time_engine(self) -> float:
        """Engine overhead: decoding wall time outside the target's and drafter's model forwards."""
        return max(0.0, self.time_total - self.time_prefill - self.time_target_model - self.time_drafter_model)

    @property
    def overhead_per_step(self) -> float:
        batched_steps = max(self.target_forwards - 1, 1)
        return self.time_engine / batched_steps

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total else 0.0

    def note_kernel(self, name: str, lossless: bool) -> None:
        """Record which acceptance rule verified a non-empty draft ("a+b" when several were used)."""
        if name != self.acceptance:
            names = [n for n in self.acceptance.split("+") if n]
            if name not in names:
                self.acceptance = "+".join(names + [name])
        self.lossless = self.lossless and lossless

    def record_step(self, draft_depths: list[int], accepted_depth: int, committed: int, n_draft: int) -> None:
        """One row-step: depths present in the draft, how deep the accepted path went, tokens committed."""
        self.steps += 1
        self.draft_tokens += n_draft
        self.accepted_tokens += accepted_depth
        self.committed_tokens += committed
        if n_draft:
            self.drafted_steps += 1
        while len(self.acceptance_length_histogram) <= committed:
            self.acceptance_length_histogram.append(0)
        self.acceptance_length_histogram[committed] += 1
        max_depth = max(draft_depths, default=0)
        while len(self.depth_tries) < max_depth:
            self.depth_tries.append(0)
            self.depth_accepts.append(0)
        while len(self.depth_draft_tokens) < max_depth:
            self.depth_draft_tokens.append(0)
        for d in draft_depths:
            self.depth_draft_tokens[d - 1] += 1
        for d in range(1, min(max_depth, accepted_depth + 1) + 1):
            self.depth_tries[d - 1] += 1
            if d <= accepted_depth:
                self.depth_accepts[d - 1] += 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tau=self.tau, tau_minus_1=self.tau_minus_1, alpha=self.alpha, time_other=self.time_other,
                 time_engine=self.time_engine, overhead_per_step=self.overhead_per_step,
                 tokens_per_second=self.tokens_per_second, **self.vllm_metrics())
        return d

    def summary(self) -> str:
        """One line: tokens, rule, tau (tokens per request per verification forward) split into accepted drafts and
        the target's own token, acceptance by depth, forwards and the time split."""
        alpha = " ".join(f"{a:.2f}" for a in self.alpha[:8]) or "-"
        kind = "lossless" if self.lossless else "LOSSY: output distribution differs from the target's"
        return (f"{self.new_tokens} tokens, {self.requests} request(s) | acceptance={self.acceptance or 'none'} ({kind}) | "
                f"tau={self.tau:.2f} tokens per verification step (tau-1={self.tau_minus_1:.2f} of them accepted "
                f"draft tokens, the rest from the target) | acceptance rate by draft depth: {alpha} | "
                f"target fwd={self.target_forwards} drafter fwd={self.drafter_forwards} | "
                f"time {self.time_total * 1e3:.0f} ms (prefill {self.time_prefill * 1e3:.0f}, "
                f"draft {self.time_draft * 1e3:.0f}, verify {self.time_verify * 1e3:.0f}, "
                f"other {self.time_other * 1e3:.0f}; engine overhead {self.overhead_per_step * 1e3:.2f} ms/step)"
                + (f" | compile {self.time_compile:.1f} s (not in the time)" if self.time_compile else ""))
