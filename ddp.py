"""More than one device: trainer.py under torchrun with DistributedDataParallel (DDP).

    torchrun --standalone --nproc_per_node=2 trainer.py [flags]     # two processes on one machine

torchrun starts one process per device and tells each its place in the environment (RANK,
LOCAL_RANK, WORLD_SIZE); setup() joins them into a process group: nccl on CUDA, one device
per local rank; gloo on the CPU. `python trainer.py` runs the same code as a world of one:
no process group is made, and every function here is then the identity or a no-op.

The recipe's sampling stays one process's: every rank draws the same epoch order, and each
trains on its share of every global batch (shard). Label repair deals its fold models out to
the ranks and gathers their probabilities in fold order (spread). Rank 0 is the only writer
and the only voice: the other ranks print nothing (run_main).
"""
import contextlib
import datetime
import json
import os
import re
import socket
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import Interrupted, UserError, pick_device
from cli import run_main as cli_run_main


def launched():
    """True when torchrun started this process: it sets RANK, LOCAL_RANK and WORLD_SIZE."""
    return all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def rank():
    return int(os.environ["RANK"]) if launched() else 0


def local_rank():
    return int(os.environ["LOCAL_RANK"]) if launched() else 0


def size():
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main():
    """The one process that prints, reads the resume state and writes every output."""
    return rank() == 0


# How long a process waits for the others in a collective (an all-reduce, a barrier) or to join
# the group. nccl's own default is 10 minutes; here a process may wait for another machine's
# first process to download and build the data (minutes), or for another process's label-repair
# fold model when the folds do not divide evenly (docs/distributed.md).
GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def setup(device_name):
    """This process's torch device; under torchrun also the process group (nccl for CUDA, gloo for the CPU).

    Without torchrun it is cli.pick_device and nothing else. Under torchrun, CUDA means the
    device of this process's local rank, and auto means CUDA when there is one, else the CPU.
    """
    if not launched():
        return pick_device(device_name)
    if device_name in (None, "auto"):
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = pick_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--device {device_name}: under torchrun each process takes the CUDA device of its "
                            "local rank; use --device cuda and choose devices with CUDA_VISIBLE_DEVICES")
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"torchrun started more processes on this machine than it has CUDA devices "
                            f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--device {device_name}: torchrun runs on CUDA devices (nccl) or on the CPU (gloo); "
                        f"on {device.type} train with one process: python trainer.py")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return device


# ---------------------------------------------------------------------------
# Training together: the model, each rank's share of a batch, the loss they report


def wrap(model, device):
    """model in DistributedDataParallel when there is more than one process, else model itself.

    DDP averages the ranks' gradients in backward(); no SyncBatchNorm: each rank normalizes over
    its own share of the batch, and DDP copies rank 0's batch-norm statistics to the others at
    every forward (docs/distributed.md says why).
    """
    if size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The module inside DistributedDataParallel (nanoGPT's raw_model), or model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def place(model):
    """(rank, world size) of the processes training model together: (0, 1) for a model that wrap()
    did not wrap, such as label repair's fold models, each trained whole by one process."""
    if isinstance(model, DistributedDataParallel):
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch, rank, world):
    """This rank's share of one global batch of indices, and the weight of its mean loss.

    The batch is cut into `world` consecutive parts whose sizes differ by at most one (when the
    world size does not divide the batch size, the first ranks take one image more). Weighting
    each rank's mean loss by len(share) * world / len(batch) makes DDP's average of the ranks'
    gradients the gradient of the whole batch's mean loss, as one process computes it. A rank
    left without an image (only an epoch's last batch can be smaller than the world) takes the
    batch's first image with weight 0: every rank must take every step. World 1: (batch, 1.0).
    """
    share = batch.tensor_split(world)[rank]
    if len(share) == 0:
        return batch[:1], 0.0
    return share, len(share) * world / len(batch)


def step_means(values, world):
    """The mean over the ranks of each element of a 1-D tensor, as a list of floats, in one read
    (world 1: values.tolist()) and one all-reduce.

    Of the weighted losses of shard(), one per step, it gives each step's whole-batch mean loss;
    every rank gets the same numbers, so all of them see a loss that stops being finite at the
    same step.
    """
    if world == 1:
        return values.tolist()
    values = values.detach().clone()
    dist.all_reduce(values)
    return [value / world for value in values.tolist()]


