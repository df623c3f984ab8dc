"""Drafter training data: a plain on-disk format, its loader, a train/held-out split, and self-distillation.

On disk a dataset is a directory::

    my_data/
      data.jsonl        one record per line (blank lines are skipped)
      img/0000.png      the images, referenced by paths relative to the directory
      ...

and each line of ``data.jsonl`` is one conversation::

    {"images": ["img/0000.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]}]}

``messages`` are transformers chat messages (a content may also be a plain string); the last message is the
assistant's answer, the one the drafter is trained to predict; earlier turns are context. Each ``{"type": "image"}``
part takes the next path of ``images``, so there are exactly as many image parts as images.

Self-distillation (ViSpec, Kang et al. 2025; MASSV, Ganesan et al. 2025): the answers are the target's own greedy
answers, so the drafter learns the distribution it will be verified against, not a human annotator's.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mmspec.errors import DatasetError, InvalidInputError

DATA_FILE = "data.jsonl"
IMAGE_DIR = "img"
FORMAT_HELP = ('expected one JSON object per line: {"images": ["img/0000.png", ...] (paths relative to the dataset '
               'directory), "messages": [chat messages, the last one {"role": "assistant", ...}]}')


@dataclass
class Record:
    """One training conversation: absolute image paths and chat messages ending with the assistant's answer."""

    images: list[Path]
    messages: list[dict]

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation without its final answer: what the target is asked at generation time."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        content = self.messages[-1]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content
                                                                 if p.get("type") == "text")


# ------------------------------------------------------------------------------------------------------- loading
def load_dataset(directory) -> list[Record]:
    """Read and validate ``directory/data.jsonl``; every problem raises `DatasetError` naming the file and line."""
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {str(root)!r} does not exist (or is not a directory); expected a "
                           f"directory holding {DATA_FILE} and its images")
    path = root / DATA_FILE
    if not path.is_file():
        raise DatasetError(f"{str(root)!r} has no {DATA_FILE}; {FORMAT_HELP}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit in a JSON string
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{str(path)!r} cannot be read as UTF-8 text ({e})") from e
    records = [_parse_line(root, path, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise DatasetError(f"{str(path)!r} is empty: it holds no records; {FORMAT_HELP}")
    return records


def _parse_line(root: Path, path: Path, n: int, line: str) -> Record:
    where = f"{str(path)!r} line {n}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DatasetError(f"{where} is not JSON ({e}); {FORMAT_HELP}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where} is a JSON {type(obj).__name__}, not an object; {FORMAT_HELP}")
    for key, kind in (("images", list), ("messages", list)):
        if key not in obj:
            raise DatasetError(f"{where} has no {key!r} field; {FORMAT_HELP}")
        if not isinstance(obj[key], kind):
            raise DatasetError(f"{where}: {key!r} is a {type(obj[key]).__name__}, expected a list; {FORMAT_HELP}")
    images = [_image_path(root, where, i, p) for i, p in enumerate(obj["images"])]
    messages = _check_messages(where, obj["messages"])
    parts = sum(1 for m in messages if not isinstance(m["content"], str)
                for p in m["content"] if p["type"] == "image")
    if parts != len(images):
        raise DatasetError(f"{where} has {parts} image part(s) in its messages but {len(images)} image path(s); each "
                           '{"type": "image"} part takes the next path of "images"')
    return Record(images, messages)


def _image_path(root: Path, where: str, i: int, rel) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: images[{i}] is {rel!r}, expected a path relative to {str(root)!r}")
    full = root / rel
    if not full.is_file():
        raise DatasetError(f"{where}: image {rel!r} not found (looked for {str(full)!r})")
    return full


def _check_messages(where: str, messages: list) -> list[dict]:
    if not messages:
        raise DatasetError(f"{where}: 'messages' is empty; it needs at least a user turn and the assistant's answer")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DatasetError(f"{where}: messages[{i}] is {m!r}; expected {{'role': str, 'content': ...}}")
        content = m["content"]
        ok = isinstance(content, str) or (isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get("type"), str) for p in content))
        if not ok:
            raise DatasetError(f"{where}: messages[{i}]['content'] must be a string or a list of {{'type': ...}} "
                               f"parts, got {content!r}")
    if messages[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: no assistant turn at the end (the last message's role is "
                           f"{messages[-1]['role']!r}); the last message must be the answer, role 'assistant'")
    if len(messages) < 2:
        raise DatasetError(f"{where}: only an assistant turn; the answer needs a prompt (a user turn) before it")
    return messages


def split(records: Sequence[Record], held_out: float | int = 0.1, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): a seeded shuffle; `held_out` is a fraction in (0, 1) or a count. Both parts non-empty."""
    n = len(records)
    if n < 2:
        raise DatasetError(f"cannot split {n} record(s) into a training and a held-out part; need at least 2")
    if isinstance(held_out, float) and 0 < held_out < 1:
        k = round(n * held_out)
    elif isinstance(held_out, int) and not isinstance(held_out, bool) and held_out > 0:
        k = held_out
    else:
        raise InvalidInputError(f"held_out={held_out!r}: pass a fraction in (0, 1) or a positive count")
    k = min(max(k, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[k:])], [records[i] for i in sorted(order[:k])]


# ------------------------------------------------------------------------------------------------------- writing
def save_dataset(directory, rows: Sequence[tuple[list, list[dict]]]) -> list[Record]:
    """Write rows of (images, messages) in the on-disk format: images as PNG under img/, then data.jsonl.

    data.jsonl is written last and atomically, so a crash never leaves a dataset that names missing images."""
    from vision.images import load_images

    root = Path(directory)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (images, messages) in enumerate(rows):
        rel = []
        for j, img in enumerate(load_images(list(images))):
            name = f"{IMAGE_DIR}/{n:05d}.png" if len(images) == 1 else f"{IMAGE_DIR}/{n:05d}_{j}.png"
            img.save(root / name)
            rel.append(name)
        lines.append(json.dumps({"images": rel, "messages": messages}, ensure_ascii=False))
    tmp = root / (DATA_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, root / DATA_FILE)
    return load_dataset(root)


def self_distill(model, processor, images: Sequence, prompts, out_dir, *, max_new_tokens: int = 256,
                 batch_size: int = 8, progress: bool = True) -> list[Record]:
    """Ask the target each prompt about its image(s), greedily, and save the answers as a dataset (see module).

    `images`: one entry per example, an image (path, PIL, array, ...) or a list of images; `prompts`: one string
    for every example or a list with one per example. Answers are decoded without special tokens (the chat template
    adds the end-of-turn markers back when the conversation is rendered for training)."""
    from tqdm.auto import tqdm

    from vision import SpeculativeVLM

    images = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if not images or len(prompts) != len(images):
        raise InvalidInputError(f"self_distill needs one prompt per example: got {len(images)} image entries and "
                                f"{len(prompts)} prompts (or pass one prompt string for all)")
    svlm = SpeculativeVLM(model, processor, None)  # target only: greedy answers exactly as the target gives them
    rows = []
    for start in tqdm(range(0, len(images), batch_size), desc="self-distillation", disable=not progress):
        imgs, qs = images[start:start + batch_size], prompts[start:start + batch_size]
        out = svlm.generate(prompt=qs, images=imgs, max_new_tokens=max_new_tokens)
        for im, q, answer in zip(imgs, qs, out.texts):
            user = {"role": "user", "content": [{"type": "image"}] * len(im) + [{"type": "text", "text": q}]}
            rows.append((im, [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]))
    return save_dataset(out_dir, rows)
