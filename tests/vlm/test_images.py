"""vision.images: every accepted input type, every mode conversion, and every bad input (typed, named errors).

All fixture images are made here with Pillow at run time.
"""
from __future__ import annotations

import gc
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mmspec.errors import ImageCountError, ImageError
from vision.images import check_image_count, load_image, load_images

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _rgb_image(w: int = 5, h: int = 3) -> Image.Image:
    img = Image.new("RGB", (w, h), RED)
    img.putpixel((1, 2), BLUE)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _assert_rgb(out: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == size


# ---------------------------------------------------------------- accepted inputs

def test_pil_image_gives_a_fresh_copy_and_leaves_the_input_alone():
    src = _rgb_image()
    out = load_image(src)
    _assert_rgb(out, (5, 3))
    assert out is not src and out.tobytes() == src.tobytes()
    out.putpixel((0, 0), GREEN)
    assert src.getpixel((0, 0)) == RED


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "bytearray", "bytesio"])
def test_paths_and_encoded_bytes(tmp_path, kind):
    data = _png_bytes(_rgb_image())
    file = tmp_path / "img.png"
    file.write_bytes(data)
    buf = io.BytesIO(data)
    buf.seek(7)
    image = {"str": str(file), "path": file, "bytes": data, "bytearray": bytearray(data), "bytesio": buf}[kind]
    out = load_image(image)
    _assert_rgb(out, (5, 3))
    assert out.getpixel((1, 2)) == BLUE and out.getpixel((0, 0)) == RED
    assert buf.tell() == 7  # the caller's stream position is untouched


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 1), (3, 5, 3), (3, 5, 4)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_numpy_arrays(shape, dtype):
    a = np.zeros(shape, dtype=np.float64)
    a[0, 0] = 1.0 if dtype == "float32" else 255
    a[1, 1] = 0.5 if dtype == "float32" else 128
    if len(shape) == 3 and shape[2] == 4:
        a[..., 3] = 1.0 if dtype == "float32" else 255  # opaque
    a = a.astype(dtype)
    original = a.copy()
    out = load_image(a)
    _assert_rgb(out, (5, 3))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == (128, 128, 128)  # 0.5 * 255 = 127.5 rounds to 128
    assert out.getpixel((2, 2)) == (0, 0, 0)
    np.testing.assert_array_equal(a, original)


def test_numpy_result_does_not_share_memory_with_the_array():
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    out = load_image(a)
    out.putpixel((0, 0), WHITE)
    assert a.max() == 0


@pytest.mark.parametrize("layout", ["chw", "hwc"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_torch_tensors(layout, dtype):
    hwc = torch.zeros(2, 5, 3)  # (H, W, C); H = 2 so that channels-last is unambiguous
    hwc[1, 2] = torch.tensor([1.0, 0.0, 0.5])
    t = hwc.permute(2, 0, 1) if layout == "chw" else hwc  # (C, H, W) or (H, W, C)
    t = (t * 255).round().to(dtype) if dtype == torch.uint8 else t.to(dtype)
    out = load_image(t.requires_grad_(True) if dtype.is_floating_point else t)
    _assert_rgb(out, (5, 2))
    assert out.getpixel((2, 1)) == (255, 0, 128)
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_torch_single_channel_tensor():
    out = load_image(torch.full((1, 2, 4), 0.2))
    _assert_rgb(out, (4, 2))
    assert out.getpixel((3, 1)) == (51, 51, 51)


# ---------------------------------------------------------------- mode conversions

def test_rgba_is_composited_on_white():
    src = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # fully transparent black
    src.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    src.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = load_image(src)
    _assert_rgb(out, (3, 1))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (0, 0, 0, 0)  # the input is untouched


@pytest.mark.parametrize("mode, value, expected", [
    ("LA", (0, 0), WHITE), ("LA", (60, 255), (60, 60, 60)),
    ("PA", (0, 0), WHITE),
    ("RGBa", (0, 0, 0, 0), WHITE), ("La", (0, 0), WHITE), ("La", (100, 255), (100, 100, 100)),
])
def test_other_alpha_modes_are_composited_on_white(mode, value, expected):
    _assert_rgb(out := load_image(Image.new(mode, (2, 2), value)), (2, 2))
    assert out.getpixel((1, 1)) == expected


def test_palette_with_transparency_is_composited_on_white():
    src = Image.new("P", (2, 1))
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    src.putpixel((1, 0), 1)
    src.info["transparency"] = 0
    out = load_image(src)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == RED


def test_palette_png_with_transparency_file(tmp_path):
    src = Image.new("P", (2, 1))
    src.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    src.putpixel((1, 0), 1)
    src.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == BLUE


@pytest.mark.parametrize("value, expected", [((0, 0, 0, 0), WHITE), ((0, 0, 0, 255), (0, 0, 0)),
                                             ((0, 255, 255, 0), RED)])
def test_cmyk(value, expected):
    assert load_image(Image.new("CMYK", (2, 2), value)).getpixel((0, 0)) == expected


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)), ("1", 1, WHITE), ("1", 0, (0, 0, 0)),
    ("YCbCr", (255, 128, 128), WHITE), ("HSV", (0, 255, 255), RED),
])
def test_gray_bilevel_and_colour_spaces(mode, value, expected):
    _assert_rgb(out := load_image(Image.new(mode, (3, 2), value)), (3, 2))
    assert out.getpixel((2, 1)) == expected


