"""
Helpers for distributed training.

Launch modes understood by :func:`setup_dist`:

* ``mpiexec -n N python script.py`` (mpi4py installed, N > 1): ranks come from
  ``MPI.COMM_WORLD``; the node-local rank from ``Split_type(COMM_TYPE_SHARED)``.
  On one node the torch.distributed rendezvous happens on 127.0.0.1 through a
  TCPStore that rank 0 opens on a free port and whose port it broadcasts over
  MPI.  Across several nodes ``MASTER_ADDR`` (and optionally ``MASTER_PORT``)
  must be set.
* ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
  ``MASTER_PORT`` in the environment): the usual ``env://`` rendezvous.
* anything else: one plain process and no process group; every helper in this
  module still works (rank 0, world size 1, barrier is a no-op, ...).

Backend: gloo on CPU, nccl when CUDA is available (override with ``backend``).
The local GPU is ``local_rank() % torch.cuda.device_count()``; an existing
``CUDA_VISIBLE_DEVICES`` is respected and never modified.

Every process group is created with a timeout (``IMPROVED_DIFFUSION_DIST_TIMEOUT``
seconds, default 60), so that a dead or stuck rank makes the others fail with
an error rather than hang.  Under MPI an uncaught exception additionally calls
``MPI.COMM_WORLD.Abort`` so that ``mpiexec`` tears the whole job down.

Nothing happens on import: scripts call :func:`setup_dist` explicitly.
"""

import atexit
import datetime
import io
import os
import sys
import warnings

import blobfile as bf
import torch as th
import torch.distributed as dist

TIMEOUT_ENV_VAR = "IMPROVED_DIFFUSION_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 60.0

# Environment variables that MPI launchers set for the processes they start.
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

# Chunk size for broadcasting checkpoint bytes (MPI counts are 32-bit ints).
_CHUNK_SIZE = 2 ** 30


class _DistState:
    def __init__(self):
        self.initialized = False  # setup_dist() has run
        self.rank = None
        self.world_size = None
        self.local_rank = None
        self.mpi_comm = None  # MPI.COMM_WORLD when launched by mpiexec with N > 1
        self.device = None


_STATE = _DistState()


# ---------------------------------------------------------------------------
# Environment inspection (never imports mpi4py).
# ---------------------------------------------------------------------------


def _env_int(names, default=None):
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def _launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _mpi_world_size_from_env():
    return _env_int(_MPI_SIZE_VARS, default=None)


def _launched_by_mpi():
    size = _mpi_world_size_from_env()
    if size is not None:
        return size > 1
    # Some launchers only expose a rank; let MPI tell us the size.
    return _env_int(_MPI_RANK_VARS, default=None) is not None


