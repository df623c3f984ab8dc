"""DFlash block drafting (`vision.drafters.DFlashHead` / `DFlashDrafter`, `vision.train.train_dflash`): training on a
learnable tiny VLM raises held-out tau; the trained drafter is lossless with images (chains and static trees, batch
4 of different images and lengths, and alone); a chi-square test of sampling on a text LM and on a hybrid Qwen3.5;
checkpoints round-trip and are refused for another target; transformers' own DFlash path runs the same weights;
bad settings are typed errors."""
from __future__ import annotations

import pytest
import torch

from mmspec import SpeculativeDecoder
from mmspec.errors import DraftError, IncompatibleModelsError
from mmspec.sampling import SamplingSpec
from mmspec.testing import tiny_llama, tiny_qwen3_5
from mmspec.tree import DynamicTree, StaticTree
from stats_tools import chi_square, exact_joint, sampled_runs
from vision import SpeculativeVLM
from vision.drafters import DFlashDrafter, DFlashHead, load_feature_drafter
from vision.drafters.dflash import default_taps
from vision.prompts import build_request
from vision.train import evaluate_dflash, fit_dflash, lm_example, train_dflash
from learnable_cases import learnable_data
from vlm_cases import MAX_NEW, family, hf_reference, image

PROMPTS = [[5, 9, 3, 7, 1, 2, 44, 12], [8, 8, 4], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(target, held-out records, untrained tau report, trained head, trained tau report, train report)."""
    t, train, held = learnable_data(tmp_path_factory.mktemp("learnable"))
    torch.manual_seed(0)
    head = DFlashHead(t.model, block_size=5)
    before = evaluate_dflash(head, t.model, t.processor, held, max_new_tokens=24, batch_size=16)
    report = train_dflash(head, t.model, t.processor, train, steps=300, lr=1e-2, batch_size=4, progress=False)
    after = evaluate_dflash(head, t.model, t.processor, held, max_new_tokens=24, batch_size=16)
    return t, held, before, head, after, report


def reference(t, record, max_new: int) -> list[int]:
    """transformers' greedy generate on a record's prompt and images."""
    req, _, _ = build_request(t.processor, messages=record.prompt_messages, images=[str(p) for p in record.images])
    ids = torch.tensor([req.input_ids])
    out = t.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **req.inputs, max_new_tokens=max_new,
                           do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_training_raises_held_out_tau(trained):
    _, _, before, _, after, report = trained
    numbers = (f"held-out tau {before['tau']:.3f} untrained -> {after['tau']:.3f} trained (alpha {after['alpha']}), "
               f"loss {report['losses'][0]:.3f} -> {report['loss']:.3f}, slot-1 agreement {report['acceptance']:.3f}")
    print(numbers)
    assert before["tau"] < 1.1, numbers
    assert after["tau"] >= 1.3 and after["tau"] - before["tau"] >= 0.25, numbers
    assert report["loss"] < report["losses"][0] / 2 and report["acceptance"] > 0.3, numbers


@pytest.mark.parametrize("tree", [None, 2, StaticTree.full((2, 2, 1))], ids=["block", "chain2", "tree221"])
def test_trained_drafter_is_lossless_with_images(trained, tree):
    t, held, _, head, _, _ = trained
    records = held[:4]  # different images, prompts and lengths
    expected = [reference(t, r, MAX_NEW) for r in records]
    svlm = SpeculativeVLM(t.model, t.processor, DFlashDrafter(head, tree))
    out = svlm.generate(messages=[r.prompt_messages for r in records],
                        images=[[str(p) for p in r.images] for r in records], max_new_tokens=MAX_NEW)
    assert out.sequences == expected
    assert out.stats.accepted_tokens > 0  # the accept path ran, not only corrections
    st = out.stats  # the same stats as every drafter: one drafter forward per step, its time apart
    assert 0 < st.drafter_forwards < st.target_forwards and 0 < st.time_drafter_model <= st.time_draft
    alone = svlm.generate(messages=records[1].prompt_messages, images=[str(p) for p in records[1].images],
                          max_new_tokens=MAX_NEW)
    assert alone.token_ids == expected[1]


def test_checkpoint_round_trip_and_wrong_target(trained, tmp_path):
    t, _, _, head, _, _ = trained
    head.save_pretrained(tmp_path)
    drafter = load_feature_drafter(tmp_path, t.model, tree=3)
    assert isinstance(drafter, DFlashDrafter) and drafter.max_depth == 3
    assert drafter.head.taps == head.taps and drafter.head.block_size == head.block_size
    assert all(torch.equal(a, b) for a, b in zip(drafter.head.state_dict().values(), head.state_dict().values()))
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}
    with pytest.raises(IncompatibleModelsError, match="another target"):
        DFlashHead.from_pretrained(tmp_path, tiny_llama())


def test_hybrid_vlm_with_an_image_is_lossless():
    """A Qwen3.5 VLM target (Gated DeltaNet layers, M-RoPE): the drafter reads the image through its features."""
    t = family("qwen3_5")
    torch.manual_seed(3)
    head = DFlashHead(t.model, block_size=4)
    svlm = SpeculativeVLM(t.model, t.processor, DFlashDrafter(head, StaticTree.full((2, 1, 1))))
    rows = [{"prompt": "describe the image", "images": [image(51, "qwen2_vl")]},
            {"prompt": "what color is it on the left", "images": [image(52, "qwen2_vl")]}]
    out = svlm.generate(prompt=[r["prompt"] for r in rows], images=[r["images"] for r in rows],
                        max_new_tokens=MAX_NEW)
    assert out.sequences == [hf_reference("qwen3_5", r) for r in rows]


def fitted_on(model, prompt: list[int], spec: dict) -> DFlashHead:
    """A DFlash head fitted (60 steps, a few seconds) on 64 continuations of `prompt` sampled from the model with
    `spec`: right often enough that sampling both accepts drafts and corrects them."""
    torch.manual_seed(0)
    seqs = model.generate(torch.tensor([prompt] * 64), max_new_tokens=6, do_sample=True, eos_token_id=None,
                          pad_token_id=0, **spec)
    taps = default_taps(model.config.num_hidden_layers)
    examples = [lm_example(model, s.tolist(), len(prompt), taps) for s in seqs]
    torch.manual_seed(4)
    head = DFlashHead(model, block_size=4)
    fit_dflash(head, model, examples, steps=60, lr=1e-2, batch_size=8, progress=False)
    return head.eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3_5], ids=["llama", "qwen3_5"])
def test_sampling_matches_the_exact_distribution(make):
    """A briefly trained head: some drafts are accepted, the others corrected from the residual (and, on Qwen3.5,
    the linear-attention state rolled back)."""
    model = make().eval()
    prompt, length, spec = [5, 17, 5, 17, 5, 17, 5], 3, SamplingSpec(temperature=1.0, top_k=4, top_p=0.9)
    dec = SpeculativeDecoder(model, DFlashDrafter(fitted_on(model, prompt, dict(temperature=1.0, top_k=4, top_p=0.9))))
    joint = exact_joint(model, prompt, spec, length)
    samples, accepted, drafted = sampled_runs(dec, prompt, length, 1200, temperature=1.0, top_k=4, top_p=0.9)
    stat, threshold, outside = chi_square(samples, joint)
    assert outside == 0 and stat < threshold, (stat, threshold)
    assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)  # both paths, many times each


def test_transformers_dflash_runs_the_same_weights():
    """The head's network is transformers' DFlash drafter: generate(speculation_type="dflash") accepts it (batch 1)
    and gives the target's greedy output, as mmspec does at any batch size."""
    model = tiny_llama().eval()
    torch.manual_seed(0)
    head = DFlashHead(model, block_size=5).eval()
    p = torch.tensor([PROMPTS[0]])
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = model.generate(p, **kw)
    assert torch.equal(model.generate(p, assistant_model=head.model, speculation_type="dflash", **kw), ref)
    out = SpeculativeDecoder(model, DFlashDrafter(head)).generate(PROMPTS, max_new_tokens=16)
    assert out.sequences[0] == ref[0, p.shape[1]:].tolist()
    with pytest.raises(ValueError, match="batch_size = 1"):  # what mmspec just ran at batch 3
        model.generate(torch.tensor([PROMPTS[0][:3], PROMPTS[1]]), assistant_model=head.model,
                       speculation_type="dflash", **kw)


def test_bad_settings_are_typed_errors():
    model = tiny_llama()
    with pytest.raises(DraftError, match="block_size"):
        DFlashHead(model, block_size=1)
    with pytest.raises(DraftError, match="taps"):
        DFlashHead(model, taps=(0, 7))
    head = DFlashHead(model, block_size=4)
    assert DFlashDrafter(head, 5).max_depth == 3  # a chain of up to 5: the block's 3 slots
    with pytest.raises(DraftError, match="exceeds the drafter's 3 slots"):
        DFlashDrafter(head, StaticTree.full((2, 1, 1, 1)))
    with pytest.raises(DraftError, match="k=0"):
        DFlashDrafter(head, 0)
    with pytest.raises(DraftError, match="dynamic tree"):
        DFlashDrafter(head, DynamicTree(topk=2, depth=2, total=4))


def test_train_drafter_command_trains_and_resumes_a_dflash_drafter(tmp_path, capsys):
    import argparse
    import json

    from mmspec.errors import InvalidInputError
    from vision.testing import test_image
    from vision.train.cli import add_parser
    from learnable_cases import learnable_llava

    t = learnable_llava()
    t.model.save_pretrained(tmp_path / "target")
    t.processor.save_pretrained(tmp_path / "target")
    (tmp_path / "photos").mkdir()
    for i in range(6):
        test_image(300 + i).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("describe the image\nwhat color is the sky\n")
    parser = argparse.ArgumentParser(prog="mmspec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    base = ["train-drafter", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--head", "dflash", "--block-size", "4", "--blocks", "2", "--taps", "1,-1",
            "--lr", "3e-3", "--batch-size", "2", "--held-out", "0.34", "--eval-tokens", "4", "--save-every", "2",
            "--quiet"]
    args = parser.parse_args(base + ["--steps", "2", "--distill", "--images", str(tmp_path / "photos"), "--prompts",
                                     str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["step"] == 2 and report["held_out"]["trained"]["tau"] >= 1.0
    args = parser.parse_args(base + ["--steps", "4", "--resume"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["train"]["start_step"] == 2
    drafter = load_feature_drafter(tmp_path / "out", t.model)  # the default chain of 4: the block's 3 slots
    assert isinstance(drafter, DFlashDrafter) and drafter.head.taps == (1, 2) and drafter.head.block_size == 4
    assert drafter.max_depth == 3
    with pytest.raises(InvalidInputError, match="--compressor do not apply to --head dflash"):
        bad = parser.parse_args(base + ["--steps", "2", "--compressor", "avg_pool:2"])
        bad.func(bad)
    with pytest.raises(InvalidInputError, match="comma-separated integers"):
        bad = parser.parse_args(base + ["--steps", "2", "--taps", "1,x"])
        bad.func(bad)
