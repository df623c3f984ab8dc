"""The causal-LM target adapter computes logits only where the loop needs them."""
from __future__ import annotations


from mmspec import SpeculativeDecoder
from mmspec.target import CausalLMTarget


def test_prefill_materialises_logits_only_at_last_prompt_tokens(target, drafters):
    seen = []
    handle = target.register_forward_hook(lambda m, a, out: seen.append(tuple(out.logits.shape)))
    try:
        tgt = CausalLMTarget(target)
        prompts = [list(range(3, 53)), list(range(3, 40))]  # 50 and 37 tokens
        ref = [SpeculativeDecoder(target).generate([p], max_new_tokens=4).sequences[0] for p in prompts]
        seen.clear()
        out = SpeculativeDecoder(tgt, drafters["noisy"], tree=3).generate(prompts, max_new_tokens=4)
    finally:
        handle.remove()
    assert out.sequences == ref
    assert seen[0] == (2, 50 - 37 + 1, target.config.vocab_size)  # not (2, 50, V)
    assert all(s[1] <= 4 for s in seen[1:])  # verify blocks: pending + at most 3 nodes
