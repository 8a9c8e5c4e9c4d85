"""
Run a sampling script and SIGKILL it in the middle of writing a file: what a
crash or ``kill -9`` at that instant leaves in the log directory, at a known
point instead of a timed one (tests/test_resume.py). The shipped code has no
hooks for this; this wrapper patches it from outside, in its own process.

    python tests/die_while_writing.py shard K image_sample [flags...]
        each rank writes K shards, then dies half-way through writing the next
    python tests/die_while_writing.py shard_together K DIR image_sample [flags...]
        the same, but every rank first waits in DIR until all ranks have
        written K shards (every rank must have more than K batches): the job
        dies with exactly K shards per rank, whatever the ranks' speeds
    python tests/die_while_writing.py npz image_sample [flags...]
        rank 0 dies while streaming the shards into the final npz
    python tests/die_while_writing.py after_npz image_sample [flags...]
        rank 0 dies right after renaming the final npz into place

The script is named as a module of ``scripts`` and run through its main.
"""

import importlib
import io
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from improved_diffusion.run import sample_run  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_every_rank(folder):
    """A rendezvous through files: this rank checks in, then waits for all the others."""
    from improved_diffusion import dist_util

    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"rank{rank}"), "w").close()
    while len([n for n in os.listdir(folder) if n.startswith("rank")]) < world:
        time.sleep(0.01)


def die_in_shard(after, together=None):
    """
    np.savez (the shard writer's) writes `after` files, then half of the next
    (with `together`, a folder: once every rank has got that far).
    """
    savez, written = np.savez, [0]

    def half_then_die(file, *args, **kwargs):
        if written[0] < after:
            written[0] += 1
            return savez(file, *args, **kwargs)
        if together:
            wait_for_every_rank(together)
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
    elif sys.argv[1] == "shard_together":
        die_in_shard(int(sys.argv[2]), together=sys.argv[3])
        script, rest = sys.argv[4], sys.argv[5:]
    else:
        {"npz": die_in_npz, "after_npz": die_after_npz}[sys.argv[1]]()
        script, rest = sys.argv[2], sys.argv[3:]
    from improved_diffusion import cli

    cli.run_main(importlib.import_module(f"scripts.{script}").main, rest)
