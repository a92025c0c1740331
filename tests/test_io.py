"""Atomic writes and checked reads: a failure never leaves a half-written file or folder."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from mta.io import MTAError, atomic_dir, atomic_save_tensors, atomic_write_json, load_tensors, read_json


def test_atomic_dir_rolls_back(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_json_and_tensors_round_trip(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"b": [1, 2]})
    assert read_json(tmp_path / "a" / "x.json") == {"b": [1, 2]}
    atomic_save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(6.0).reshape(2, 3).T})  # non-contiguous is fine
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["w"], torch.arange(6.0).reshape(2, 3).T)


def test_failed_tensor_save_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        atomic_save_tensors(tmp_path / "t.safetensors", {"w": "not a tensor"})
    assert list(tmp_path.iterdir()) == []


def test_checked_reads(tmp_path):
    with pytest.raises(MTAError, match="thing not found"):
        read_json(tmp_path / "nope.json", "thing")
    (tmp_path / "bad.json").write_text("[1,\n 2")
    with pytest.raises(MTAError, match=r"thing .*bad.json is not valid JSON \(line 2"):
        read_json(tmp_path / "bad.json", "thing")
    with pytest.raises(MTAError, match="tensor file not found"):
        load_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(MTAError, match=r"is not a readable safetensors file \(truncated or corrupt\?\)"):
        load_tensors(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Like any file the user makes (not tempfile's 0600/0700): an export or bank is readable by whom the umask allows."""
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
        with atomic_dir(tmp_path / "d") as tmp:
            atomic_write_json(tmp / "inner.json", [])
            save_file({"w": torch.zeros(2)}, tmp / "peft.safetensors")  # as PEFT and transformers save: 0600 by itself
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "a.json", tmp_path / "t.safetensors", tmp_path / "d",
                                                               tmp_path / "d" / "inner.json", tmp_path / "d" / "peft.safetensors"]}
    assert modes == {"a.json": file_mode, "t.safetensors": file_mode, "d": dir_mode, "inner.json": file_mode,
                     "peft.safetensors": file_mode}
