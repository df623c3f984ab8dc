"""Reading mmspec's own checkpoint folders safely: a `config.json` tagged with a "kind", and safetensors weights
(nothing is unpickled or executed). Every failure is a `CheckpointError` naming the file and what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError


def read_kind_config(path: Path, kind: str, owner: str) -> dict:
    """The JSON object in `path`, which must carry `"kind": kind` (a folder written by `owner`.save_pretrained)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: expected a directory written by {owner}.save_pretrained")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(raw, dict) or raw.get("kind") != kind:
        found = raw.get("kind") if isinstance(raw, dict) else None
        raise CheckpointError(f"{str(path)!r} is not a {kind} config (kind={found!r})")
    return raw


def read_safetensors(path: Path, what: str = "checkpoint") -> dict:
    """The tensors of a safetensors file; `what` names the checkpoint in the error for a missing file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: the {what} has no weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); the checkpoint is corrupt "
                              "or truncated") from e


CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def checkpoint_kind(directory) -> str | None:
    """The "kind" a checkpoint folder's config.json declares, or None (no folder, no config, not JSON, no kind)."""
    try:
        raw = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def write_checkpoint(directory, kind: str, config: dict, tensors: dict, *, config_name: str = CONFIG_NAME,
                     weights_name: str = WEIGHTS_NAME) -> Path:
    """Write `weights_name` (the tensors, as contiguous CPU safetensors) and `config_name` ({"kind": kind,
    **config}) into `directory` (created), the layout `read_kind_config` / `read_safetensors` read back."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / weights_name))
    (out / config_name).write_text(json.dumps({"kind": kind, **config}, indent=2))
    return out
