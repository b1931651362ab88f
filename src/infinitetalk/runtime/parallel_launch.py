"""Starting the ranks of a parallel job: `infinitetalk generate --gpus N` and torchrun.

* `run_ranks(fn, args, world=N, device="cuda")` starts N processes (torch.multiprocessing),
  initialises torch.distributed in each (NCCL on CUDA, one GPU per rank: cuda:0 .. cuda:N-1;
  gloo with `device="cpu"`: N CPU processes, which is how the tests run the parallel code),
  calls `fn(*args)` in every rank and returns rank 0's result. Ranks are spawned (fresh
  interpreters: a forked process cannot use CUDA, and a fork of a process whose media threads
  ran may inherit a held lock). `start_method="fork"` (CPU only) skips the second import of
  torch per rank and shares the caller's objects without pickling; the tests use it. Before a
  fork the caller's garbage is collected and the survivors frozen (`gc.freeze`), so a rank's
  garbage collector never finalizes an object of the caller: an unclosed PyAV decoder in a
  reference cycle, finalized in a fork, waits forever for its frame threads, which a fork lacks.
* A rank that raises an InfiniteTalkError reports its sentence and exits; the other ranks are
  stopped and `run_ranks` raises `RankFailedError` with that sentence and exit code, so the CLI
  prints one clean error. Any other exception is an internal error and comes back as a
  RuntimeError with the rank's traceback.
* `init_from_torchrun()` joins the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK and the
  master address in the environment): `torchrun --nproc-per-node N -m infinitetalk generate ...`.
  torchrun stops every rank when one fails; each rank prints its own error sentence.
"""
from __future__ import annotations

import gc
import logging
import os
import pickle
import socket
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import InfiniteTalkError, InputError

log = logging.getLogger(__name__)


class RankFailedError(InfiniteTalkError):
    """A rank of a parallel job stopped with a user-facing error; `str(err)` is its sentence."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world(world: int, device_type: str) -> None:
    """Raise InputError when `world` ranks cannot run on `device_type`."""
    if world < 1:
        raise InputError(f"--gpus must be at least 1, got {world}.")
    if device_type == "cuda":
        found = torch.cuda.device_count()
        if found < world:
            raise InputError(f"--gpus {world} asks for {world} GPUs but {found} CUDA GPU(s) are visible; "
                             f"use --gpus {max(found, 1)} or --device cpu.")
    elif device_type != "cpu":
        raise InputError(f"Several ranks run on 'cuda' or 'cpu' devices, not {device_type!r}.")


def _rank_entry(rank: int, world: int, device_type: str, port: int, fn: Callable, args: Sequence, results,
                forked: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    elif forked:  # an OpenMP pool inherited through fork can hang when it is used with > 1 thread
        torch.set_num_threads(1)
    else:  # N CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend_for(device_type), rank=rank, world_size=world)
    try:
        out = fn(*args)
    except InfiniteTalkError as err:
        results.put(("error", rank, int(err.exit_code), str(err)))
        sys.stderr.flush()
        os._exit(int(err.exit_code))  # the others may wait in a collective: the parent stops them
    if rank == 0:  # by value: shared-memory tensors would not outlive this process
        results.put(("result", rank, pickle.dumps(out)))
    dist.destroy_process_group()


def _drain(results, into: list) -> None:
    while not results.empty():
        into.append(results.get())


def run_ranks(fn: Callable, args: Sequence = (), *, world: int, device: str = "cuda",
              start_method: Optional[str] = None) -> Any:
    """Run `fn(*args)` on `world` new ranks of one job; return rank 0's result (see module doc).

    `fn` and `args` must be picklable unless `start_method="fork"`."""
    device_type = torch.device(device).type
    check_world(world, device_type)
    start_method = start_method or "spawn"
    if start_method == "fork" and device_type == "cuda":
        raise ValueError("CUDA ranks cannot be forked; use start_method='spawn'")
    results = mp.get_context(start_method).SimpleQueue()
    port = _free_port()
    forked = start_method == "fork"
    if forked:  # see the module doc: no object of the caller is finalized in a rank
        gc.collect()
        gc.freeze()
    try:
        context = mp.start_processes(_rank_entry, args=(world, device_type, port, fn, tuple(args), results, forked),
                                     nprocs=world, join=False, start_method=start_method)
    finally:
        if forked:
            gc.unfreeze()
    messages: list = []
    try:
        while True:
            _drain(results, messages)
            if context.join(timeout=0.2):
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        _drain(results, messages)
        errors = sorted(m for m in messages if m[0] == "error")
        if errors:
            _, rank, code, sentence = errors[0]
            log.debug("rank %d failed: %s", rank, sentence)
            raise RankFailedError(sentence, code) from None
        raise RuntimeError(f"rank {err.error_index} of the parallel job failed:\n{err}") from None
    except BaseException:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        raise
    _drain(results, messages)
    for message in messages:
        if message[0] == "result":
            return pickle.loads(message[2])
    return None


def torchrun_world() -> int:
    """The world size torchrun gave this process (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ and "MASTER_ADDR" in os.environ else 1


def init_from_torchrun(device_type: str) -> torch.device:
    """Join torchrun's job (env://) and return this rank's device (cuda:LOCAL_RANK or cpu)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        check_world(local + 1, "cuda")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device_type))
    return torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")


def rank_device(device_type: str) -> torch.device:
    """This rank's device inside a started job."""
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def requested_world(gpus: Optional[int]) -> int:
    """Ranks of the job: --gpus N, or torchrun's world size (they must agree when both are given)."""
    launched = torchrun_world()
    if gpus is not None and launched > 1 and gpus != launched:
        raise InputError(f"--gpus {gpus} disagrees with torchrun's {launched} processes; leave --gpus out under torchrun.")
    return launched if launched > 1 else int(gpus or 1)


def start_or_join(fn: Callable, args: Any, world: int, device_type: str) -> Optional[Any]:
    """In a rank (started by `run_ranks` or torchrun): join the job and return None. Otherwise
    start `world` ranks running `fn(args)` and return rank 0's result."""
    if dist.is_initialized():
        return None
    if torchrun_world() > 1:
        init_from_torchrun(device_type)
        return None
    return run_ranks(fn, (args,), world=world, device=device_type)