def get_timeout():
    """The process-group timeout as a ``datetime.timedelta``."""
    raw = os.environ.get(TIMEOUT_ENV_VAR, "")
    seconds = DEFAULT_TIMEOUT_SECONDS
    if raw.strip():
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(
                f"{TIMEOUT_ENV_VAR} must be a number of seconds, got {raw!r}"
            ) from None
        if seconds <= 0:
            raise ValueError(f"{TIMEOUT_ENV_VAR} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


def setup_dist(backend=None):
    """
    Set up the distributed environment (idempotent).

    :param backend: torch.distributed backend; default nccl with CUDA, else gloo.
    """
    if _STATE.initialized:
        return
    if dist.is_available() and dist.is_initialized():
        # Someone else created the default group; adopt it.
        _STATE.rank = dist.get_rank()
        _STATE.world_size = dist.get_world_size()
        _STATE.local_rank = _env_int(("LOCAL_RANK",), default=0)
        _STATE.device = _select_device(_STATE.local_rank)
        _STATE.initialized = True
        return

    if backend is None:
        backend = "nccl" if th.cuda.is_available() else "gloo"
    timeout = get_timeout()

    if _launched_by_torchrun():
        _setup_torchrun(backend, timeout)
    elif _launched_by_mpi() and _try_setup_mpi(backend, timeout):
        pass
    else:
        _STATE.rank, _STATE.world_size, _STATE.local_rank = 0, 1, 0
        _STATE.device = _select_device(0)

    _STATE.initialized = True


def _device_for(local_rank_):
    if th.cuda.is_available():
        return th.device("cuda", local_rank_ % th.cuda.device_count())
    return th.device("cpu")


def _select_device(local_rank_):
    device = _device_for(local_rank_)
    if device.type == "cuda":
        th.cuda.set_device(device)
    return device


def _setup_torchrun(backend, timeout):
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    _STATE.rank, _STATE.world_size = rank, world_size
    _STATE.local_rank = _env_int(("LOCAL_RANK",), default=0)
    _STATE.device = _select_device(_STATE.local_rank)
    _init_process_group(backend, timeout, init_method="env://", rank=rank,
                        world_size=world_size)


def _try_setup_mpi(backend, timeout):
    try:
        from mpi4py import MPI
    except ImportError:
        warnings.warn(
            "Launched by an MPI launcher but mpi4py is not installed; "
            "running as a single process."
        )
        return False

    comm = MPI.COMM_WORLD
    world_size = comm.Get_size()
    if world_size <= 1:
        return False
    rank = comm.Get_rank()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank_, local_size = node_comm.Get_rank(), node_comm.Get_size()
    node_comm.Free()
    single_node = comm.allreduce(int(local_size == world_size), op=MPI.MIN) == 1

    _STATE.mpi_comm = comm
    _STATE.rank, _STATE.world_size, _STATE.local_rank = rank, world_size, local_rank_
    _STATE.device = _select_device(local_rank_)
    _install_mpi_excepthook(comm)

    master_addr = os.environ.get("MASTER_ADDR")
    master_port = _env_int(("MASTER_PORT",), default=None)
    if master_addr and master_port:
        host, port = master_addr, master_port
    elif single_node:
        host, port = "127.0.0.1", None
    elif master_addr:
        host, port = master_addr, None
    else:
        raise RuntimeError(
            "Multi-node MPI launch: set MASTER_ADDR (and optionally MASTER_PORT) "
            "to an address of rank 0's node reachable from all nodes."
        )

    store = None
    error = None
    if rank == 0:
        try:
            # wait_for_workers=False: the clients only learn the port below.
            store = dist.TCPStore(
                host, port or 0, world_size, True, timeout=timeout, wait_for_workers=False
            )
            port = store.port
        except Exception as exc:  # tell the other ranks instead of hanging
            error, port = exc, -1
    port = comm.bcast(port, root=0)
    if port == -1:
        if error is not None:
            raise error
        raise RuntimeError("rank 0 failed to open the rendezvous store")
    if rank != 0:
        store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    _init_process_group(backend, timeout, store=store, rank=rank,
                        world_size=world_size)
    return True


def _init_process_group(backend, timeout, **kwargs):
    if backend == "nccl":
        # Make a dead peer surface as an error instead of a hang.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    # A process that exits with the group still up can abort in the C++
    # destructors of its communication threads ("terminate called without an
    # active exception", exit status 6 under mpiexec): close it first.
    atexit.register(close_process_group)


def close_process_group():
    """Take the process group down cleanly (idempotent; a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway
            pass


def _install_mpi_excepthook(comm):
    """Abort the whole MPI job on an uncaught exception (like ``python -m mpi4py``)."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
            sys.stderr.flush()
        finally:
            comm.Abort(1)

    sys.excepthook = hook


# ---------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------


def _pg_active():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    if _pg_active():
        return dist.get_rank()
    if _STATE.rank is not None:
        return _STATE.rank
    if _launched_by_torchrun():
        return int(os.environ["RANK"])
    return _env_int(_MPI_RANK_VARS, default=0)


def get_world_size():
    if _pg_active():
        return dist.get_world_size()
    if _STATE.world_size is not None:
        return _STATE.world_size
    if _launched_by_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return _mpi_world_size_from_env() or 1


def local_rank():
    """The rank of this process among the processes on its node."""
    if _STATE.local_rank is not None:
        return _STATE.local_rank
    return _env_int(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"),
                    default=0)


def is_main_process():
    return get_rank() == 0


def is_distributed():
    """True when a process group with more than one rank exists."""
    return _pg_active() and dist.get_world_size() > 1


def barrier():
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[dev().index])
        else:
            dist.barrier()
    elif _STATE.mpi_comm is not None:
        _STATE.mpi_comm.Barrier()


