"""Page faults and images/s of a SimpleCNN train step (batch 128, MNIST-sized input) with glibc's
default allocator settings and with the CPU runtime's (`select_runtime` keeps freed memory in the
process, docs/speed.md), each in a fresh process:

    python -m benchmarks.page_faults [--layout channels_last] [--warmup 10] [--steps 20]

Faults are counted by the kernel (getrusage), so they do not depend on how busy the machine is.
"""
import argparse
import subprocess
import sys

from imgcls.paths import ROOT

MODES = {"default": "glibc's defaults", "runtime": 'select_runtime("cpu")'}


def child(mode: str, layout: str, warmup: int, steps: int) -> None:
    """Print faults per step and images/s of the timed steps, in this (fresh) process."""
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from imgcls.models import SimpleCNN
    from imgcls.training import select_runtime

    if mode == "runtime":
        select_runtime("cpu")
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = SimpleCNN().to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.randn(128, 1, 28, 28).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (128,))

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(images)[0], labels).backward()
        optimizer.step()

    for _ in range(warmup):  # with the runtime's setting the heap grows to the step's working set here
        step()
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps, 128 * steps / seconds)


def measure(mode: str, layout: str = "channels_last", warmup: int = 10, steps: int = 20) -> tuple[float, float]:
    """(page faults per step, images/s) of one mode, measured in a fresh process."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.page_faults", "--child", mode, "--layout", layout,
                          "--warmup", str(warmup), "--steps", str(steps)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    faults, speed = run.stdout.split()[-2:]
    return float(faults), float(speed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.page_faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="counted and timed steps")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.layout, args.warmup, args.steps)
        return
    print(f"SimpleCNN train step, batch 128, fp32 {args.layout}; {args.steps} steps after {args.warmup}\n")
    print("| allocator | page faults per step | img/s |\n|---|---|---|")
    for mode, name in MODES.items():  # one after the other: both share the CPU otherwise
        faults, speed = measure(mode, args.layout, args.warmup, args.steps)
        print(f"| {name} | {faults:,.0f} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
