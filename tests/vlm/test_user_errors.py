"""Bad inputs a new user meets first (issue 19), on `SpeculativeVLM` and `mmspec chat`: typed errors naming the
input, raised before any work, the object working on the next call; the chat CLI's transcript, --system,
--acceptance and --json; a prompt already rendered by the chat template is not templated twice."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mmspec.cli import main
from mmspec.errors import CheckpointError, GenerationConfigError, ImageCountError, ImageError, InvalidInputError
from mmspec.tree import StaticTree
from bad_inputs import break_checkpoint, no_loading
from vision import SpeculativeVLM
from vision.prompts import build_request, render, user_turn
from vlm_cases import MAX_NEW, family, image

NAME = "qwen2_vl"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    t = family(NAME)
    t.model.save_pretrained(root / "vlm")
    t.processor.save_pretrained(root / "vlm")
    image(50, NAME).save(root / "photo.png")
    broken = break_checkpoint(root, "vlm", lambda c: c["text_config"].update(hidden_size="big"))
    return root, broken


@pytest.fixture(scope="module")
def svlm():
    t = family(NAME)
    return SpeculativeVLM(t.model, t.processor, "ngram", tree=3)


ROW = dict(prompt="describe the image")


def row():
    return dict(ROW, images=[image(5, NAME)])


# --- paths and checkpoints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["target", "drafter"])
def test_missing_local_paths_fail_before_loading(which, saved, monkeypatch):
    root, _ = saved
    no_loading(monkeypatch)
    args = {"target": "./missing-vlm", "drafter": None} if which == "target" else \
        {"target": str(root / "vlm"), "drafter": str(root / "no-drafter")}
    with pytest.raises(CheckpointError, match=f"{which} '.*missing-vlm'|{which} '.*no-drafter'") as e:
        SpeculativeVLM.from_pretrained(args["target"], drafter=args["drafter"])
    assert "no such file or directory" in str(e.value)


@pytest.mark.parametrize("kind,file", [("pickle", "pytorch_model.bin"), ("truncated", "model.safetensors"),
                                       ("config", "config.json")])
def test_broken_vlm_checkpoints_are_checkpoint_errors(kind, file, saved, capfd):
    root, broken = saved
    with pytest.raises(CheckpointError) as e:
        SpeculativeVLM.from_pretrained(str(broken[kind]))
    assert file in str(e.value) and "weights_only" not in str(e.value)
    assert main(["chat", "--target", str(broken[kind]), "--quiet", "hello"]) == 2
    out = capfd.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("mmspec: error: CheckpointError") and file in out.err
    assert "PWNED" not in out.out + out.err and "weights_only" not in out.err and "Traceback" not in out.err
    assert SpeculativeVLM.from_pretrained(str(root / "vlm")).generate(**row(), max_new_tokens=3).token_ids


def test_chat_with_a_mistyped_target_names_it_without_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    no_loading(monkeypatch)
    assert main(["chat", "--target", "models/llava_targt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--target 'models/llava_targt': no such file or directory" in err


# --- construction and call settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,needle", [
    (dict(drafter=42), "drafter=42"),
    (dict(drafter="eagle"), "drafter='eagle'"),
    (dict(tree="foo"), "tree='foo'"),
    (dict(drafter="ngram", tree=StaticTree.full((2, 2))), "n-gram drafter drafts chains only"),
    (dict(acceptance="lenient"), "'lenient'"),
])
def test_bad_construction_fails_at_construction(kwargs, needle, saved, monkeypatch):
    t = family(NAME)
    with pytest.raises(InvalidInputError) as e:
        SpeculativeVLM(t.model, t.processor, **kwargs)
    assert needle in str(e.value)
    if kwargs.get("drafter") == "eagle":
        return  # from_pretrained reads a drafter string as a path or hub id
    root, _ = saved
    no_loading(monkeypatch)  # from_pretrained refuses them before loading anything
    with pytest.raises(InvalidInputError) as e:
        SpeculativeVLM.from_pretrained(str(root / "vlm"), **kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(seed="abc"), "seed='abc': must be an int"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(top_p=2), "top_p=2"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_bad_settings_fail_before_the_images_are_processed(svlm, kwargs, needle, monkeypatch):
    from mmspec import SpeculativeDecoder
    from mmspec.testing import tiny_llama

    with monkeypatch.context() as m:
        m.setattr(svlm, "_prepare", lambda *a, **k: pytest.fail("inputs were processed"))
        with pytest.raises(GenerationConfigError) as e:
            svlm.generate(**row(), **{"max_new_tokens": 4, **kwargs})
    assert needle in str(e.value)
    with pytest.raises(GenerationConfigError) as engine:  # the engine's rule and message are the same
        SpeculativeDecoder(tiny_llama()).generate([[5, 6]], **{"max_new_tokens": 4, **kwargs})
    assert str(engine.value) == str(e.value)
    assert len(svlm.generate(**row(), max_new_tokens=4).token_ids) >= 1


def test_an_image_the_processor_rejects_is_named(svlm, saved, tmp_path):
    Image.new("RGB", (2000, 5)).save(tmp_path / "strip.png")
    with pytest.raises(ImageError, match=r"images\[1\] \('.*strip.png'\).*aspect ratio"):
        svlm.generate(prompt="compare", images=[image(5, NAME), str(tmp_path / "strip.png")], max_new_tokens=3)
    with pytest.raises(ImageError, match=r"images\[0\] \(2000x5 Image\)"):
        svlm.generate(prompt="compare", images=[Image.new("RGB", (2000, 5))], max_new_tokens=3)
    assert svlm.generate(**row(), max_new_tokens=3).token_ids


# --- a prompt rendered already -------------------------------------------------------------------------------------
def test_a_rendered_prompt_is_not_templated_twice(svlm):
    p = family(NAME).processor
    rendered = render(p, [user_turn("what is it", 0)])
    as_is, msgs, text = build_request(p, prompt=rendered)
    plain, _, _ = build_request(p, prompt="what is it")
    assert msgs is None and text == rendered and as_is.input_ids == plain.input_ids
    assert svlm.generate(prompt=rendered, max_new_tokens=5).token_ids == \
        svlm.generate(prompt="what is it", max_new_tokens=5).token_ids
    with pytest.raises(ImageCountError, match="already rendered.*no image placeholder.*plain question"):
        build_request(p, prompt=rendered, images=[image(5, NAME)])


# --- streams -------------------------------------------------------------------------------------------------------
def test_last_output_after_a_partial_and_a_full_stream(svlm):
    full = "".join(svlm.stream(**row(), max_new_tokens=MAX_NEW))
    assert svlm.last_output.text == full
    it = svlm.stream(**row(), max_new_tokens=MAX_NEW)
    next(it)
    assert svlm.last_output is None  # a stream under way has no final output (not the previous one's)
    it.close()
    assert svlm.last_output is None
    chat = svlm.chat(max_new_tokens=MAX_NEW)
    chat.send("describe the image", images=[image(5, NAME)])
    pieces = chat.stream("and the colour?")
    next(pieces)
    assert chat.last_output is None
    pieces.close()
    with pytest.raises(InvalidInputError, match="text='  '"):
        chat.send("  ")


# --- the chat command ----------------------------------------------------------------------------------------------
def test_chat_refuses_an_empty_question(saved, capsys, monkeypatch):
    root, _ = saved
    no_loading(monkeypatch)
    assert main(["chat", "--target", str(root / "vlm"), ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "question ''" in err


def test_interactive_transcript_system_acceptance_and_json(saved, tmp_path, capsys, monkeypatch):
    root, _ = saved
    monkeypatch.setattr("sys.stdin", io.StringIO("what color\n\n"))
    path = tmp_path / "chat.json"
    assert main(["chat", "-i", "--target", str(root / "vlm"), "--image", str(root / "photo.png"), "--system",
                 "Answer briefly.", "--acceptance", "point_mass", "--temperature", "0.8", "--seed", "3",
                 "--max-new-tokens", str(MAX_NEW), "--json", str(path), "--quiet", "describe the image"]) == 0
    out = capsys.readouterr().out
    rec = json.loads(path.read_text())
    answers = [t["answer"] for t in rec["turns"]]
    assert out == "".join(a + "\n" for a in answers)  # each answer ends its line: prompts never run into it
    assert rec["settings"]["system"] == "Answer briefly." and rec["settings"]["acceptance"] == "point_mass"
    assert rec["settings"]["seed"] == 3 and rec["settings"]["temperature"] == 0.8
    assert all(t["stats"]["acceptance"] in ("", "point_mass") for t in rec["turns"])
    svlm = SpeculativeVLM.from_pretrained(str(root / "vlm"), drafter="ngram", acceptance="point_mass")
    chat = svlm.chat(system="Answer briefly.", max_new_tokens=MAX_NEW, temperature=0.8, seed=3)
    assert chat.send("describe the image", images=[str(root / "photo.png")]).text == answers[0]
    assert chat.send("what color").text == answers[1]
    assert chat.messages[0]["role"] == "system"
