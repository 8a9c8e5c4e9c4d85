"""
Files written whole or not at all, and file digests.

Every writer in the project that must not leave a half-written file behind
(checkpoints, shards, npz results, pictures, JSON records) goes through
:func:`atomic_write`: the data goes to a temporary file in the same folder,
which is renamed over the destination only once it is complete.
"""

import contextlib
import hashlib
import json
import os
import secrets


def sha256_file(path, chunk=1 << 20):
    """The sha256 hex digest of a file's contents, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path, mode="wb", fsync=False):
    """
    Open a temporary file next to `path` for writing; when the block ends
    without an exception, make it `path` (``os.replace``), else remove it.

    :param fsync: flush the data to disk before the rename (for results
        that must survive a crash of the machine, not only of the process).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_json(path, obj, end="\n", **dump_kwargs):
    """Write `obj` as JSON (then `end`) with :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)
        f.write(end)
    return path


def atomic_torch_save(obj, path):
    """
    ``torch.save`` through :func:`atomic_write` (with fsync). Remote blob
    paths (``scheme://...``) cannot be renamed: they are written directly.
    """
    import torch as th

    if "://" in path:
        import blobfile as bf

        with bf.BlobFile(path, "wb") as f:
            th.save(obj, f)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb", fsync=True) as f:
        th.save(obj, f)
    return path
