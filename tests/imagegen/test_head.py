"""ImageHead / ImageHeadDrafter (EAGLE-style feature head for LlamaGen, LANTERN's drafter) and its training.

Tiny fp32 models on the CPU: greedy equality with the plain sampler (batch 1 and 4, guided and not, untrained and
trained head), the drafts against a no-cache recomputation (ragged cache bookkeeping), training raising the mean
accepted length, seeded sampling with valid q rows, checkpoints and typed errors.
"""
from __future__ import annotations

import json

import pytest
import torch

from image_ar.drafters.head import ImageHead, ImageHeadDrafter, is_head_checkpoint
from image_ar.models.llamagen import cfg_logits, generate_tokens
from image_ar.target import LlamaGenTarget
from image_ar.testing import tiny_llamagen
from image_ar.train import main, teacher, train_head
from mmspec.errors import (CheckpointError, DatasetError, IncompatibleModelsError, InvalidInputError,
                           UnsupportedModelError, VocabularyMismatchError)
from mmspec.loop import SpeculativeDecoder

GRID, VOCAB, SCALE = 4, 32, 3.0
LABELS4 = [0, 3, 5, 7]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a shared, loaded CPU two threads are many times
    slower than one (measured); the session's setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return tiny_llamagen(seed=0, vocab_size=VOCAB, grid_size=GRID)


@pytest.fixture(scope="module")
def untrained(target):
    torch.manual_seed(1)
    return ImageHead(target)


@pytest.fixture(scope="module")
def trained(target):
    torch.manual_seed(1)
    head = ImageHead(target)
    hist = train_head(target, head, samples=256, steps=200, lr=3e-3, batch_size=16, guidance_scale=SCALE,
                      w_cls=0.3, seed=0, progress=False)
    assert hist["kl"][-1] < 0.5 * hist["kl"][0] and hist["feature_loss"][-1] < hist["feature_loss"][0]
    return head


class Recording(ImageHeadDrafter):
    """Logs, per propose: (request index, known image tokens) per row and the drafts (with their q)."""

    def __init__(self, head, k=4):
        super().__init__(head, k)
        self.log = []

    def begin(self, ctx, prefill):
        super().begin(ctx, prefill)
        self.active = list(range(len(ctx.history)))

    def select_rows(self, rows):
        super().select_rows(rows)
        self.active = [self.active[r] for r in rows]

    def propose(self, budgets):
        drafts = super().propose(budgets)
        self.log.append(([(i, len(h) - 1) for i, h in zip(self.active, self.ctx.history)], drafts))
        return drafts


def run(model, head, labels, scale=SCALE, k=4, max_new=GRID * GRID, **kw):
    tgt = LlamaGenTarget(model, scale)
    drafter = Recording(head, k)
    out = SpeculativeDecoder(tgt, drafter).generate(tgt.requests(labels), max_new_tokens=max_new, **kw)
    return out, drafter


def test_interleaved_head_streams_with_different_scales_equal_plain_decoding(target, trained):
    """One target and head drafter, two streams read alternately, each with its own guidance scale (it travels in
    the requests): each equals plain decoding at its scale."""
    from interleave import read_alternately

    tgt = LlamaGenTarget(target, SCALE)
    dec = SpeculativeDecoder(tgt, ImageHeadDrafter(trained, 3))
    a = dec.stream(tgt.requests(LABELS4[:2]), max_new_tokens=GRID * GRID)
    b = dec.stream(tgt.requests(LABELS4[2:], guidance_scale=1.0), max_new_tokens=GRID * GRID)
    got_a, got_b = read_alternately(a, b)
    want_a = generate_tokens(target, torch.tensor(LABELS4[:2]), guidance_scale=SCALE, temperature=0).tolist()
    want_b = generate_tokens(target, torch.tensor(LABELS4[2:]), guidance_scale=1.0, temperature=0).tolist()
    assert [got_a[0], got_a[1]] == want_a and [got_b[0], got_b[1]] == want_b
    assert tgt.guidance_scale == SCALE  # the requests' scales never replaced the target's default


# --- losslessness at temperature 0 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["untrained", "trained"])
@pytest.mark.parametrize("scale", [SCALE, 1.0])
@pytest.mark.parametrize("labels", [[2], LABELS4])
def test_greedy_equals_plain_decoding(target, untrained, trained, which, scale, labels):
    head = untrained if which == "untrained" else trained
    ref = generate_tokens(target, torch.tensor(labels), guidance_scale=scale, temperature=0)
    assert len(set(ref.flatten().tolist())) > 4  # a diverse reference: equality is not vacuous
    for k in (1, 3):
        out, _ = run(target, head, labels, scale, k=k, temperature=0)
        assert out.sequences == ref.tolist()
    out, _ = run(target, head, labels, scale, max_new=11, temperature=0)  # drafts cut by the budget
    assert out.sequences == ref[:, :11].tolist()


