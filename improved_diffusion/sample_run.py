"""
A sampling run across ranks that never loses work.

Every rank samples whole batches of positions and writes each finished batch
as a shard file; rank 0 then streams the shards, in position order, into
the final npz. The log directory (``OPENAI_LOGDIR``, shared by all ranks)
holds::

    shards/shard_<digest>_<start>-<end>.npz   positions start..end-1: 'images'
                                              (uint8 NHWC), 'labels', 'positions'
                                              and 'flags' (JSON of what made them)
    shards/alive_<session>_<rank>.json        progress reports while running
    samples_NxHxWx3.npz                       the result: arr_0 (and arr_1)
    samples_NxHxWx3.png                       a grid of the first samples
    config.json                               every flag, seed, world size, versions
    attention_masks/step_*.png                with --save_attention_masks
    log.txt, progress.csv, log-rank*.txt      the logger's files

Rules:

* **Exact and reproducible.** Batches are the grid ``[b * batch_size,
  (b + 1) * batch_size)`` cut at ``num_samples``, dealt round-robin to the
  ranks; position p always comes from ``seed + p`` (SAG-NOTES.md), so the
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
  While sampling, ranks report progress in small files; rank 0 watches
  them (tqdm bar with samples per second across ranks) and gives up when a
  rank stops reporting for half the process-group timeout
  (``IMPROVED_DIFFUSION_DIST_TIMEOUT``, default 60 s); the other ranks give
  up when rank 0 does. ``mpiexec`` and torchrun also tear a job down when
  one of its processes dies.
"""

import datetime
import errno
import hashlib
import json
import math
import os
import platform
import re
import secrets
import signal
import struct
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import torch as th
import torch.distributed as dist
from numpy.lib import format as npy_format

from . import dist_util, logger
from .image_grid import AttentionMaskRecorder, save_grid
from .sample_util import UsageError, npz_name

FORMAT_VERSION = 1
SHARD_DIR = "shards"
CONFIG_NAME = "config.json"
ATTENTION_DIR = "attention_masks"
# Flags that do not change any sample (or that are replaced by a file hash).
NOT_IN_FINGERPRINT = frozenset(
    {"num_samples", "batch_size", "save_attention_masks", "model_path",
     "classifier_path", "base_samples"}
)
SHARD_RE = re.compile(r"^shard_([0-9a-f]{12})_(\d+)-(\d+)\.npz$")
DIE_AFTER_ENV = "IMPROVED_DIFFUSION_TEST_DIE_AFTER_BATCHES"  # test hook: SIGKILL rank 0
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# ---------------------------------------------------------------------------
# Collective helpers (no-ops in a single process)
# ---------------------------------------------------------------------------


_OBJECT_GROUP = {}


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _object_group():
    """
    The group for the small object collectives of a run: the default group
    under gloo, else a gloo group beside it (no GPU involved, and it works
    when several ranks share one GPU, which nccl refuses). Created by the
    first collective, which every rank reaches together.
    """
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _OBJECT_GROUP:
        _OBJECT_GROUP["gloo"] = dist.new_group(backend="gloo", timeout=dist_util.get_timeout())
    return _OBJECT_GROUP["gloo"]


def gather_objects(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group())
    return box[0]


def agree(fn, *args, **kwargs):
    """
    Run `fn` on every rank; if any rank raises UsageError, every rank raises
    the first such error (lowest rank), marked agreed: rank 0 alone prints it
    and every rank exits normally, so that no rank is left waiting.
    """
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except UsageError as e:
        error = str(e)
    errors = [e for e in gather_objects(error) if e is not None]
    if errors:
        raise UsageError(errors[0], agreed=True)
    return result


