"""EAGLE-3 heads with a reduced draft vocabulary (`vision.drafters.Eagle3Head`, `vision.train.draft_vocab`):
training chooses the vocabulary from the data's token frequencies and raises held-out tau on a learnable tiny
VLM; d2t / t2d follow the shared convention; the drafter is lossless with images (chains, trees, batch and alone)
and under sampling (chi-square on a text LM whose draft vocabulary misses half the target's); checkpoints
round-trip and bad ones are typed errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmspec import SpeculativeDecoder
from mmspec.errors import CheckpointError, IncompatibleModelsError, InvalidInputError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_llama
from mmspec.tree import DynamicTree, StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs
from vision import SpeculativeVLM
from vision.drafters import Eagle3Head, EagleDrafter, load_feature_drafter
from vision.drafters.eagle3 import vocab_maps
from vision.train import evaluate_tau, train_eagle
from vision.train.draft_vocab import choose_draft_vocab
from learnable_cases import learnable_data
from test_dflash import reference
from vlm_cases import MAX_NEW

DRAFT_VOCAB = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(target, held-out records, untrained tau, trained head, trained tau, train report)."""
    t, train, held = learnable_data(tmp_path_factory.mktemp("learnable"))
    torch.manual_seed(0)
    head = Eagle3Head(t.model, taps=(0, 1, 2), draft_vocab=DRAFT_VOCAB)
    before = evaluate_tau(head, t.model, t.processor, held, tree=4, max_new_tokens=24, batch_size=16)
    report = train_eagle(head, t.model, t.processor, train, steps=300, lr=1e-2, batch_size=4, unroll=2,
                         progress=False)
    after = evaluate_tau(head, t.model, t.processor, held, tree=4, max_new_tokens=24, batch_size=16)
    return t, held, before, head, after, report


def test_vocab_maps_follow_the_shared_convention():
    d2t, t2d = vocab_maps(torch.tensor([0, 3, 4, 9]), 12)
    assert d2t.dtype == torch.int64 and (torch.arange(4) + d2t).tolist() == [0, 3, 4, 9]
    assert t2d.dtype == torch.bool and t2d.nonzero().flatten().tolist() == [0, 3, 4, 9]
    counts = torch.tensor([5, 0, 7, 7, 1, 0])
    assert choose_draft_vocab(counts, 3).tolist() == [0, 2, 3]  # most frequent, ascending
    with pytest.raises(InvalidInputError, match="ascending"):
        vocab_maps(torch.tensor([3, 1]), 12)
    with pytest.raises(InvalidInputError, match=r"\[0, 12\)"):
        vocab_maps(torch.tensor([1, 12]), 12)
    with pytest.raises(InvalidInputError, match="draft vocabulary size"):
        choose_draft_vocab(counts, 7)


def test_training_chooses_the_vocabulary_and_raises_held_out_tau(trained):
    t, _, before, head, after, report = trained
    numbers = (f"held-out tau {before['tau']:.3f} untrained -> {after['tau']:.3f} trained (alpha {after['alpha']}), "
               f"loss {report['losses'][0]:.3f} -> {report['loss']:.3f}, slot-1 agreement {report['acceptance']:.3f}, "
               f"draft vocabulary {head.draft_vocab_size} of {head.target_vocab} covering "
               f"{report['draft_vocab_coverage']:.3f} of the answer tokens")
    print(numbers)
    assert head.vocab_chosen and report["draft_vocab_coverage"] > 0.98, numbers  # the answers use few words
    assert before["tau"] < 1.1 and after["tau"] >= 1.5, numbers
    ids = torch.tensor([[5, 9, 11]])
    logits = head(ids, torch.randn(1, 3, 3 * head.config.hidden_size)).logits
    assert logits.shape[-1] == head.target_vocab
    assert torch.isneginf(logits[..., ~head.t2d]).all() and torch.isfinite(logits[..., head.t2d]).all()


@pytest.mark.parametrize("tree", [3, StaticTree.full((2, 2, 1)), DynamicTree(topk=3, depth=3, total=8)],
                         ids=["chain3", "tree221", "dynamic"])
