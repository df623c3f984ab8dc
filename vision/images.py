"""Turn whatever a user passes as an image into a fresh RGB `PIL.Image.Image` for a Hugging Face processor.

Accepted: a `PIL.Image.Image`; a path (`str` / `os.PathLike`); encoded bytes (`bytes`, `bytearray`, `io.BytesIO`);
a `numpy.ndarray` (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); a `torch.Tensor` (C, H, W) or (H, W, C). Arrays and
tensors are uint8 (0..255) or float in [0, 1]. Anything else, and any image that cannot be decoded or has no pixels,
raises `ImageError` naming the input (``image 2 '/tmp/cat.png' ...``, the index being the position in the list) and
saying what would be valid; a mismatch between images and prompt placeholders raises `ImageCountError`.

Modes are converted, never rejected: transparency is composited onto white, 16-bit data maps 0..65535 onto 0..255,
"F" maps [0, 1] onto 0..255 (other ranges are clipped to 0..255), CMYK / YCbCr / LAB / HSV / palette / "1" go
through Pillow's own conversions. Multi-frame images give their first frame and EXIF orientation is applied. The
result never shares memory with the caller's object, and the caller's object is left as it was (file position,
current frame, pixels). No URL is ever fetched.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmspec.errors import ImageCountError, ImageError

_ACCEPTED = ("pass a PIL.Image.Image, a path (str or os.PathLike), encoded image bytes (bytes, bytearray, "
             "io.BytesIO), a numpy.ndarray (H, W[, C]) or a torch.Tensor (C, H, W) / (H, W, C)")
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # Pillow opens 16-bit PNG / TIFF as I;16 or I
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image(image, *, index: int | None = None) -> Image.Image:
    """One image -> a fresh RGB PIL image. `index` (the position in the caller's list) only labels error messages."""
    desc = _describe(image, index)
    if isinstance(image, Image.Image):
        return _from_pil(image, desc)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(os.fsdecode(image), desc)
    if isinstance(image, (bytes, bytearray, io.BytesIO)):
        data = image.getvalue() if isinstance(image, io.BytesIO) else bytes(image)  # getvalue keeps the position
        if not data:
            raise ImageError(f"{desc} is empty (0 bytes); pass the bytes of an encoded image file (PNG, JPEG, ...)")
        return _decode(io.BytesIO(data), desc)
    if isinstance(image, np.ndarray):
        return _from_array(image, desc)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image, desc)
    if isinstance(image, (list, tuple)):
        raise ImageError(f"{desc} is not an image; pass one image here, or a flat list of images to load_images")
    raise ImageError(f"{desc} has unsupported type {_type_name(image)}; {_ACCEPTED}")


def load_images(images) -> list[Image.Image]:
    """None -> [], one image -> [it], a list or tuple -> each of its images, all as fresh RGB PIL images."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [load_image(image, index=i) for i, image in enumerate(images)]
    return [load_image(images)]


def check_image_count(n_images: int, n_placeholders: int, *, what: str = "prompt") -> None:
    """Raise `ImageCountError` unless there is exactly one image per image placeholder of `what`."""
    if n_images < 0 or n_placeholders < 0:
        raise ImageCountError(f"image counts cannot be negative (got {n_images} images, "
                              f"{n_placeholders} placeholders in the {what})")
    if n_images != n_placeholders:
        raise ImageCountError(
            f"got {n_images} image(s) but the {what} has {n_placeholders} image placeholder(s); each placeholder "
            f"takes exactly one image: pass {n_placeholders} image(s), or put {n_images} placeholder(s) "
            f"in the {what}")


def _describe(image, index: int | None) -> str:
    name = "image" if index is None else f"image {index}"
    if isinstance(image, (str, os.PathLike)):
        return f"{name} {os.fsdecode(image)!r}"
    if isinstance(image, Image.Image):
        source = f" from {image.filename!r}" if getattr(image, "filename", "") else ""
        return f"{name} (PIL.Image.Image, mode {image.mode}, {image.width}x{image.height}{source})"
    if isinstance(image, (bytes, bytearray, io.BytesIO)):
        size = len(image.getbuffer()) if isinstance(image, io.BytesIO) else len(image)
        return f"{name} ({type(image).__name__} of {size} bytes)"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{name} ({_type_name(image)}, shape {tuple(image.shape)}, dtype {image.dtype})"
    return f"{name} ({_type_name(image)})"


def _type_name(obj) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


@contextlib.contextmanager
def _decoding(desc: str):
    """Translate Pillow's many decode failures into one `ImageError` that names the input."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{desc} exceeds Pillow's decompression-bomb size limit (PIL.Image.MAX_IMAGE_PIXELS = "
                         f"{Image.MAX_IMAGE_PIXELS} pixels): {e}; raise that limit only for images you trust") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{desc} cannot be decoded: the file is corrupt or truncated, or not an image format "
                         f"Pillow reads ({type(e).__name__}: {e})") from e


