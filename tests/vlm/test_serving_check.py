"""The real loader accepts the export (slow tier: it installs the `speculators` package in its own virtual
environment, `.venv-serving`, through scripts/serving_check/setup_venv.sh; a few minutes the first time).

For a LLaVA and a Qwen2-VL target: an EAGLE-3 head trained by mmspec is exported in the speculators layout, and
speculators' own `Eagle3DraftModel` loads the directory with no missing or unexpected weights, and its draft step on
the same inputs matches mmspec's head (logits over the draft vocabulary, the fed-back hidden state and its norm)
within 1e-4 (scripts/serving_check/check_speculators.py)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vision.drafters import Eagle3Head
from vision.export import export_drafter, reference_step
from vision.testing import test_image, tiny_vlm
from vision.train import self_distill, train_eagle

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serving_python():
    subprocess.run(["bash", str(ROOT / "scripts/serving_check/setup_venv.sh")], check=True, cwd=ROOT)
    return ROOT / ".venv-serving/bin/python"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_speculators_loads_the_export_and_drafts_what_mmspec_drafts(serving_python, family, tmp_path):
    t = tiny_vlm(family)
    vocab = t.model.get_output_embeddings().weight.shape[0]
    records = self_distill(t.model, t.processor, [test_image(300 + i, t.image_size) for i in range(6)],
                           "describe the image", tmp_path / "data", max_new_tokens=8, progress=False)
    torch.manual_seed(4)
    head = Eagle3Head(t.model, taps=(0, 1, 2), draft_vocab=vocab // 2)
    train_eagle(head, t.model, t.processor, records, steps=8, lr=3e-3, batch_size=2, progress=False)
    out = export_drafter(head, t.model, "speculators", tmp_path / "draft", verifier=f"tiny/{family}")
    torch.manual_seed(5)
    ids, taps = torch.randint(0, vocab, (1, 9)), torch.randn(1, 9, 3 * head.config.hidden_size)
    save_file({k: v.contiguous() for k, v in reference_step(head, ids, taps).items()}, str(tmp_path / "ref.safetensors"))
    layers = t.model.config.get_text_config().num_hidden_layers
    run = subprocess.run([str(serving_python), str(ROOT / "scripts/serving_check/check_speculators.py"), str(out),
                          str(tmp_path / "ref.safetensors"), "--verifier-num-layers", str(layers)],
                         capture_output=True, text=True, cwd=ROOT)
    verdict = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and verdict["ok"], run.stdout + run.stderr[-2000:]
    assert verdict["missing"] == [] and verdict["unexpected"] == [] and verdict["argmax_agree"] == 1.0
    assert max(verdict["max_abs_diff"].values()) < 1e-4
