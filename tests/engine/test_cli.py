"""The command line and the README's Python example, on tiny models saved to disk (the path a user takes)."""
from __future__ import annotations

import re

import pytest
import torch

from mmspec.cli import main
from mmspec.testing import noisy_copy, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = tiny_llama(seed=0)
    target.generation_config.pad_token_id = 0
    tok = word_tokenizer(96)
    target.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    noisy_copy(target, 0.5).save_pretrained(root / "drafter")
    return root / "target", root / "drafter", target, tok


def test_generate_command_streams_the_target_greedy_answer(saved_pair, capsys):
    tdir, ddir, target, tok = saved_pair
    prompt = "w5 w9 w5 w9 w5 w9 w5"
    assert main(["generate", "--target", str(tdir), "--drafter", str(ddir), "--max-new-tokens", "12",
                 "--tree", "full:2,2", prompt]) == 0
    out = capsys.readouterr()
    ids = tok(prompt)["input_ids"]
    ref = target.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2)
    assert out.out.strip() == tok.decode(ref[0, len(ids):], skip_special_tokens=True).strip()
    assert re.search(r"tau=\d", out.err) and "lossless" in out.err


def test_generate_command_reports_typed_errors(saved_pair, capsys):
    tdir, _, _, _ = saved_pair
    code = main(["generate", "--target", str(tdir), "--drafter", "ngram", "--max-new-tokens", "0", "w5 w6"])
    assert code == 2
    assert "GenerationConfigError" in capsys.readouterr().err


def test_bad_tree_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--target", "x", "--tree", "spiral:3", "w5"])
    assert "--tree" in capsys.readouterr().err


def test_readme_python_example_runs(saved_pair):
    """The README example, with the paths replaced by the tiny saved models."""
    tdir, ddir, _, _ = saved_pair
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmspec import DynamicTree, SpeculativeDecoder

    tok = AutoTokenizer.from_pretrained(tdir)
    target = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32)
    drafter = AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32)
    dec = SpeculativeDecoder(target, drafter, tree=DynamicTree(topk=8, depth=6, total=60))
    ids = tok("w3 w4 w5 w6")["input_ids"]
    out = dec.generate([ids], max_new_tokens=16, temperature=0.0, eos_token_id=tok.eos_token_id)
    ref = target.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=0)
    assert out.sequences[0] == ref[0, len(ids):].tolist()
    pieces = [e.tokens for e in dec.stream([ids], max_new_tokens=16, temperature=0.7, top_p=0.9, seed=0)]
    assert sum(len(p) for p in pieces) == 16


def test_generate_with_a_missing_model_path_is_a_typed_error(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    assert main(["generate", "--target", missing, "w5"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "no-such-model" in err


def test_generate_compiled_gives_the_same_answer(saved_pair, capsys):
    """`--compile on` decodes over a static cache with compiled forwards: the same text, compile time apart."""
    tdir, ddir, _, _ = saved_pair
    args = ["generate", "--target", str(tdir), "--drafter", str(ddir), "--max-new-tokens", "10", "w5 w9 w5 w9"]
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main(args[:1] + ["--compile", "on"] + args[1:]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out
    assert "compile" in compiled.err and "compile" not in eager.err


def test_compile_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--target", "x", "--compile", "maybe", "w5"])
    assert "expected auto, on or off" in capsys.readouterr().err
    assert main(["bench", "image", "--compile", "on"]) == 2
    assert "--compile applies to `bench engine` and `bench vlm`" in capsys.readouterr().err
