"""Images/s of the project's train step and embedding pass against a reference-style loop, on
the same model and data, in one run, and how close each is to the hardware:

    python -m benchmarks.train_speed [--steps 50] [--batch-size 128] [--device auto] [--epoch] ...

The project path is imgcls.training itself (`fit` and `infer`: uint8 tensors in memory,
normalised per batch, precision and layout chosen by `select_runtime`).  The reference-style
path is what the practical's notebooks do: a torchvision-style dataset that makes a PIL image of
each item and applies ToTensor + Normalize, a DataLoader, fp32, contiguous tensors, `.item()`
every step.  It runs in a process of its own, so that nothing the project sets for its process
(the allocator setting of `select_runtime`) reaches it.  Before timing, both paths compute the
fp32 loss of one batch from the same weights, so the comparison is shown to be like for like.
The train step's FLOPs are counted (torch.utils.flop_counter) and set against the machine's
measured fp32 and bf16 matrix-product peaks.  `--epoch` adds two full epochs of each study (the
train stage's `fit`, validation included) against two full reference-style epochs, and the
share of each project epoch spent outside the model step, timed within that epoch.  Data: each
study's prepared arrays (data/prepared/<study>.npz) unless a Keras-layout npz is given (--mnist,
--cifar10).
"""
import argparse
import contextlib
import copy
import io
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from imgcls import models, paths
from imgcls.params import TrainParams
from imgcls.training import Runtime, fit, infer, select_runtime

STUDY_MODELS = {"mnist": "simple_cnn", "cifar10": "alexnet"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides the kernels PyTorch and oneDNN run
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")  # set: an older CPU emulated (docs/speed.md)
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]  # (bf16, channels_last)


def load_arrays(path: Path) -> dict:
    """uint8 NCHW train/validation images, int64 labels and float32 per-channel mean/std.

    Reads a prepared npz (x_val, mean, std) or a Keras-layout one (x_test, NHW or NHWC).
    """
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    prepared = "mean" in arrays
    out = {}
    for split, key in (("train", "x_train"), ("val", "x_val" if prepared else "x_test")):
        images = arrays[key]
        if not prepared:
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        out[f"x_{split}"] = np.ascontiguousarray(images)
        out[f"y_{split}"] = arrays[key.replace("x_", "y_")].astype(np.int64)
    if prepared:
        out["mean"], out["std"] = arrays["mean"].astype(np.float32), arrays["std"].astype(np.float32)
    else:
        scaled = out["x_train"].astype(np.float32) / 255.0
        out["mean"], out["std"] = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    return out


class ReferenceStyleDataset(Dataset):
    """What torchvision's MNIST/CIFAR10 do per item: a PIL image from HW(C) uint8, then transform."""

    def __init__(self, images_nchw: np.ndarray, labels: np.ndarray, mean, std):
        images = images_nchw.transpose(0, 2, 3, 1)
        self.data = np.ascontiguousarray(images[..., 0] if images.shape[-1] == 1 else images)
        self.targets = labels
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize([float(m) for m in mean], [float(s) for s in std])])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), int(self.targets[index])


def cycle(n: int, available: int) -> np.ndarray:
    """Indices of n items drawn in order from `available`, repeating when there are too few."""
    return np.arange(n) % available


def build_model(study: str, arrays: dict, batch_size: int) -> tuple[nn.Module, TrainParams]:
    cfg = TrainParams(data=study, model={"name": STUDY_MODELS[study]}, epochs=1, batch_size=batch_size)
    channels, size = arrays["x_train"].shape[1], arrays["x_train"].shape[2]
    num_classes = int(max(arrays["y_train"].max(), arrays["y_val"].max())) + 1
    return models.build(cfg.model, in_channels=channels, num_classes=num_classes, image_size=size), cfg


