"""Held-out speed of a drafter: greedy speculative decoding of records' prompts, tau and acceptance per depth."""
from __future__ import annotations

from typing import Sequence

from mmspec.errors import InvalidInputError


def measure_tau(svlm, module, records: Sequence, max_new_tokens: int = 32, batch_size: int = 8) -> dict:
    """Run `svlm` (a SpeculativeVLM) on the records' prompts (messages without the final answer), with `module` (the
    drafter's trainable part) in eval mode meanwhile: {"tau" (committed tokens per verification step), "alpha"
    (acceptance per draft depth), "acceptance" (accepted / drafted), "new_tokens", "requests", "sequences"}. The
    answers are the target's own (lossless), so only the speed statistics depend on the drafter."""
    if not records:
        raise InvalidInputError("measuring tau needs at least one held-out record")
    was_training = module.training
    module.eval()
    committed = steps = accepted = drafted = new = 0
    tries, accepts, sequences = [], [], []
    try:
        for s in range(0, len(records), batch_size):
            rows = records[s:s + batch_size]
            out = svlm.generate(messages=[r.prompt_messages for r in rows],
                                images=[[str(p) for p in r.images] for r in rows], max_new_tokens=max_new_tokens)
            st = out.stats
            committed, steps = committed + st.committed_tokens, steps + st.steps
            accepted, drafted, new = accepted + st.accepted_tokens, drafted + st.draft_tokens, new + st.new_tokens
            tries, accepts = _add(tries, st.depth_tries), _add(accepts, st.depth_accepts)
            sequences.extend(out.sequences)
    finally:
        module.train(was_training)
    return {"tau": committed / steps if steps else 0.0, "alpha": [a / t if t else 0.0 for a, t in zip(accepts, tries)],
            "acceptance": accepted / drafted if drafted else 0.0, "new_tokens": new, "requests": len(records),
            "sequences": sequences}


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
