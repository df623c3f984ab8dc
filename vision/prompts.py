"""From (images, prompt | chat messages) to processor inputs, with each model's own processor and chat template.

Messages use transformers' chat format: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text",
"text": "..."}]}, ...]``; an image part may carry the image itself (``{"type": "image", "image": PIL/path}``) or take
the next one of ``images``. A plain ``prompt`` becomes one user turn with one image part per image. Without a chat
template the prompt is used as written (the family's image token is prepended per image when it has none).
"""
from __future__ import annotations

import copy
import torch

from mmspec.errors import ImageCountError, ImageError, InvalidInputError

from .images import load_images
from .target import VLMRequest

PROCESSOR_ONLY = ("input_ids", "attention_mask", "labels")  # the rest of a processor's output goes to the model as is


def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                         "chat_template", None))


def user_turn(prompt: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}


def normalise_messages(messages) -> list[dict]:
    """Validate chat messages; string contents become one text part."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidInputError(f"messages[{i}] is {m!r}; expected a dict with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not all(isinstance(p, dict) and "type" in p for p in content):
            raise InvalidInputError(f"messages[{i}]['content'] must be a string or a list of {{'type': ...}} parts")
        out.append({**m, "content": [dict(p) for p in content]})
    return out


def take_message_images(messages: list[dict], images: list) -> tuple[list[dict], list]:
    """Images in message order: an image part's own 'image' (or 'url'/'path'), else the next of `images`."""
    queue, ordered, n_parts = list(images), [], 0
    msgs = copy.deepcopy(messages)
    for m in msgs:
        for part in m["content"]:
            if part["type"] != "image":
                continue
            n_parts += 1
            own = next((part.pop(k) for k in ("image", "path", "url") if k in part), None)
            if own is not None:
                ordered.append(own)
            elif queue:
                ordered.append(queue.pop(0))
    given = len(ordered) + len(queue)
    if n_parts != given:
        raise ImageCountError(f"the messages have {n_parts} image part(s) but {given} image(s) were given; pass one "
                              "image per {'type': 'image'} part")
    return msgs, ordered


def strip_images(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [p for p in m["content"] if p["type"] != "image"]} for m in messages]