def project_fit(model, images, labels, arrays, cfg, rt: Runtime, seed: int = 0) -> tuple[float, float]:
    """One epoch of imgcls.training.fit over `images`; (images/s of the epoch, its mean train loss)."""
    def to(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(rt.device)

    data = {"x_train": to(images), "y_train": to(labels), "x_val": to(images[:1]), "y_val": to(labels[:1]),
            "mean": to(arrays["mean"]), "std": to(arrays["std"])}
    with contextlib.redirect_stdout(io.StringIO()):  # fit prints one line per epoch
        history, _, _ = fit(model, data, cfg, rt, seed)
    return len(images) / history[0]["epoch_seconds"], history[0]["train_loss"]


def reference_process() -> ProcessPoolExecutor:
    """A process of its own for the reference-style path, as a notebook's kernel is: what the project
    sets for its process (select_runtime's allocator setting) does not reach it."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def reference_train(model, dataset: Dataset, batch_size: int, device: torch.device, steps: int, warmup: int,
                    workers: int = 0) -> float:
    """The notebook loop: fp32, per-item transforms through a shuffling DataLoader, .item() each step."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    done, images, running_loss, started = 0, 0, 0.0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                started, images = time.perf_counter(), 0
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            logits, _ = model(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done, images = done + 1, images + len(y)
            if done == warmup + steps:
                break
    return images / (time.perf_counter() - started)


def reference_loss(model, dataset: Dataset, device: torch.device) -> float:
    """Loss of the whole (small) dataset as one training batch, the reference's way."""
    model.to(device).train()
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=True)))
    logits, _ = model(x.to(device))
    return nn.CrossEntropyLoss()(logits, y.to(device)).item()


def same_loss(study: str, arrays: dict, device: torch.device, n: int = 64, seed: int = 0) -> tuple[float, float]:
    """fp32 loss of the same n images through the project's fit and the reference-style path, same weights.

    Dropout is switched off so that the batch order (fit shuffles) cannot change the result.
    """
    images, labels = arrays["x_train"][:n], arrays["y_train"][:n]
    torch.manual_seed(seed)
    model, cfg = build_model(study, arrays, batch_size=n)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    reference_model = copy.deepcopy(model)
    _, project = project_fit(model, images, labels, arrays, cfg, Runtime(device, bf16=False, channels_last=False), seed)
    return project, reference_loss(reference_model, ReferenceStyleDataset(images, labels, arrays["mean"], arrays["std"]), device)


def project_embed(model, images: np.ndarray, arrays, rt: Runtime, batch_size: int) -> float:
    """The embed stage's pass: imgcls.training.infer over CPU uint8 images, results back on the host."""
    rt.place(model)
    mean, std = (torch.from_numpy(arrays[key]).to(rt.device) for key in ("mean", "std"))
    host = torch.from_numpy(np.ascontiguousarray(images))
    list(infer(model, host[:batch_size], mean, std, rt, batch_size))  # warm-up
    started = time.perf_counter()
    for logits, features in infer(model, host, mean, std, rt, batch_size):
        logits.cpu(), features.cpu()
    return len(images) / (time.perf_counter() - started)


@torch.no_grad()
def reference_embed(model, dataset: Dataset, batch_size: int, device: torch.device, workers: int = 0) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    model.to(device).eval()
    for x, _ in loader:  # warm-up batch
        model(x.to(device))
        break
    started, images = time.perf_counter(), 0
    for x, _ in loader:
        logits, features = model(x.to(device))
        logits.cpu().numpy(), features.cpu().numpy()
        images += len(x)
    return images / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """GFLOP/s of square matrix products in `dtype`: what this machine's kernels reach at best.

    The size doubles from 256 up to 2048 while one product takes under a tenth of `seconds` (bf16
    is emulated, hundreds of times slower, on CPUs without native bf16), so the measurement lasts
    about `seconds` everywhere.
    """
    size = 256
    while True:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        a @ b
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        if time.perf_counter() - started > seconds / 10 or size >= 2048:
            break
        size *= 2
    products, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or products < 3:
        a @ b
        synchronize(device)
        products += 1
    return 2 * size ** 3 * products / elapsed / 1e9