def test_lab():
    white = load_image(Image.new("LAB", (1, 1), (255, 128, 128))).getpixel((0, 0))
    grey = load_image(Image.new("LAB", (1, 1), (128, 128, 128))).getpixel((0, 0))
    assert all(c >= 250 for c in white)
    assert max(grey) - min(grey) <= 2 and 100 <= grey[0] <= 140  # L* = 50 is mid grey in sRGB


def _sixteen_bit_values() -> np.ndarray:
    return np.array([[0, 257, 32768, 65535]], dtype=np.uint16)


def test_sixteen_bit_uses_the_full_range():
    src = Image.fromarray(_sixteen_bit_values())
    assert src.mode == "I;16"
    out = load_image(src)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert out.getpixel((3, 0)) == WHITE


def test_sixteen_bit_big_endian_and_int32():
    big = Image.frombytes("I;16B", (4, 1), _sixteen_bit_values().astype(">u2").tobytes())
    assert [load_image(big).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    wide = Image.fromarray(_sixteen_bit_values().astype(np.int32))
    assert wide.mode == "I"
    assert [load_image(wide).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_sixteen_bit_png_file(tmp_path):
    Image.fromarray(_sixteen_bit_values()).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    assert [out.getpixel((x, 0)) for x in (2, 3)] == [(128, 128, 128), WHITE]


@pytest.mark.parametrize("values, expected", [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 300.0], [0, 100, 255])])
def test_float_mode_f(values, expected):
    src = Image.fromarray(np.array([values], dtype=np.float32))
    assert src.mode == "F"
    out = load_image(src)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == expected


def test_multi_frame_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(tmp_path / "anim.gif").getpixel((0, 0)) == RED
    with Image.open(tmp_path / "anim.gif") as opened:
        opened.seek(2)
        assert load_image(opened).getpixel((0, 0)) == RED
        assert opened.tell() == 2  # the caller's image stays on its frame


def test_exif_orientation_is_applied(tmp_path):
    src = Image.new("RGB", (32, 16), RED)
    src.paste(BLUE, (16, 0, 32, 16))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    src.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    _assert_rgb(out, (16, 32))
    top, bottom = out.getpixel((8, 4)), out.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_files_are_closed(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(_rgb_image()))
    (tmp_path / "bad.png").write_bytes(_png_bytes(_rgb_image(64, 64))[:60])
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_images([tmp_path / "a.png", tmp_path / "anim.gif"])
        with pytest.raises(ImageError):
            load_image(tmp_path / "bad.png")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ---------------------------------------------------------------- bad images

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_name_the_path(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format=fmt)
    data = buf.getvalue()
    file = tmp_path / f"half.{fmt.lower()}"
    file.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError, match="truncated") as err:
        load_image(file)
    assert str(file) in str(err.value)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on behind the caller's back


