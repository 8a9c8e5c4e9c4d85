"""
A sampling run across ranks that never loses work: :func:`sample_to_npz`.

Every rank samples whole batches of positions and writes each finished batch
as a shard file; rank 0 then streams the shards, in position order, into
the final npz. The log directory (``OPENAI_LOGDIR``, shared by all ranks)
holds::

    shards/shard_<digest>_<start>-<end>.npz   positions start..end-1 (improved_diffusion.run.shards)
    shards/alive_<session>_<rank>.json        progress reports while running (heartbeat)
    samples_NxHxWx3.npz                       the result: arr_0 (and arr_1)
    samples_NxHxWx3.png                       a grid of the first samples
    config.json                               every flag, seed, world size, versions
    attention_masks/step_*.png                with --save_attention_masks
    log.txt, progress.csv, log-rank*.txt      the logger's files

Rules (docs/sampling-runs.md tells the design):

* **Exact and reproducible.** Batches are the grid ``[b * batch_size,
  (b + 1) * batch_size)`` cut at ``num_samples``, dealt round-robin to the
  ranks; position p always comes from ``seed + p`` (docs/sag.md), so the
  npz does not depend on the number of ranks, and not on the batch size
  beyond float rounding.
* **Crash-safe.** Shards and the npz are written under a temporary name and
  renamed. Re-running the same command with the same log directory samples
  only the positions that no shard holds; the flags that decide the samples
  (the *fingerprint*: every flag but ``num_samples``/``batch_size``/output
  options, plus the checkpoints' sha256) must match the shards', else the
  run is refused with one line naming the flag. A finished run re-run
  prints its npz and stops.
* **Flat memory.** A rank holds one batch; rank 0 assembles shard by shard.
* **No hangs.** Collectives happen only at start (all ranks in step).
  While sampling, ranks report progress in small files
  (:mod:`improved_diffusion.run.heartbeat`) and give up when a rank stops
  reporting for half the process-group timeout
  (``IMPROVED_DIFFUSION_DIST_TIMEOUT``, default 60 s). ``mpiexec`` and
  torchrun also tear a job down when one of its processes dies.
"""

import dataclasses
import datetime
import json
import os
import platform
import secrets
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import dist_util, logger
from ..allocator import keep_freed_memory
from ..checkpoints.loading import check_checkpoint_exists
from ..cli import agree, on_rank0
from ..errors import UsageError
from ..files.atomic import atomic_json
from .heartbeat import Heartbeat
from .pictures import save_grid
from .provenance import package_versions
from ..files.npz import npz_array, npz_name, verify_npz, write_npz_streaming
from .shards import (
    NO_SPACE,
    SHARD_DIR,
    collect_shards,
    describe_difference,
    fingerprint_digest,
    make_fingerprint,
    no_space_message,
    plan_batches,
    positions_in_shards,
    rank_batches,
    write_shard,
)

CONFIG_NAME = "config.json"


@dataclasses.dataclass(frozen=True)
class Batches:
    """
    What a sampling script hands the run: how to draw one batch.

    :param draw: ``draw(positions, step_callback)`` -> (uint8 NHWC images,
        int labels or None) for the positions (a list of ints).
    :param describe: lines for the log.
    :param step_callback: called as ``step_callback(index, out)`` at every
        step of rank 0's first batch (e.g. the SAG pictures); if it has a
        ``batch_done(images)`` method, that is called with the batch's
        images and returns a line for the log.
    """

    draw: Callable
    describe: Sequence[str] = ()
    step_callback: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class _Run:
    """The facts of one run, fixed once every rank agreed on them."""

    args: Any
    script: str
    height: int
    width: int
    has_labels: bool
    rank: int
    world: int
    log_dir: str
    session: str
    fingerprint: dict
    digest: str
    done: tuple  # position ranges already in shards
    notes: tuple = ()  # lines for the log about what a crash left (removed files)

    @property
    def num_samples(self):
        return int(self.args.num_samples)

    @property
    def shard_dir(self):
        return os.path.join(self.log_dir, SHARD_DIR)

    @property
    def npz_path(self):
        return os.path.join(self.log_dir, npz_name(self.num_samples, self.height, self.width))

    @property
    def initial(self):
        return sum(e - s for s, e in self.done)