def step_flops(model, arrays: dict, batch_size: int, device: torch.device) -> float:
    """FLOPs per image of one training step (forward and backward), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(device).train()
    index = cycle(batch_size, len(arrays["x_train"]))
    images = torch.from_numpy(arrays["x_train"][index]).to(device).float() / 255
    labels = torch.from_numpy(arrays["y_train"][index]).to(device)
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(images)
        F.cross_entropy(logits, labels).backward()
    return counter.get_total_flops() / batch_size


class StepClock:
    """Seconds spent in the model step (forward, loss, backward, optimizer) inside a running `fit`,
    so that an epoch's share outside the step comes from that same epoch, whatever the machine's
    drift: a step starts when the model is called in training mode and ends when an optimizer
    has stepped.  The device is synchronised at both ends (a no-op on the CPU)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.seconds, self.steps, self.started = device, 0.0, 0, None
        self.hooks = [model.register_forward_pre_hook(self.begin),
                      register_optimizer_step_post_hook(self.end)]

    def begin(self, module, args) -> None:
        if module.training:
            synchronize(self.device)
            self.started = time.perf_counter()

    def end(self, optimizer, args, kwargs) -> None:
        if self.started is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.steps += 1
            self.started = None

    def take(self) -> tuple[float, int]:
        """(seconds, steps) since the last call."""
        taken, self.seconds, self.steps = (self.seconds, self.steps), 0.0, 0
        return taken

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def reference_evaluate(model, loader: DataLoader, device: torch.device) -> None:
    """The notebook's validation pass: fp32, `.item()` per batch."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    for x, y in loader:
        logits, _ = model(x.to(device))
        criterion(logits, y.to(device)).item()
        (logits.argmax(1) == y.to(device)).sum().item()


def reference_epochs(model, train: Dataset, val: Dataset, batch_size: int, device: torch.device,
                     epochs: int = 2) -> list[float]:
    """Seconds of each of `epochs` reference-style epochs: the training loop over every image, then
    the validation pass."""
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        reference_train(model, train, batch_size, device, steps=math.ceil(len(train) / batch_size), warmup=0)
        reference_evaluate(model, DataLoader(val, batch_size=batch_size), device)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def full_epoch(study: str, model, arrays: dict, cfg, rt: Runtime, reference_runner: ProcessPoolExecutor,
               seed: int = 0) -> dict:
    """Seconds of full epochs (every training image once, then the validation split) through the
    train stage's `fit` and through the reference-style loop (in `reference_runner`'s process), two of
    each, alternated (project, reference-style, project, reference-style) so that the machine's
    drift falls on both alike: the first includes the kernels' first-call set-up, the second is
    what every later epoch of a run costs.  Each project epoch is split into its model steps
    (`StepClock`), the rest of its training loop (gathering, normalising, bookkeeping) and the
    rest of the epoch (validation, keeping the best weights, logging)."""
    def to(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(rt.device)

    data = {key: to(arrays[key]) for key in ("x_train", "y_train", "x_val", "y_val", "mean", "std")}
    train = ReferenceStyleDataset(arrays["x_train"], arrays["y_train"], arrays["mean"], arrays["std"])
    val = ReferenceStyleDataset(arrays["x_val"], arrays["y_val"], arrays["mean"], arrays["std"])
    project, reference, step, steps, loop, started = [], [], [], [], [], [time.perf_counter()]
    model = copy.deepcopy(model)
    clock = StepClock(model, rt.device)

    def epoch_ended(row):
        synchronize(rt.device)
        project.append(time.perf_counter() - started[0])
        seconds, count = clock.take()
        step.append(seconds)
        steps.append(count)
        loop.append(row["epoch_seconds"])
        reference.extend(reference_runner.submit(reference_epochs, model, train, val, cfg.batch_size, rt.device,
                                                 epochs=1).result())
        progress(f"{study}: full epoch {row['epoch']}, project {project[-1]:.1f} s (model step {step[-1]:.1f} s), "
                 f"reference-style {reference[-1]:.1f} s")
        started[0] = time.perf_counter()

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fit(model, data, cfg.model_copy(update={"epochs": 2}), rt, seed, on_epoch=epoch_ended)
    finally:
        clock.remove()
    return {"project": project, "reference": reference, "ratio": [r / p for r, p in zip(reference, project)],
            "step": step, "steps": steps, "in_loop": [ls - s for ls, s in zip(loop, step)],
            "after_loop": [p - ls for p, ls in zip(project, loop)],
            "outside_step": [1 - s / p for s, p in zip(step, project)]}


def run(data: dict[str, Path], steps: int = 50, warmup: int = 5, batch_size: int = 128, embed_batches: int = 10,
        embed_batch_size: int = 500, device: str = "auto", workers: int = 0, repeats: int = 3,
        matrix: bool = True, epoch: bool = False, peak_seconds: float = 1.0, seed: int = 0) -> dict:
    """Measure every study in `data` ({study: npz path}); images/s are medians over `repeats`."""
    with reference_process() as reference_runner:
        rt = select_runtime(device)
        peaks = {name: matmul_peak(dtype, rt.device, peak_seconds)
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        progress("matrix-product peaks: " + ", ".join(f"{name} {gflops:,.0f} GFLOP/s" for name, gflops in peaks.items()))
        results = {"runtime": rt, "peaks": peaks, "studies": {}}
        for study, path in data.items():
            results["studies"][study] = measure(study, path, rt, reference_runner, steps, warmup, batch_size,
                                                embed_batches, embed_batch_size, workers, repeats, matrix, epoch, seed)
    return results


def measure(study: str, path: Path, rt: Runtime, reference_runner: ProcessPoolExecutor, steps: int, warmup: int,
            batch_size: int, embed_batches: int, embed_batch_size: int, workers: int, repeats: int, matrix: bool,
            epoch: bool, seed: int) -> dict:
    """One study's figures (see run); the reference-style path runs in `reference_runner`."""
    arrays = load_arrays(path)
    torch.manual_seed(seed)
    model, cfg = build_model(study, arrays, batch_size)
    train_idx = cycle(steps * batch_size, len(arrays["x_train"]))
    images, labels = arrays["x_train"][train_idx], arrays["y_train"][train_idx]
    warm = cycle(warmup * batch_size, len(arrays["x_train"]))
    train_set = ReferenceStyleDataset(images, labels, arrays["mean"], arrays["std"])
    layouts = LAYOUTS if matrix else [(rt.bf16, rt.channels_last)]
    speeds = {layout: [] for layout in layouts}
    reference_speeds = []
    for _ in range(repeats):  # interleaved, so a burst of load from elsewhere hits both paths
        for bf16, channels_last in layouts:
            layout_rt = Runtime(rt.device, bf16, channels_last)
            project_fit(copy.deepcopy(model), arrays["x_train"][warm], arrays["y_train"][warm], arrays, cfg,
                        layout_rt, seed)
            speeds[(bf16, channels_last)].append(
                project_fit(copy.deepcopy(model), images, labels, arrays, cfg, layout_rt, seed)[0])
            progress(f"{study}: train step, project {layout_name(bf16, channels_last)}: "
                     f"{speeds[(bf16, channels_last)][-1]:,.0f} img/s")
        reference_speeds.append(reference_runner.submit(reference_train, model, train_set, batch_size, rt.device,
                                                        steps, warmup, workers).result())
        progress(f"{study}: train step, reference-style fp32: {reference_speeds[-1]:,.0f} img/s")
    val_idx = cycle(embed_batches * embed_batch_size, len(arrays["x_val"]))
    val_images, val_labels = arrays["x_val"][val_idx], arrays["y_val"][val_idx]
    val_set = ReferenceStyleDataset(val_images, val_labels, arrays["mean"], arrays["std"])
    project_embeds, reference_embeds = [], []
    for _ in range(repeats):
        project_embeds.append(project_embed(copy.deepcopy(model), val_images, arrays, rt, embed_batch_size))
        reference_embeds.append(reference_runner.submit(reference_embed, model, val_set, embed_batch_size,
                                                        rt.device, workers).result())
        progress(f"{study}: embedding, project {project_embeds[-1]:,.0f} img/s, "
                 f"reference-style {reference_embeds[-1]:,.0f} img/s")
    median = {layout: statistics.median(values) for layout, values in speeds.items()}
    train = {"project": median[(rt.bf16, rt.channels_last)], "reference": statistics.median(reference_speeds)}
    embed = {"project": statistics.median(project_embeds), "reference": statistics.median(reference_embeds)}
    return {
        "model": type(model).__name__,
        "same_loss": same_loss(study, arrays, rt.device, seed=seed),
        "train": {**train, "ratio": train["project"] / train["reference"]},
        "embed": {**embed, "ratio": embed["project"] / embed["reference"]},
        "matrix": median if matrix else {},
        "flops_per_image": step_flops(model, arrays, batch_size, rt.device),
        "epoch": full_epoch(study, model, arrays, cfg, rt, reference_runner, seed) if epoch else None,
    }


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> str:
    """CPU model and the flags that decide its kernels (and any ISA limit set), GPU, versions."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    limits = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if name in os.environ]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model} ({' '.join(present) or 'none of ' + ' '.join(CPU_FLAGS)}"
            f"{'; limited by ' + ' '.join(limits) if limits else ''}), {os.cpu_count()} CPUs "
            f"({torch.get_num_threads()} torch threads){gpu}; torch {torch.__version__}, Python {platform.python_version()}")


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def layout_name(bf16: bool, channels_last: bool) -> str:
    return {(False, False): "fp32", (False, True): "channels_last", (True, False): "bf16",
            (True, True): "bf16 + channels_last"}[(bf16, channels_last)]


def achieved(r: dict, speed: float, peak: float) -> str:
    """GFLOP/s of a train step at `speed` img/s, and its share of the matrix-product peak."""
    gflops = r["flops_per_image"] * speed / 1e9
    return f"{gflops:,.1f} ({gflops / peak:.0%})"


def report(results: dict, args) -> str:
    rt, peaks = results["runtime"], results["peaks"]
    auto = layout_name(rt.bf16, rt.channels_last)
    project_peak = peaks["bf16" if rt.bf16 else "fp32"]
    lines = [f"machine: {machine()}", f"device: {rt.device}; auto precision/layout: {auto}",
             f"matrix-product peak: fp32 {peaks['fp32']:,.0f} GFLOP/s, bf16 {peaks['bf16']:,.0f} GFLOP/s",
             f"train: batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up; embed: "
             f"{args.embed_batches} batches of {args.embed_batch_size}; DataLoader workers {args.workers}; "
             f"median of {args.repeats}", ""]
    lines += ["| study | model | fp32 loss, project / reference-style (same batch) | MFLOP per image (train step) | "
              f"train img/s, project ({auto}) | GFLOP/s (of {'bf16' if rt.bf16 else 'fp32'} peak) | train img/s, "
              "reference-style (fp32) | GFLOP/s (of fp32 peak) | ratio | embed img/s, project | embed img/s, "
              "reference-style | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for study, r in results["studies"].items():
        project_loss, reference = r["same_loss"]
        train, embed = r["train"], r["embed"]
        lines.append(f"| {study} | {r['model']} | {project_loss:.6f} / {reference:.6f} | "
                     f"{r['flops_per_image'] / 1e6:.1f} | {train['project']:,.0f} | "
                     f"{achieved(r, train['project'], project_peak)} | {train['reference']:,.0f} | "
                     f"{achieved(r, train['reference'], peaks['fp32'])} | {train['ratio']:.2f}x | "
                     f"{embed['project']:,.0f} | {embed['reference']:,.0f} | {embed['ratio']:.2f}x |")
    if any(r["matrix"] for r in results["studies"].values()):
        lines += ["", "Project train step by precision/layout, img/s (ratio to fp32; GFLOP/s and share of the "
                  "peak of its precision):", "",
                  "| study | " + " | ".join(layout_name(*layout) for layout in LAYOUTS) + " |",
                  "|---|" + "---|" * len(LAYOUTS)]
        for study, r in results["studies"].items():
            fp32 = r["matrix"][(False, False)]
            lines.append(f"| {study} ({r['model']}) | " + " | ".join(
                f"{r['matrix'][layout]:,.0f} ({r['matrix'][layout] / fp32:.2f}x; "
                f"{achieved(r, r['matrix'][layout], peaks['bf16' if layout[0] else 'fp32'])})"
                for layout in LAYOUTS) + " |")
    if any(r["epoch"] for r in results["studies"].values()):
        lines += ["", "Full epochs (all training images, then the validation split), seconds; the second "
                  "epoch is what every later epoch of a run costs. The project's epoch splits into its model steps, "
                  "the rest of its training loop, and validation with the rest of the epoch, all timed in that "
                  "same epoch:", "",
                  f"| study | project `fit` ({auto}), 2nd epoch | model step | rest of the training loop | "
                  "validation and the rest | outside the model step | reference-style loop (fp32), 2nd epoch | "
                  "ratio | 1st epoch: project / reference-style (ratio), outside the model step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for study, r in results["studies"].items():
            e = r["epoch"]
            lines.append(f"| {study} | {e['project'][1]:.1f} | {e['step'][1]:.1f} | {e['in_loop'][1]:.2f} | "
                         f"{e['after_loop'][1]:.2f} | {e['outside_step'][1]:.1%} | {e['reference'][1]:.1f} | "
                         f"{e['ratio'][1]:.2f}x | {e['project'][0]:.1f} / {e['reference'][0]:.1f} "
                         f"({e['ratio'][0]:.2f}x), {e['outside_step'][0]:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0])
    for study in STUDY_MODELS:
        parser.add_argument(f"--{study}", type=Path, default=paths.prepared(study), metavar="NPZ",
                            help=f"prepared or Keras-layout npz (default {paths.prepared(study)})")
    parser.add_argument("--studies", nargs="+", choices=list(STUDY_MODELS), default=list(STUDY_MODELS))
    parser.add_argument("--steps", type=int, default=50, help="timed train steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed train steps before each measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--embed-batches", type=int, default=10)
    parser.add_argument("--embed-batch-size", type=int, default=500)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workers", type=int, default=0, help="reference-style DataLoader worker processes")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (median reported)")
    parser.add_argument("--no-matrix", dest="matrix", action="store_false",
                        help="skip the fp32/channels_last/bf16 matrix (measure only the auto choice)")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="time per matrix-product peak measurement")
    parser.add_argument("--epoch", action="store_true",
                        help="add two full epochs per study: the train stage's fit against the reference-style loop")
    args = parser.parse_args(argv)
    for study in args.studies:
        if not getattr(args, study).exists():
            parser.error(f"{getattr(args, study)} not found: run `dvc repro preprocess@{study}` or pass --{study}")
    load_before = load()
    results = run({study: getattr(args, study) for study in args.studies}, steps=args.steps, warmup=args.warmup,
                  batch_size=args.batch_size, embed_batches=args.embed_batches,
                  embed_batch_size=args.embed_batch_size, device=args.device, workers=args.workers,
                  repeats=args.repeats, matrix=args.matrix, epoch=args.epoch,
                  peak_seconds=args.peak_seconds)
    print(report(results, args))
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {load()}")
    return results


if __name__ == "__main__":
    main()
