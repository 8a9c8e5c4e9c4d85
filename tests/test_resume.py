"""
Resuming a sampling run from whatever a crash or a disk fault leaves in the
log directory: the result is the npz of an uninterrupted run, byte for byte,
or one line naming the file and what to do (exit 2); never a traceback and
never a damaged npz.

Real kills come from tests/die_while_writing.py (SIGKILL half-way through a
shard or the final npz, at a known point); other damage is made by hand
(cut files, empty files, stale files). Resumes run in this process, through
the scripts' main, so a traceback would fail the test. The expected npz is
always that of an independent, uninterrupted run of the same flags (samples
depend only on seed + position: docs/sag.md).
"""

import json
import os
import resource
import shutil
import signal

import numpy as np
import pytest

from conftest import (
    TINY,
    die_while_writing,
    error_lines,
    load_npz,
    needs_mpi,
    npz_files,
    run_in_process,
    run_script,
    script_module,
)

IMAGE_SAMPLE = script_module("image_sample")
FLAGS = TINY + " --class_cond True --num_classes 10 --timestep_respacing 2 --seed 3 --batch_size 2"
NPZ = "samples_6x16x16x3.npz"  # --num_samples 6: shards [0, 2), [2, 4), [4, 6)


@pytest.fixture(scope="module")
def flags(ckpts):
    return f"{FLAGS} --model_path {ckpts['cond']} --num_samples 6"


@pytest.fixture(scope="module")
def uninterrupted(flags, tmp_path_factory):
    """The run with nothing in its way: its folder (npz, config.json, no shards)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    res = run_script("image_sample.py", flags, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert npz_files(out) == [str(out / NPZ)]
    return out


def killed(how, flags, out):
    """The log directory `out` of one process killed by die_while_writing `how`."""
    res = die_while_writing(how, "image_sample", flags, out)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_in_shard(flags, tmp_path_factory):
    """Killed after the shard [0, 2), while writing [2, 4)."""
    return killed("shard 1", flags, tmp_path_factory.mktemp("killed_in_shard"))


@pytest.fixture(scope="module")
def killed_in_npz(flags, tmp_path_factory):
    """Killed while streaming the three shards into the npz."""
    return killed("npz", flags, tmp_path_factory.mktemp("killed_in_npz"))


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "run")


def shard_names(logdir):
    return sorted(n for n in os.listdir(logdir / "shards") if n.startswith("shard_"))


def digest_of(logdir):
    return shard_names(logdir)[0].split("_")[1]


def resume(flags, logdir, capsys, monkeypatch):
    """Re-run the same command in this process: (exit code, stderr)."""
    return run_in_process(IMAGE_SAMPLE, flags, logdir, capsys, monkeypatch)


def assert_resumed_to(logdir, uninterrupted, code, err, sampled):
    """Exit 0, no error, the uninterrupted run's npz; `sampled` positions drawn again."""
    assert code == 0 and not error_lines(err) and "Traceback" not in err, err
    assert npz_files(logdir) == [str(logdir / NPZ)]
    got, want = load_npz(logdir / NPZ), load_npz(uninterrupted / NPZ)
    assert list(got) == ["arr_0", "arr_1"]
    assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["arr_1"], want["arr_1"])
    config = json.load(open(logdir / "config.json"))
    assert config["session"]["positions_sampled"] == sampled
    assert not (logdir / "shards").exists()  # shards, temporary files, progress reports: gone
    assert not [n for n in os.listdir(logdir) if n.endswith((".partial", ".tmp"))]


def log_text(logdir):
    return open(logdir / "log.txt").read()