def render(processor, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def image_token(processor) -> str | None:
    return getattr(processor, "image_token", None)


def build_request(processor, *, images=None, prompt: str | None = None, messages=None,
                  device: torch.device | None = None) -> tuple[VLMRequest, list[dict] | None, str]:
    """(request, normalised messages or None, rendered text) for one row."""
    if (prompt is None) == (messages is None):
        raise InvalidInputError("pass exactly one of prompt= (a string) or messages= (chat turns)")
    imgs = images if isinstance(images, (list, tuple)) else ([] if images is None else [images])
    if messages is not None:
        msgs, ordered = take_message_images(normalise_messages(messages), imgs)
        pil = load_images(ordered)
        text = render(processor, msgs)
    else:
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        pil = load_images(imgs)
        msgs = None
        tok = image_token(processor)
        rendered = has_chat_template(processor) and not (tok and tok in prompt) and is_rendered(processor, prompt)
        if rendered and pil:
            raise ImageCountError(
                f"prompt={_short(prompt)}: it is already rendered by the chat template but has no image placeholder "
                f"for the {len(pil)} image(s); pass the plain question as prompt= (it is templated for you), or "
                f"put {tok!r} where each image goes in the rendered prompt, or pass messages=[...]")
        if has_chat_template(processor) and not (tok and tok in prompt) and not rendered:
            msgs = [user_turn(prompt, len(pil))]
            text = render(processor, msgs)
        else:
            n = prompt.count(tok) if tok else 0
            if n and n != len(pil):
                raise ImageCountError(f"the prompt has {n} {tok!r} placeholder(s) but {len(pil)} image(s) were "
                                      "given; pass one image per placeholder")
            text = (tok * len(pil) if (tok and not n) else "") + prompt
    names = [_image_name(i, spec) for i, spec in enumerate(ordered if messages is not None else imgs)]
    return process(processor, text, pil, names), msgs, text


SENTINEL = "\x00mmspec-question\x00"


def is_rendered(processor, prompt: str) -> bool:
    """Whether `prompt` was already run through the processor's chat template: it holds a special token the template
    writes around a question (``<|im_start|>``, ``<start_of_turn>``, ...), or ends with the template's generation
    prompt (``ASSISTANT:``). Templating it again would nest one conversation inside another."""
    try:
        probe = render(processor, [user_turn(SENTINEL, 0)])
    except Exception:  # noqa: BLE001 - a template that cannot render a plain turn: nothing to compare against
        return False
    if SENTINEL not in probe:
        return False
    before, after = probe.split(SENTINEL, 1)
    tok = getattr(processor, "tokenizer", processor)
    specials = set(getattr(tok, "all_special_tokens", []) or []) | set(getattr(tok, "added_tokens_encoder", {}) or {})
    markers = {t for t in specials if t and len(t) > 1 and t in before + after and t != image_token(processor)}
    if any(m in prompt for m in markers):
        return True
    tail = after.strip()
    return bool(tail) and len(tail) > 2 and prompt.rstrip().endswith(tail)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _image_name(i: int, spec) -> str:
    """How an error names image i: its path, or its size and type for an in-memory image."""
    from pathlib import Path

    if isinstance(spec, (str, Path)):
        return f"images[{i}] ({str(spec)!r})"
    size = getattr(spec, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        return f"images[{i}] ({size[0]}x{size[1]} {type(spec).__name__})"
    shape = tuple(getattr(spec, "shape", ()) or ())
    return f"images[{i}] ({type(spec).__name__}{' ' + str(shape) if shape else ''})"


def _culprit(processor, images: list, names: list[str] | None) -> str | None:
    """Which image the processor's image part rejects on its own (the first), named; None if none does alone."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or not images:
        return None
    for i, img in enumerate(images):
        try:
            ip(images=[img], return_tensors="pt")
        except Exception:  # noqa: BLE001 - any failure singles the image out
            return names[i] if names and i < len(names) else f"images[{i}]"
    return None


def process(processor, text: str, images: list, names: list[str] | None = None) -> VLMRequest:
    """Run the processor for one row; its errors about images vs placeholders become ImageCountError, an image it
    rejects (an extreme aspect ratio, a size it cannot resize) an ImageError naming the image."""
    try:
        out = processor(images=images or None, text=[text], return_tensors="pt")
    except (ValueError, IndexError, RuntimeError, TypeError) as e:
        msg = str(e)
        culprit = _culprit(processor, images, names)
        if culprit is not None:
            raise ImageError(f"{culprit}: the processor cannot use this image ({' '.join(msg.split())}); resize "
                             "or crop it to a usual shape") from e
        if "image" in msg.lower() or "token" in msg.lower():
            raise ImageCountError(f"the processor rejected {len(images)} image(s) for this prompt: {msg}") from e
        raise InvalidInputError(f"the processor rejected the input: {msg}") from e
    ids = out["input_ids"][0].tolist()
    inputs = {k: v for k, v in out.items() if k not in PROCESSOR_ONLY}
    return VLMRequest(ids, inputs)


def text_only_ids(processor, messages: list[dict] | None, prompt_text: str) -> list[int]:
    """What a text-only drafter sees: the same conversation rendered without image parts."""
    tok = processor.tokenizer
    if messages is not None:
        text = render(processor, strip_images(messages))
    else:
        it = image_token(processor)
        text = prompt_text.replace(it, "") if it else prompt_text
    return tok(text)["input_ids"]


def batch_args(images, prompt, messages) -> list[dict]:
    """Split the public arguments into rows: prompt=[...] / messages=[[...], ...] with images=[[...], ...]."""
    if isinstance(prompt, (list, tuple)) or (isinstance(messages, (list, tuple)) and messages
                                            and isinstance(messages[0], (list, tuple))):
        rows = list(prompt) if prompt is not None else list(messages)
        imgs = images if images is not None else [None] * len(rows)
        if not isinstance(imgs, (list, tuple)) or len(imgs) != len(rows):
            raise ImageCountError(f"{len(rows)} prompts need {len(rows)} image lists (images=[[...], ...]); got "
                                  f"{len(imgs) if isinstance(imgs, (list, tuple)) else type(imgs).__name__}")
        key = "prompt" if prompt is not None else "messages"
        return [{key: r, "images": i} for r, i in zip(rows, imgs)]
    return [{"prompt": prompt, "messages": messages, "images": images}]
