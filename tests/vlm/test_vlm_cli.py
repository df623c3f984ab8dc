"""`mmspec chat` on saved tiny checkpoints: streams the target's own answer, prints stats, reports bad input."""
from __future__ import annotations

import io

import pytest
import torch

from mmspec.cli import main
from vision import SpeculativeVLM
from vision.testing import draft_vlm, tiny_vlm
from vlm_cases import MAX_NEW, hf_reference, image


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    t, d = tiny_vlm("qwen2_vl"), draft_vlm("qwen2_vl")
    t.model.save_pretrained(root / "target")
    t.processor.save_pretrained(root / "target")
    d.model.save_pretrained(root / "drafter")
    d.processor.save_pretrained(root / "drafter")
    img = root / "photo.png"
    image(50, "qwen2_vl").save(img)
    return root, t


def test_chat_streams_the_targets_answer(checkpoints, capsys):
    root, t = checkpoints
    code = main(["chat", "--target", str(root / "target"), "--drafter", str(root / "drafter"), "--image",
                 str(root / "photo.png"), "--max-new-tokens", str(MAX_NEW), "--tree", "3", "describe the image"])
    assert code == 0
    out, err = capsys.readouterr()
    ids = hf_reference("qwen2_vl", {"prompt": "describe the image", "images": [str(root / "photo.png")]})
    expected = t.processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert out.strip() == expected.strip()
    assert "tau=" in err and "lossless" in err


def test_interactive_follow_up_and_a_bad_turn(checkpoints, capsys, monkeypatch):
    root, t = checkpoints
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {root / 'missing.png'}\nwhat is it\nwhat color\n\n"))
    code = main(["chat", "-i", "--target", str(root / "target"), "--drafter", "ngram", "--image",
                 str(root / "photo.png"), "--max-new-tokens", str(MAX_NEW), "describe the image"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "ImageError" in err and "missing.png" in err  # the bad turn is reported, the chat goes on
    assert err.count("tau=") == 2  # the first question and 'what color' were answered
    svlm = SpeculativeVLM.from_pretrained(str(root / "target"))
    chat = svlm.chat(max_new_tokens=MAX_NEW)
    first = chat.send("describe the image", images=[str(root / "photo.png")]).text
    second = chat.send("what color").text
    assert first in out and second in out


def test_unloadable_target_is_a_checkpoint_error(tmp_path, capsys):
    code = main(["chat", "--target", str(tmp_path / "nothing"), "hello"])
    assert code == 2
    assert "CheckpointError" in capsys.readouterr().err


def test_bench_vlm_on_given_models_and_prompts(tmp_path, capsys):
    """`bench vlm --target --drafter --prompts`: the user's models (here quick zoo paths) and prompt file."""
    import json

    from vision import scenes

    scenes.render(scenes.random_scene(__import__("random").Random(3)), 20).save(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "Describe the image.", "images": ["a.png"]}\n'
                                      '{"prompt": "Tell me about lists."}\n')
    out = tmp_path / "out"
    assert main(["bench", "vlm", "--target", "zoo:vlm@quick", "--drafter", "zoo:vlm-draft@quick", "--drafter",
                 "ngram", "--prompts", str(tmp_path / "p.jsonl"), "--temperatures", "0", "--repeats", "1",
                 "--new-tokens", "8", "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["prompts"] == 2 and res["config"]["drafters"] == ["zoo:vlm-draft@quick", "ngram"]
    rows = res["tables"][0]["rows"]
    names = [r["method"] for r in rows]
    assert names[0] == "plain decoding (mmspec)" and any(n.startswith("assisted generation") for n in names)
    assert [n for n in names if "chain" in n] == ["zoo:vlm-draft@quick (mmspec, chain 4)", "ngram (mmspec, chain 4)"]
    assert all(r["lossless"] == "yes (identical)" for r in rows if "error" not in r)
    assert "| method |" in capsys.readouterr().out


def test_readme_vlm_example_runs(checkpoints, tmp_path, capsys):
    """The README's VLM example, verbatim except for the paths (the tiny saved checkpoints and a test image)."""
    import re
    from pathlib import Path

    root, t = checkpoints
    draft = root / "drafter"
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = re.search(r"## Python: VLM chat.*?```python\n(.*?)```", readme, re.S).group(1)
    code = (code.replace("path/to/vlm", str(root / "target")).replace("path/to/small-vlm", str(draft))
            .replace("photo.jpg", str(root / "photo.png")))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "tau=" in out
    ref_ids = hf_reference("qwen2_vl", {"prompt": "What is in this picture?", "images": [str(root / "photo.png")]},
                           max_new=64)
    assert t.processor.tokenizer.decode(ref_ids, skip_special_tokens=True) in out


def test_bench_compress_quick(tmp_path):
    import json

    assert main(["bench", "compress", "--quick", "--out", str(tmp_path)]) == 0
    rows = {r["compressor"]: r for r in json.loads((tmp_path / "result.json").read_text())["rows"]}
    assert rows["none"]["drafter_image_slots"] == 576
    assert rows["avg_pool s=2"]["drafter_image_slots"] == 144 and rows["resampler 64"]["drafter_image_slots"] == 64


def test_from_pretrained_with_a_text_lm_drafter_checks_its_tokenizer(checkpoints, tmp_path):
    """A text LM drafter given as a path: loaded with its tokenizer, checked against the target's, lossless."""
    from mmspec.drafters import ModelDrafter
    from mmspec.errors import TokenizerMismatchError
    from mmspec.testing import word_tokenizer
    from vision.testing import text_drafter

    root, t = checkpoints
    lm = text_drafter("qwen2_vl")
    lm.save_pretrained(tmp_path / "lm")
    t.processor.tokenizer.save_pretrained(tmp_path / "lm")
    svlm = SpeculativeVLM.from_pretrained(str(root / "target"), drafter=str(tmp_path / "lm"), tree=3,
                                          dtype=torch.float32)
    assert isinstance(svlm.drafter, ModelDrafter) and svlm.drafter.shared_tokenizer
    with pytest.warns(FutureWarning, match="torch_dtype= is the old spelling of dtype="):  # the old name still works
        old = SpeculativeVLM.from_pretrained(str(root / "target"), torch_dtype=torch.float32)
    assert next(old.model.parameters()).dtype == torch.float32
    row = {"prompt": "describe the image", "images": [str(root / "photo.png")]}
    assert svlm.generate(**row, max_new_tokens=MAX_NEW).token_ids == hf_reference("qwen2_vl", row)
    lm.save_pretrained(tmp_path / "other")
    word_tokenizer(96).save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatchError):
        SpeculativeVLM.from_pretrained(str(root / "target"), drafter=str(tmp_path / "other"))
