"""The core every feature drafter shares (EAGLE, Li et al. 2024; vision's EAGLE / EAGLE-3 / DREAM / ViSpec drafters and
image_ar's LlamaGen head).

A feature drafter feeds pairs (x_{t+1}, f_t): each token with the target's feature of the position before it. The
pairs of the tokens a row commits come from the verification forward: the pending token's feature for the first
committed token, then each accepted node's (`committed_features`). They wait, per row, until the next proposal
feeds them as one right-padded block (`padded_features`) through the drafter's model, with the features passed as
an argument of that forward (`CausalLMRunner.forward_block(inputs=...)`); drafted nodes then read their parent's
*predicted* feature. Drafted slots are dropped after verification; only pairs with true features stay cached.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..state import take_rows
from .base import RowUpdate


def committed_features(update: RowUpdate, hidden: torch.Tensor) -> torch.Tensor:
    """The target's feature before each token a row committed this step: (len(update.tokens), H) from the verify
    block's features hidden (M, H) = [pending, draft nodes...]."""
    prev = [0] + [1 + n for n in update.path]
    return hidden[prev[: len(update.tokens)]]


def padded_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row features (n_b, H) -> (B, max n_b, H), zero-padded on the right (pads are never kept)."""
    first = features[0]
    out = first.new_zeros(len(features), max(f.shape[0] for f in features), first.shape[-1])
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return out


def padded_tokens(tokens: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Per-row token lists -> (B, max n_b) long, right-padded with 0."""
    m = max(len(t) for t in tokens)
    return torch.tensor([list(t) + [0] * (m - len(t)) for t in tokens], dtype=torch.long, device=device)


class PendingPairs:
    """Per row, the pairs (token, the target's feature before it) a feature drafter has not fed yet.

    `begin` seeds them from the prompt, `append_committed` adds each step's committed tokens with their features
    from the verification, `take` hands them over for one feed (and empties them), `select_rows` drops finished
    rows. Features are (n, H) tensors per row; tokens lists of ids.
    """

    def __init__(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]):
        self.tokens = [list(t) for t in tokens]
        self.features = list(features)

    def counts(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def append_committed(self, updates: Sequence[RowUpdate], hidden: torch.Tensor, transform=None) -> None:
        """Add each row's committed tokens with the verification's features before them (`committed_features`);
        transform(b, features) maps them into the drafter's space first (EAGLE-3 taps, ViSpec's fusion)."""
        for b, up in enumerate(updates):
            feats = committed_features(up, hidden[b])
            if transform is not None:
                feats = transform(b, feats)
            self.tokens[b] = self.tokens[b] + list(up.tokens)
            self.features[b] = torch.cat([self.features[b], feats.to(self.features[b].dtype)])

    def take(self, device=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(tokens (B, M), features (B, M, H), counts): every row's pairs right-padded; the rows are emptied."""
        n = self.counts()
        tokens, feats = padded_tokens(self.tokens, device), padded_features(self.features)
        self.clear()
        return tokens, (feats if device is None else feats.to(device)), n

    def clear(self) -> None:
        self.tokens = [[] for _ in self.tokens]
        self.features = [f[:0] for f in self.features]

    def select_rows(self, rows: Sequence[int]) -> None:
        take_rows(self, rows, "tokens", "features")