def one_error(code, err):
    """Exit 2 and exactly one line on stderr (beside the progress bar), an error line: returns it."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sampling:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------
# A kill mid-shard
# ---------------------------------------------------------------------------


def test_killed_mid_shard_resumes_to_same_npz(killed_in_shard, uninterrupted, flags, tmp_path,
                                               capsys, monkeypatch):
    out = copy_of(killed_in_shard, tmp_path)
    left = sorted(os.listdir(out / "shards"))
    (done,) = shard_names(out)
    assert done.endswith("_000000000-000000002.npz")
    (tmp,) = [n for n in left if n.endswith(".tmp")]  # the shard [2, 4), half written
    assert tmp.startswith(f".{done[:-len('000000000-000000002.npz')]}000000002-000000004.npz.")
    assert 0 < os.path.getsize(out / "shards" / tmp) < os.path.getsize(out / "shards" / done)
    assert not npz_files(out)
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=4)
    assert "resuming: 2 of 6 positions are already in shards" in log_text(out)


DAMAGED_SHARDS = {
    # what a disk fault or a copy cut short leaves under a shard's name
    "empty": lambda whole: b"",
    "cut_in_half": lambda whole: whole[: len(whole) // 2],
    "zip_tail_cut": lambda whole: whole[:-10],
    "bit_flip": lambda whole: whole[:600] + bytes([whole[600] ^ 0xFF]) + whole[601:],
    "garbage": lambda whole: b"not a zip file at all" * 20,
}


@pytest.mark.parametrize("damage", list(DAMAGED_SHARDS))
def test_damaged_shard_is_sampled_again(damage, killed_in_shard, uninterrupted, flags, tmp_path,
                                        capsys, monkeypatch):
    out = copy_of(killed_in_shard, tmp_path)
    (done,) = shard_names(out)
    whole = open(out / "shards" / done, "rb").read()
    damaged = out / "shards" / f"shard_{digest_of(out)}_000000004-000000006.npz"
    damaged.write_bytes(DAMAGED_SHARDS[damage](whole))
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=4)
    assert f"removed the damaged shard {damaged} (" in log_text(out)
    assert "resuming: 2 of 6 positions" in log_text(out)


def test_shard_damaged_while_running_stops_with_one_line(killed_in_shard, uninterrupted, flags,
                                                        tmp_path, capsys, monkeypatch):
    """A shard that goes bad after the start-up check (a disk fault mid-run; here the
    check is switched off): one line, no npz, no partial; the next run resamples it."""
    from improved_diffusion.run import shards

    out = copy_of(killed_in_shard, tmp_path)
    damaged = out / "shards" / f"shard_{digest_of(out)}_000000004-000000006.npz"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    with monkeypatch.context() as patch:
        patch.setattr(shards, "shard_problem", lambda path, start, end: None)
        code, err = resume(flags, out, capsys, monkeypatch)
    assert one_error(code, err).startswith(f"error: cannot read the shard {damaged} (")
    assert not npz_files(out) and not os.path.exists(out / f"{NPZ}.partial")
    code, err = resume(flags, out, capsys, monkeypatch)  # [2, 4) was sampled before the stop
    assert_resumed_to(out, uninterrupted, code, err, sampled=2)


def test_whole_shard_under_the_wrong_name_is_sampled_again(killed_in_shard, uninterrupted, flags,
                                                          tmp_path, capsys, monkeypatch):
    """A whole shard copied to another position range's name (a wrong manual copy)."""
    out = copy_of(killed_in_shard, tmp_path)
    (done,) = shard_names(out)
    shutil.copy(out / "shards" / done, out / "shards" / done.replace("000000000-000000002",
                                                                     "000000004-000000006"))
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=4)
    assert "does not hold positions 4..5" in log_text(out)


# ---------------------------------------------------------------------------
# A kill during the final assembly; a full disk there; a damaged npz
# ---------------------------------------------------------------------------


def test_killed_during_assembly_resumes_to_same_npz(killed_in_npz, uninterrupted, flags, tmp_path,
                                                    capsys, monkeypatch):
    out = copy_of(killed_in_npz, tmp_path)
    assert len(shard_names(out)) == 3  # the shards stay until the npz is in place
    assert os.path.exists(out / f"{NPZ}.partial") and not npz_files(out)
    assert not (out / "config.json").exists()
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=0)
    assert "resuming: 6 of 6 positions" in log_text(out)


