"""mmspec.guidance: the [cond; uncond] rows of classifier-free guidance, used by every guided target and drafter."""
from __future__ import annotations

import torch

from mmspec.guidance import both_halves, combine_logits, double_rows, is_guided, pair_halves, per_row, split_halves


def test_rows_halves_and_the_guided_combination():
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(double_rows(x, 4.0), torch.cat([x, x])) and double_rows(x, 1.0) is x
    assert both_halves([2, 0], 3, 4.0) == [2, 0, 5, 3] and both_halves([2, 0], 3, 1.0) == [2, 0]
    assert per_row([[0, 1], []], 2.5) == [[0, 1], [], [0, 1], []] and per_row([[0]], 1.0) == [[0]]
    assert is_guided(0.0) and not is_guided(1.0)
    c, u = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    torch.testing.assert_close(combine_logits(torch.cat([c, u]), 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(combine_logits(torch.cat([c, u]), 1.0), c)  # scale 1 is the conditional model
    paired = pair_halves(torch.cat([c, u]), 4.0)
    assert paired.shape == (3, 5, 14) and torch.equal(paired[..., :7], c) and torch.equal(paired[..., 7:], u)
    assert torch.equal(split_halves(paired, 4.0), torch.cat([c, u])) and pair_halves(c, 1.0) is c
