"""Atomic writes and checked reads: a crash mid-write must never leave a half file behind.

Temporary files and folders are created with the modes of ordinary ones (0666/0777 less the umask), not
tempfile's private 0600/0700: banks, user folders, exports and the model cache are handed to other
processes and users.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch



class MTAError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


def _temp_beside(path: Path) -> Path:
    """A fresh hidden name in `path`'s folder (made there so that os.replace stays on one file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """`fsync=False` leaves durability to the caller (who syncs many files at once)."""
    path = Path(path)
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save  # to bytes: safetensors' own save_file makes its files 0600

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def _umask_modes(folder: Path) -> None:
    """Give everything under `folder` the mode a new file or folder gets here: safetensors (so PEFT and transformers,
    which write through it) makes its files 0600. `folder` was made with 0777, so its mode is 0777 less the umask."""
    dir_mode = stat.S_IMODE(folder.stat().st_mode)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod(dir_mode if p.is_dir() else dir_mode & 0o666)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    tmp = _temp_beside(path)
    tmp.mkdir(0o777)  # the umask applies
    try:
        yield tmp
        _umask_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(path: str | Path, marker: str, what: str, overwrite: bool = False) -> None:
    """Refuse, before any work, to write `path` over anything mta did not write.

    `path` may be missing or empty; a folder mta wrote (it holds `marker`) is replaced only with `overwrite`;
    any other folder or file is never replaced.
    """
    path = Path(path)
    if not path.exists() or path.is_dir() and not any(path.iterdir()):
        return
    if not (path / marker).is_file():
        kind = "a folder" if path.is_dir() else "a file"
        raise MTAError(f"{path} is {kind} that is not an mta {what} (no {marker}): mta never replaces it; choose another --out")
    if not overwrite:
        raise MTAError(f"{path} is an mta {what} already; pass --overwrite to replace it")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MTAError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MTAError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise MTAError(f"{what} {path} is not UTF-8 text") from None


def load_tensors(path: str | Path) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MTAError(f"tensor file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MTAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