def test_greedy_equality_t2i():
    model = tiny_llamagen(seed=3, model_type="t2i", vocab_size=VOCAB, grid_size=GRID)
    cfg = model.config
    caps = torch.randn(2, cfg.cls_token_num, cfg.caption_dim, generator=torch.Generator().manual_seed(0))
    ref = generate_tokens(model, caps, guidance_scale=SCALE, temperature=0)
    out, _ = run(model, ImageHead(model), caps, temperature=0)
    assert out.sequences == ref.tolist()


@pytest.mark.parametrize("scale", [SCALE, 1.0])
def test_drafts_equal_no_cache_recomputation(target, trained, scale):
    """Every draft (ragged batch of 4) is what the head gives without a cache: true features for the known tokens
    (teacher-forced target), then its own predictions; checks positions, masks and the cache roll-back."""
    out, drafter = run(target, trained, LABELS4, scale, k=4, temperature=0)
    seqs = torch.tensor(out.sequences)  # (B, N): equal to the plain greedy output (test above)
    b, n_cls = len(LABELS4), target.config.cls_token_num
    with torch.no_grad():
        feats, _ = teacher(target, torch.tensor(LABELS4), seqs, scale)  # (R, N, D)
        checked = 0
        for known, drafts in drafter.log:
            for (r, c), d in zip(known, drafts):
                rows = [r, b + r] if scale != 1.0 else [r]
                toks, fs = seqs[r, :c].tolist(), feats[rows, :c]  # (R', c, D)
                for tok in d.token_list:
                    pos = n_cls + torch.arange(len(toks))
                    g = trained(torch.tensor([toks] * len(rows)), fs, pos)[:, -1]  # (R', D)
                    logits = trained.logits(g)
                    logits = cfg_logits(logits, scale) if scale != 1.0 else logits
                    assert int(logits.argmax(-1)) == tok
                    toks.append(tok)
                    fs = torch.cat([fs, g[:, None]], dim=1)
                    checked += 1
    assert checked > 20


# --- training ---------------------------------------------------------------------------------------------------------
def test_training_raises_mean_accepted_length(target, untrained, trained):
    """Held out: greedy grids of every class and a fresh sampling seed (training used temperature-1 samples)."""
    labels = list(range(10))
    greedy = [run(target, h, labels, temperature=0)[0].stats.tau for h in (untrained, trained)]
    sampled = [run(target, h, labels, temperature=1.0, seed=123)[0].stats.tau for h in (untrained, trained)]
    assert greedy[1] > greedy[0] + 0.3, greedy
    assert sampled[1] > sampled[0] + 0.2, sampled


def test_train_on_given_grids_and_cli(target, tmp_path):
    grids = generate_tokens(target, torch.arange(8), guidance_scale=SCALE, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    head = ImageHead(target)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    hist = train_head(target, head, class_labels=torch.arange(8), tokens=grids, steps=3, batch_size=4,
                      guidance_scale=1.0, progress=False)
    assert len(hist["loss"]) == 3 and all(torch.isfinite(torch.tensor(v)).all() for v in hist.values())
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())  # the target's flags are restored
    assert all(p.grad is None for p in target.parameters())  # and nothing accumulated on it
    target.save_pretrained(tmp_path / "target")
    assert main(["--target", str(tmp_path / "target"), "--out", str(tmp_path / "head"), "--steps", "2",
                 "--samples", "4", "--batch-size", "2", "--seed", "1"]) == 0
    assert is_head_checkpoint(tmp_path / "head")
    ImageHead.from_pretrained(tmp_path / "head", target)


def test_train_bad_inputs(target):
    head = ImageHead(target)
    with pytest.raises(InvalidInputError, match="steps"):
        train_head(target, head, steps=0, progress=False)
    with pytest.raises(InvalidInputError, match="lr"):
        train_head(target, head, steps=1, lr=0.0, progress=False)
    with pytest.raises(DatasetError, match="without their conditions"):
        train_head(target, head, tokens=torch.zeros(2, GRID * GRID, dtype=torch.long), steps=1, progress=False)
    with pytest.raises(DatasetError, match="integer"):
        train_head(target, head, class_labels=[0, 1], tokens=torch.zeros(2, 3, dtype=torch.long), steps=1,
                   progress=False)
    with pytest.raises(DatasetError, match="codebook"):
        train_head(target, head, class_labels=[0, 1], tokens=torch.full((2, GRID * GRID), VOCAB), steps=1,
                   progress=False)
    with pytest.raises(InvalidInputError, match="class label"):
        train_head(target, head, class_labels=[99], steps=1, progress=False)


