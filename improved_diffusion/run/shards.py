"""
The shards of a sampling run: which positions are still to sample, the
fingerprint of the flags that decide the samples, and the shard files.

A shard ``shards/shard_<digest>_<start>-<end>.npz`` holds positions
start..end-1 of the run: 'images' (uint8 NHWC), 'labels' (labelled runs),
'positions' and 'flags' (the JSON fingerprint that made them). Its name
carries the fingerprint's digest, so a run resumes from the shards of the
same flags only (docs/sampling-runs.md).
"""

import errno
import hashlib
import json
import math
import os
import re
import zipfile

import numpy as np

from ..errors import UsageError
from ..files.atomic import atomic_write, sha256_file

FORMAT_VERSION = 1
SHARD_DIR = "shards"
# Flags that do not change any sample (or that are replaced by a file hash),
# and cli's note of which values a model card chose.
NOT_IN_FINGERPRINT = frozenset(
    {"num_samples", "batch_size", "save_attention_masks", "model_path",
     "classifier_path", "base_samples", "from_card"}
)
SHARD_RE = re.compile(r"^shard_([0-9a-f]{12})_(\d+)-(\d+)\.npz$")
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def no_space_message(what, path, exc):
    return (
        f"disk full while writing {what} {path} ({exc.strerror or exc}); free some space "
        "and re-run the same command: the finished shards are kept and the run resumes"
    )


# ---------------------------------------------------------------------------
# Fingerprint: what decides the samples
# ---------------------------------------------------------------------------


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
# Shard files
# ---------------------------------------------------------------------------


def shard_name(digest, start, end):
    return f"shard_{digest}_{start:09d}-{end:09d}.npz"


def write_shard(shard_dir, fingerprint, digest, start, end, images, labels=None):
    """Write positions start..end-1 (uint8 NHWC `images`, int `labels` or None) atomically."""
    final = os.path.join(shard_dir, shard_name(digest, start, end))
    arrays = dict(
        images=images,
        positions=np.arange(start, end, dtype=np.int64),
        flags=np.frombuffer(json.dumps(fingerprint, sort_keys=True, default=str).encode(),
                            dtype=np.uint8),
    )
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64).reshape(-1)
    try:
        with atomic_write(final, "wb", fsync=True) as f:
            np.savez(f, **arrays)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise UsageError(no_space_message("shard", final, e)) from None
        raise UsageError(f"cannot write shard {final} ({e}); check OPENAI_LOGDIR") from None
    return final


def read_shard_flags(path):
    """The fingerprint a shard was made with ({} if unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            return json.loads(shard["flags"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return {}


def shard_problem(path, start, end):
    """
    None if the shard file holds positions start..end-1 whole (every zip
    member read against its CRC), else what is wrong with it: what a disk
    fault or a copy that was cut short leaves under a shard's name.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return f"{bad} fails its CRC check"
        with np.load(path, allow_pickle=False) as shard:
            positions, rows = shard["positions"], len(shard["images"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"{type(e).__name__}: {e}"
    if rows != end - start or not np.array_equal(positions, np.arange(start, end)):
        return f"it does not hold positions {start}..{end - 1}"
    return None


def positions_in_shards(shard_dir, fingerprint, digest, num_samples):
    """
    The merged ranges of positions below `num_samples` that shards of this
    fingerprint hold, and the lines to log about damaged shards. Removes
    what a killed run left (temporary files, progress reports) and shards
    that are not whole (their positions are sampled again); refuses shards
    made with other flags (UsageError naming the first flag that differs).
    """
    if not os.path.isdir(shard_dir):
        return [], []
    done, notes = [], []
    for entry in sorted(os.listdir(shard_dir)):
        path = os.path.join(shard_dir, entry)
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
                f"the shards in {shard_dir} were made with other flags: "
                f"{describe_difference(theirs, fingerprint)}; re-run with the "
                "same flags to resume, or use another OPENAI_LOGDIR"
            )
        s, e = int(m.group(2)), int(m.group(3))
        if s >= num_samples:
            continue
        problem = shard_problem(path, s, e)
        if problem is not None:
            os.remove(path)
            notes.append(f"removed the damaged shard {path} ({problem}); "
                         "its positions are sampled again")
            continue
        done.append((s, min(e, num_samples)))
    return merge_ranges(done), notes


def collect_shards(shard_dir, digest, num_samples):
    """The shards covering 0..num_samples-1 in order: (row_start, row_end, path)."""
    found = []
    for entry in os.listdir(shard_dir):
        m = SHARD_RE.match(entry)
        if m and m.group(1) == digest:
            found.append((int(m.group(2)), int(m.group(3)), os.path.join(shard_dir, entry)))
    found.sort()
    pieces, pos = [], 0
    for s, e, path in found:
        if pos >= num_samples:
            break
        if e <= pos:
            continue
        if s > pos:
            break
        stop = min(e, num_samples)
        pieces.append((pos - s, stop - s, path))
        pos = stop
    if pos < num_samples:
        raise UsageError(
            f"positions from {pos} on are missing in {shard_dir} although every rank "
            "finished; the log directory must be shared by all ranks' nodes"
        )
    return pieces
