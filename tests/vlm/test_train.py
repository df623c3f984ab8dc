"""Drafter training (vision.train): dataset format and errors, self-distillation, EAGLE training that raises held-out
tau, exact resume, offline == online features, evaluation, and the train-drafter command.

A random tiny VLM is chaotic: its next token depends on everything before it in ways a freshly trained head cannot
learn in seconds. `learnable_llava` keeps the structure of a real model's answers in miniature: the upper text layer
only nudges the residual stream (damped, as in mmspec.testing.pairs), and the LM head speaks a small vocabulary (its
rows for other tokens are zeroed), so answers are diverse sentences over ~36 word tokens that depend on the image
and the prompt. On it, 300 steps (a few seconds on 2 CPU cores) take held-out tau from ~1.0 to ~1.8-2.0.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from mmspec.errors import CheckpointError, DatasetError, InvalidInputError
from vision.drafters import EagleHead
from vision.testing import test_image
from vision.train import (OnlineFeatures, evaluate_tau, load_dataset, make_example, precompute,
                          save_dataset, self_distill, split, train_eagle)
from vision.train.cli import add_parser, distill_inputs
from vision.train.features import collate
from vision.train.losses import drafter_loss, prob_l1, token_ce
from vlm_cases import family, hf_reference
from learnable_cases import learnable_data, learnable_llava


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """(target, train records, held-out records): see learnable_cases.learnable_data."""
    return learnable_data(tmp_path_factory.mktemp("learnable"))


def user(text: str, n_images: int = 1) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# --------------------------------------------------------------------------------------------------- (a) dataset
def test_dataset_round_trip_and_split(tmp_path):
    rows = [([test_image(i)], [user(f"what is {i}"), assistant(f"a cat {i}")]) for i in range(5)]
    rows.append(([test_image(7), test_image(8)], [user("compare", 2), assistant("same"), user("sure?", 0),
                                                  {"role": "assistant", "content": "yes"}]))
    written = save_dataset(tmp_path / "d", rows)
    loaded = load_dataset(tmp_path / "d")
    assert [r.messages for r in loaded] == [m for _, m in rows] == [r.messages for r in written]
    assert [len(r.images) for r in loaded] == [1] * 5 + [2]
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(loaded[5].images[1])), np.asarray(test_image(8)))  # lossless PNG
    assert loaded[0].answer == "a cat 0" and loaded[5].answer == "yes"
    assert loaded[5].prompt_messages == rows[5][1][:-1]
    train, held = split(loaded, held_out=0.34, seed=3)
    assert len(held) == 2 and len(train) == 4 and not {id(r) for r in train} & {id(r) for r in held}
    assert split(loaded, held_out=0.34, seed=3) == (train, held)  # seeded
    assert len(split(loaded, held_out=1)[1]) == 1
    with pytest.raises(DatasetError, match="at least 2"):
        split(loaded[:1])
    with pytest.raises(InvalidInputError, match="held_out"):
        split(loaded, held_out=1.5)


GOOD = {"images": ["img/a.png"], "messages": [user("hi"), assistant("hello")]}
BAD_LINES = {
    "not json": ("{oops", r"line 2 is not JSON"),
    "not an object": ("[1, 2]", r"line 2 is a JSON list"),
    "no messages": (json.dumps({"images": []}), r"line 2 has no 'messages'"),
    "no images": (json.dumps({"messages": GOOD["messages"]}), r"line 2 has no 'images'"),
    "images not a list": (json.dumps({**GOOD, "images": "img/a.png"}), r"line 2: 'images' is a str"),
    "missing image": (json.dumps({**GOOD, "images": ["img/nope.png"]}), r"line 2: image 'img/nope.png' not found"),
    "no assistant turn": (json.dumps({**GOOD, "messages": [user("hi")]}), r"line 2: no assistant turn"),
    "bad message": (json.dumps({**GOOD, "messages": [{"content": "x"}, assistant("a")]}), r"line 2: messages\[0\]"),
    "bad content": (json.dumps({**GOOD, "messages": [{"role": "user", "content": 3}, assistant("a")]}),
                    r"line 2: messages\[0\]\['content'\]"),
    "image count": (json.dumps({**GOOD, "messages": [user("hi", 2), assistant("a")]}),
                    r"line 2 has 2 image part\(s\) in its messages but 1"),
    "answer only": (json.dumps({"images": [], "messages": [assistant("a")]}), r"line 2: only an assistant turn"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_dataset_lines_name_the_file_and_line(tmp_path, case):
    (tmp_path / "img").mkdir()
    test_image(0).save(tmp_path / "img" / "a.png")
    line, pattern = BAD_LINES[case]
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=pattern) as err:
        load_dataset(tmp_path)
    assert "data.jsonl" in str(err.value)


def test_missing_or_empty_datasets(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="has no data.jsonl"):
        load_dataset(tmp_path)
    (tmp_path / "data.jsonl").write_text("\n  \n")
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------ (b) self-distillation
def test_self_distillation_writes_the_targets_greedy_answers(tmp_path):
    t = family("llava")
    images = [test_image(30), [test_image(31), test_image(32)], test_image(33)]
    prompts = ["describe the image", "what color is the sky", "tell me about the cat"]
    records = self_distill(t.model, t.processor, images, prompts, tmp_path / "d", max_new_tokens=10, batch_size=2,
                           progress=False)
    assert records == load_dataset(tmp_path / "d")
    tok = t.processor.tokenizer
    for rec, imgs, prompt in zip(records, images, prompts):
        imgs = imgs if isinstance(imgs, list) else [imgs]
        ids = hf_reference("llava", {"prompt": prompt, "images": imgs}, max_new=10)
        assert rec.answer == tok.decode(ids, skip_special_tokens=True)
        assert rec.messages[0] == user(prompt, len(imgs)) and len(rec.images) == len(imgs)
    assert len({r.answer for r in records}) == 3  # the answers depend on the request
    with pytest.raises(InvalidInputError, match="one prompt per example"):
        self_distill(t.model, t.processor, images, prompts[:2], tmp_path / "e", progress=False)


# -------------------------------------------------------------------------------- (c) training raises held-out tau
def test_training_raises_held_out_tau(learnable):
    t, train, held = learnable
    torch.manual_seed(0)
    head = EagleHead(t.model)
    before = evaluate_tau(head, t.model, t.processor, held, tree=4, max_new_tokens=24, batch_size=16)
    report = train_eagle(head, t.model, t.processor, train, steps=300, lr=1e-2, batch_size=4, progress=False)
    after = evaluate_tau(head, t.model, t.processor, held, tree=4, max_new_tokens=24, batch_size=16)
    numbers = (f"held-out tau {before['tau']:.3f} untrained -> {after['tau']:.3f} trained (alpha {after['alpha']}), "
               f"train loss {report['losses'][0]:.3f} -> {report['loss']:.3f}, running acceptance "
               f"{report['acceptance']:.3f}, {report['seconds']:.1f} s")
    print(numbers)
    assert before["tau"] < 1.15, numbers
    assert after["tau"] >= 1.5 and after["tau"] - before["tau"] >= 0.4, numbers
    assert report["loss"] < report["losses"][0] and report["acceptance"] > 0.3, numbers


# --------------------------------------------------------------------------------------------------- (d) resume
def test_resume_equals_an_uninterrupted_run(learnable, tmp_path):
    t, train, _ = learnable
    records = train[:10]
    kw = dict(lr=3e-3, batch_size=2, noise=0.05, warmup=3, save_every=4, progress=False)

    def fresh(seed):
        torch.manual_seed(seed)
        return EagleHead(t.model)

    whole = fresh(0)
    full = train_eagle(whole, t.model, t.processor, records, steps=12, out_dir=tmp_path / "a", **kw)
    part = fresh(0)
    first = train_eagle(part, t.model, t.processor, records, steps=6, out_dir=tmp_path / "b", **kw)
    resumed = fresh(1)  # a different init: everything must come from the checkpoint
    rest = train_eagle(resumed, t.model, t.processor, records, steps=12, out_dir=tmp_path / "b", resume=True, **kw)
    assert rest["start_step"] == 6 and first["losses"] + rest["losses"] == full["losses"]
    trained = [k for k, _ in whole.named_parameters() if not k.startswith("body.embed_tokens")]  # (unused table)
    for name in trained:
        assert torch.equal(whole.state_dict()[name], resumed.state_dict()[name]), name
    assert rest["acceptance"] == full["acceptance"] and rest["loss"] == full["loss"]
    loaded = EagleHead.from_pretrained(tmp_path / "b", t.model)  # the final head sits in out_dir
    assert all(torch.equal(loaded.state_dict()[k], whole.state_dict()[k]) for k in trained)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step-0000008", "step-0000012"]  # keep=2
    files = {p.suffix for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}  # nothing pickled
    with pytest.raises(CheckpointError, match="lr=0.003 there, 0.001 now"):
        train_eagle(fresh(0), t.model, t.processor, records, steps=14, out_dir=tmp_path / "b", resume=True,
                    **{**kw, "lr": 1e-3})
    with pytest.raises(InvalidInputError, match="already holds checkpoints"):
        train_eagle(fresh(0), t.model, t.processor, records, steps=14, out_dir=tmp_path / "b", **kw)


# ------------------------------------------------------------------------------------- (e) offline == online
def test_offline_and_online_modes_train_on_identical_features(learnable, tmp_path, monkeypatch):
    t, train, _ = learnable
    records = train[:7]
    store = precompute(t.model, t.processor, records, tmp_path / "cache", topk=4, shard_size=3, progress=False)
    online = OnlineFeatures(t.model, t.processor, records, topk=4)
    assert len(store) == len(online) == 7 and len(store.index["shards"]) == 3
    for i in range(7):
        a, b = store[i], online[i]
        assert a.answer_start == b.answer_start and 0 < a.answer_start < len(a.input_ids)
        for field in ("input_ids", "features", "topk_ids", "topk_logprobs"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (i, field)
    import vision.train.features as features

    monkeypatch.setattr(features, "make_example", lambda *a, **k: pytest.fail("the cache was not reused"))
    assert len(precompute(t.model, t.processor, records, tmp_path / "cache", topk=4, progress=False)) == 7
    monkeypatch.undo()
    runs = {}
    for mode in ("offline", "online"):
        torch.manual_seed(0)
        head = EagleHead(t.model)
        runs[mode] = train_eagle(head, t.model, t.processor, records, steps=5, lr=3e-3, batch_size=2, mode=mode,
                                 topk=4, cache_dir=tmp_path / "cache", progress=False)["losses"]
    assert runs["offline"] == runs["online"]


def test_feature_example_matches_the_targets_forward(learnable):
    t, train, _ = learnable
    ex = make_example(t.model, t.processor, train[0], topk=3)
    tok = t.processor.tokenizer
    answer = tok.decode(ex.input_ids[ex.answer_start:].tolist(), skip_special_tokens=True)
    assert answer.strip() == train[0].answer.strip()
    assert ex.features.shape == (len(ex.input_ids), t.model.config.text_config.hidden_size)
    assert torch.all(ex.topk_logprobs[:, 0] >= ex.topk_logprobs[:, 1])
    batch = collate([ex, make_example(t.model, t.processor, train[1], topk=3)], context_weight=0.25)
    n = len(ex.input_ids) - 1
    assert torch.equal(batch.target_features[0, : n - 1], batch.features[0, 1:n])  # f_{t+1} is the next pair's f
    assert set(batch.weights[0, :n].unique().tolist()) == {0.25, 1.0} and batch.answer[0, n - 1]


def test_losses_reduce_to_their_full_vocabulary_forms():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    logp = torch.log_softmax(target, -1)
    full_ids = torch.arange(11).expand(2, 3, 11)
    l1 = prob_l1(logits, full_ids, logp)  # k = V: exact
    torch.testing.assert_close(l1, (logits.softmax(-1) - target.softmax(-1)).abs().sum(-1))
    top1 = target.argmax(-1, keepdim=True)  # k = 1: hard cross-entropy to the greedy token
    ce = token_ce(logits, top1, logp.gather(-1, top1))
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits.transpose(1, 2), top1[..., 0],
                                                                     reduction="none"))


def test_vispec_loss_trains(learnable):
    t, train, _ = learnable
    head = EagleHead(t.model)
    report = train_eagle(head, t.model, t.processor, train[:4], steps=3, lr=1e-3, mode="online", loss="vispec",
                         progress=False)
    assert len(report["losses"]) == 3 and all(v == v and v > 0 for v in report["losses"])
    batch = collate([make_example(t.model, t.processor, train[0])])
    out = head(batch.input_ids, batch.features, use_cache=False)
    _, parts = drafter_loss(out.hidden_states[0], out.logits, batch, "vispec")
    assert set(parts) == {"reg", "cls", "prob", "rank"}
    with pytest.raises(InvalidInputError, match="mode="):
        train_eagle(head, t.model, t.processor, train[:4], steps=3, mode="batch", progress=False)


# ------------------------------------------------------------------------------------------------ (f) evaluation
def test_evaluate_tau_reports_at_least_one_token_per_step(learnable):
    t, _, held = learnable
    torch.manual_seed(3)
    out = evaluate_tau(EagleHead(t.model), t.model, t.processor, held[:3], tree=3, max_new_tokens=8)
    assert out["tau"] >= 1.0 and out["requests"] == 3 and out["new_tokens"] == 24
    assert len(out["alpha"]) == 3 and all(0 <= a <= 1 for a in out["alpha"])


# ----------------------------------------------------------------------------------------------------------- CLI
def test_train_drafter_command_distils_trains_and_resumes(tmp_path, capsys):
    t = learnable_llava()
    t.model.save_pretrained(tmp_path / "target")
    t.processor.save_pretrained(tmp_path / "target")
    (tmp_path / "photos").mkdir()
    for i in range(6):
        test_image(200 + i).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("describe the image\n\nwhat color is the sky\n")
    parser = argparse.ArgumentParser(prog="mmspec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    base = ["train-drafter", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--lr", "3e-3", "--batch-size", "2", "--held-out", "0.34", "--eval-tokens", "4",
            "--save-every", "2", "--quiet"]
    args = parser.parse_args(base + ["--steps", "2", "--distill", "--images", str(tmp_path / "photos"), "--prompts",
                                     str(tmp_path / "prompts.txt"), "--max-new-tokens", "6"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["step"] == 2 and report["held_out"]["records"] == 2
    assert report["held_out"]["trained"]["tau"] >= 1.0
    assert len(load_dataset(tmp_path / "data")) == 6
    assert load_dataset(tmp_path / "data")[1].messages[0]["content"][-1]["text"] == "what color is the sky"
    args = parser.parse_args(base + ["--steps", "4", "--resume"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["start_step"] == 2 and report["train"]["step"] == 4
    EagleHead.from_pretrained(tmp_path / "out", t.model)
    dream = ["train-drafter", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--out",
             str(tmp_path / "dream"), "--held-out", "0.34", "--eval-tokens", "4", "--quiet", "--steps", "2",
             "--head", "dream", "--taps", "1,-1", "--compressor", "avg_pool:2", "--unroll", "2"]
    args = parser.parse_args(dream)
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["train"]["step"] == 2
    from vision.drafters import DreamDrafter, load_feature_drafter

    loaded = load_feature_drafter(tmp_path / "dream", t.model)
    assert isinstance(loaded, DreamDrafter) and loaded.head.taps == (1, -1)
    assert loaded.compressor.config() == {"type": "avg_pool", "stride": 2}
    from mmspec.errors import InvalidInputError
    from vision.drafters import Eagle3Head

    eagle3 = ["train-drafter", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "data"), "--out",
              str(tmp_path / "eagle3"), "--held-out", "0.34", "--eval-tokens", "4", "--quiet", "--steps", "2",
              "--head", "eagle3", "--draft-vocab", "40"]
    args = parser.parse_args(eagle3)
    assert args.func(args) == 0
    assert 0 < json.loads(capsys.readouterr().out)["train"]["draft_vocab_coverage"] <= 1
    loaded = load_feature_drafter(tmp_path / "eagle3", t.model)
    assert isinstance(loaded.head, Eagle3Head) and loaded.head.draft_vocab_size == 40 and loaded.head.taps == (1, 2)
    with pytest.raises(InvalidInputError, match="cannot be represented in an EAGLE-3 head"):
        args = parser.parse_args(eagle3[:6] + [str(tmp_path / "e3b")] + eagle3[7:] + ["--msd"])
        args.func(args)
    with pytest.raises(InvalidInputError, match="--head eagle3 only"):
        args = parser.parse_args(dream[:6] + [str(tmp_path / "d2")] + dream[7:] + ["--draft-vocab", "8"])
        args.func(args)
    from vision.train.cli import parse_compressor

    with pytest.raises(InvalidInputError, match="expected one of"):
        parse_compressor("blur:3", t.model)
    with pytest.raises(InvalidInputError, match="stride must be a int"):
        parse_compressor("avg_pool:two", t.model)
    with pytest.raises(DatasetError, match="--images"):
        distill_inputs(None, tmp_path / "prompts.txt")
    with pytest.raises(DatasetError, match="no prompt"):
        (tmp_path / "empty.txt").write_text("\n")
        distill_inputs(tmp_path / "photos", tmp_path / "empty.txt")