def on_rank0(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result (or UsageError) to every rank."""
    result, error = None, None
    if dist_util.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except UsageError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UsageError(error, agreed=True)
    return result


# ---------------------------------------------------------------------------
# Fingerprint: what decides the samples
# ---------------------------------------------------------------------------


def sha256_file(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def make_fingerprint(args, script, files):
    """
    :param files: flag name -> path of each input file the samples depend on
        (checkpoints, base samples); their contents enter as sha256.
    """
    fp = {"script": script, "format": FORMAT_VERSION}
    for key, value in sorted(vars(args).items()):
        if key not in NOT_IN_FINGERPRINT:
            fp[key] = value
    for flag, path in files.items():
        fp[f"{flag} sha256"] = sha256_file(path)
    return fp


def fingerprint_digest(fp):
    text = json.dumps(fp, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cli(value):
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def describe_difference(old, new):
    """The first key whose value differs, as a phrase naming the flag."""
    for key in sorted(set(old) | set(new), key=lambda k: (k != "script", k)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b:
            continue
        if key == "script":
            return f"the script (scripts/{a}.py made them, this is scripts/{b}.py)"
        if key.endswith(" sha256"):
            flag = key[: -len(" sha256")]
            return (f"--{flag} (the file's contents differ: sha256 {str(a)[:12]}... there, "
                    f"{str(b)[:12]}... now)")
        return f"--{key} ({_cli(a)} there, {_cli(b)} now)"
    return "nothing visible (another version of the fork made them)"


# ---------------------------------------------------------------------------
# npz files written and read without holding them in memory
# ---------------------------------------------------------------------------


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


def _read_npy_header(f):
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    return npy_format.read_array_header_2_0(f)


def verify_npz(path, expected):
    """
    Check an npz without loading it: member names, dtypes, shapes, byte
    counts and the zip CRCs (read in chunks).

    :param expected: key -> (dtype, shape), in member order.
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
                    got_shape, fortran, got_dtype = _read_npy_header(f)
                    want = f"{np.dtype(dtype)} {tuple(shape)}"
                    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or fortran:
                        return f"{key} is {got_dtype} {tuple(got_shape)}, expected {want}"
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
        shape, fortran, dtype = _read_npy_header(raw)
        offset = raw.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {key} holds Python objects")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape), offset=offset,
                     order="F" if fortran else "C")


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def merge_ranges(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(r) for r in out]


def plan_batches(num_samples, batch_size, done=()):
    """
    The batches still to sample: the grid ``[b * batch_size, (b + 1) *
    batch_size)`` cut at `num_samples`, minus the `done` ranges (a batch
    that is partly done is cut into its missing runs).
    """
    done = merge_ranges(done)
    batches, j = [], 0
    for b in range(math.ceil(num_samples / batch_size)):
        s, e = b * batch_size, min((b + 1) * batch_size, num_samples)
        while j < len(done) and done[j][1] <= s:
            j += 1
        pos, k = s, j
        while pos < e:
            if k < len(done) and done[k][0] <= pos:
                pos = max(pos, done[k][1])
                k += 1
                continue
            stop = min(e, done[k][0]) if k < len(done) else e
            batches.append((pos, stop))
            pos = stop
    return batches


def rank_batches(batches, rank, world_size):
    return batches[rank::world_size]


# ---------------------------------------------------------------------------
# Progress reports between ranks
# ---------------------------------------------------------------------------