def test_trained_head_is_lossless_with_images(trained, tree):
    t, held, _, head, _, _ = trained
    records = held[:4]
    expected = [reference(t, r, MAX_NEW) for r in records]
    svlm = SpeculativeVLM(t.model, t.processor, EagleDrafter(head, tree))
    out = svlm.generate(messages=[r.prompt_messages for r in records],
                        images=[[str(p) for p in r.images] for r in records], max_new_tokens=MAX_NEW)
    assert out.sequences == expected and out.stats.accepted_tokens > 0
    alone = svlm.generate(messages=records[1].prompt_messages, images=[str(p) for p in records[1].images],
                          max_new_tokens=MAX_NEW)
    assert alone.token_ids == expected[1]


def test_sampling_with_half_the_vocabulary_matches_the_exact_distribution():
    """Tokens outside the draft vocabulary have q = 0: they can only come from the residual, which must still give
    the target's distribution."""
    model = tiny_llama()
    vocab = model.get_output_embeddings().weight.shape[0]
    torch.manual_seed(3)
    head = Eagle3Head(model, taps=(0, 1, 2), draft_vocab=torch.arange(0, vocab, 2))
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 3, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    joint = exact_joint(model, prompt, spec, length)
    dec = SpeculativeDecoder(model, EagleDrafter(head, 2))
    samples, accepted, drafted = sampled_runs(dec, prompt, length, 1200, temperature=1.0, top_k=4, top_p=0.9)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    assert 0 < accepted < drafted  # both the accept and the residual paths ran
    assert any(t % 2 for s in samples for t in s)  # odd ids, outside the draft vocabulary, were generated


def test_checkpoints_round_trip_and_bad_ones_are_typed(trained, tmp_path):
    t, held, _, head, _, _ = trained
    head.save_pretrained(tmp_path / "head")
    loaded = load_feature_drafter(tmp_path / "head", t.model, tree=3)
    assert isinstance(loaded.head, Eagle3Head) and torch.equal(loaded.head.d2t, head.d2t)
    assert all(torch.equal(a, b) for a, b in zip(loaded.head.state_dict().values(), head.state_dict().values()))
    with pytest.raises(IncompatibleModelsError, match="another target"):
        Eagle3Head.from_pretrained(tmp_path / "head", tiny_llama())
    weights = load_file(str(tmp_path / "head" / "model.safetensors"))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text((tmp_path / "head" / "config.json").read_text())
    save_file({**weights, "d2t": torch.zeros(head.target_vocab + 1, dtype=torch.long)},
              str(tmp_path / "big" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="more than the target"):
        Eagle3Head.from_pretrained(tmp_path / "big", t.model)
    save_file({k: v for k, v in weights.items() if k != "fc.weight"}, str(tmp_path / "big" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="fc.weight"):
        Eagle3Head.from_pretrained(tmp_path / "big", t.model)


def test_training_examples_of_a_qwen_vl_target_carry_its_mrope_positions(tmp_path):
    """An M-RoPE head trains at the target's positions: each example records them (T, 3), 3-D over the image and
    text continuing after it at the image's largest position + 1, and batches carry them per pair."""
    from vision.testing import test_image, tiny_vlm
    from vision.train import self_distill
    from vision.train.features import collate, make_example

    t = tiny_vlm("qwen2_vl")
    rec = self_distill(t.model, t.processor, [test_image(7, t.image_size)], "describe the image", tmp_path,
                       max_new_tokens=4, progress=False)[0]
    ex = make_example(t.model, t.processor, rec, positions=True)
    pos, ids = ex.positions, ex.input_ids
    image = ids == t.model.config.image_token_id
    assert pos.shape == (len(ids), 3) and not torch.equal(pos[image, 1], pos[image, 2])
    last = int(image.nonzero().max())
    assert int(pos[last + 1, 0]) == int(pos[: last + 1].max()) + 1 and (pos[last + 1:, 0] == pos[last + 1:, 1]).all()
    batch = collate([ex, ex])
    assert batch.positions.shape == (2, len(ids) - 1, 3) and torch.equal(batch.positions[0], pos[:-1])
    assert make_example(t.model, t.processor, rec).positions is None  # only when asked
    for unroll in (1, 2):  # teacher forcing builds its own causal mask from the slot order, not the positions
        report = train_eagle(Eagle3Head(t.model, taps=(0, 1, 2)), t.model, t.processor, [rec], steps=2,
                             unroll=unroll, progress=False)
        assert torch.isfinite(torch.tensor(report["losses"])).all()
