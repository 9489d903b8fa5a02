"""Atomic result files: nothing awt writes is ever left half-written.

Each writer writes to a temporary file in the destination folder and renames it over
the target with :func:`os.replace`, which is atomic on POSIX and Windows.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Result", "to_jsonable", "atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the mode an ordinary ``open(path, "w")`` would give it: the existing file's, else
    ``0o666 & ~umask`` (``mkstemp`` alone would leave it ``0o600``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        perm = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        perm = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, perm)
        try:
            fh = os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def _default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_jsonable(o: Any) -> Any:
    """Plain-Python (JSON-ready) form of ``o``: tensors and arrays become nested lists, results and
    dataclasses dicts (through their ``to_dict``), mappings and sequences are converted element-wise."""
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, (os.PathLike,)):
        return os.fspath(o)
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if is_dataclass(o) and not isinstance(o, type):
        return {f.name: to_jsonable(getattr(o, f.name)) for f in fields(o)}
    return to_jsonable(_default(o))


@dataclass(frozen=True)
class Result:
    """Base of awt's result records: a frozen dataclass whose :meth:`to_dict` is its fields in
    JSON-ready form (:func:`to_jsonable`). Subclasses declare fields only; a subclass that needs
    another layout overrides :meth:`to_dict` and says why."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self)}


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    text = json.dumps(obj, indent=indent, default=_default, allow_nan=True)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through a temporary file (checkpoints survive interruption)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), mode="wb")