def sample_to_npz(args, script, image_size, has_labels, files, setup, log_dir=None):
    """
    Sample positions ``0 .. args.num_samples - 1`` on every rank into
    ``samples_NxHxWx3.npz`` in the log directory, resuming from the shards
    a previous run of the same flags left there. Every rank calls it.

    :param args: the parsed flags (num_samples, batch_size, seed, ...).
    :param script: the script's name, e.g. "image_sample" (part of the fingerprint).
    :param image_size: H (= W) of the samples.
    :param has_labels: whether the npz gets ``arr_1``.
    :param files: flag name -> input file the samples depend on; each must
        exist, and its sha256 enters the fingerprint.
    :param setup: ``setup(log_dir)`` -> :class:`Batches`; called on every
        rank together, only when there is something to sample (loading the
        models goes here).
    :param log_dir: the log directory (the same on every rank); default
        ``OPENAI_LOGDIR``, or a fresh folder under the temporary directory.
    :return: the npz path on rank 0, None on the other ranks.
    """
    keep_freed_memory()  # no page faults per step (improved_diffusion/allocator.py)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    log_dir, session, created = _choose_log_dir(rank, log_dir)
    try:
        _check_log_dir(log_dir, session, rank)
        found = on_rank0(_inspect, args, script, files, log_dir,
                         npz_name(int(args.num_samples), image_size, image_size),
                         _npz_members(int(args.num_samples), int(image_size), has_labels))
        run = _Run(args=args, script=script, height=int(image_size), width=int(image_size),
                   has_labels=bool(has_labels), rank=rank, world=world, log_dir=log_dir,
                   session=session, fingerprint=found["fingerprint"], digest=found["digest"],
                   done=tuple(tuple(r) for r in found["done"]), notes=tuple(found["notes"]))
        if found["complete"]:
            return run.npz_path if rank == 0 else None
        batches = setup(log_dir)
    except UsageError as e:
        if e.agreed and rank == 0 and created:
            try:  # an invalid-input run leaves nothing behind
                os.rmdir(log_dir)
            except OSError:
                pass
        raise
    return _sample(run, batches)


# ---------------------------------------------------------------------------
# Before sampling: every rank agrees on the log directory and what it holds
# ---------------------------------------------------------------------------


