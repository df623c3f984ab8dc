"""Helpers of the bad-input tests (issue 19): broken copies of a saved checkpoint, and a guard that no loader runs."""
from __future__ import annotations

import json
import os
import pickle
import shutil


def break_checkpoint(root, name, bad_config) -> dict:
    """{kind: directory} of broken copies of root/name (shared with the VLM tests)."""

    class Hostile:  # a pickle that would run code if it were unpickled unsafely
        def __reduce__(self):
            return (os.system, ("echo PWNED",))

    out = {}
    for kind in ("pickle", "truncated", "config"):
        d = root / f"{name}_{kind}"
        shutil.copytree(root / name, d)
        weights = d / "model.safetensors"
        if kind == "pickle":
            weights.unlink()
            (d / "pytorch_model.bin").write_bytes(pickle.dumps(Hostile()))
        elif kind == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        else:
            cfg = json.loads((d / "config.json").read_text())
            bad_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        out[kind] = d
    return out


def no_loading(monkeypatch):
    """Any from_pretrained call fails the test: a path error must come before loading and without the hub."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError(f"from_pretrained was called with {a}")

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoModelForImageTextToText", "AutoProcessor",
                 "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