def dev():
    """The device to use for torch.distributed and the model."""
    if _STATE.device is not None:
        return _STATE.device
    return _device_for(local_rank())


# ---------------------------------------------------------------------------
# Checkpoints and parameters
# ---------------------------------------------------------------------------


def _read_bytes(path):
    with bf.BlobFile(path, "rb") as f:
        return f.read()


def _broadcast_bytes_mpi(comm, path):
    import numpy as np

    data = None
    if comm.Get_rank() == 0:
        try:
            data = _read_bytes(path)
        except Exception:
            comm.bcast(-1, root=0)  # let the other ranks fail too
            raise
        size = comm.bcast(len(data), root=0)
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        size = comm.bcast(None, root=0)
        if size == -1:
            raise RuntimeError(f"rank 0 failed to read {path}")
        buf = np.empty(size, dtype=np.uint8)
    for start in range(0, size, _CHUNK_SIZE):
        comm.Bcast(buf[start : start + _CHUNK_SIZE], root=0)
    return data if data is not None else buf.tobytes()


def _broadcast_bytes_torch(path):
    device = dev() if dist.get_backend() == "nccl" else th.device("cpu")
    data = None
    if dist.get_rank() == 0:
        try:
            data = _read_bytes(path)
        except Exception:
            dist.broadcast(th.tensor([-1], dtype=th.int64, device=device), 0)
            raise
        dist.broadcast(th.tensor([len(data)], dtype=th.int64, device=device), 0)
        buf = th.frombuffer(bytearray(data), dtype=th.uint8).to(device)
    else:
        size = th.zeros(1, dtype=th.int64, device=device)
        dist.broadcast(size, 0)
        if size.item() == -1:
            raise RuntimeError(f"rank 0 failed to read {path}")
        buf = th.empty(int(size.item()), dtype=th.uint8, device=device)
    for start in range(0, buf.numel(), _CHUNK_SIZE):
        dist.broadcast(buf[start : start + _CHUNK_SIZE], 0)
    return data if data is not None else buf.cpu().numpy().tobytes()


def load_state_dict(path, **kwargs):
    """
    Load a PyTorch file, reading it once on rank 0 and broadcasting the bytes.

    Must be called by every rank.  Always loads with ``weights_only=True``;
    ``map_location`` defaults to ``"cpu"``.
    """
    if kwargs.pop("weights_only", True) is not True:
        raise ValueError("load_state_dict always uses weights_only=True")
    kwargs.setdefault("map_location", "cpu")

    if _STATE.mpi_comm is not None and _STATE.mpi_comm.Get_size() > 1:
        data = _broadcast_bytes_mpi(_STATE.mpi_comm, path)
    elif is_distributed():
        data = _broadcast_bytes_torch(path)
    else:
        data = _read_bytes(path)
    return th.load(io.BytesIO(data), weights_only=True, **kwargs)


def sync_params(params):
    """Broadcast a sequence of tensors from rank 0 to all other ranks (in place)."""
    if not is_distributed():
        return
    for p in params:
        with th.no_grad():
            dist.broadcast(p, 0)


# ---------------------------------------------------------------------------
# Small Python objects between ranks (no-ops in a single process)
# ---------------------------------------------------------------------------

_OBJECT_GROUP = {}


def _object_group():
    """
    The group for small object collectives: the default group under gloo,
    else a gloo group beside it (no GPU involved, and it works when several
    ranks share one GPU, which nccl refuses). Created by the first
    collective, which every rank reaches together.
    """
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _OBJECT_GROUP:
        _OBJECT_GROUP["gloo"] = dist.new_group(backend="gloo", timeout=get_timeout())
    return _OBJECT_GROUP["gloo"]


def gather_objects(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group())
    return box[0]
