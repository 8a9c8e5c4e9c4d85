"""
Progress reports between the ranks of a sampling run, in small files.

No collective happens while sampling: every rank writes a report (a
counter, the samples it finished, whether it is done) to
``<shard_dir>/alive_<session>_<rank>.json`` every few seconds. Rank 0
reads them all, moves the progress bar and notices a rank that stopped
reporting for `stale_after` seconds; the other ranks watch rank 0. A rank
that gives up prints one line and leaves (``os._exit``), which makes
``mpiexec`` or torchrun tear the job down.
"""

import json
import os
import platform
import sys
import threading
import time

from ..files.atomic import atomic_json


class Heartbeat(threading.Thread):
    """
    :param shard_dir: where the reports go (shared by all ranks).
    :param session: the run's session id (part of the report names).
    :param initial: positions already in shards when the run started.
    :param bar: rank 0's tqdm bar, or None.

    The sampling loop adds finished samples to ``done`` and sets
    ``finished``; rank 0 waits on ``all_finished``.
    """

    def __init__(self, shard_dir, session, rank, world, initial, interval, stale_after, bar=None):
        super().__init__(daemon=True, name="sample-run-heartbeat")
        self.shard_dir = shard_dir
        self.session = session
        self.rank = rank
        self.world = world
        self.initial = initial
        self.interval = interval
        self.stale_after = stale_after
        self.bar = bar
        self.done = 0  # samples this rank finished in this session
        self.finished = False
        self.wake = threading.Event()
        self.stopping = False
        self.seq = 0
        self.abort = None
        self.all_finished = threading.Event()
        self.seen = {}  # rank -> (seq, local time it changed, report)
        self.started = time.monotonic()

    def path(self, rank):
        return os.path.join(self.shard_dir, f"alive_{self.session}_{rank}.json")

    def write_report(self):
        if self.world == 1:
            return
        self.seq += 1
        report = dict(seq=self.seq, done=self.done, finished=self.finished,
                      abort=self.abort, pid=os.getpid(), host=platform.node())
        try:
            atomic_json(self.path(self.rank), report, end="")
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
        ranks = range(1, self.world) if self.rank == 0 else [0]
        total = self.done
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
                if self.rank != 0 and report.get("abort"):
                    return ""  # rank 0 printed the reason
                if self.rank == 0 and report.get("finished"):
                    continue  # (rank 0 itself reports until it has assembled the npz)
            finished = False
            if now - changed > self.stale_after:
                who = "rank 0" if r == 0 else f"rank {r}"
                return (
                    f"{who} stopped reporting progress ({self.stale_after:.0f} s without a "
                    f"report; IMPROVED_DIFFUSION_DIST_TIMEOUT sets the limit); the finished "
                    f"batches are kept in {self.shard_dir}: re-run the same command to resume"
                )
        if self.rank == 0:
            if self.bar is not None and self.initial + total > self.bar.n:
                self.bar.update(self.initial + total - self.bar.n)
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