def default_log_dir():
    """``OPENAI_LOGDIR``, else a fresh folder under the temporary directory."""
    return os.environ.get("OPENAI_LOGDIR") or os.path.join(
        tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"))


def _choose_log_dir(rank, log_dir=None):
    """(log directory, session id, whether rank 0 creates it), the same on every rank."""
    chosen = None
    if rank == 0:
        chosen = log_dir or default_log_dir()
        chosen = (os.path.abspath(os.path.expanduser(chosen)), secrets.token_hex(4),
                  not os.path.isdir(chosen))
    return dist_util.broadcast_object(chosen)


def _check_log_dir(log_dir, session, rank):
    """Every rank can write to the log directory and sees rank 0's files there."""
    probe = os.path.join(log_dir, f".probe_{session}_{rank}")

    def write_probe():
        try:
            os.makedirs(log_dir, exist_ok=True)
            with open(probe, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            raise UsageError(
                f"cannot write to the log directory {log_dir} "
                f"({e.strerror or type(e).__name__}); set OPENAI_LOGDIR to a writable folder"
            ) from None

    def see_rank0():
        if not os.path.exists(os.path.join(log_dir, f".probe_{session}_0")):
            raise UsageError(
                f"rank {rank} on {platform.node()} does not see rank 0's files in "
                f"{log_dir}; set OPENAI_LOGDIR to a folder shared by all nodes"
            )

    try:
        agree(write_probe)
        agree(see_rank0)
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


def _inspect(args, script, files, log_dir, name, members):
    """
    Rank 0: input files, fingerprint, existing result and shards. A result
    that is not whole (cut short by a crash or a full disk) is removed and
    made again, as is an npz that a killed run was assembling.
    """
    for flag, path in files.items():
        check_checkpoint_exists(path, f"--{flag}")
    fp = make_fingerprint(args, script, files)
    digest = fingerprint_digest(fp)
    state = dict(fingerprint=fp, digest=digest, done=[], complete=False, notes=[])
    final = os.path.join(log_dir, name)
    problem = verify_npz(final, members, read_data=False) if os.path.exists(final) else None
    if problem is not None:
        os.remove(final)
        state["notes"].append(f"removed the damaged {final} ({problem}); it is made again")
    if os.path.exists(final):
        config = _read_config(log_dir)
        if config and config.get("fingerprint_digest") == digest:
            state["complete"] = True
            return state
        if config and "fingerprint" in config:
            raise UsageError(
                f"{log_dir} already holds {name} made with other flags: "
                f"{describe_difference(config['fingerprint'], fp)}; use another OPENAI_LOGDIR"
            )
        raise UsageError(
            f"{log_dir} already holds {name}, but {CONFIG_NAME} there is missing or unreadable, "
            f"so the flags that made it are unknown; move {name} away or use another OPENAI_LOGDIR"
        )
    grid = os.path.splitext(name)[0] + ".png"
    for entry in os.listdir(log_dir):
        # what a run killed while writing the result left: the npz being
        # assembled, temporary files of its grid and config.json
        if entry == name + ".partial" or (
                entry.startswith((f".{grid}.", f".{CONFIG_NAME}.")) and entry.endswith(".tmp")):
            os.remove(os.path.join(log_dir, entry))
    state["done"], notes = positions_in_shards(os.path.join(log_dir, SHARD_DIR), fp, digest,
                                               int(args.num_samples))
    state["notes"] += notes
    return state


def _npz_members(num_samples, image_size, has_labels):
    """The result's members: name -> (dtype, shape), in order."""
    members = {"arr_0": (np.uint8, (num_samples, image_size, image_size, 3))}
    if has_labels:
        members["arr_1"] = (np.int64, (num_samples,))
    return members


def _read_config(log_dir):
    path = os.path.join(log_dir, CONFIG_NAME)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Sampling: this rank's batches, as shards
# ---------------------------------------------------------------------------


def _sample(run, batches):
    """
    Draw this rank's batches into shards; rank 0 then assembles the npz.
    The run logs into its own log directory (log.txt, progress.csv,
    log-rank*.txt); the caller's logger is back when it returns.
    """
    os.makedirs(run.shard_dir, exist_ok=True)
    todo = plan_batches(run.num_samples, int(run.args.batch_size), run.done)
    mine = rank_batches(todo, run.rank, run.world)
    callback = batches.step_callback if run.rank == 0 else None
    expected_hw = (run.height, run.width, 3)
    with logger.scoped_configure(dir=run.log_dir):
        heartbeat, bar = _start_progress(run, batches, len(todo))
        try:
            start = time.monotonic()
            for n, (s, e) in enumerate(mine):
                positions = list(range(s, e))
                images, labels = batches.draw(positions, callback if n == 0 else None)
                images = np.asarray(images)
                if images.shape != (e - s,) + expected_hw or images.dtype != np.uint8:
                    raise RuntimeError(f"draw returned {images.dtype} {images.shape}, "
                                       f"expected uint8 {(e - s,) + expected_hw}")
                write_shard(run.shard_dir, run.fingerprint, run.digest, s, e, images,
                            labels if run.has_labels else None)
                heartbeat.done += e - s
                if run.rank == 0:
                    logger.log(f"sampled positions {s}..{e - 1}")
                if n == 0 and callback is not None and hasattr(callback, "batch_done"):
                    logger.log(callback.batch_done(images))
            seconds = time.monotonic() - start
            heartbeat.finished = True
            heartbeat.poke()  # its thread reports it
            if run.rank != 0:
                return None
            while not heartbeat.all_finished.wait(0.2):
                pass
            heartbeat.stop()
            bar.update(run.num_samples - bar.n)
            bar.close()
            return _finish(run, seconds, heartbeat.done)
        finally:
            heartbeat.stop()
            if bar is not None:
                bar.close()


def _start_progress(run, batches, num_batches):
    """Log what is sampled; start the heartbeat (and, on rank 0, the progress bar)."""
    for line in run.notes + tuple(batches.describe):
        logger.log(line)
    if run.initial:
        logger.log(
            f"resuming: {run.initial} of {run.num_samples} positions are already in "
            f"shards; sampling the other {run.num_samples - run.initial}"
        )
    logger.log(
        f"sampling {run.num_samples} samples ({num_batches} batches of up to "
        f"{int(run.args.batch_size)}) on {run.world} rank(s) into {run.log_dir}"
    )
    bar = None
    if run.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.num_samples, initial=run.initial, unit="sample", desc="sampling",
                   file=sys.stderr, mininterval=1.0, smoothing=0.1, dynamic_ncols=True)
    stale_after = max(2.0, dist_util.get_timeout().total_seconds() / 2)
    heartbeat = Heartbeat(run.shard_dir, run.session, run.rank, run.world, run.initial,
                          interval=min(2.0, stale_after / 5), stale_after=stale_after, bar=bar)
    heartbeat.start()
    return heartbeat, bar


# ---------------------------------------------------------------------------
# Rank 0 at the end: the npz, its grid and config.json
# ---------------------------------------------------------------------------


def _finish(run, seconds, sampled):
    """
    Stream the shards into the npz under a temporary name, verify it, write
    the extras, then rename it into place and remove the shards: whatever
    step a crash interrupts, the shards are still there and a re-run
    assembles them again (config.json alone does not make a run complete).
    """
    pieces = collect_shards(run.shard_dir, run.digest, run.num_samples)
    partial = _assemble(run, pieces)
    try:
        _write_extras(run, partial, seconds, sampled)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    path = run.npz_path
    os.replace(partial, path)
    for _, _, shard in pieces:
        os.remove(shard)
    for entry in os.listdir(run.shard_dir):
        if entry.startswith(f"alive_{run.session}_"):
            os.remove(os.path.join(run.shard_dir, entry))
    try:
        os.rmdir(run.shard_dir)
    except OSError:
        pass  # other files there (e.g. shards with more positions): keep them
    logger.log(f"wrote {path}")
    return path


def _assemble(run, pieces):
    """The shards' rows streamed into ``<npz>.partial`` and verified; returns its path."""
    final = run.npz_path
    partial = final + ".partial"

    def rows(key):
        def chunks():
            for a, b, path in pieces:
                try:
                    with np.load(path, allow_pickle=False) as shard:
                        part = shard[key][a:b]
                except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                    # damaged after the run started (checked then): a disk fault
                    raise UsageError(
                        f"cannot read the shard {path} ({type(e).__name__}: {e}); re-run the "
                        "same command: damaged shards are removed and sampled again"
                    ) from None
                yield part
        return chunks

    expected = _npz_members(run.num_samples, run.height, run.has_labels)
    members = [(key, dtype, shape, rows("images" if key == "arr_0" else "labels"))
               for key, (dtype, shape) in expected.items()]
    try:
        write_npz_streaming(partial, members)
    except BaseException as e:
        if os.path.exists(partial):
            os.remove(partial)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            raise UsageError(no_space_message("the samples", final, e)) from None
        raise
    problem = verify_npz(partial, expected)
    if problem is not None:
        os.remove(partial)
        raise UsageError(
            f"the assembled {os.path.basename(final)} failed verification ({problem}); "
            f"the shards are kept in {run.shard_dir}: re-run the same command"
        )
    return partial


def _write_extras(run, source, seconds, sampled):
    """The grid and config.json of the npz at `source` (its temporary name)."""
    path = run.npz_path
    grid_path = os.path.splitext(path)[0] + ".png"
    try:
        save_grid(grid_path, np.asarray(npz_array(source, "arr_0")[:64]))
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        config = dict(
            script=f"scripts/{run.script}.py",
            npz=os.path.basename(path),
            num_samples=run.num_samples,
            seed=run.args.seed,
            world_size=run.world,
            device=str(dist_util.dev()),
            flags=vars(run.args),
            fingerprint=run.fingerprint,
            fingerprint_digest=run.digest,
            versions=package_versions(),
            session=dict(
                positions_already_in_shards=run.initial,
                positions_sampled=run.num_samples - run.initial,
                rank0_sampling_seconds=round(seconds, 3),
                rank0_samples_per_second=round(sampled / max(seconds, 1e-9), 3),
                rank0_peak_rss_mib=round(peak_kib / 1024, 1),
            ),
            created=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        atomic_json(os.path.join(run.log_dir, CONFIG_NAME), config,
                    indent=1, sort_keys=True, default=str)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise UsageError(no_space_message("the pictures/config next to", path, e)) from None
        raise
