"""Atomic writes: whole or nothing, and readable like ordinary files."""

import os
import stat

import pytest

from homoexport.atomic import atomic_write_json, staging_dir


def test_staging_dir_renames_on_success_and_removes_on_failure(tmp_path):
    with staging_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "other") as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("validation failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staging_dir(tmp_path / "out"):
            pass


def test_outputs_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with staging_dir(tmp_path / "out") as tmp:
            atomic_write_json(tmp / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "r.json").stat().st_mode) == 0o644


def test_arrays_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import numpy as np

    from homoexport.atomic import atomic_write_array

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_write_array(tmp_path / "a.npy", a)
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_array(tmp_path / "b.npy", a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
