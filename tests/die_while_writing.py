"""
Run a sampling script and SIGKILL it in the middle of writing a file: what a
crash or ``kill -9`` at that instant leaves in the log directory, at a known
point instead of a timed one (tests/test_resume.py). The shipped code has no
hooks for this; this wrapper patches it from outside, in its own process.

    python tests/die_while_writing.py shard K scripts/image_sample.py [flags...]
        each rank writes K shards, then dies half-way through writing the next
    python tests/die_while_writing.py npz scripts/image_sample.py [flags...]
        rank 0 dies while streaming the shards into the final npz
    python tests/die_while_writing.py after_npz scripts/image_sample.py [flags...]
        rank 0 dies right after renaming the final npz into place
"""

import io
import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from improved_diffusion import sample_run  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def die_in_shard(after):
    """np.savez (the shard writer's) writes `after` files, then half of the next."""
    savez, written = np.savez, [0]

    def half_then_die(file, *args, **kwargs):
        if written[0] < after:
            written[0] += 1
            return savez(file, *args, **kwargs)
        data = io.BytesIO()
        savez(data, *args, **kwargs)
        file.write(data.getvalue()[: len(data.getvalue()) // 2])
        file.flush()
        die()

    np.savez = half_then_die


def die_in_npz():
    """The final npz dies after its first chunk of samples reached the file."""
    write = sample_run.write_npz_streaming

    def write_then_die(path, members):
        key, dtype, shape, chunks = members[0]

        def first_then_die():
            for n, chunk in enumerate(chunks()):
                if n == 1:
                    die()
                yield chunk

        return write(path, [(key, dtype, shape, first_then_die)] + list(members[1:]))

    sample_run.write_npz_streaming = write_then_die


def die_after_npz():
    """The process dies as soon as the final npz has its name (before the shards go)."""
    replace = os.replace

    def replace_then_die(src, dst):
        replace(src, dst)
        if os.path.basename(dst).startswith("samples_") and dst.endswith(".npz"):
            die()

    os.replace = replace_then_die


if __name__ == "__main__":
    if sys.argv[1] == "shard":
        die_in_shard(int(sys.argv[2]))
        script, rest = sys.argv[3], sys.argv[4:]
    else:
        {"npz": die_in_npz, "after_npz": die_after_npz}[sys.argv[1]]()
        script, rest = sys.argv[2], sys.argv[3:]
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")