def _from_path(path: str, desc: str) -> Image.Image:
    if path.lower().startswith(("http://", "https://")):
        raise ImageError(f"{desc} is a URL; URLs are not fetched: download it and pass the local file, "
                         "or pass a PIL image")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ImageError(f"{desc}: no such file; pass the path of an existing image file")
    if os.path.isdir(path):
        raise ImageError(f"{desc} is a directory; pass the path of an image file inside it")
    try:
        fp = open(path, "rb")
    except OSError as e:
        raise ImageError(f"{desc} cannot be read ({e.strerror or e})") from e
    with fp:
        return _decode(fp, desc)


def _decode(fp, desc: str) -> Image.Image:
    with _decoding(desc), Image.open(fp) as img:
        img.load()  # Image.open only reads the header; decode everything now so truncation shows up here
        return _to_rgb(img, desc)


def _from_pil(img: Image.Image, desc: str) -> Image.Image:
    with _decoding(desc):  # a lazily opened image is decoded only now
        frame = img.tell()
        if frame == 0:
            return _to_rgb(img, desc)
        img.seek(0)
        try:
            return _to_rgb(img, desc)
        finally:
            img.seek(frame)  # leave the caller's image on the frame it was on


def _to_rgb(img: Image.Image, desc: str) -> Image.Image:
    _check_size(img.width, img.height, desc)
    img = ImageOps.exif_transpose(img)  # always a new image, so nothing below touches the caller's
    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        img = _to_8bit(img, desc)
    if img.mode == "La":  # Pillow cannot convert premultiplied La directly; RGBa it can
        lum, alpha = img.split()
        img = Image.merge("RGBa", (lum, lum, lum, alpha))
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def _to_8bit(img: Image.Image, desc: str) -> Image.Image:
    a = np.asarray(img).astype(np.float64)  # (H, W); uint16 / int32 / float32 in Pillow
    if img.mode == "F":
        if not np.isfinite(a).all():
            raise ImageError(f"{desc} has NaN or infinite pixels; pass finite values")
        a = a * 255.0 if a.min() >= 0.0 and a.max() <= 1.0 else a
    else:
        a = np.clip(a, 0.0, 65535.0) / 257.0  # 65535 / 257 = 255 exactly
    return Image.fromarray(np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8))  # mode L


def _check_size(width: int, height: int, desc: str) -> None:
    if width == 0 or height == 0:
        raise ImageError(f"{desc} has size {width}x{height}; an image needs at least 1x1 pixels")


def _from_array(a: np.ndarray, desc: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{desc} has shape {tuple(a.shape)}; pass (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    _check_size(a.shape[1], a.shape[0], desc)
    if a.dtype.kind == "f":
        lo, hi = (float(a.min()), float(a.max())) if np.isfinite(a).all() else (float("nan"),) * 2
        if not (0.0 <= lo and hi <= 1.0):
            raise ImageError(f"{desc} has float values in [{lo}, {hi}]; float images must be finite and lie in "
                             "[0, 1] (or pass uint8 values 0..255)")
        a = np.rint(a.astype(np.float64) * 255.0)
    elif a.dtype != np.uint8:
        raise ImageError(f"{desc} has dtype {a.dtype}; pass uint8 (0..255) or float in [0, 1]")
    a = np.array(a, dtype=np.uint8, order="C", copy=True)  # never share memory with the caller's array
    return _to_rgb(Image.fromarray(a), desc)  # mode L, RGB or RGBA


def _from_tensor(t: torch.Tensor, desc: str) -> Image.Image:
    t = t.detach().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):  # channels first wins when ambiguous: torchvision's layout
        t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    elif not (t.ndim == 2 or (t.ndim == 3 and t.shape[2] in (1, 3, 4))):
        raise ImageError(f"{desc} has shape {tuple(t.shape)}; pass one image (C, H, W) or (H, W, C) with "
                         "C in 1, 3, 4 (for a batch, pass a list of images)")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return _from_array(t.numpy(), desc)
