"""Every notebook under notebooks/ executes top to bottom (slow tier); the committed notebooks are the ones their
sources build, with their outputs stored (fast tier). `scripts/make_notebooks.py` regenerates them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SOURCES = sorted((ROOT / "notebooks" / "src").glob("*.py"))


def _script():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_source_has_its_committed_notebook_with_outputs():
    import nbformat

    script = _script()
    assert [p.stem for p in NOTEBOOKS] == [s.stem for s in SOURCES]
    for src in SOURCES:
        committed = nbformat.read(ROOT / "notebooks" / f"{src.stem}.ipynb", as_version=4)
        built = script.build(src)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
            f"{src.stem}.ipynb is stale: run scripts/make_notebooks.py {src.stem[:2]}")
        code = [c for c in committed.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{src.stem}.ipynb is committed without its outputs"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{src.stem}.ipynb shows no figure"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
