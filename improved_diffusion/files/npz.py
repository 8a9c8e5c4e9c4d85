"""
npz files (what ``np.savez`` writes) written and read without holding them
in memory: streamed member by member, checked in chunks, memory-mapped.
Used by the sampling run (shards, the assembled result, base samples) and
by ``evaluations/evaluator.py``.

The sampling scripts' result is ``samples_NxHxWx3.npz`` holding ``arr_0``
(uint8 [N, H, W, 3]) and, for labelled runs, ``arr_1`` (int64 [N]).
"""

import os
import struct
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from .atomic import atomic_write


def npz_name(num_samples, height, width):
    return f"samples_{num_samples}x{height}x{width}x3.npz"


def save_npz(path, images, labels=None):
    """Write ``arr_0`` (and ``arr_1``) atomically: temp file, then rename."""
    with atomic_write(path, "wb") as f:
        if labels is not None:
            np.savez(f, images, labels)
        else:
            np.savez(f, images)
    return path


class UnsupportedNpyVersion(ValueError):
    """An .npy format version that is not streamed here (read it with np.load)."""


def read_npy_header(f):
    """
    (shape, fortran_order, dtype) of the .npy stream `f`, left at the data.
    Raises UnsupportedNpyVersion for format versions other than 1.0 and 2.0.
    """
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    raise UnsupportedNpyVersion(f"npy format version {version} is not streamed")


class TruncatedMember(ValueError):
    """A member of an npz holds fewer bytes than its header promises."""

    def __init__(self, key, got, size):
        super().__init__(f"{key} ends after {got} of {size} bytes")
        self.key, self.got, self.size = key, got, size


def iter_npz_rows(path, key, batch_size):
    """
    The rows of member `key` (a C-order array) in arrays of at most
    `batch_size` rows, read in order from the zip member (stored or
    compressed), never the whole array at once. Raises UnsupportedNpyVersion
    for headers it does not stream (read those with ``np.load``) and
    TruncatedMember when the data ends early.
    """
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, fortran, dtype = read_npy_header(f)
        if fortran:
            raise UnsupportedNpyVersion(f"{key} is stored in Fortran order")
        row_shape = tuple(shape[1:])
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = _read_exact(f, n * row_bytes, key)
            yield np.frombuffer(data, dtype=dtype).reshape((n,) + row_shape)


def _read_exact(f, size, key):
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise TruncatedMember(key, got, size)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_npz_streaming(path, members):
    """
    Write an uncompressed npz (what ``np.savez`` writes) member by member.

    :param members: list of (key, dtype, shape, chunks) with `chunks` a
        callable returning an iterator over arrays whose rows, concatenated,
        make the member.
    """
    with open(path, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, dtype, shape, chunks in members:
                dtype = np.dtype(dtype)
                expected = int(np.prod(shape)) * dtype.itemsize
                written = 0
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    npy_format.write_array_header_1_0(
                        f,
                        {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                         "shape": tuple(shape)},
                    )
                    for chunk in chunks():
                        data = np.ascontiguousarray(chunk, dtype=dtype)
                        f.write(data.data)
                        written += data.nbytes
                if written != expected:
                    raise RuntimeError(f"{key}: wrote {written} bytes, expected {expected}")
        raw.flush()
        os.fsync(raw.fileno())


def verify_npz(path, expected, read_data=True):
    """
    Check an npz without loading it: member names, dtypes, shapes, byte
    counts and the zip CRCs (read in chunks).

    :param expected: key -> (dtype, shape), in member order.
    :param read_data: False checks the byte counts the zip records instead
        of reading the data (no CRCs): enough to find a file that a crash or
        a full disk cut short, without reading it.
    :return: None, or a description of the first problem.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            want = [k + ".npy" for k in expected]
            if names != want:
                return f"members {names}, expected {want}"
            for key, (dtype, shape) in expected.items():
                with zf.open(key + ".npy") as f:
                    got_shape, fortran, got_dtype = read_npy_header(f)
                    want = f"{np.dtype(dtype)} {tuple(shape)}"
                    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or fortran:
                        return f"{key} is {got_dtype} {tuple(got_shape)}, expected {want}"
                    n = zf.getinfo(key + ".npy").file_size - f.tell()
                    if read_data:
                        n = 0
                        while True:
                            block = f.read(1 << 20)  # the CRC is checked at the end
                            if not block:
                                break
                            n += len(block)
                    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    if n != nbytes:
                        return f"{key} holds {n} bytes of data, expected {nbytes}"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def npz_array(path, key="arr_0"):
    """
    One array of an npz: memory-mapped when the member is stored
    uncompressed (``np.savez``), else loaded (``np.savez_compressed``).
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as data:
            return data[key]
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad zip local header for {key}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        raw.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = read_npy_header(raw)
        offset = raw.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {key} holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape), offset=offset,
                     order="F" if fortran else "C")