class _Monitor(threading.Thread):
    """
    Every `interval` seconds: write this rank's report (a counter, samples
    done, finished flag); on rank 0 read all reports, move the progress bar
    and notice ranks that stopped reporting; on other ranks notice when rank
    0 stopped or gave up. A rank that gives up prints one line and leaves.
    """

    def __init__(self, run, interval, stale_after, bar=None):
        super().__init__(daemon=True, name="sample-run-monitor")
        self.run_ = run
        self.interval = interval
        self.stale_after = stale_after
        self.bar = bar
        self.wake = threading.Event()
        self.stopping = False
        self.seq = 0
        self.finished = False
        self.abort = None
        self.all_finished = threading.Event()
        self.seen = {}  # rank -> (seq, local time it changed, report)
        self.started = time.monotonic()

    def path(self, rank):
        return os.path.join(self.run_.shard_dir, f"alive_{self.run_.session}_{rank}.json")

    def write_report(self):
        if self.run_.world == 1:
            return
        self.seq += 1
        report = dict(seq=self.seq, done=self.run_.sampled, finished=self.finished,
                      abort=self.abort, pid=os.getpid(), host=platform.node())
        tmp = self.path(self.run_.rank) + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(report, f)
            os.replace(tmp, self.path(self.run_.rank))
        except OSError:
            pass  # a full disk shows up where it matters: in the shard writes

    def read_report(self, rank):
        try:
            with open(self.path(rank)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def check(self):
        """One round; returns a message if this rank must give up."""
        now = time.monotonic()
        run = self.run_
        ranks = range(1, run.world) if run.rank == 0 else [0]
        total = run.sampled
        finished = self.finished
        for r in ranks:
            report = self.read_report(r)
            last = self.seen.get(r)
            if report is not None and (last is None or report["seq"] != last[0]):
                self.seen[r] = (report["seq"], now, report)
            elif last is None:
                self.seen[r] = (None, self.started, None)
            seq, changed, report = self.seen[r]
            if report is not None:
                total += report.get("done", 0)
                if run.rank != 0 and report.get("abort"):
                    return ""  # rank 0 printed the reason
                if run.rank == 0 and report.get("finished"):
                    continue  # (rank 0 itself reports until it has assembled the npz)
            finished = False
            if now - changed > self.stale_after:
                who = "rank 0" if r == 0 else f"rank {r}"
                return (
                    f"{who} stopped reporting progress ({self.stale_after:.0f} s without a "
                    f"report; IMPROVED_DIFFUSION_DIST_TIMEOUT sets the limit); the finished "
                    f"batches are kept in {run.shard_dir}: re-run the same command to resume"
                )
        if run.rank == 0:
            if self.bar is not None and run.initial + total > self.bar.n:
                self.bar.update(run.initial + total - self.bar.n)
            if finished:
                self.all_finished.set()
        return None

    def run(self):
        self.started = time.monotonic()
        while True:
            self.write_report()
            if self.stopping:
                return
            message = self.check()
            if message is not None:
                self.abort = message or "rank 0 gave up"
                self.write_report()
                if message:
                    print(f"error: {message}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)
            self.wake.wait(self.interval)
            self.wake.clear()

    def poke(self):
        """Report and check now rather than at the next tick."""
        self.wake.set()

    def stop(self):
        """Write the last report and end the thread."""
        self.stopping = True
        self.wake.set()
        if self.is_alive():
            self.join(timeout=10)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def package_versions():
    versions = {"python": platform.python_version(), "torch": th.__version__, "numpy": np.__version__}
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return versions
    for dist_name, key in (("improved-diffusion-sag", "improved_diffusion"), ("mpi4py", "mpi4py"),
                           ("tqdm", "tqdm"), ("Pillow", "Pillow"), ("blobfile", "blobfile")):
        try:
            versions[key] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            versions[key] = None
    versions["git_commit"] = _git_commit()
    return versions


def _git_commit():
    """The repository's HEAD commit, read from .git without running git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = os.path.join(root, ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        ref_path = os.path.join(git, ref)
        if os.path.exists(ref_path):
            with open(ref_path) as f:
                return f.read().strip()
        with open(os.path.join(git, "packed-refs")) as f:
            for line in f:
                if line.strip().endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return None


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _no_space_message(what, path, exc):
    return (
        f"disk full while writing {what} {path} ({exc.strerror or exc}); free some space "
        "and re-run the same command: the finished shards are kept and the run resumes"
    )


class SampleRun:
    """
    One sampling run: ``prepare`` (collective checks), ``start``, ``sample``
    (this rank's batches, as shards), ``finish`` (rank 0 assembles).

    :param args: the parsed flags (num_samples, batch_size, seed, ...).
    :param script: the script's name, e.g. "image_sample" (part of the fingerprint).
    :param image_size: H (= W) of the samples.
    :param has_labels: whether the npz gets ``arr_1``.
    :param files: flag name -> input file the samples depend on; each must
        exist, and its sha256 enters the fingerprint.
    """

    def __init__(self, args, script, image_size, has_labels, files):
        self.args = args
        self.script = script
        self.num_samples = int(args.num_samples)
        self.batch_size = int(args.batch_size)
        self.height = self.width = int(image_size)
        self.has_labels = bool(has_labels)
        self.files = dict(files)
        self.rank = dist_util.get_rank()
        self.world = dist_util.get_world_size()
        self.log_dir = None
        self.created_dir = False
        self.session = None
        self.monitor = None
        self.bar = None
        self.sampled = 0  # samples this rank finished in this session
        self.initial = 0  # positions already in shards when the run started
        self.result_path = None
        self.sampling_seconds = 0.0

    # -- context: clean up after invalid input -----------------------------

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.monitor is not None and exc_type is not None:
            self.monitor.stop()
        if self.bar is not None and exc_type is not None:
            self.bar.close()
        if (exc_type is not None and issubclass(exc_type, UsageError) and exc.agreed
                and self.rank == 0 and self.created_dir and self.monitor is None):
            try:  # an invalid-input run leaves nothing behind
                os.rmdir(self.log_dir)
            except OSError:
                pass
        return False

    # -- paths --------------------------------------------------------------

    @property
    def shard_dir(self):
        return os.path.join(self.log_dir, SHARD_DIR)

    @property
    def npz_path(self):
        return os.path.join(self.log_dir, npz_name(self.num_samples, self.height, self.width))

    def shard_name(self, start, end):
        return f"shard_{self.digest}_{start:09d}-{end:09d}.npz"

    # -- prepare -------------------------------------------------------------

    def prepare(self):
        """
        Collective: choose and check the log directory, check the input
        files, compare the flags with existing shards or results.

        :return: False when the result already exists (then `result_path`
            is set and nothing is to be done), else True.
        """
        self._agree_log_dir()
        state = on_rank0(self._inspect)
        self.fingerprint = state["fingerprint"]
        self.digest = state["digest"]
        self.done = [tuple(r) for r in state["done"]]
        self.initial = sum(e - s for s, e in merge_ranges(self.done))
        if state["complete"]:
            self.result_path = self.npz_path
            return False
        return True

    def _agree_log_dir(self):
        chosen = None
        if self.rank == 0:
            chosen = os.environ.get("OPENAI_LOGDIR") or os.path.join(
                tempfile.gettempdir(),
                datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"),
            )
            chosen = (os.path.abspath(os.path.expanduser(chosen)), secrets.token_hex(4),
                      not os.path.isdir(chosen))
        self.log_dir, self.session, self.created_dir = broadcast_object(chosen)
        probe = os.path.join(self.log_dir, f".probe_{self.session}_{self.rank}")

        def write_probe():
            try:
                os.makedirs(self.log_dir, exist_ok=True)
                with open(probe, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as e:
                raise UsageError(
                    f"cannot write to the log directory {self.log_dir} "
                    f"({e.strerror or type(e).__name__}); set OPENAI_LOGDIR to a writable folder"
                ) from None

        try:
            agree(write_probe)

            def see_rank0():
                if not os.path.exists(os.path.join(self.log_dir, f".probe_{self.session}_0")):
                    raise UsageError(
                        f"rank {self.rank} on {platform.node()} does not see rank 0's files in "
                        f"{self.log_dir}; set OPENAI_LOGDIR to a folder shared by all nodes"
                    )

            agree(see_rank0)
        finally:
            try:
                os.remove(probe)
            except OSError:
                pass

    def _inspect(self):
        """Rank 0: input files, fingerprint, existing results and shards."""
        from .sample_util import check_checkpoint_exists

        for flag, path in self.files.items():
            check_checkpoint_exists(path, f"--{flag}")
        fp = make_fingerprint(self.args, self.script, self.files)
        digest = fingerprint_digest(fp)
        state = dict(fingerprint=fp, digest=digest, done=[], complete=False)
        config_path = os.path.join(self.log_dir, CONFIG_NAME)
        final = self.npz_path
        if os.path.exists(final):
            config = None
            if os.path.exists(config_path):
                try:
                    with open(config_path) as f:
                        config = json.load(f)
                except (OSError, ValueError):
                    config = None
            name = os.path.basename(final)
            if config and config.get("fingerprint_digest") == digest:
                state["complete"] = True
                return state
            if config and "fingerprint" in config:
                raise UsageError(
                    f"{self.log_dir} already holds {name} made with other flags: "
                    f"{describe_difference(config['fingerprint'], fp)}; use another OPENAI_LOGDIR"
                )
            raise UsageError(
                f"{self.log_dir} already holds {name}; move it away or use another OPENAI_LOGDIR"
            )
        for leftover in (final + ".partial",):
            if os.path.exists(leftover):
                os.remove(leftover)
        if not os.path.isdir(self.shard_dir):
            return state
        done = []
        for entry in sorted(os.listdir(self.shard_dir)):
            path = os.path.join(self.shard_dir, entry)
            if entry.endswith(".tmp") or entry.startswith("alive_"):
                os.remove(path)  # left by a run that was killed
                continue
            m = SHARD_RE.match(entry)
            if not m:
                continue
            if m.group(1) != digest:
                theirs = read_shard_flags(path)
                if not theirs:
                    raise UsageError(
                        f"{path} has no readable record of the flags it was made with; "
                        "move it away or use another OPENAI_LOGDIR"
                    )
                raise UsageError(
                    f"the shards in {self.shard_dir} were made with other flags: "
                    f"{describe_difference(theirs, fp)}; re-run with the "
                    "same flags to resume, or use another OPENAI_LOGDIR"
                )
            s, e = int(m.group(2)), int(m.group(3))
            if s < self.num_samples:
                done.append((s, min(e, self.num_samples)))
        state["done"] = merge_ranges(done)
        return state

    # -- start ---------------------------------------------------------------

    def start(self, describe=()):
        """Configure the logger, plan this rank's batches, start progress reports."""
        logger.configure(dir=self.log_dir)
        os.makedirs(self.shard_dir, exist_ok=True)
        batches = self.batches = plan_batches(self.num_samples, self.batch_size, self.done)
        self.mine = rank_batches(batches, self.rank, self.world)
        self.shards_at_start = self._count_shards()
        for line in describe:
            logger.log(line)
        if self.initial:
            logger.log(
                f"resuming: {self.initial} of {self.num_samples} positions are already in "
                f"shards; sampling the other {self.num_samples - self.initial}"
            )
        logger.log(
            f"sampling {self.num_samples} samples ({len(batches)} batches of up to "
            f"{self.batch_size}) on {self.world} rank(s) into {self.log_dir}"
        )
        if self.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.num_samples, initial=self.initial, unit="sample",
                            desc="sampling", file=sys.stderr, mininterval=1.0, smoothing=0.1,
                            dynamic_ncols=True)
        timeout = dist_util.get_timeout().total_seconds()
        stale_after = max(2.0, timeout / 2)
        self.monitor = _Monitor(self, interval=min(2.0, stale_after / 5), stale_after=stale_after,
                                bar=self.bar)
        self.monitor.start()

    # -- sample --------------------------------------------------------------

    def sample(self, draw, sag=None, diffusion=None):
        """
        Sample this rank's batches and write each as a shard.

        :param draw: ``draw(positions, step_callback)`` -> (uint8 NHWC images,
            int labels or None).
        """
        recorder = None
        if getattr(self.args, "save_attention_masks", False) and self.rank == 0 and self.mine:
            recorder = self._attention_recorder(sag, diffusion)
        die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
        start = time.monotonic()
        for n, (s, e) in enumerate(self.mine):
            positions = list(range(s, e))
            images, labels = draw(positions, recorder if n == 0 else None)
            self._write_shard(s, e, images, labels)
            self.sampled += e - s
            if self.rank == 0:
                logger.log(f"sampled positions {s}..{e - 1}")
            if n == 0 and recorder is not None:
                saved = recorder.save(images)
                logger.log(
                    f"saved SAG pictures of {len(saved)} steps in {recorder.out_dir}"
                    if saved else "--save_attention_masks: no guided step in this run, no pictures"
                )
            if die_after and self.rank == 0 and n + 1 >= die_after:
                self._die_for_test(die_after)
        self.sampling_seconds = time.monotonic() - start
        self.monitor.finished = True
        self.monitor.poke()  # its thread reports it

    def _count_shards(self):
        return sum(1 for e in os.listdir(self.shard_dir)
                   if SHARD_RE.match(e) and e.split("_")[1] == self.digest)

    def _die_for_test(self, batches):
        """
        Test hook (IMPROVED_DIFFUSION_TEST_DIE_AFTER_BATCHES=N): once every
        rank has written N shards in this session (or all it had), rank 0
        SIGKILLs itself: a crash at a known point.
        """
        want = self.shards_at_start + sum(
            min(batches, len(rank_batches(self.batches, r, self.world))) for r in range(self.world)
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self._count_shards() < want:
            time.sleep(0.05)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def _attention_recorder(self, sag, diffusion):
        out_dir = os.path.join(self.log_dir, ATTENTION_DIR)
        guided = []
        if sag is not None and diffusion is not None:
            guided = [i for i in range(diffusion.num_timesteps) if sag.applies(i)]
        return AttentionMaskRecorder(out_dir, guided,
                                     timestep_map=getattr(diffusion, "timestep_map", None))

    def _write_shard(self, start, end, images, labels):
        images = np.asarray(images)
        expected = (end - start, self.height, self.width, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise RuntimeError(f"draw returned {images.dtype} {images.shape}, expected uint8 {expected}")
        name = self.shard_name(start, end)
        final = os.path.join(self.shard_dir, name)
        tmp = final + f".{self.rank}.tmp"
        arrays = dict(
            images=images,
            positions=np.arange(start, end, dtype=np.int64),
            flags=np.frombuffer(json.dumps(self.fingerprint, sort_keys=True, default=str).encode(),
                                dtype=np.uint8),
        )
        if self.has_labels:
            arrays["labels"] = np.asarray(labels, dtype=np.int64).reshape(-1)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            if e.errno in NO_SPACE:
                raise UsageError(_no_space_message("shard", final, e)) from None
            raise UsageError(f"cannot write shard {final} ({e}); check OPENAI_LOGDIR") from None

    # -- finish ---------------------------------------------------------------

    def finish(self):
        """
        Rank 0: wait for every rank, stream the shards into the npz, verify
        it, write the grid and config.json, remove the shards.
        Other ranks: return None at once.

        :return: the npz path on rank 0, None elsewhere.
        """
        if self.rank != 0:
            self.monitor.stop()
            return None
        while not self.monitor.all_finished.wait(0.2):
            pass
        self.monitor.stop()
        self.bar.update(self.num_samples - self.bar.n)
        self.bar.close()
        pieces = self._collect_shards()
        path = self._assemble(pieces)
        self._write_extras(path)
        for _, _, shard in pieces:
            os.remove(shard)
        for entry in os.listdir(self.shard_dir):
            if entry.startswith(f"alive_{self.session}_"):
                os.remove(os.path.join(self.shard_dir, entry))
        try:
            os.rmdir(self.shard_dir)
        except OSError:
            pass  # other files there (e.g. shards with more positions): keep them
        logger.log(f"wrote {path}")
        self.result_path = path
        return path

    def _collect_shards(self):
        """The shards covering 0..num_samples-1 in order: (row_start, row_end, path)."""
        found = []
        for entry in os.listdir(self.shard_dir):
            m = SHARD_RE.match(entry)
            if m and m.group(1) == self.digest:
                found.append((int(m.group(2)), int(m.group(3)), os.path.join(self.shard_dir, entry)))
        found.sort()
        pieces, pos = [], 0
        for s, e, path in found:
            if pos >= self.num_samples:
                break
            if e <= pos:
                continue
            if s > pos:
                break
            stop = min(e, self.num_samples)
            pieces.append((pos - s, stop - s, path))
            pos = stop
        if pos < self.num_samples:
            raise UsageError(
                f"positions from {pos} on are missing in {self.shard_dir} although every rank "
                "finished; the log directory must be shared by all ranks' nodes"
            )
        return pieces

    def _assemble(self, pieces):
        final = self.npz_path
        partial = final + ".partial"
        n, h, w = self.num_samples, self.height, self.width

        def rows(key):
            def chunks():
                for a, b, path in pieces:
                    with np.load(path, allow_pickle=False) as shard:
                        yield shard[key][a:b]
            return chunks

        members = [("arr_0", np.uint8, (n, h, w, 3), rows("images"))]
        if self.has_labels:
            members.append(("arr_1", np.int64, (n,), rows("labels")))
        try:
            write_npz_streaming(partial, members)
        except OSError as e:
            if os.path.exists(partial):
                os.remove(partial)
            if e.errno in NO_SPACE:
                raise UsageError(_no_space_message("the samples", final, e)) from None
            raise
        problem = verify_npz(partial, {k: (dt, shape) for k, dt, shape, _ in members})
        if problem is not None:
            os.remove(partial)
            raise UsageError(
                f"the assembled {os.path.basename(final)} failed verification ({problem}); "
                f"the shards are kept in {self.shard_dir}: re-run the same command"
            )
        os.replace(partial, final)
        return final

    def _write_extras(self, path):
        grid_path = os.path.splitext(path)[0] + ".png"
        try:
            save_grid(grid_path, np.asarray(npz_array(path, "arr_0")[:64]))
            seconds = max(self.sampling_seconds, 1e-9)
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            config = dict(
                script=f"scripts/{self.script}.py",
                npz=os.path.basename(path),
                num_samples=self.num_samples,
                seed=self.args.seed,
                world_size=self.world,
                device=str(dist_util.dev()),
                flags=vars(self.args),
                fingerprint=self.fingerprint,
                fingerprint_digest=self.digest,
                versions=package_versions(),
                session=dict(
                    positions_already_in_shards=self.initial,
                    positions_sampled=self.num_samples - self.initial,
                    rank0_sampling_seconds=round(self.sampling_seconds, 3),
                    rank0_samples_per_second=round(self.sampled / seconds, 3),
                    rank0_peak_rss_mib=round(peak_kib / 1024, 1),
                ),
                created=datetime.datetime.now().isoformat(timespec="seconds"),
            )
            _atomic_json(os.path.join(self.log_dir, CONFIG_NAME), config)
        except OSError as e:
            if e.errno in NO_SPACE:
                raise UsageError(_no_space_message("the pictures/config next to", path, e)) from None
            raise


def read_shard_flags(path):
    """The fingerprint a shard was made with ({} if unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            return json.loads(shard["flags"].tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return {}


def report_result(run):
    """Print where the samples are: the last line of stdout on rank 0."""
    if run.rank == 0 and run.result_path:
        print(run.result_path, flush=True)