def test_half_written_partial_npz_and_extras_are_rebuilt(killed_in_npz, uninterrupted, flags,
                                                        tmp_path, capsys, monkeypatch):
    """What a kill while writing the npz, its grid or config.json leaves (atomic_write's
    temporary names)."""
    out = copy_of(killed_in_npz, tmp_path)
    whole = open(uninterrupted / NPZ, "rb").read()
    (out / f"{NPZ}.partial").write_bytes(whole[: len(whole) // 2])
    config = open(uninterrupted / "config.json").read()
    (out / ".config.json.4242.0badc0de.tmp").write_text(config[: len(config) // 2])
    (out / ".samples_6x16x16x3.png.4242.0badc0de.tmp").write_bytes(b"\x89PNG\r\n")
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=0)


def test_killed_right_after_the_npz_got_its_name(flags, uninterrupted, tmp_path, capsys,
                                                  monkeypatch):
    """config.json is written before the npz is renamed into place, so a finished npz
    always has it; the shards that were not removed yet are kept (they cost nothing
    and a run of more samples uses them)."""
    out = killed("after_npz", flags, tmp_path / "run")
    assert len(shard_names(out)) == 3
    code, err = resume(flags, out, capsys, monkeypatch)
    assert code == 0 and not err.strip(), err
    got, want = load_npz(out / NPZ), load_npz(uninterrupted / NPZ)
    assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["arr_1"], want["arr_1"])
    assert json.load(open(out / "config.json"))["npz"] == NPZ


def test_disk_full_during_assembly_then_resume(flags, uninterrupted, tmp_path, capsys, monkeypatch):
    """Files may not grow past 4300 bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes
    fail with EFBIG): a shard of 2 images (3502 bytes) and the log (under 1 kB) fit, the
    npz of 6 (4608 bytes of pixels alone) does not."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4300, 4300))

    out = tmp_path / "run"
    res = run_script("image_sample.py", flags, out, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = error_lines(res.stderr)
    assert line.startswith(f"error: disk full while writing the samples {out}/{NPZ} ")
    assert "Traceback" not in res.stderr
    assert not npz_files(out) and not os.path.exists(out / f"{NPZ}.partial")
    assert len(shard_names(out)) == 3
    code, err = resume(flags, out, capsys, monkeypatch)  # space freed
    assert_resumed_to(out, uninterrupted, code, err, sampled=0)


@pytest.mark.parametrize("cut", [0, 0.5, -22])
def test_damaged_npz_next_to_the_shards_is_made_again(cut, killed_in_npz, uninterrupted, flags,
                                                      tmp_path, capsys, monkeypatch):
    """An npz cut short (zero bytes, half, its zip directory's tail) where a disk fault put it."""
    out = copy_of(killed_in_npz, tmp_path)
    whole = open(uninterrupted / NPZ, "rb").read()
    (out / NPZ).write_bytes(whole[: int(len(whole) * cut) if cut >= 0 else cut])
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=0)
    assert f"removed the damaged {out / NPZ} (" in log_text(out)


@pytest.mark.parametrize("cut", [0, 0.5])
def test_damaged_npz_of_a_finished_run_is_sampled_again(cut, uninterrupted, flags, tmp_path,
                                                        capsys, monkeypatch):
    """The shards are gone; config.json says these flags made it, but the npz is cut short."""
    out = copy_of(uninterrupted, tmp_path)
    whole = open(out / NPZ, "rb").read()
    (out / NPZ).write_bytes(whole[: int(len(whole) * cut)])
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=6)


def test_finished_run_is_not_sampled_again(uninterrupted, flags, tmp_path, capsys, monkeypatch):
    out = copy_of(uninterrupted, tmp_path)
    before = {n: open(out / n, "rb").read() for n in (NPZ, "config.json")}
    code, err = resume(flags, out, capsys, monkeypatch)
    assert code == 0 and not err.strip(), err
    assert {n: open(out / n, "rb").read() for n in (NPZ, "config.json")} == before


# ---------------------------------------------------------------------------
# config.json, progress reports, shards of other flags
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["", '{"fingerprint_digest": "', None])
def test_finished_npz_with_unreadable_config_stops_with_one_line(config, uninterrupted, flags,
                                                                 tmp_path, capsys, monkeypatch):
    """Nothing tells which flags made the npz: one line, the npz untouched."""
    out = copy_of(uninterrupted, tmp_path)
    if config is None:
        os.remove(out / "config.json")
    else:
        (out / "config.json").write_text(config)
    before = open(out / NPZ, "rb").read()
    code, err = resume(flags, out, capsys, monkeypatch)
    assert one_error(code, err) == (
        f"error: {out} already holds {NPZ}, but config.json there is missing or unreadable, so "
        f"the flags that made it are unknown; move {NPZ} away or use another OPENAI_LOGDIR")
    assert open(out / NPZ, "rb").read() == before


