"""Choosing an EAGLE-3 head's draft vocabulary from token frequencies in the training data (Li et al. 2025: the
head predicts over the N most frequent tokens only; `vision.drafters.eagle3` maps them back with d2t / t2d).

A token counts each time it is one the drafter will have to propose: an answer token of a training conversation,
or the target's own greedy next token at an answer position (they differ where the data was not distilled from
this target). Ties go to the lower id; when the data holds fewer than N distinct tokens, the rest of the vocabulary
is the lowest ids not yet chosen (they cost a row of lm_head each and are otherwise never proposed)."""
from __future__ import annotations

from typing import Sequence

import torch

from mmspec.errors import InvalidInputError


def token_counts(examples: Sequence, vocab: int, progress: bool = False) -> torch.Tensor:
    """(vocab,) int64 counts over the examples' answers (`features.Example`: input_ids, topk_ids, answer_start)."""
    from tqdm.auto import tqdm

    counts = torch.zeros(vocab, dtype=torch.long)
    for i in tqdm(range(len(examples)), desc="draft vocabulary", disable=not progress):
        ex = examples[i]
        start = max(int(ex.answer_start), 1)
        ids = torch.cat([ex.input_ids[start:].long(), ex.topk_ids[start - 1:, 0].long()])
        counts += torch.bincount(ids[(ids >= 0) & (ids < vocab)], minlength=vocab)
    return counts


def choose_draft_vocab(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent ids (ties: lower id first), ascending."""
    vocab = counts.numel()
    if not isinstance(size, int) or not 0 < size <= vocab:
        raise InvalidInputError(f"draft vocabulary size {size!r}: must be an integer in [1, {vocab}] (the target's "
                                "vocabulary)")
    order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(sorted(order[:size]), dtype=torch.long)


def coverage(counts: torch.Tensor, draft_ids: torch.Tensor) -> float:
    """Share of the counted tokens inside the draft vocabulary (an upper bound on what the head can propose)."""
    total = int(counts.sum())
    return float(counts[draft_ids].sum()) / total if total else 0.0
