"""Shared fixtures: tiny offline models (no hub), prompts, and target-only references."""
from __future__ import annotations

import os

import pytest
import torch

from mmspec.testing import noisy_copy, tiny_llama

torch.set_num_threads(2)

# The shared fixture models live on this device (MMSPEC_TEST_DEVICE=cuda runs the equality and sampling tests on a
# GPU; CI has none and uses the CPU). Tests that build their own models keep them on the CPU.
DEVICE = torch.device(os.environ.get("MMSPEC_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def target():
    return tiny_llama(seed=0).to(DEVICE)


@pytest.fixture(scope="session")
def drafters(target):
    """Drafters that agree with the target always, sometimes, and almost never."""
    return {
        "copy": noisy_copy(target, 0.0),
        "noisy": noisy_copy(target, 0.5, seed=1),
        "unrelated": tiny_llama(seed=7, hidden=32, layers=1, heads=2, kv_heads=1).to(DEVICE),
    }


def make_prompts(n: int, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 14, (1,), generator=g))
        body = torch.randint(3, vocab, (length,), generator=g).tolist()
        if i % 3 == 0:  # repetitive prompts give the n-gram drafter something to find
            body = (body[:4] * 4)[: max(length, 8)]
        out.append(body)
    return out


@pytest.fixture(scope="session")
def prompts():
    return make_prompts(24)


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def reference(target, prompts):
    """Target-only greedy continuations from transformers' own `generate` (an independent implementation)."""
    return [hf_greedy(target, p, 24) for p in prompts]


# --- the zoo: every fast-tier test sees $MMSPEC_ZOO pointing at one fresh directory of the session, so quick zoo
# models (`zoo:NAME@quick`, trained in seconds) are built once and never land in the user's cache. Slow-tier tests
# keep the user's zoo directory: the full zoo is many minutes of training, built once and reused.
@pytest.fixture(scope="session")
def quick_zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(autouse=True)
def _isolated_zoo(request, quick_zoo_root, monkeypatch):
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("MMSPEC_ZOO", str(quick_zoo_root))


@pytest.fixture(scope="session")
def quick_zoo(quick_zoo_root):
    """Every quick image recipe built once into the session's zoo directory: (root, {name: card})."""
    from image_ar.zoo import zoo

    cards = zoo(quick_zoo_root).build(quick=True, progress=False)
    return quick_zoo_root, {c["name"]: c for c in cards}


@pytest.fixture(scope="session")
def quick_vlm_zoo(quick_zoo_root):
    """Every quick VLM recipe built once into the session's zoo directory: (root, {name: card})."""
    from vision.zoo import zoo

    cards = zoo(quick_zoo_root).build(quick=True, progress=False)
    return quick_zoo_root, {c["name"]: c for c in cards}
