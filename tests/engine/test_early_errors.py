"""Bad inputs a new user meets first (issue 19), on the engine and `mmspec generate` / `mmspec bench`: each is a typed
error that names the input, raised before any work, and the object works on the next call."""
from __future__ import annotations

import json

import pytest
import torch

from mmspec import SpeculativeDecoder, StaticTree
from mmspec.checks import check_local_path, is_path_like
from mmspec.cli import main
from mmspec.errors import CheckpointError, GenerationConfigError, InvalidInputError
from bad_inputs import break_checkpoint, no_loading
from mmspec.testing import noisy_copy, tiny_llama, word_tokenizer

PROMPT = [5, 9, 5, 9, 5, 9, 5]


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(seed=0)
    target.generation_config.pad_token_id = 0
    return target, noisy_copy(target, 0.5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pair):
    """A saved LM and its three broken copies: pickled weights, truncated safetensors, a config of wrong types."""
    root = tmp_path_factory.mktemp("lm")
    target, _ = pair
    target.save_pretrained(root / "lm")
    word_tokenizer(96).save_pretrained(root / "lm")
    return root, break_checkpoint(root, "lm", lambda c: c.update(hidden_size="big"))


class Forwards:
    """Counts a model's forwards (to show that nothing ran before an error)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- local paths ---------------------------------------------------------------------------------------------------
def test_path_like_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for spec in ("./missing", "../x", "/abs/model", "~/m", "models/llava_targt", "a/b/c", "w\\x", "m.safetensors",
                 tmp_path):
        assert is_path_like(spec), spec
    for spec in ("gpt2", "google/gemma-4-e2b-it", "zoo:vlm", "zoo:vlm@quick", "ngram", None, 42):
        assert not is_path_like(spec), spec
    with pytest.raises(CheckpointError, match=r"'models/llava_targt'.*did you mean|'models/llava_targt'.*exists"):
        check_local_path("models/llava_targt", "--target")
    (tmp_path / "models" / "llava_target").mkdir()
    with pytest.raises(CheckpointError, match="did you mean 'models/llava_target'"):
        check_local_path("models/llava_targt", "--target")
    check_local_path("models/llava_target", "--target")  # exists: fine
    check_local_path("org/name", "--target")  # a hub id: left to the loader


@pytest.mark.parametrize("flag", ["--target", "--drafter"])
def test_generate_with_a_mistyped_local_path_names_it_without_the_hub(flag, tmp_path, monkeypatch, capsys, saved):
    root, _ = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    args = {"--target": str(root / "lm"), "--drafter": "ngram", flag: "models/llava_targt"}
    no_loading(monkeypatch)
    code = main(["generate", "--target", args["--target"], "--drafter", args["--drafter"], "w5 w6"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("mmspec: error: CheckpointError")
    assert f"{flag} 'models/llava_targt': no such file or directory" in err and "hub" in err


# --- broken checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,file", [("pickle", "pytorch_model.bin"), ("truncated", "model.safetensors"),
                                       ("config", "config.json")])
def test_broken_lm_checkpoint_is_a_checkpoint_error_naming_the_file(kind, file, saved, capfd):
    from transformers import AutoModelForCausalLM

    from mmspec.checkpoint import load_pretrained

    root, broken = saved
    with pytest.raises(CheckpointError) as e:
        load_pretrained(AutoModelForCausalLM, str(broken[kind]), "--target")
    assert file in str(e.value) and "weights_only" not in str(e.value)
    assert main(["generate", "--target", str(broken[kind]), "w5 w6"]) == 2
    out = capfd.readouterr()
    assert "PWNED" not in out.out + out.err  # nothing was unpickled
    assert out.err.count("\n") == 1 and "CheckpointError" in out.err and file in out.err
    assert "weights_only" not in out.err and "Traceback" not in out.err
    assert main(["generate", "--target", str(root / "lm"), "--max-new-tokens", "3", "--quiet", "w5 w6"]) == 0


# --- construction-time checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,needle", [
    (dict(drafter=42), "drafter=42"),
    (dict(drafter="eagle"), "drafter='eagle'"),
    (dict(drafter=object()), "lacks check_target"),
    (dict(tree="foo"), "tree='foo'"),
    (dict(tree=0), "tree=0"),
    (dict(drafter="ngram", tree=StaticTree.full((2, 2))), "n-gram drafter drafts chains only"),
    (dict(acceptance="lenient"), "'lenient'"),
])
def test_bad_construction_arguments_fail_at_construction(pair, kwargs, needle):
    target, _ = pair
    with pytest.raises(InvalidInputError) as e:
        SpeculativeDecoder(target, **kwargs)
    assert needle in str(e.value)


def test_ngram_drafter_honours_a_chain_tree(pair):
    target, _ = pair
    dec = SpeculativeDecoder(target, "ngram", tree=StaticTree.chain(3))
    assert dec.drafter.k == 3
    plain = SpeculativeDecoder(target, None).generate([PROMPT], max_new_tokens=10)
    assert dec.generate([PROMPT], max_new_tokens=10).sequences == plain.sequences


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=-1), "temperature=-1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=1.5), "top_k=1.5"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf"),
    (dict(seed="abc"), "seed='abc': must be an int"),
    (dict(seed=True), "seed=True"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_bad_generation_settings_fail_before_any_forward_and_the_decoder_works_after(pair, kwargs, needle):
    target, drafter = pair
    dec = SpeculativeDecoder(target, drafter, tree=3)
    with Forwards(target) as t, Forwards(drafter) as d:
        with pytest.raises(GenerationConfigError) as e:
            dec.generate([PROMPT], **{"max_new_tokens": 8, **kwargs})
        assert t.n == 0 and d.n == 0
    assert needle in str(e.value)
    ref = SpeculativeDecoder(target, None).generate([PROMPT], max_new_tokens=8)
    assert dec.generate([PROMPT], max_new_tokens=8).sequences == ref.sequences


def test_summary_says_what_tau_means(pair):
    target, drafter = pair
    s = SpeculativeDecoder(target, drafter, tree=3).generate([PROMPT], max_new_tokens=12).stats
    line = s.summary()
    assert f"tau={s.tau:.2f} tokens per verification step (tau-1={s.tau_minus_1:.2f} of them accepted draft" in line
    assert "acceptance rate by draft depth" in line


# --- the CLI: one-line errors, exit code 2 ------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--tree", "full:2,2"], "--tree full:2,2: the n-gram drafter drafts chains only"),
    (["--temperature", "inf"], "temperature=inf"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--device", "tpu9"], "--device 'tpu9'"),
    (["--json", "."], "--json '.' is a directory"),
])
def test_generate_user_errors_are_one_line_before_loading(argv, needle, saved, capsys, monkeypatch):
    root, _ = saved
    no_loading(monkeypatch)
    assert main(["generate", "--target", str(root / "lm"), *argv, "w5 w6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmspec: error: ") and err.count("\n") == 1 and needle in err, err


def test_generate_refuses_an_empty_prompt(saved, capsys):
    root, _ = saved
    assert main(["generate", "--target", str(root / "lm"), "  "]) == 2
    assert "non-empty prompt" in capsys.readouterr().err


def test_generate_json_records_the_settings_and_stats(saved, tmp_path, capsys):
    root, _ = saved
    path = tmp_path / "run.json"
    assert main(["generate", "--target", str(root / "lm"), "--tree", "3", "--temperature", "0.7", "--seed", "5",
                 "--max-new-tokens", "6", "--json", str(path), "--quiet", "w5 w6 w5 w6"]) == 0
    out = capsys.readouterr().out
    rec = json.loads(path.read_text())
    assert rec["settings"] == {**rec["settings"], "tree": "3", "temperature": 0.7, "seed": 5, "max_new_tokens": 6,
                               "drafter": "ngram", "acceptance": "auto"}
    turn = rec["turns"][0]
    assert out == turn["answer"] + "\n" and turn["stats"]["new_tokens"] == len(turn["token_ids"])


@pytest.mark.parametrize("argv,needle", [
    (["bench", "vlm", "--device", "cuda"], "--device: not an option of `bench vlm`"),
    (["bench", "vlm", "--dtype", "bfloat16"], "--dtype: not an option of `bench vlm`"),
    (["bench", "compress", "--device", "cuda", "--dtype", "bfloat16"], "--device --dtype: not an option"),
    (["bench", "overhead", "--dtype", "bfloat16"], "--dtype: not an option of `bench overhead`"),
    (["bench", "native", "--device", "cuda"], "--device: not an option of `bench native`"),
    (["bench", "compress", "--new-tokens", "9"], "--new-tokens: not an option of `bench compress`"),
    (["bench", "vlm", "--quick", "--new-tokens", "300"], "--quick sets its own sizes; drop --new-tokens"),
    (["bench", "engine", "--layers", "4", "8"], "`bench engine` runs one pair"),
    (["bench", "engine", "--new-tokens", "0"], "--new-tokens=0"),
    (["bench", "engine", "--device", "cuda:99"], "--device 'cuda:99'"),
])
def test_bench_refuses_options_it_would_ignore(argv, needle, capsys, monkeypatch):
    import mmspec.bench

    monkeypatch.setattr(mmspec.bench, "run_engine_benchmark", lambda **k: pytest.fail("the benchmark ran"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmspec: error: ") and err.count("\n") == 1 and needle in err, err


def test_bench_engine_refuses_cuda_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with CUDA
    assert main(["bench", "engine", "--device", "cuda", "--dtype", "bfloat16"]) == 2
    assert "--device 'cuda': CUDA is not available on this machine" in capsys.readouterr().err


def test_bench_vlm_passes_new_tokens_through_uncapped(monkeypatch):
    import vision.bench

    seen = {}
    monkeypatch.setattr(vision.bench, "run_vlm_benchmark", lambda **k: seen.update(k))
    assert main(["bench", "vlm", "--new-tokens", "300"]) == 0
    assert seen["new_tokens"] == 300
    assert main(["bench", "vlm"]) == 0 and seen["new_tokens"] == 128


def test_generation_bar_respects_quiet(monkeypatch):
    import argparse

    from mmspec.cli import _generation_bar

    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert _generation_bar(argparse.Namespace(quiet=True, max_new_tokens=4)).disable
    assert not _generation_bar(argparse.Namespace(quiet=False, max_new_tokens=4)).disable


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--target", "x", "--temperature", "abc", "w5"], "invalid float value: 'abc'"),
    (["chat", "--target", "x"], "required: question"),
    (["bench", "gpu"], "invalid choice: 'gpu'"),
    (["generate", "--target", "x", "--tree", "0", "w5"], "--tree '0'"),
    (["generate", "--target", "x", "--nonsense", "w5"], "unrecognized arguments: --nonsense"),
])
def test_usage_errors_are_one_line_with_exit_code_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("mmspec: error: ") and err.count("\n") == 1 and needle in err, err
