"""The engine's second storage backend (BufferCache + RaggedRows), its checkpoint writer and the shared EAGLE loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmspec.cache import BufferCache, RaggedRows
from mmspec.checkpoint import checkpoint_kind, read_kind_config, read_safetensors, write_checkpoint
from mmspec.eagle_loss import eagle_loss, full_distribution
from mmspec.errors import CheckpointError, InvalidInputError


def _filled(rows: int, slots: int) -> BufferCache:
    """A one-layer cache whose slot s of row r holds the value 100 r + s (keys) and -(100 r + s) (values)."""
    cache = BufferCache(1, capacity=2)
    k = (100 * torch.arange(rows)[:, None] + torch.arange(slots)[None]).float()[:, None, :, None]  # (R, 1, S, 1)
    cache.update(0, k, -k)
    cache.advance(slots)
    return cache


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_ragged_rows_keep_moves_each_request_slots_after_its_committed_ones(scale):
    b = 3
    r = 2 * b if scale != 1.0 else b
    cache = _filled(r, 9)  # committed lengths 4, 6, 5; a block of 3 appended at slot 6
    lengths = [4, 6, 5]
    cache.crop(6)
    block = (100 * torch.arange(r)[:, None] + 50 + torch.arange(3)[None]).float()[:, None, :, None]
    cache.update(0, block, -block)
    cache.advance(3)
    rows = RaggedRows(cache, lengths, scale)
    before = cache.keys[0][:, 0, :, 0].clone()
    keep = [[0, 2], [], [1]]
    rows.keep(keep, 6)
    assert rows.lengths == [6, 6, 6]
    for req, ks in enumerate(keep):
        for row in ([req, req + b] if scale != 1.0 else [req]):  # both halves of a guided request move alike
            want = [before[row, s].item() for s in list(range(lengths[req])) + [6 + j for j in ks]]
            got = cache.keys[0][row, 0, : rows.lengths[req], 0].tolist()
            assert got == want and (cache.values[0][row, 0, : rows.lengths[req], 0] == -torch.tensor(want)).all()
    seen = rows.committed("cpu")
    assert seen.shape == (r, cache.length) and seen.all()
    full = rows.select_rows([2, 0])
    assert full == ([2, 0, 5, 3] if scale != 1.0 else [2, 0]) and rows.lengths == [6, 6]
    rows.rollback([4, 5])
    assert cache.length == 5 and rows.committed("cpu").sum(1).tolist() == ([4, 5] * (2 if scale != 1.0 else 1))
    with pytest.raises(InvalidInputError, match="past the committed"):
        rows.rollback([6, 1])


def test_write_checkpoint_round_trip_and_kind(tmp_path):
    tensors = {"w": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2)}  # a non-contiguous tensor too
    out = write_checkpoint(tmp_path / "c", "demo.kind", {"size": 3}, tensors)
    assert checkpoint_kind(out) == "demo.kind" and read_kind_config(out / "config.json", "demo.kind", "X")["size"] == 3
    back = read_safetensors(out / "model.safetensors")
    assert set(back) == {"w", "b"} and torch.equal(back["w"], tensors["w"])
    assert checkpoint_kind(tmp_path) is None and checkpoint_kind(tmp_path / "missing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert checkpoint_kind(tmp_path / "bad") is None
    with pytest.raises(CheckpointError, match="not a other.kind config"):
        read_kind_config(out / "config.json", "other.kind", "X")


def test_eagle_loss_on_a_whole_distribution_is_the_kl_up_to_the_targets_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    p = torch.softmax(torch.randn(2, 5, 11, generator=g) * 2, -1)
    p[0, 0] = torch.nn.functional.one_hot(torch.tensor(3), 11).float()  # zero entries in p
    feats, target = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids, logp = full_distribution(p)
    loss, reg, ce = eagle_loss(feats, target, logits, ids, logp, w_cls=0.3)
    kl = F.kl_div(logits.log_softmax(-1).flatten(0, 1), p.flatten(0, 1), reduction="batchmean")
    entropy = -(p * logp).sum(-1).mean()
    torch.testing.assert_close(ce - entropy, kl)
    torch.testing.assert_close(reg, F.smooth_l1_loss(feats, target))
    torch.testing.assert_close(loss, reg + 0.3 * ce)
    w = torch.zeros(2, 5)
    w[1, 2] = 1.0  # one weighted position: the loss is that position's
    _, reg1, ce1 = eagle_loss(feats, target, logits, ids, logp, weights=w)
    torch.testing.assert_close(reg1, F.smooth_l1_loss(feats[1, 2], target[1, 2]))
    torch.testing.assert_close(ce1, -(p[1, 2] * logits[1, 2].log_softmax(-1)).sum())