# ---------------------------------------------------------------------------
# Sharing results: fold models dealt out, rank 0's objects, the same data everywhere


def spread(function, items):
    """[function(item) for item in items] with the items dealt round-robin to the ranks (item k to
    rank k mod N) and the results gathered, in item order, on every rank."""
    items = list(items)
    mine = {k: function(item) for k, item in enumerate(items) if k % size() == rank()}
    if size() > 1:
        parts = [None] * size()
        dist.all_gather_object(parts, mine)
        mine = {k: result for part in parts for k, result in part.items()}
    return [mine[k] for k in range(len(items))]


def broadcast(obj):
    """Rank 0's obj, on every rank (world 1: obj itself)."""
    if size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first():
    """The block runs on each machine's first process, then on its others: it builds what they read
    (the others wait at a barrier, within GROUP_TIMEOUT)."""
    if local_rank() > 0:
        dist.barrier()
    yield
    if size() > 1 and local_rank() == 0:
        dist.barrier()


def check_same(value, what, advice):
    """Stop every process with one line unless all of them hold the same value (a fingerprint of
    their data, say): nodes that read different files would train on a mix of them, silently."""
    if size() == 1:
        return
    parts = [None] * size()
    dist.all_gather_object(parts, (value, socket.gethostname()))
    odd = [(r, host) for r, (v, host) in enumerate(parts) if v != parts[0][0]]
    if odd:
        r, host = odd[0]
        others = f" and {len(odd) - 1} more" if len(odd) > 1 else ""
        raise UserError(f"{what} differs between processes: process {r} (on {host}){others} read other data than "
                        f"process 0 (on {parts[0][1]}); {advice}")


# ---------------------------------------------------------------------------
# One voice: errors under torchrun


def run_main(main):
    """cli.run_main for a script that torchrun may start: one error line, from rank 0.

    Under torchrun the other ranks print nothing (Python's stdout and stderr go to os.devnull), so
    a mistake every rank makes alike (a bad flag, a missing file) is one line, as without
    torchrun. Each failing rank also leaves its message in the error file torchrun reads
    (TORCHELASTIC_ERROR_FILE, as torch's @record does), so torchrun's failure report, which
    follows, names the cause. An unexpected exception becomes one line as well; its traceback
    goes to that report. SIGTERM, which torchrun sends to the other processes when one fails,
    stops a rank as Ctrl-C does: rank 0 says what was saved.

    A run that succeeds ends together: every rank waits for rank 0's last write, then the
    process group is destroyed. Then, and after a failure, the process leaves with os._exit
    once its output is flushed, skipping the interpreter's shutdown: gloo's worker threads may
    still be releasing tensors that need the interpreter, and during its shutdown that aborts
    the process (SIGABRT, "terminate called without an active exception"; docs/distributed.md).
    Every file was written and closed before (cli.atomic_write).
    """
    if not launched():
        cli_run_main(main)
        return
    if not is_main():  # Python's output only: a crash in C++ still reaches the terminal
        sys.stdout = sys.stderr = open(os.devnull, "w")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    code = 0
    try:
        cli_run_main(lambda: _reported(main))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _reported(main):
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the run is ending: torchrun's SIGTERM must not cut it short
        if isinstance(e, MemoryError):
            raise
        if isinstance(e, KeyboardInterrupt):
            e = Interrupted("stopped by a signal: torchrun stops every process when one of them fails, and passes "
                            "Ctrl-C on; run the same command with --resume to continue from the last finished epoch")
        elif not isinstance(e, UserError):  # a bug, or another process gone in the middle of a collective
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)  # the traceback, for torchrun's report
            # gloo opens its messages with its source file ("[.../pair.cc:545] Read error ..."): drop it.
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0]).split(". ")[0][:300]
            raise UserError(f"process {rank()} of {size()} stopped on {type(e).__name__}: {first} (torchrun's "
                            "report below shows the process that failed first); once the cause is fixed, run the "
                            "same command with --resume to continue from the last finished epoch") from None
        _error_file(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(e).split())}")
        raise e from None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _error_file(line):
    """Leave line where torchrun's failure report looks for this process's error (torch's @record format)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump(data, f)
