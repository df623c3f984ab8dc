"""Build the notebooks under notebooks/ from their sources and execute them, outputs stored.

    flock /tmp/mmspec-heavy.lock .venv/bin/python scripts/make_notebooks.py            # all of them
    .venv/bin/python scripts/make_notebooks.py 02 03                                   # those whose name starts so
    .venv/bin/python scripts/make_notebooks.py --no-execute                            # build only (no outputs)

Each notebook's source is notebooks/src/<name>.py in the "percent" format (Jupytext, VS Code, Spyder): a line
``# %%`` starts a code cell, ``# %% [markdown]`` a Markdown cell whose lines are comments (``# `` stripped). The
script writes notebooks/<name>.ipynb, runs it top to bottom with nbclient in notebooks/ (the zoo models load from
$MMSPEC_ZOO, built on first use), and saves it with every output: the committed notebooks show their images and
plots where the repository is browsed. A cell that raises stops the run and the notebook is still written, with the
error in its outputs. Prints each notebook's run time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
TIMEOUT = 900  # seconds per cell


def parse(text: str) -> list[tuple[str, str]]:
    """[(cell_type, source)] of a percent-format file."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is not None:
            src = "\n".join(lines).strip("\n")
            if kind == "markdown":
                src = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in src.splitlines())
            cells.append((kind, src))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in parse(src.read_text(encoding="utf-8")):
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text))
    return nb


def execute(nb: nbformat.NotebookNode) -> None:
    NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="name prefixes to build (default: every source)")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    args = ap.parse_args(argv)
    sources = sorted(p for p in SOURCES.glob("*.py") if not args.only or any(p.stem.startswith(o) for o in args.only))
    if not sources:
        print(f"no notebook sources under {SOURCES} match {args.only}", file=sys.stderr)
        return 2
    failed = []
    for src in sources:
        nb, path = build(src), NOTEBOOKS / f"{src.stem}.ipynb"
        t0 = time.perf_counter()
        if not args.no_execute:
            try:
                execute(nb)
            except CellExecutionError as e:
                failed.append(src.stem)
                print(f"{src.stem}: FAILED\n{str(e)[-3000:]}", file=sys.stderr)
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: {len(nb.cells)} cells, {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
