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


def load_pretrained(loader, path, what: str, **kwargs):
    """`loader.from_pretrained(path, **kwargs)` (a transformers Auto class, a model or processor class) with every
    loader failure as a CheckpointError that names the file at fault and never advises unpickling: a path-like
    `path` that does not exist fails first, without asking the hub (`mmspec.checks.check_local_path`); a pickled
    ``pytorch_model.bin`` torch refuses to unpickle, a truncated or corrupt safetensors file, a config.json with
    wrong field types, a missing file or an unreachable hub id each get their own message. `what` names the
    argument in the message ("--target", "drafter", ...)."""
    import pickle

    from .checks import check_local_path, is_path_like
    from .errors import MMSpecError

    check_local_path(path, what)
    try:
        return loader.from_pretrained(path, **kwargs)
    except MMSpecError:
        raise
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never repeat that advice
        files = sorted(Path(path).glob("*.bin")) if Path(path).is_dir() else [Path(path)]
        name = ", ".join(repr(str(f)) for f in files) or repr(str(path))
        raise CheckpointError(f"{what} {str(path)!r}: {name} is a pickled checkpoint that could not be loaded "
                              "safely (it holds objects other than tensors, which are not unpickled); re-save the "
                              "model with save_pretrained (safetensors) from a source you trust") from None
    except Exception as e:  # noqa: BLE001 - every loader failure is reported as a checkpoint problem, typed
        if type(e).__name__ == "SafetensorError" or "safetensors" in type(e).__module__:
            bad = _bad_safetensors(path)
            raise CheckpointError(f"{what} {str(path)!r}: {bad or 'a safetensors file'} is not a readable "
                                  f"safetensors file ({e}); the checkpoint is truncated or corrupt") from None
        if type(e).__name__.startswith("StrictDataclass") or (isinstance(e, (TypeError, ValueError)) and
                                                               "config" in str(e).lower() and _has_config(path)):
            raise CheckpointError(f"{what} {str(path)!r}: {str(Path(path) / CONFIG_NAME)!r} is invalid "
                                  f"({' '.join(str(e).split())})") from None
        if not isinstance(e, (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)):
            raise
        where = ("a local model directory with config.json and weights" if is_path_like(path)
                 else "a local model directory, or a hub id reachable from this machine")
        raise CheckpointError(f"{what} {str(path)!r} could not be loaded by {getattr(loader, '__name__', loader)} "
                              f"({type(e).__name__}: {' '.join(str(e).split())}); pass {where}") from e


def _has_config(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def _bad_safetensors(path) -> str | None:
    """The first safetensors file under `path` whose header or data cannot be read (quoted), or None."""
    from safetensors import safe_open

    p = Path(path)
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else [p]:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception:  # noqa: BLE001 - any failure marks the file
            return repr(str(f))
    return None