def test_random_bytes(tmp_path):
    junk = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match=r"bytes of 512 bytes.*corrupt"):
        load_image(junk)
    (tmp_path / "junk.png").write_bytes(junk)
    with pytest.raises(ImageError, match="corrupt") as err:
        load_image(str(tmp_path / "junk.png"))
    assert str(tmp_path / "junk.png") in str(err.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_missing_file_directory_and_url(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such file") as err:
        load_image(missing)
    assert str(missing) in str(err.value)
    with pytest.raises(ImageError, match="directory") as err:
        load_image(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ImageError, match="URLs are not fetched") as err:
        load_image("https://example.com/cat.png")
    assert "https://example.com/cat.png" in str(err.value)


def test_decompression_bomb(tmp_path, monkeypatch):
    _rgb_image(10, 10).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS") as err:
        load_image(tmp_path / "big.png")
    assert str(tmp_path / "big.png") in str(err.value)


@pytest.mark.parametrize("image, size", [
    (Image.new("RGB", (0, 0)), "0x0"), (Image.new("L", (0, 4)), "0x4"),
    (np.zeros((0, 0, 3), np.uint8), "0x0"), (np.zeros((3, 0), np.uint8), "0x3"), (torch.zeros(3, 0, 2), "2x0"),
])
def test_zero_sized_images(image, size):
    with pytest.raises(ImageError, match=f"has size {size}; an image needs at least 1x1 pixels"):
        load_image(image)


def test_zero_sized_image_in_a_list_names_its_index():
    with pytest.raises(ImageError, match=r"image 1 \(PIL.Image.Image, mode RGB, 0x0\)"):
        load_images([_rgb_image(), Image.new("RGB", (0, 0))])


@pytest.mark.parametrize("image, named", [(3, "int"), ({"a": 1}, "dict"), (None, "NoneType"), (1.5, "float"),
                                          (object(), "object")])
def test_bad_types_name_the_type_and_the_accepted_ones(image, named):
    with pytest.raises(ImageError, match=f"unsupported type {named}") as err:
        load_image(image)
    assert "PIL.Image.Image" in str(err.value) and "numpy.ndarray" in str(err.value)


def test_bad_items_in_a_list_name_their_position(tmp_path):
    with pytest.raises(ImageError, match="image 1 .*NoneType"):
        load_images([_rgb_image(), None])
    with pytest.raises(ImageError, match=r"image 2 \(list\) is not an image"):
        load_images([_rgb_image(), _rgb_image(), [_rgb_image()]])
    with pytest.raises(ImageError, match="image 0 '.*missing.png': no such file"):
        load_images((str(tmp_path / "missing.png"),))


@pytest.mark.parametrize("array, named", [
    (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    (np.zeros((1, 4, 4, 3), np.uint8), r"shape \(1, 4, 4, 3\)"),
    (np.zeros(4, np.uint8), r"shape \(4,\)"),
    (np.zeros((4, 4), np.int64), "dtype int64"),
    (np.zeros((4, 4), bool), "dtype bool"),
    (np.full((4, 4), 2.0), r"float values in \[2.0, 2.0\]"),
    (np.full((4, 4), np.nan, np.float32), "finite"),
    (torch.zeros(1, 3, 4, 4), r"shape \(1, 3, 4, 4\).*batch"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), "dtype int32"),
    (torch.full((3, 4, 4), -0.5), r"float values in \[-0.5, -0.5\]"),
])
def test_bad_arrays_name_shape_or_dtype(array, named):
    with pytest.raises(ImageError, match=named):
        load_image(array)


# ---------------------------------------------------------------- load_images and counts

def test_load_images_shapes():
    assert load_images(None) == []
    assert len(load_images(_rgb_image())) == 1
    assert len(load_images(np.zeros((2, 2, 3), np.uint8))) == 1  # one array is one image
    outs = load_images((_rgb_image(), np.zeros((2, 3), np.uint8)))
    assert [o.size for o in outs] == [(5, 3), (3, 2)] and all(o.mode == "RGB" for o in outs)


def test_check_image_count():
    check_image_count(2, 2)
    check_image_count(0, 0, what="message")
    with pytest.raises(ImageCountError, match=r"got 3 image\(s\) but the prompt has 1 image placeholder") as err:
        check_image_count(3, 1)
    assert "pass 1 image(s), or put 3 placeholder(s) in the prompt" in str(err.value)
    with pytest.raises(ImageCountError, match=r"got 0 image\(s\) but the chat turn has 2") as err:
        check_image_count(0, 2, what="chat turn")
    assert isinstance(err.value, ValueError)
    with pytest.raises(ImageCountError, match="negative"):
        check_image_count(-1, 0)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        load_image(42)