# --- sampling ---------------------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_q_rows_are_distributions(target, trained):
    kw = dict(temperature=1.0, top_k=8, seed=7)
    out, drafter = run(target, trained, LABELS4, **kw)
    again, _ = run(target, trained, LABELS4, **kw)
    assert out.sequences == again.sequences
    assert all(len(s) == GRID * GRID and all(0 <= t < VOCAB for t in s) for s in out.sequences)
    assert out.stats.accepted_tokens > 0
    n = 0
    for _, drafts in drafter.log:
        for d in drafts:
            if len(d):
                assert d.q.shape == (len(d), VOCAB)
                assert torch.allclose(d.q.sum(-1), torch.ones(len(d)), atol=1e-5)
                assert bool((d.q[torch.arange(len(d)), d.tokens] > 0).all())
                assert int((d.q > 0).sum(-1).max()) <= 8  # top-k warping is in q, as in p
                n += 1
    assert n > 5


# --- checkpoints and errors -------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_drafts(target, trained, tmp_path):
    trained.save_pretrained(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["kind"] == "image_ar.head" and is_head_checkpoint(tmp_path / "h")
    loaded = ImageHead.from_pretrained(tmp_path / "h", target)
    assert "tok_embeddings.weight" not in loaded.state_dict()  # the target's layers are shared, not saved
    a, da = run(target, trained, LABELS4, temperature=1.0, seed=3)
    b, db = run(target, loaded, LABELS4, temperature=1.0, seed=3)
    assert a.sequences == b.sequences
    for (_, x), (_, y) in zip(da.log, db.log):
        assert [d.token_list for d in x] == [d.token_list for d in y]
        assert all(torch.equal(p.q, q.q) for p, q in zip(x, y) if len(p))


def test_checkpoint_errors(target, trained, tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        ImageHead.from_pretrained(tmp_path / "nowhere", target)
    assert not is_head_checkpoint(tmp_path / "nowhere")
    good = trained.save_pretrained(tmp_path / "good")
    other = tiny_llamagen(seed=1, vocab_size=VOCAB + 8, grid_size=GRID)
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        ImageHead.from_pretrained(good, other)
    with pytest.raises(IncompatibleModelsError, match="dim"):
        ImageHead.from_pretrained(good, tiny_llamagen(seed=1, vocab_size=VOCAB, grid_size=GRID, dim=32))
    with pytest.raises(IncompatibleModelsError, match="grid_size"):
        ImageHead.from_pretrained(good, tiny_llamagen(seed=1, vocab_size=VOCAB, grid_size=GRID + 1))
    bad = trained.save_pretrained(tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        ImageHead.from_pretrained(bad, target)
    assert not is_head_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({"kind": "mmspec.llamagen"}))
    with pytest.raises(CheckpointError, match="image_ar.head"):
        ImageHead.from_pretrained(bad, target)
    trained.save_pretrained(bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        ImageHead.from_pretrained(bad, target)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ImageHead.from_pretrained(bad, target)
    deeper = ImageHead(target, n_layer=2).save_pretrained(tmp_path / "deep")
    cfg = json.loads((deeper / "config.json").read_text())
    cfg["config"]["n_layer"] = 1  # weights of 2 blocks, a config of 1
    (deeper / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected"):
        ImageHead.from_pretrained(deeper, target)


def test_bad_inputs(target, untrained):
    with pytest.raises(UnsupportedModelError):
        ImageHead(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidInputError, match="n_layer"):
        ImageHead(target, n_layer=0)
    with pytest.raises(InvalidInputError, match="k="):
        ImageHeadDrafter(untrained, k=0)
    with pytest.raises(InvalidInputError, match="ImageHead"):
        ImageHeadDrafter(target)
    with pytest.raises(UnsupportedModelError, match="LlamaGen target"):
        ImageHeadDrafter(untrained).check_target(object())
    other = tiny_llamagen(seed=1, vocab_size=VOCAB + 8, grid_size=GRID)
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(LlamaGenTarget(other, SCALE), ImageHeadDrafter(untrained))
    with pytest.raises(InvalidInputError, match="features"):
        untrained(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 5), torch.arange(1, 3))


def test_train_head_speaks_the_vlm_trainers_names(target):
    """w_cls / noise as in vision.train.train_eagle; the old ce_weight / feature_noise still work, with a warning."""
    from mmspec.errors import InvalidInputError

    kw = dict(samples=4, steps=2, batch_size=2, guidance_scale=SCALE, seed=0, progress=False)
    torch.manual_seed(2)
    new = train_head(target, ImageHead(target), w_cls=0.5, noise=0.1, **kw)
    torch.manual_seed(2)
    with pytest.warns(FutureWarning) as caught:
        old = train_head(target, ImageHead(target), ce_weight=0.5, feature_noise=0.1, **kw)
    assert sorted(str(w.message).split("=")[0] for w in caught) == ["ce_weight", "feature_noise"]
    assert new["loss"] == old["loss"]
    with pytest.raises(InvalidInputError, match="pass only w_cls="):
        train_head(target, ImageHead(target), w_cls=0.5, ce_weight=0.5, **kw)
