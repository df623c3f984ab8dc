"""The papers' training pieces: EAGLE-3 taps and unrolled training, ViSpec's ranking loss, DREAM's entropy-selected
intermediate features and attention mass, compressors trained with the head, and loading what training saved."""
from __future__ import annotations

import pytest
import torch

from mmspec.errors import InvalidInputError
from mmspec.testing import tiny_llama
from vision import SpeculativeVLM
from vision.compressors import build_compressor
from vision.drafters import DreamDrafter, DreamHead, EagleDrafter, EagleHead, feature_drafter_kind, \
    load_feature_drafter
from vision.train import make_example, train_eagle
from vision.train.eagle_trainer import unrolled
from vision.train.features import collate, compress_pairs, example_pairs
from vision.train.losses import rank_loss
from vlm_cases import MAX_NEW


@pytest.fixture(scope="module")
def learnable_small(tmp_path_factory):
    """The learnable tiny LLaVA and 12 self-distilled records (enough to exercise training, not to learn)."""
    from learnable_cases import learnable_llava, word_prompts
    from vision.testing import test_image
    from vision.train import self_distill

    t = learnable_llava()
    records = self_distill(t.model, t.processor, [test_image(200 + i) for i in range(12)], word_prompts(12, 5),
                           tmp_path_factory.mktemp("d"), max_new_tokens=10, batch_size=12, progress=False)
    return t, records


def _eager(model, req):
    ids = torch.tensor([req.input_ids])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return ids, model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                              output_hidden_states=True, **req.inputs)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("head_cls", [EagleHead, DreamHead])
def test_unrolled_pass_equals_drafting_its_own_chain(head_cls):
    """Pass s at index t = the head drafting s steps from the true context t - s, recomputed naively."""
    target = tiny_llama(seed=0)
    torch.manual_seed(0)
    head = head_cls(target).eval()
    if head_cls is DreamHead:
        with torch.no_grad():
            head.body.layers[1].attn_gate.fill_(0.5)
    b, n = 2, 8
    ids, feats = torch.randint(0, 96, (b, n)), torch.randn(b, n, head.config.hidden_size)
    with torch.no_grad():
        passes = [(o.hidden_states[0], w) for o, w in unrolled(head, ids, feats, torch.ones(b, n), 3)]
        for s in (1, 2):
            assert torch.equal(passes[s][1][0], (torch.arange(n) >= s).float())  # no context before t = s
            for t in range(s, n):
                f = feats[:, : t - s + 1]
                h = head(ids[:, : t - s + 1], f, use_cache=False).hidden_states[0][:, -1:]
                for i in range(1, s + 1):
                    f = torch.cat([f, h], 1)
                    h = head(ids[:, : t - s + 1 + i], f, use_cache=False).hidden_states[0][:, -1:]
                torch.testing.assert_close(passes[s][0][:, t], h[:, 0], atol=1e-5, rtol=0)


def test_rank_loss_rewards_the_targets_order():
    ids = torch.tensor([[[0, 1, 2]]])
    target = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    right = torch.tensor([[[3.0, 2.0, 1.0, -5.0]]])
    wrong = torch.tensor([[[1.0, 2.0, 3.0, -5.0]]])
    assert rank_loss(right, ids, target) < rank_loss(wrong, ids, target)
    expected = torch.nn.functional.softplus(-torch.tensor([1.0, 2.0, 1.0])).mean()  # pairs (0,1), (0,2), (1,2)
    torch.testing.assert_close(rank_loss(right, ids, target)[0, 0], expected)
    tied = torch.log(torch.tensor([[[0.4, 0.4, 0.2]]]))  # tied tokens make no pair
    torch.testing.assert_close(rank_loss(right, ids, tied)[0, 0], torch.nn.functional.softplus(-torch.tensor(
        [2.0, 1.0])).mean())


