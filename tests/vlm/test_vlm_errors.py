"""Bad input to the VLM pipeline: a typed error naming the problem, and the pipeline still answers correctly after."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from mmspec.errors import (ContextOverflowError, ImageCountError, ImageError, InvalidInputError,
                           TokenizerMismatchError)
from mmspec.testing import word_tokenizer
from vision import SpeculativeVLM
from vlm_cases import MAX_NEW, family, hf_reference, image, small_vlm, text_lm

NAMES = ["llava", "qwen2_vl", "gemma3"]


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
    name = request.param
    t = family(name)
    return name, SpeculativeVLM(t.model, t.processor, small_vlm(name), tree=3)


def still_works(name: str, svlm: SpeculativeVLM) -> None:
    row = {"prompt": "describe the image", "images": [image(40, name)]}
    assert svlm.generate(**row, max_new_tokens=MAX_NEW).token_ids == hf_reference(name, row)


def test_unreadable_corrupt_and_truncated_files(setup, tmp_path):
    name, svlm = setup
    good = tmp_path / "good.png"
    image(41, name).save(good)
    data = good.read_bytes()
    cases = {"missing.png": None, "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
             "truncated.png": data[: len(data) // 2], "empty.jpg": b""}
    for fname, content in cases.items():
        path = tmp_path / fname
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ImageError, match=fname):
            svlm.generate(images=[path], prompt="describe the image", max_new_tokens=4)
    still_works(name, svlm)


def test_zero_sized_image(setup):
    name, svlm = setup
    with pytest.raises(ImageError, match="0x0"):
        svlm.generate(images=[Image.new("RGB", (0, 0))], prompt="describe the image", max_new_tokens=4)
    still_works(name, svlm)


def test_other_modes_are_converted(setup):
    """RGBA, CMYK, 16-bit and grayscale images are converted to RGB and answered like that RGB image."""
    name, svlm = setup
    rgb = image(42, name)
    arr = np.asarray(rgb)
    variants = {
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "L": rgb.convert("L"),
        "I;16": Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)),
    }
    expected_rgb = {"RGBA": rgb, "CMYK": rgb.convert("CMYK").convert("RGB"), "L": rgb.convert("L").convert("RGB"),
                    "I;16": rgb.convert("L").convert("RGB")}
    assert arr.shape[2] == 3
    for mode, img in variants.items():
        out = svlm.generate(images=[img], prompt="describe the image", max_new_tokens=MAX_NEW).token_ids
        ref = hf_reference(name, {"prompt": "describe the image", "images": [expected_rgb[mode]]})
        assert out == ref, mode


def test_image_count_mismatches(setup):
    name, svlm = setup
    img = image(43, name)
    two_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": "compare"}]}]
    with pytest.raises(ImageCountError, match=r"2 image part\(s\) but 1 image"):
        svlm.generate(messages=two_parts, images=[img], max_new_tokens=4)
    one_part = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    with pytest.raises(ImageCountError, match=r"1 image part\(s\) but 3 image"):
        svlm.generate(messages=one_part, images=[img, img, img], max_new_tokens=4)
    placeholder = svlm.processor.image_token
    with pytest.raises(ImageCountError, match="2"):
        svlm.generate(prompt=f"{placeholder} {placeholder} compare", images=[img], max_new_tokens=4)
    with pytest.raises(ImageCountError):
        svlm.generate(prompt=["a", "b"], images=[[img]], max_new_tokens=4)  # 2 prompts, 1 image list
    still_works(name, svlm)


def test_prompt_longer_than_the_context(setup):
    name, svlm = setup
    limit = svlm.target.max_positions
    long_prompt = " ".join(["describe"] * (limit + 10))
    with pytest.raises(ContextOverflowError, match=str(limit)):
        svlm.generate(images=[image(44, name)], prompt=long_prompt, max_new_tokens=4)
    with pytest.raises(ContextOverflowError):  # fits alone, not with the new tokens
        svlm.generate(images=[image(44, name)], prompt="describe", max_new_tokens=limit)
    still_works(name, svlm)


def test_bad_arguments(setup):
    name, svlm = setup
    with pytest.raises(InvalidInputError, match="exactly one of prompt"):
        svlm.generate(images=[image(45, name)], max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="role"):
        svlm.generate(messages=[{"text": "hi"}], max_new_tokens=4)
    with pytest.raises(ImageError, match="int"):
        svlm.generate(images=[7], prompt="describe", max_new_tokens=4)
    still_works(name, svlm)


def test_drafter_with_a_different_tokenizer():
    t = family("llava")
    other = word_tokenizer(96)
    with pytest.raises(TokenizerMismatchError, match="drafter"):
        SpeculativeVLM(t.model, t.processor, text_lm("llava"), drafter_tokenizer=other)
    # the same tokenizer passes the check, and then vocabularies of different sizes are reconciled
    svlm = SpeculativeVLM(t.model, t.processor, text_lm("llava"), drafter_tokenizer=copy.deepcopy(t.processor.tokenizer))
    still_works("llava", svlm)
