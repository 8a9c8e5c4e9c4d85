"""
A small key/value + text logger with the API of OpenAI baselines' logger (as
used by guided-diffusion).

Output formats: ``stdout``, ``log`` (``log.txt``), ``csv`` (``progress.csv``)
and ``json`` (``progress.json``).  Nothing is configured on import; the first
logging call without :func:`configure` sets up a default logger writing to a
fresh folder under ``tempfile.gettempdir()`` (or ``$OPENAI_LOGDIR``).
"""

import datetime
import json
import os
import os.path as osp
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40

DISABLED = 50


class KVWriter:
    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self):
        pass


class SeqWriter:
    def writeseq(self, seq):
        raise NotImplementedError

    def close(self):
        pass


def _to_float_or_none(value):
    if isinstance(value, bool):
        return None
    if hasattr(value, "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


class HumanOutputFormat(KVWriter, SeqWriter):
    """Aligned tables of key/values and free-form lines, to a file or stream."""

    MAX_LEN = 30

    def __init__(self, filename_or_file):
        if isinstance(filename_or_file, str):
            self.file = open(filename_or_file, "at")  # a resumed run continues the file
            self.own_file = True
        else:
            if not hasattr(filename_or_file, "write"):
                raise TypeError(f"expected a file or a path, got {filename_or_file!r}")
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        key2str = {}
        for key, val in sorted(kvs.items()):
            fval = _to_float_or_none(val)
            valstr = "%-8.3g" % fval if fval is not None else str(val)
            key2str[self._truncate(str(key))] = self._truncate(valstr)

        if not key2str:
            warnings.warn("tried to write an empty key-value dict")
            return
        keywidth = max(map(len, key2str.keys()))
        valwidth = max(map(len, key2str.values()))

        dashes = "-" * (keywidth + valwidth + 7)
        lines = [dashes]
        for key, val in sorted(key2str.items(), key=lambda kv: kv[0].lower()):
            lines.append(
                "| %s%s | %s%s |"
                % (key, " " * (keywidth - len(key)), val, " " * (valwidth - len(val)))
            )
        lines.append(dashes)
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()

    def _truncate(self, s):
        return s[: self.MAX_LEN - 3] + "..." if len(s) > self.MAX_LEN else s

    def writeseq(self, seq):
        self.file.write(" ".join(seq) + "\n")
        self.file.flush()

    def close(self):
        if self.own_file and not self.file.closed:
            self.file.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per line."""

    def __init__(self, filename):
        self.file = open(filename, "at")  # a resumed run continues the file

    def writekvs(self, kvs):
        row = {}
        for k, v in sorted(kvs.items()):
            if not (v is None or isinstance(v, (bool, int, float, str))):
                fval = _to_float_or_none(v)  # numpy / torch scalars
                v = fval if fval is not None else str(v)
            row[str(k)] = v
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()

    def close(self):
        if not self.file.closed:
            self.file.close()


class CSVOutputFormat(KVWriter):
    """
    A CSV table; the header grows (and old rows are padded) as new keys
    appear. An existing file is continued under its header (a resumed
    training run keeps the rows of the runs before it), upstream truncated it.
    """

    def __init__(self, filename):
        self.file = open(filename, "a+t")  # writes go to the end, reads from anywhere
        self.sep = ","
        self.file.seek(0)
        header = self.file.readline().rstrip("\n")
        self.keys = header.split(self.sep) if header else []
        self.file.seek(0, os.SEEK_END)

    def writekvs(self, kvs):
        extra_keys = sorted(set(kvs.keys()) - set(self.keys))
        if extra_keys:
            self.keys.extend(extra_keys)
            self.file.seek(0)
            lines = self.file.readlines()
            self.file.seek(0)
            self.file.truncate()
            self.file.write(self.sep.join(self.keys) + "\n")
            for line in lines[1:]:
                self.file.write(line.rstrip("\n") + self.sep * len(extra_keys) + "\n")
        values = []
        for k in self.keys:
            v = kvs.get(k)
            values.append("" if v is None else str(v))
        self.file.write(self.sep.join(values) + "\n")
        self.file.flush()

    def close(self):
        if not self.file.closed:
            self.file.close()


def make_output_format(format, ev_dir, log_suffix=""):
    os.makedirs(ev_dir, exist_ok=True)
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    elif format == "log":
        return HumanOutputFormat(osp.join(ev_dir, "log%s.txt" % log_suffix))
    elif format == "json":
        return JSONOutputFormat(osp.join(ev_dir, "progress%s.json" % log_suffix))
    elif format == "csv":
        return CSVOutputFormat(osp.join(ev_dir, "progress%s.csv" % log_suffix))
    else:
        raise ValueError("Unknown format specified: %s" % (format,))


# ================================================================
# API
# ================================================================


def logkv(key, val):
    """
    Log a value of some diagnostic.
    Call this once for each diagnostic quantity, each iteration.
    If called many times, the last value is used.
    """
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """The same as logkv(), but if called many times, values are averaged."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """Log a dictionary of key-value pairs."""
    for k, v in d.items():
        logkv(k, v)


def dumpkvs():
    """Write all of the diagnostics from the current iteration; returns them."""
    return get_current().dumpkvs()


def getkvs():
    return get_current().name2val


def log(*args, level=INFO):
    """Write the args, separated by spaces, to the console and log files."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Set logging threshold on the current logger."""
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The directory log files are written to."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    logkey = "wait_" + scopename
    tstart = time.time()
    try:
        yield
    finally:
        current = get_current()
        current.name2val[logkey] = current.name2val.get(logkey, 0.0) + time.time() - tstart


def profile(n):
    """
    Usage:
    @profile("my_func")
    def my_func(): code
    """

    def decorator_with_name(func):
        def func_wrapper(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return func_wrapper

    return decorator_with_name


# ================================================================
# Backend
# ================================================================


def get_current():
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    DEFAULT = None  # logger made by the first implicit configure()
    CURRENT = None  # logger used by the free functions above

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)  # values this iteration
        self.name2cnt = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    # Logging API, forwarded
    # ----------------------------------------
    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        oldval, cnt = self.name2val[key], self.name2cnt[key]
        self.name2val[key] = oldval * cnt / (cnt + 1) + val / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self):
        if self.comm is None:
            d = dict(self.name2val)
        else:
            d = mpi_weighted_mean(
                self.comm,
                {
                    name: (val, self.name2cnt.get(name, 1))
                    for (name, val) in self.name2val.items()
                },
            )
            if self.comm.rank != 0:
                d["dummy"] = 1  # so we don't get a warning about an empty dict
        out = d.copy()  # returned for unit testing purposes
        for fmt in self.output_formats:
            if isinstance(fmt, KVWriter):
                fmt.writekvs(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return out

    def log(self, *args, level=INFO):
        if self.level <= level:
            self._do_log(args)

    # Configuration
    # ----------------------------------------
    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for fmt in self.output_formats:
            fmt.close()

    # Misc
    # ----------------------------------------
    def _do_log(self, args):
        for fmt in self.output_formats:
            if isinstance(fmt, SeqWriter):
                fmt.writeseq(map(str, args))


def get_rank_without_mpi_import():
    # Check environment variables instead of importing mpi4py, to avoid
    # calling MPI_Init() when this module is used.
    for varname in ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"]:
        value = os.environ.get(varname)
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


def mpi_weighted_mean(comm, local_name2valcount):
    """
    Weighted average of dicts that live on different ranks.

    :param comm: an mpi4py communicator.
    :param local_name2valcount: dict mapping key -> (value, count).
    :return: on rank 0, key -> mean; an empty dict on the other ranks.
    """
    all_name2valcount = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    name2sum = defaultdict(float)
    name2count = defaultdict(float)
    for n2vc in all_name2valcount:
        for name, (val, count) in n2vc.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                warnings.warn(
                    "tried to compute mean on non-float {}={}".format(name, val)
                )
            else:
                name2sum[name] += val * count
                name2count[name] += count
    return {name: name2sum[name] / name2count[name] for name in name2sum}


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """
    Configure the current logger.

    :param dir: output folder; default ``$OPENAI_LOGDIR`` or a fresh folder
                under the system temp dir.
    :param format_strs: e.g. ["stdout", "log", "csv", "json"]; default
                ``$OPENAI_LOG_FORMAT`` or "stdout,log,csv" on rank 0 and
                ``$OPENAI_LOG_FORMAT_MPI`` or "log" on the other ranks.
    :param comm: an mpi4py communicator; if given, numeric values are averaged
                 across it on dumpkvs().
    :param log_suffix: appended to file names; ranks > 0 add "-rank%03i".
    """
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR")
    if dir is None:
        dir = osp.join(
            tempfile.gettempdir(),
            datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"),
        )
    if not isinstance(dir, (str, os.PathLike)):
        raise TypeError(f"dir must be a path, got {dir!r}")
    dir = osp.expanduser(os.fspath(dir))
    os.makedirs(dir, exist_ok=True)

    rank = get_rank_without_mpi_import()
    if rank > 0:
        log_suffix = log_suffix + "-rank%03i" % rank

    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    format_strs = [f.strip() for f in format_strs if f and f.strip()]
    output_formats = [make_output_format(f, dir, log_suffix) for f in format_strs]

    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log("Logging to %s" % dir)


def _configure_default_logger():
    configure()
    Logger.DEFAULT = Logger.CURRENT


def reset():
    if Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    prevlogger = Logger.CURRENT
    Logger.CURRENT = None  # so configure() does not close the previous logger
    configure(dir=dir, format_strs=format_strs, comm=comm)
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = prevlogger