def test_dream_examples_hold_the_entropy_selected_features_and_attention(learnable_small):
    t, records = learnable_small
    from vision.train.features import encode

    ex = make_example(t.model, t.processor, records[0], topk=4, mid_features=True)
    req, start = encode(t.processor, records[0])
    ids, ref = _eager(t.model, req)
    n_layers = len(t.model.model.language_model.layers)
    early = max(1, -(-4 * n_layers // 10))  # ceil(0.4 L)
    att = ref.attentions[-n_layers:]
    entropy = torch.stack([-(a * a.clamp_min(1e-30).log()).sum(-1).mean(1)[0] for a in att[:early]])  # (l, T)
    best = entropy.argmin(0)
    want = torch.stack([ref.hidden_states[int(l)][0, i] for i, l in enumerate(best)])
    torch.testing.assert_close(ex.mid_features, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ex.attention, att[-1][0, :, start - 1].sum(0), atol=1e-5, rtol=1e-4)
    taps = make_example(t.model, t.processor, records[0], topk=4, taps=(1, -1))
    torch.testing.assert_close(taps.features, torch.cat([ref.hidden_states[1], ref.hidden_states[-1]], -1)[0],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(taps.regression_target, ref.hidden_states[-1][0], atol=1e-5, rtol=0)


def test_compressed_training_view_is_the_drafters_view(learnable_small):
    """compress_pairs builds the pairs the drafter reads at inference; compressed slots carry no target."""
    t, records = learnable_small
    h = t.model.config.text_config.hidden_size
    torch.manual_seed(0)
    comp = build_compressor({"type": "vispec", "dim": h, "n_queries": 4, "heads": 4})
    with torch.no_grad():
        comp.gate.fill_(0.5)
    head = EagleHead(t.model, compressor=comp)
    drafter = EagleDrafter(head, 3)
    drafter.image_token_id = t.model.config.image_token_id
    ex = make_example(t.model, t.processor, records[1], topk=4)
    pairs = example_pairs(ex, 0.1)
    with torch.no_grad():
        view = compress_pairs(pairs, comp, drafter.image_token_id)
        tokens, feats, _ = drafter._view(pairs["input_ids"].tolist(), pairs["features"], pairs["attention"])
    assert view["input_ids"].tolist() == tokens
    torch.testing.assert_close(view["features"], feats)
    image = view["input_ids"] == drafter.image_token_id
    assert int(image.sum()) == 4 and torch.all(view["weights"][image] == 0) and torch.all(view["weights"][~image] > 0)
    text = pairs["input_ids"] != drafter.image_token_id
    torch.testing.assert_close(view["target_features"][~image], pairs["target_features"][text])


def test_dream_with_a_trained_compressor_and_unrolling_saves_and_loads(learnable_small, tmp_path):
    t, records = learnable_small
    h = t.model.config.text_config.hidden_size
    torch.manual_seed(0)
    head = DreamHead(t.model, compressor=build_compressor({"type": "resampler", "dim": h, "n_queries": 4,
                                                         "heads": 4}))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    report = train_eagle(head, t.model, t.processor, records, steps=4, lr=1e-3, batch_size=2, unroll=2,
                         out_dir=tmp_path / "dream", progress=False)
    assert len(report["losses"]) == 4 and all(v == v for v in report["losses"])
    moved = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("compressor.") for k in moved)  # the compressor trains with the head
    assert any(k.endswith("attn_gate") for k in moved)  # DREAM's cross-attention gate left its zero init
    assert feature_drafter_kind(tmp_path / "dream") == "mmspec.dream"
    drafter = load_feature_drafter(tmp_path / "dream", t.model, tree=3)
    assert isinstance(drafter, DreamDrafter) and drafter.compressor is not None
    row = {"prompt": "describe the image", "images": [records[0].images[0]]}
    out = SpeculativeVLM(t.model, t.processor, drafter).generate(**row, max_new_tokens=MAX_NEW)
    plain = SpeculativeVLM(t.model, t.processor, None).generate(**row, max_new_tokens=MAX_NEW)
    assert out.token_ids == plain.token_ids
    assert drafter.prompt_slots[0] < len(plain.token_ids) + 200  # sanity: a prompt was fed
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        f = torch.randn(1, 3, h)
        torch.testing.assert_close(drafter.head(ids, f).logits, head(ids, f).logits)


def test_bad_training_arguments(learnable_small):
    t, records = learnable_small
    with pytest.raises(InvalidInputError, match="unroll="):
        train_eagle(EagleHead(t.model), t.model, t.processor, records, steps=1, unroll=0, progress=False)
    with pytest.raises(InvalidInputError, match="DreamHead"):
        train_eagle(EagleHead(t.model), t.model, t.processor, records, steps=1, loss="dream", progress=False)
    batch = collate([make_example(t.model, t.processor, records[0])])
    from vision.train.losses import drafter_loss

    with pytest.raises(InvalidInputError, match="mid_features"):
        drafter_loss(batch.target_features, torch.zeros(*batch.input_ids.shape, 8), batch, "dream")


def test_pipeline_from_pretrained_loads_a_trained_head(learnable_small, tmp_path):
    """A trained head directory is a drafter path like any other (SpeculativeVLM.from_pretrained, mmspec chat)."""
    t, records = learnable_small
    t.model.save_pretrained(tmp_path / "target")
    t.processor.save_pretrained(tmp_path / "target")
    torch.manual_seed(0)
    EagleHead(t.model, taps=(1, -1)).save_pretrained(tmp_path / "eagle3")
    svlm = SpeculativeVLM.from_pretrained(str(tmp_path / "target"), drafter=str(tmp_path / "eagle3"), tree=3)
    assert isinstance(svlm.drafter, EagleDrafter) and svlm.drafter.head.taps == (1, -1)
    row = {"prompt": "describe the image", "images": [records[0].images[0]]}
    plain = SpeculativeVLM(t.model, t.processor, None).generate(**row, max_new_tokens=MAX_NEW)
    assert svlm.generate(**row, max_new_tokens=MAX_NEW).token_ids == plain.token_ids


def test_accelerate_single_process_equals_the_plain_loop(learnable_small):
    t, records = learnable_small
    weights = []
    for accelerate in (False, True):
        torch.manual_seed(0)
        head = EagleHead(t.model)
        train_eagle(head, t.model, t.processor, records, steps=3, lr=1e-3, batch_size=2, accelerate=accelerate,
                    progress=False, mode="online")
        weights.append({k: v.clone() for k, v in head.state_dict().items() if not k.startswith("body.embed")})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