@pytest.mark.parametrize("config", ["", '{"fingerprint_digest": "'])
def test_unreadable_config_next_to_shards_is_rewritten(config, killed_in_shard, uninterrupted, flags,
                                                       tmp_path, capsys, monkeypatch):
    out = copy_of(killed_in_shard, tmp_path)
    (out / "config.json").write_text(config)
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=4)


def test_stale_progress_reports_are_removed(killed_in_shard, uninterrupted, flags, tmp_path,
                                            capsys, monkeypatch):
    """alive_*.json of a dead two-rank session, one of them cut short."""
    out = copy_of(killed_in_shard, tmp_path)
    report = dict(seq=7, done=2, finished=False, host="gone", pid=1)
    (out / "shards" / "alive_deadbeef_0.json").write_text(json.dumps(report))
    (out / "shards" / "alive_deadbeef_1.json").write_text(json.dumps(report)[:9])
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=4)


def test_shard_of_other_flags_stops_with_one_line(killed_in_shard, flags, tmp_path, capsys,
                                                  monkeypatch):
    out = copy_of(killed_in_shard, tmp_path)
    (done,) = shard_names(out)
    with np.load(out / "shards" / done) as shard:
        arrays = {k: shard[k] for k in shard.keys()}
    theirs = json.loads(arrays["flags"].tobytes().decode())
    assert theirs["guide_scale"] == 1.5
    theirs["guide_scale"] = 1.2
    arrays["flags"] = np.frombuffer(json.dumps(theirs, sort_keys=True).encode(), dtype=np.uint8)
    other = out / "shards" / "shard_0123456789ab_000000004-000000006.npz"
    np.savez(other, **arrays)
    code, err = resume(flags, out, capsys, monkeypatch)
    assert one_error(code, err) == (
        f"error: the shards in {out}/shards were made with other flags: --guide_scale (1.2 there, "
        "1.5 now); re-run with the same flags to resume, or use another OPENAI_LOGDIR")
    # Unreadable, under another digest's name: nothing says whose it is.
    other.write_bytes(b"")
    code, err = resume(flags, out, capsys, monkeypatch)
    assert one_error(code, err) == (
        f"error: {other} has no readable record of the flags it was made with; move it away "
        "or use another OPENAI_LOGDIR")
    assert shard_names(out) == sorted([done, other.name]) and not npz_files(out)


# ---------------------------------------------------------------------------
# Another number of ranks
# ---------------------------------------------------------------------------


@needs_mpi
def test_two_ranks_killed_then_one_rank_resumes(flags, uninterrupted, tmp_path, capsys, monkeypatch):
    """mpiexec -n 2: each rank dies half-way through its second shard (rank 1 has
    only one, [2, 4): it may or may not finish it before mpiexec takes it down)."""
    out = tmp_path / "run"
    res = die_while_writing("shard 1", "image_sample", flags, out, ranks=2)
    assert res.returncode != 0 and not npz_files(out), res.stderr[-3000:]
    assert shard_names(out)[0].endswith("_000000000-000000002.npz")
    assert any(n.endswith(".tmp") for n in os.listdir(out / "shards"))
    held = len(shard_names(out))
    code, err = resume(flags, out, capsys, monkeypatch)
    assert_resumed_to(out, uninterrupted, code, err, sampled=6 - 2 * held)
    assert json.load(open(out / "config.json"))["world_size"] == 1


@needs_mpi
def test_one_rank_killed_then_two_ranks_resume(flags, uninterrupted, killed_in_shard, tmp_path):
    out = copy_of(killed_in_shard, tmp_path)
    res = run_script("image_sample.py", flags, out, ranks=2)
    assert res.returncode == 0 and not error_lines(res.stderr), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out / NPZ)
    got, want = load_npz(out / NPZ), load_npz(uninterrupted / NPZ)
    assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["arr_1"], want["arr_1"])
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 2 and config["session"]["positions_sampled"] == 4
    assert not (out / "shards").exists()
