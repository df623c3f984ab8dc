"""The zoo: models mmspec trains itself, offline and deterministically, cached on the user's machine.

No machine this project runs on can download pretrained weights, and random or one-millisecond models say nothing
about speculative decoding: their forwards are all overhead and no drafter agrees with them. So the project trains
its own small models, sized so that their cost structure is that of real ones (a target token costs many drafter
tokens), on data it generates offline. Each pipeline declares its models as recipes (`vision.zoo.MODELS`,
`image_ar.zoo.MODELS`); this module builds, caches and finds them:

    zoo = Zoo(MODELS)
    zoo.get("vlm")                   # the model's directory; trained now (progress bars) when not cached yet
    zoo.build(["vlm-eagle"])         # dependencies ("vlm") are built first
    resolve("zoo:vlm", zoo)          # any path argument may name a zoo model: zoo:NAME, or zoo:NAME@quick

A model lives in ``zoo_dir() / "NAME-DIGEST"``: what its own ``save_pretrained`` writes, plus a model card
(``README.md`` and ``card.json``: data, size, training time, final loss, held-out acceptance). The digest hashes the
recipe, the variant and the digests of the models it was trained against, so changing a recipe trains anew and a
second build reuses the cache. Builds write into a temporary directory that is renamed when complete: an
interrupted build never leaves a directory that looks finished.

Every recipe has a ``quick`` variant (tiny sizes, a few steps) that trains in seconds: the fast test tier and
``mmspec demo --quick`` use it; its numbers mean nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import CheckpointError, InvalidInputError

PREFIX = "zoo:"
QUICK_TAG = "@quick"
CARD_JSON, CARD_MD = "card.json", "README.md"
FORMAT = 1  # bump when the on-disk layout of every zoo model changes


@contextlib.contextmanager
def seeded(seed: int):
    """Initialise weights from `seed` without touching the caller's global RNG (zoo recipes are deterministic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def zoo_dir() -> Path:
    """$MMSPEC_ZOO, else $XDG_CACHE_HOME/mmspec/zoo, else ~/.cache/mmspec/zoo."""
    if os.environ.get("MMSPEC_ZOO"):
        return Path(os.environ["MMSPEC_ZOO"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mmspec" / "zoo"


@dataclass
class BuildContext:
    """What a recipe's build function gets: where to write, its settings, and its dependencies' directories."""

    name: str
    out: Path  # an empty directory; the build writes the model (save_pretrained) into it
    recipe: dict  # the variant's settings (quick overrides applied)
    deps: dict[str, Path]  # dependency name -> its built directory
    quick: bool
    progress: bool


@dataclass(frozen=True)
class ZooModel:
    """A recipe. build(ctx) trains into ctx.out and returns the facts for the model card: "data" (str),
    "parameters" (int), "final_loss" (float or None), optionally "held_out" (dict of measured numbers) and
    "notes" (str). quick: recipe overrides for the quick variant."""

    name: str
    summary: str
    recipe: dict
    build: Callable[[BuildContext], dict]
    needs: tuple[str, ...] = ()
    quick: dict = field(default_factory=dict)
    loads_with: str = ""  # how a user loads it, for the card ("SpeculativeVLM.from_pretrained('zoo:vlm')")

    def settings(self, quick: bool) -> dict:
        return {**self.recipe, **self.quick} if quick else dict(self.recipe)


def parse(spec: str) -> tuple[str, bool] | None:
    """"zoo:NAME" -> (NAME, False), "zoo:NAME@quick" -> (NAME, True); anything else -> None."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        return None
    name = spec[len(PREFIX):]
    quick = name.endswith(QUICK_TAG)
    return (name[: -len(QUICK_TAG)] if quick else name), quick


class Zoo:
    """A set of recipes (names unique) over one cache directory."""

    def __init__(self, models: Iterable[ZooModel], root: Path | str | None = None):
        self.models: dict[str, ZooModel] = {}
        for m in models:
            if m.name in self.models:
                raise ValueError(f"two zoo recipes are named {m.name!r}")
            self.models[m.name] = m
        for m in self.models.values():
            for dep in m.needs:
                if dep not in self.models:
                    raise ValueError(f"zoo recipe {m.name!r} needs {dep!r}, which is not a recipe here")
        self._root = None if root is None else Path(root)

    @property
    def root(self) -> Path:
        return self._root or zoo_dir()

    def names(self) -> list[str]:
        return list(self.models)

    def model(self, name: str) -> ZooModel:
        if name not in self.models:
            raise InvalidInputError(f"zoo model {name!r} does not exist; the zoo has: {', '.join(self.models)}")
        return self.models[name]

    def digest(self, name: str, quick: bool = False) -> str:
        m = self.model(name)
        key = {"format": FORMAT, "name": name, "quick": quick, "recipe": m.settings(quick),
               "needs": {d: self.digest(d, quick) for d in m.needs}}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def path(self, name: str, quick: bool = False) -> Path:
        """Where the model lives (whether or not it is built)."""
        return self.root / f"{name}{'-quick' if quick else ''}-{self.digest(name, quick)}"

    def is_built(self, name: str, quick: bool = False) -> bool:
        return (self.path(name, quick) / CARD_JSON).is_file()

    def card(self, name: str, quick: bool = False) -> dict:
        path = self.path(name, quick) / CARD_JSON
        if not path.is_file():
            raise CheckpointError(f"zoo model {name!r} is not built yet ({str(path)!r} is missing); run "
                                  f"`mmspec zoo build --only {name}`")
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); delete {str(path.parent)!r} and "
                                  "build it again") from e

    def order(self, names: Iterable[str]) -> list[str]:
        """`names` and everything they need, dependencies first."""
        out: list[str] = []

        def visit(n: str, stack: tuple[str, ...]):
            if n in stack:
                raise ValueError(f"zoo recipes depend on each other in a cycle: {' -> '.join(stack + (n,))}")
            if n in out:
                return
            for dep in self.model(n).needs:
                visit(dep, stack + (n,))
            out.append(n)

        for n in names:
            visit(n, ())
        return out

    def get(self, name: str, quick: bool = False, progress: bool = True) -> Path:
        """The model's directory, built first (with everything it needs) when not cached."""
        if not self.is_built(name, quick):
            self.build([name], quick=quick, progress=progress)
        return self.path(name, quick)

    def build(self, names: Iterable[str] | None = None, quick: bool = False, progress: bool = True,
              force: bool = False) -> list[dict]:
        """Build `names` (default: all) and their dependencies; cached models are reused unless `force` (which
        rebuilds only the named ones). Returns the cards, in build order."""
        wanted = list(self.models) if names is None else list(names)
        order = self.order(wanted)
        cards = []
        for i, name in enumerate(order, 1):
            fresh = force and name in wanted
            if self.is_built(name, quick) and not fresh:
                if progress:
                    print(f"zoo [{i}/{len(order)}] {name}: cached in {self.path(name, quick)}", flush=True)
            else:
                if progress:
                    print(f"zoo [{i}/{len(order)}] {name}: training ({self.model(name).summary})", flush=True)
                self._build_one(name, quick, progress)
            cards.append(self.card(name, quick))
        return cards

    def _build_one(self, name: str, quick: bool, progress: bool) -> None:
        m = self.model(name)
        final = self.path(name, quick)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ctx = BuildContext(name, tmp, m.settings(quick), {d: self.path(d, quick) for d in m.needs}, quick, progress)
        t0 = time.perf_counter()
        try:
            facts = m.build(ctx)
            card = self._card(m, quick, facts, time.perf_counter() - t0)
            (tmp / CARD_JSON).write_text(json.dumps(card, indent=2, default=str))
            (tmp / CARD_MD).write_text(card_markdown(card))
            if final.exists():  # a leftover without a card (never complete): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"zoo: {name} built in {time.perf_counter() - t0:.0f} s -> {final}", flush=True)

    def _card(self, m: ZooModel, quick: bool, facts: dict, seconds: float) -> dict:
        import torch
        import transformers

        return {"name": m.name, "variant": "quick" if quick else "full", "summary": m.summary,
                "digest": self.digest(m.name, quick), "recipe": m.settings(quick),
                "trained_against": {d: self.path(d, quick).name for d in m.needs},
                "training_seconds": round(seconds, 1), **facts,
                "loads_with": m.loads_with.replace("zoo:" + m.name, "zoo:" + m.name + (QUICK_TAG if quick else "")),
                "rebuild": f"mmspec zoo build --only {m.name}{' --quick' if quick else ''}",
                "built": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                                "python": platform.python_version(), "threads": torch.get_num_threads(),
                                "cpus": os.cpu_count(), "machine": platform.machine()}}


def card_markdown(card: dict) -> str:
    """The model card as Markdown (README.md next to the weights)."""
    lines = [f"# zoo:{card['name']}{QUICK_TAG if card['variant'] == 'quick' else ''}", "", card["summary"], ""]
    if card.get("variant") == "quick":
        lines += ["**Quick variant**: tiny sizes and a few training steps, for tests; its numbers mean nothing.", ""]
    lines += ["| | |", "|---|---|",
              f"| data | {card.get('data', '-')} |",
              f"| parameters | {card.get('parameters', 0):,} |",
              f"| training time | {card['training_seconds']:.0f} s on {card['environment']['cpus']} CPU(s), "
              f"{card['environment']['threads']} torch thread(s) |",
              f"| final training loss | {_fmt(card.get('final_loss'))} |"]
    for k, v in (card.get("held_out") or {}).items():
        lines.append(f"| held-out {k} | {_fmt(v)} |")
    for k, v in card.get("trained_against", {}).items():
        lines.append(f"| trained against | zoo:{k} ({v}) |")
    lines += [f"| load | `{card.get('loads_with') or '-'}` |", f"| rebuild | `{card['rebuild']}` |",
              f"| built | {card['built']}, torch {card['environment']['torch']}, transformers "
              f"{card['environment']['transformers']} |", ""]
    if card.get("notes"):
        lines += [card["notes"], ""]
    lines += ["## Recipe", "", "```json", json.dumps(card["recipe"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def cards_table(cards: Iterable[dict]) -> str:
    """One Markdown table over model cards (name, parameters, training time, final loss, held-out facts), with the
    total training time: what `mmspec zoo cards` prints and docs/BENCHMARKS.md quotes."""
    cards = list(cards)
    lines = ["| model | parameters | training time | final loss | held-out |", "|---|---:|---:|---:|---|"]
    for c in cards:
        held = "; ".join(f"{k} {_fmt(v)}" for k, v in (c.get("held_out") or {}).items() if k != "example")
        params = f"{c['parameters'] / 1e6:.2f} M" if c.get("parameters") else "-"
        tag = QUICK_TAG if c.get("variant") == "quick" else ""
        lines.append(f"| `zoo:{c['name']}{tag}` | {params} | {c['training_seconds']:.0f} s | "
                     f"{_fmt(c.get('final_loss'))} | {held or '-'} |")
    total = sum(c["training_seconds"] for c in cards)
    lines += ["", f"Total training time {total / 60:.1f} min ({len(cards)} models)."]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def resolve(spec, zoo: Zoo, progress: bool = True):
    """`spec` itself, or for "zoo:NAME[@quick]" the model's directory (as str), built first if needed."""
    parsed = parse(spec)
    if parsed is None:
        return spec
    name, quick = parsed
    return str(zoo.get(name, quick=quick, progress=progress))
