"""The shared file helpers: atomic writes, file digests, streamed npz rows."""

import hashlib
import os
import zipfile

import numpy as np
import pytest

from improved_diffusion.files.atomic import atomic_json, atomic_write, sha256_file
from improved_diffusion.files.npz import TruncatedMember, iter_npz_rows, npz_array, save_npz


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(str(path)) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]  # the temporary file is gone
    with atomic_write(str(path), fsync=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


def test_atomic_json_and_sha256(tmp_path):
    path = str(tmp_path / "a.json")
    atomic_json(path, {"b": 1, "a": [2]}, indent=1, sort_keys=True)
    text = open(path).read()
    assert text == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    assert sha256_file(path) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("compressed", [False, True])
def test_iter_npz_rows_and_npz_array(tmp_path, compressed):
    arr = np.arange(7 * 2 * 3, dtype=np.int64).reshape(7, 2, 3)
    path = str(tmp_path / "a.npz")
    (np.savez_compressed if compressed else np.savez)(path, arr)
    parts = list(iter_npz_rows(path, "arr_0", 3))
    assert [len(p) for p in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), arr)
    np.testing.assert_array_equal(npz_array(path, "arr_0"), arr)


def test_iter_npz_rows_truncated(tmp_path):
    arr = np.zeros((4, 8), dtype=np.uint8)
    path = str(tmp_path / "a.npz")
    save_npz(path, arr)
    # Rewrite the member with a header that promises more rows than it holds.
    with zipfile.ZipFile(path) as zf:
        member = zf.read("arr_0.npy")
    member = member.replace(b"(4, 8)", b"(5, 8)")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", member)
    with pytest.raises(TruncatedMember) as info:
        list(iter_npz_rows(path, "arr_0", 2))
    assert (info.value.got, info.value.size) == (0, 8)
