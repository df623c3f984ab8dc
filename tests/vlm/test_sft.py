"""vision.train.sft: the target mask covers exactly the assistant turns, and training lowers the loss."""
from __future__ import annotations

import pytest

from mmspec.errors import InvalidInputError
from vision.scenes import Scene, Thing, render
from vision.train.sft import encode_conversation, train_conversations
from vision.zoo_models import llava_model, llava_processor, tokenizer_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(400, tokenizer_corpus(scenes=50))
    proc = llava_processor(tok, 20, 10)
    model = llava_model(tok, image_size=20, patch=10, vision_hidden=32, vision_layers=1, hidden=64, layers=1,
                        heads=2, kv_heads=1, intermediate=128, seed=0)
    return tok, proc, model


def _conv():
    img = render(Scene("white", (Thing("star", "red", "large", 4),)), 20)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red star."}]},
            {"role": "user", "content": [{"type": "text", "text": "Where?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "In the center."}]}]
    return [img], msgs


def test_target_mask_is_exactly_the_assistant_turns(tiny):
    tok, proc, _ = tiny
    images, msgs = _conv()
    enc = encode_conversation(proc, images, msgs)
    picked = [i for i, t in zip(enc.input_ids, enc.targets) if t]
    text = tok.decode(picked)
    assert text.replace(" ", "") == "Ared star.</s>Inthecenter.</s>".replace(" ", "")
    assert enc.input_ids.count(tok.image_token_id) == 4 and "pixel_values" in enc.inputs
    with pytest.raises(InvalidInputError, match="no assistant turn"):
        encode_conversation(proc, images, msgs[:1])


def test_training_lowers_the_loss(tiny):
    _, proc, model = tiny
    report = train_conversations(model, proc, lambda i: _conv(), steps=30, batch_size=2, lr=3e-3, warmup=2,
                                 progress=False, window=3)
    assert report["losses"][-1] < 0.5 * report["losses"][0] and report["tokens"] > 0


def test_group_by_length_uses_every_conversation_once_in_length_sorted_batches(tiny, monkeypatch):
    import vision.train.sft as sft

    _, proc, model = tiny
    lengths = [1, 4, 2, 3, 1, 2, 4, 3]  # example i gets lengths[i] extra user turns
    seen = []

    def example(i):
        images, msgs = _conv()
        return images, msgs[:2] + msgs[2:] * lengths[i]

    real = sft.collate

    def spy(batch, pad):
        seen.append([len(e.input_ids) for e in batch])
        return real(batch, pad)

    monkeypatch.setattr(sft, "collate", spy)
    train_conversations(model, proc, example, steps=4, batch_size=2, lr=1e-4, warmup=1, progress=False,
                        group_by_length=4)
    widths = sorted(w for b in seen for w in b)
    assert widths == sorted(len(sft._encode(proc, example, i).input_ids) for i in range(8))
    assert all(max(b) <= min(c) or max(c) <= min(b) for b in seen for c in seen if b is not c)  # sorted pools
    with pytest.raises(InvalidInputError, match="group_by_length"):
        train_conversations(model, proc, example, steps=1, batch_size=2, lr=1e-4, group_by_length=0)
