"""`mmspec --help`, every subcommand's help and the docs list the same options: docs/cli.md has one section per
command (image commands: docs/image_ar.md), and every `mmspec CMD --flag` written in README.md or docs/ exists."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mmspec.cli import build_parser, main

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs" / "cli.md"
DOCUMENTED = ["demo", "zoo", "generate", "chat", "train-drafter", "export-drafter", "bench"]


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser; train-drafter's options live in vision.train.cli (parsed when it runs)."""
    from vision.train.cli import add_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = dict(sub.choices)
    inner = argparse.ArgumentParser(prog="mmspec")
    add_parser(inner.add_subparsers(dest="command"))
    out["train-drafter"] = next(a for a in inner._actions
                                if isinstance(a, argparse._SubParsersAction)).choices["train-drafter"]
    return out


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def doc_sections() -> dict[str, set[str]]:
    """{command: the options its docs/cli.md section lists (its "- `--opt`" lines)}."""
    out, current = {}, None
    for line in DOCS.read_text().splitlines():
        m = re.match(r"## `mmspec ([\w-]+)`", line)
        if m:
            current = out.setdefault(m.group(1), set())
        elif current is not None and line.startswith("- `-"):
            current.update(re.findall(r"`(-[\w-]+)`", line.split(":", 1)[0]))
    return out


def help_text(cmd: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"] if cmd else ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    text = help_text("", capsys)
    for cmd in commands():
        assert cmd in text


@pytest.mark.parametrize("cmd", DOCUMENTED)
def test_docs_list_exactly_the_options_of_each_command(cmd, capsys):
    parser = commands()[cmd]
    assert doc_sections()[cmd] == options(parser)
    shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text(cmd, capsys).split("options:", 1)[1]))
    assert options(parser) <= shown


def test_every_command_line_in_the_docs_uses_existing_options(capsys):
    parsers = commands()
    known_by = {cmd: options(p) for cmd, p in parsers.items()}
    # train-image-head parses its own options when it runs (image_ar.train): read them from its help
    known_by["train-image-head"] = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", help_text("train-image-head", capsys)))
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for f in files:
        for m in re.finditer(r"mmspec ([a-z][\w-]*)((?:[ \t]+[^\s`|;#()]+)*)", f.read_text()):
            cmd, rest = m.group(1), m.group(2)
            if cmd not in parsers:
                continue
            known = known_by[cmd]
            bad += [(f.name, cmd, flag) for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                    if flag not in known]
    assert not bad, bad
