"""Rendered scenes with descriptions and question-answer pairs, and natural text: the zoo VLM's training data.

Everything is generated offline and deterministically from a seed. A scene is a small picture (64 x 64 by default)
on a plain background with one to four objects — a shape (circle, square, triangle, diamond, star, cross) of a
colour and a size, each in one cell of a 3 x 3 layout ("top left" ... "bottom right") — and sometimes a short word
written in a free cell (rendered text). `conversation` turns a scene into one of several kinds of question (describe,
count, colour, where, is-there, read the text) asked in several phrasings; the answer follows from the scene and the
phrasing, so a model trained on it can be right, and its answers vary with the question as a chat model's do.

`natural_text` is prose that ships with every Python installation: the language reference topics of the standard
library's `pydoc_data` (an English text of about half a million characters). `text_conversation` asks about a topic
or to continue a passage and answers with the text itself, so the language side of the zoo model is not a template.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "orange": (245, 140, 20), "purple": (140, 60, 190), "black": (25, 25, 25), "pink": (240, 120, 180)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (200, 200, 200), "light blue": (200, 225, 245),
               "beige": (240, 230, 200)}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
WORDS = ("CAT", "DOG", "SUN", "MAP", "BOX", "KEY", "CUP", "HAT", "BUS", "PEN", "SKY", "OWL")
NUMBERS = ("no", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cell: int  # 0..8, row-major in the 3 x 3 layout


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...]
    word: str | None = None
    word_cell: int | None = None


def place(cell: int) -> str:
    """Cell index -> "top left", "top", ..., "center", ..., "bottom right"."""
    r, c = divmod(cell, 3)
    if r == 1 and c == 1:
        return "center"
    if r == 1:
        return COLS[c]
    if c == 1:
        return ROWS[r]
    return f"{ROWS[r]} {COLS[c]}"


def random_scene(rng: random.Random, text_prob: float = 0.25) -> Scene:
    n = rng.choice((1, 1, 2, 2, 3, 3, 4))
    cells = rng.sample(range(9), n + 1)
    things = tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(("small", "large")), c)
                   for c in sorted(cells[:n]))
    word = rng.choice(WORDS) if rng.random() < text_prob else None
    return Scene(rng.choice(list(BACKGROUNDS)), things, word, cells[n] if word else None)


# ------------------------------------------------------------------------------------------------------ rendering
def render(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """The scene as an RGB image; `seed` jitters positions and colours a little (the same scene, another photo)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), _jitter(BACKGROUNDS[scene.background], rng, 6))
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for t in scene.things:
        r, c = divmod(t.cell, 3)
        cx = (c + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        radius = cell * (0.22 if t.size == "small" else 0.42) * rng.uniform(0.9, 1.05)
        _shape(draw, t.shape, cx, cy, radius, _jitter(COLOURS[t.colour], rng, 18))
    if scene.word:
        r, c = divmod(scene.word_cell, 3)
        font = ImageFont.load_default(size=max(6, round(size * 0.16)))
        x0, y0, x1, y1 = draw.textbbox((0, 0), scene.word, font=font)
        draw.text(((c + 0.5) * cell - (x1 + x0) / 2, (r + 0.5) * cell - (y1 + y0) / 2), scene.word,
                  fill=(10, 10, 10), font=font)
    return img


def _jitter(rgb, rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "star":
        import math

        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# ---------------------------------------------------------------------------------------------- language: scenes
def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _count(n: int, word: str) -> str:
    return f"{NUMBERS[n]} {_plural(word, n)}"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _thing(t: Thing, size: bool = True) -> str:
    return f"{'a ' + t.size + ' ' if size else 'a '}{t.colour} {t.shape}"


def _where(t: Thing) -> str:
    p = place(t.cell)
    return "in the center" if p == "center" else f"at the {p}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, style: int) -> str:
    n = len(scene.things)
    if style == 0:  # detailed
        out = [f"The image shows {_count(n, 'shape')} on a {scene.background} background."]
        out += [f"There is {_thing(t)} {_where(t)}." for t in scene.things]
        if scene.word:
            out.append(f'The word "{scene.word}" is written {_where(Thing("", "", "", scene.word_cell))}.')
        return " ".join(out)
    if style == 1:  # one sentence
        s = f"{_join([_thing(t, size=False) for t in scene.things]).capitalize()} on a {scene.background} background"
        return s + (f', with the word "{scene.word}".' if scene.word else ".")
    out = [f"I can see {_count(n, 'object')}."]  # a list
    out += [f"{i + 1}. {_thing(t).capitalize()} {_where(t)}." for i, t in enumerate(scene.things)]
    if scene.word:
        out.append(f'There is also some text: "{scene.word}".')
    return " ".join(out)


DESCRIBE = (("Describe the image in detail.", 0), ("Describe this picture.", 0), ("What is in the image?", 1),
            ("Give a short caption for this image.", 1), ("List the objects you see.", 2),
            ("What objects are in this picture?", 2))


def conversation(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about the scene: a kind of question, then one of its phrasings."""
    kind = rng.choices(("describe", "count", "colour", "where", "exists", "text"), (4, 2, 2, 2, 2, 1))[0]
    things = scene.things
    if kind == "describe":
        q, style = rng.choice(DESCRIBE)
        return q, describe(scene, style)
    if kind == "count":
        colour = rng.choice([None, rng.choice(list(COLOURS))])
        if colour is None:
            n = len(things)
            return rng.choice((("How many shapes are there?", f"There {_be(n)} {_count(n, 'shape')}."),
                               ("How many objects can you see?", f"I can see {_count(n, 'object')}.")))
        n = sum(t.colour == colour for t in things)
        return f"How many {colour} shapes are there?", f"There {_be(n if n else 2)} {_count(n, colour + ' shape')}."
    if kind == "colour":
        unique = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        if not unique:
            return conversation(scene, rng)
        t = rng.choice(unique)
        return rng.choice(((f"What color is the {t.shape}?", f"The {t.shape} is {t.colour}."),
                           (f"Which color does the {t.shape} have?", f"It is {t.colour}.")))
    if kind == "where":
        t = rng.choice(things)
        name = f"{t.colour} {t.shape}"
        if sum(f"{u.colour} {u.shape}" == name for u in things) > 1:
            return conversation(scene, rng)
        return rng.choice(((f"Where is the {name}?", f"The {name} is {_where(t)}."),
                           (f"Where can I find the {name}?", f"It is {_where(t)} of the image.")))
    if kind == "exists":
        shape = rng.choice(SHAPES)
        found = [t for t in things if t.shape == shape]
        q = f"Is there a {shape} in the image?"
        if not found:
            return q, f"No, there is no {shape} in the image."
        return q, f"Yes, there is {_thing(found[0])} {_where(found[0])}."
    q = rng.choice(("What does the text say?", "What word is written in the image?", "Read the text in the image."))
    if scene.word is None:
        return q, "There is no text in the image."
    return q, f'The text says "{scene.word}".'


def scene_example(seed: int, size: int = 64) -> tuple[Image.Image, str, str, Scene]:
    """(image, question, answer, scene) of example `seed` (the same seed always gives the same example)."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    q, a = conversation(scene, rng)
    return render(scene, size, seed=rng.randrange(1 << 30)), q, a, scene


# ----------------------------------------------------------------------------------------------- natural text
def natural_text() -> list[tuple[str, str]]:
    """(topic, text) pairs: the Python language reference topics shipped in `pydoc_data` (plain English prose with
    some code), whitespace normalised, sorted by topic."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        text = " ".join(topics[name].split())
        if len(text) > 200:
            out.append((name, text))
    return out


def passages(max_chars: int = 400) -> list[tuple[str, str]]:
    """The natural text cut into (topic, passage) pieces of at most `max_chars`, at sentence ends where possible."""
    out = []
    for name, text in natural_text():
        start = 0
        while start < len(text):
            end = min(len(text), start + max_chars)
            cut = text.rfind(". ", start + max_chars // 2, end)
            end = cut + 1 if cut > 0 and end < len(text) else end
            out.append((name, text[start:end].strip()))
            start = end
    return [(n, p) for n, p in out if len(p) > 80]


def text_conversation(passage: tuple[str, str], rng: random.Random, answer_chars: int = 240) -> tuple[str, str]:
    """(question, answer) without an image: continue a passage, or say what a topic is about."""
    name, text = passage
    if rng.random() < 0.5:
        cut = text.find(" ", 40) if len(text) > 80 else -1
        if cut > 0:
            head, tail = text[:cut], text[cut + 1:]
            return f"Continue the text: {head}", _clip(tail, answer_chars)
    topic = name.replace("-", " ")
    return rng.choice((f"Tell me about {topic} in Python.", f"Explain {topic}.")), _clip(text, answer_chars)


def _clip(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    cut = text.rfind(" ", 0, n)
    return text[: cut if cut > 0 else n]
