"""Data-parallel training on torchrun: launch, process group, sharding and metric reduction.

The train stage re-launches itself under `torch.distributed.run` when `train.<run>.nproc` or
`nnodes` asks for more than one process; each process then finds its rank in the environment
torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK).  Outside torchrun every helper here is a no-op
for a world of one, so the single-process path never creates a process group.
"""
import os
from dataclasses import replace
from datetime import timedelta

import torch

from imgcls.errors import PipelineError

# A collective (the gradient all-reduce, the metric sums) that waits longer than this raises
# instead of hanging, e.g. when a peer machine vanished without torchrun noticing.
TIMEOUT = timedelta(minutes=10)


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 alone prints, logs and writes outputs."""
    return rank() == 0


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "WORLD_SIZE" in os.environ


def launch(module: str, args: list[str], cfg, name: str) -> None:
    """Run `python -m module args` under torchrun with cfg.nproc processes per machine on
    cfg.nnodes machines; a failed rank (torchrun stops the others) becomes a PipelineError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if cfg.nnodes == 1:
        rendezvous = ["--standalone"]
    else:  # c10d rendezvous: the same command on every machine; node ranks are assigned on arrival
        rendezvous = ["--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint,
                      "--rdzv-id", name.replace("@", "-")]
    try:
        run(get_args_parser().parse_args(["--nproc-per-node", str(cfg.nproc), *rendezvous, "-m", module, *args]))
    except ChildFailedError as err:
        failed_rank, failure = err.get_first_failure()
        raise PipelineError(f"{name}: rank {failed_rank} of {cfg.nproc * cfg.nnodes} failed (exit code "
                            f"{failure.exitcode}); its error is printed above") from None


def init(rt):
    """Join the process group (nccl on CUDA, gloo on CPU); return `rt` on this rank's GPU."""
    import torch.distributed as dist

    if rt.device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(f"rank {rank()}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                f"CUDA devices; lower train.<run>.nproc")
        torch.cuda.set_device(local_rank)
        rt = replace(rt, device=torch.device("cuda", local_rank))
    dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=rt.device if rt.device.type == "cuda" else None)
    return rt


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model, rt):
    """DistributedDataParallel: rank 0's initial weights are broadcast, gradients are averaged."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def sum_all(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (no-op in a world of one)."""
    if world() > 1:
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor)


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (all of them in a world of one)."""
    size = -(-n // world())
    return slice(rank() * size, min(n, (rank() + 1) * size))
