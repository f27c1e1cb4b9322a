"""Dropout forward and backward on the CPU: PyTorch's nn.Dropout against the models' Dropout
with its mask drawn by torch.rand (imgcls/models.py), at the tensor sizes of SimpleCNN's and
AlexNet's dropout layers (batch 128):

    python -m benchmarks.dropout_speed [--repeats 5] [--steps 30]

Each figure is the median of --repeats timings of --steps passes, the two versions interleaved.
The report says which draw the models' Dropout takes on this CPU: on Intel CPUs with MKL it is
nn.Dropout itself, and both columns time the same thing.
"""
import argparse
import statistics
import time

import torch
from torch import nn

from imgcls.models import Dropout, cpu_vendor, dropout_draws_with_rand
from imgcls.training import select_runtime

SHAPES = {"SimpleCNN features (p 0.25)": ((128, 32, 14, 14), 0.25),
          "SimpleCNN classifier hidden (p 0.5)": ((128, 128), 0.5),
          "AlexNet classifier input (p 0.5)": ((128, 512), 0.5),
          "AlexNet classifier hidden (p 0.5)": ((128, 2048), 0.5)}


def seconds(layer: nn.Module, x: torch.Tensor, steps: int) -> float:
    """Seconds per forward + backward pass of `layer` on a leaf copy of x."""
    started = time.perf_counter()
    for _ in range(steps):
        leaf = x.detach().requires_grad_()
        layer(leaf).sum().backward()
    return (time.perf_counter() - started) / steps


def measure(repeats: int, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds per pass of nn.Dropout ("torch") and the models' Dropout ("models") for
    each of SHAPES, the two interleaved."""
    torch.manual_seed(0)
    result = {}
    for name, (shape, p) in SHAPES.items():
        x = torch.randn(shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        layers = {"torch": nn.Dropout(p).train(), "models": Dropout(p).train()}
        times = {key: [] for key in layers}
        for layer in layers.values():
            seconds(layer, x, 3)
        for _ in range(repeats):
            for key, layer in layers.items():
                times[key].append(seconds(layer, x, steps))
        result[name] = {"elements": x.numel(), **{key: statistics.median(times[key]) for key in layers}}
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    select_runtime("cpu")
    print(f"CPU vendor {cpu_vendor() or 'unknown'}, MKL {torch.backends.mkl.is_available()}: the models' Dropout "
          f"draws with {'torch.rand' if dropout_draws_with_rand() else 'nn.Dropout (MKL)'}; "
          f"{torch.get_num_threads()} threads\n")
    print("| tensor | elements | nn.Dropout, ms | models' Dropout, ms | ratio |\n|---|---|---|---|---|")
    for name, r in measure(args.repeats, args.steps).items():
        print(f"| {name} | {r['elements']:,} | {r['torch'] * 1e3:.2f} | {r['models'] * 1e3:.2f} | "
              f"{r['torch'] / r['models']:.2f}x |")


if __name__ == "__main__":
    main()
