"""The one training loop and inference path, shared by every study and run.

Data stays as uint8 tensors on the compute device; each batch is gathered by index,
augmented (training only) and normalised there, so there is no per-item Python work in the
hot loop.  Precision and memory layout follow the hardware: bf16 autocast + channels_last
where bf16 is native (CUDA, CPUs with AVX-512 BF16/AMX), fp32 otherwise.  Losses and
correct counts accumulate on the device and are read once per epoch (no host sync per step).
"""
import ctypes
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imgcls import distributed
from imgcls.errors import PipelineError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def place(self, model):
        """Move the model to this runtime's device and memory layout (in place; returned for chaining)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, and oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA can hold it to
    AVX2); elsewhere bf16 is emulated, hundreds of times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # PyTorch's own check of oneDNN's bf16 path (private, also used by its tests); it honours the ISA limit
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fastest_settings(device_type: str, native_bf16: bool, precision: str = "auto",
                     channels_last: str = "auto") -> tuple[bool, bool]:
    """(bf16, channels_last) for training: the one place where `auto` is decided (docs/measurements.md).

    - bf16 autocast only where bf16 is native: Ampere+ GPUs, CPUs with AVX-512 BF16 or AMX.
    - channels_last with bf16 (tensor cores, oneDNN's blocked kernels) and on every CPU, where
      oneDNN's fp32 convolutions are faster in that layout too; off on MPS (untested here).
    """
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16 and device_type != "mps")
    layout = channels_last == "on" or (channels_last == "auto" and (bf16 or device_type == "cpu"))
    return bf16, layout


def pick_device(device: str) -> torch.device:
    """auto: CUDA first, then Apple's MPS, then the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device != "auto":
        if not available[device]:
            raise PipelineError(f"device is {device!r} but no {device.upper()} device is available; "
                                "use device: auto or cpu")
        return torch.device(device)
    return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available[kind]))


# glibc's mallopt parameters (malloc.h) and its largest mmap threshold on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX = -1, -3, 32 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Every train step frees and reallocates the same activations.  By default glibc maps each
    block over 128 KiB afresh and trims freed memory, so every step page-faults its activations
    in again: the effect that PyTorch's CPU tuning guide answers with a jemalloc or tcmalloc
    preload, here without one (docs/speed.md).  True if set; elsewhere than glibc nothing changes.
    """
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        libc = ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS), no libc.so.6
        return False
    # blocks up to the largest threshold come from the heap; freed ones stay there for the next step
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def select_runtime(device: str = "auto", precision: str = "auto", channels_last: str = "auto",
                   deterministic: bool = False) -> Runtime:
    """deterministic: only kernels that give the same bits run after run (on one machine and setup).

    On the CPU this also keeps freed memory in the process (`keep_freed_memory`)."""
    dev = pick_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    # including_emulation=False: pre-Ampere GPUs (T4, V100) only emulate bf16, slower than fp32 there
    native_bf16 = {"cuda": lambda: torch.cuda.is_bf16_supported(including_emulation=False),
                   "mps": lambda: False, "cpu": cpu_has_native_bf16}[dev.type]()
    bf16, layout = fastest_settings(dev.type, native_bf16, precision, channels_last)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first call
    torch.use_deterministic_algorithms(deterministic)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # autotuning may pick another kernel each run
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, bf16, layout)


def input_stats(model, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation a model's weights expect if it declares one (pretrained backbones),
    else the training split's statistics."""
    declared = getattr(model, "input_stats", None)
    if declared is None:
        return mean, std
    return tuple(torch.tensor(values, dtype=torch.float32, device=mean.device) for values in declared)


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float, standardised with the training split's statistics."""
    out = (batch.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last) if rt.channels_last else out


def resize(batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 batch to size x size on the device (antialiased), so that a run can work at a
    smaller input than the prepared data without a second copy of it; None: unchanged."""
    if size is None or tuple(batch.shape[-2:]) == (size, size):
        return batch
    out = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def resized_crop(batch: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per image, a random box (area fraction in `scale`, aspect 3/4..4/3, inside the image)
    resampled bilinearly to the original size: one affine grid for the whole batch."""
    n, device = len(batch), batch.device
    area = uniform(n, scale[0], scale[1], generator, device)
    log_ratio = uniform(n, math.log(3 / 4), math.log(4 / 3), generator, device)
    # box width/height as fractions of the image side; clamp keeps the box inside the image
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = uniform(n, -1.0, 1.0, generator, device) * (1 - width)
    centre_y = uniform(n, -1.0, 1.0, generator, device) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def color_jitter(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per image: brightness, contrast and saturation factors drawn from 1 ± strength."""
    n, device = len(batch), batch.device
    out = batch.float()
    brightness, contrast, saturation = (uniform(n, 1 - strength, 1 + strength, generator, device).view(n, 1, 1, 1)
                                        for _ in range(3))
    out = (out * brightness).clamp_(0, 255)
    gray = out.mean(dim=1, keepdim=True) if out.shape[1] == 3 else out
    out = (out - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
    if out.shape[1] == 3:
        gray = out.mean(dim=1, keepdim=True)
        out = (out - gray) * saturation + gray
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augment(batch: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator,
            resized_crop_scale: tuple[float, float] | None = None, jitter: float = 0.0) -> torch.Tensor:
    """Random resized crop, colour jitter, random crop (after zero padding) and horizontal
    flip, per image, on a uint8 batch.

    Works on the whole batch at once, so it costs a fraction of the train step.  Our own rather
    than kornia.augmentation, which is slower on these batches (benchmarks/augment_speed.py).
    """
    if resized_crop_scale is not None:
        batch = resized_crop(batch, resized_crop_scale, generator)
    if jitter:
        batch = color_jitter(batch, jitter, generator)
    n, _, height, width = batch.shape
    device = batch.device
    if crop_padding:
        padded = F.pad(batch, (crop_padding,) * 4)
        top = torch.randint(0, 2 * crop_padding + 1, (n, 1), device=device, generator=generator)
        left = torch.randint(0, 2 * crop_padding + 1, (n, 1), device=device, generator=generator)
        rows = (top + torch.arange(height, device=device)).view(n, 1, height, 1)
        cols = (left + torch.arange(width, device=device)).view(n, 1, 1, width)
        index = torch.arange(n, device=device).view(n, 1, 1, 1)
        channel = torch.arange(batch.shape[1], device=device).view(1, -1, 1, 1)
        batch = padded[index, channel, rows, cols]
    if flip:
        mirrored = torch.rand(n, device=device, generator=generator) < 0.5
        batch = torch.where(mirrored.view(n, 1, 1, 1), batch.flip(3), batch)
    return batch


@torch.no_grad()
def infer(model, images: torch.Tensor, mean, std, rt: Runtime, batch_size: int, desc: str = "infer",
          size: int | None = None):
    """Yield (logits, features) in float32 for consecutive batches, in eval mode."""
    model.eval()
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit=" batch",
                      disable=not distributed.is_main()):
        batch = resize(images[start:start + batch_size].to(rt.device, non_blocking=True), size)
        batch = normalize(batch, mean, std, rt)
        with rt.autocast():
            logits, features = model(batch)
        yield logits.float(), features.float()


def evaluate(model, images, labels, mean, std, rt: Runtime, batch_size: int,
             size: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole set (under torchrun: each rank scores its shard)."""
    n = len(labels)
    part = distributed.shard(n)
    images, labels = images[part], labels[part]
    loss = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    start = 0
    for logits, _ in infer(model, images, mean, std, rt, batch_size, desc="validate", size=size):
        target = labels[start:start + len(logits)]
        loss += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
        start += len(logits)
    distributed.sum_all(loss, correct)
    return loss.item() / n, correct.item() / n


def make_optimizer(model, cfg):
    """Fused kernels (CPU and CUDA): one pass over the weights per step instead of one per operation."""
    decay = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=decay,
                               fused=True)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=cfg.lr, weight_decay=decay, fused=True)


def make_scheduler(optimizer, cfg, steps_per_epoch: int):
    """Per-batch learning-rate schedule from torch's own schedulers; None for a constant rate.

    warmup_cosine: the rate rises linearly to cfg.lr over the warm-up steps (1/W, 2/W, ... of it),
    then follows a cosine to 0 at the last step.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule != "warmup_cosine":
        return None
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    rise = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, cosine], milestones=[warmup])


def fit(model, data: dict, cfg, rt: Runtime, seed: int, on_epoch=None, name: str = "train"):
    """Train for cfg.epochs; return (history, best_state, seconds).

    `data` holds uint8 x_train/x_val [N, C, H, W], int64 y_train/y_val, float mean/std,
    already on rt.device.  best_state is the state_dict of the best validation epoch.
    Under torchrun each rank trains on a strided slice of every global batch of cfg.batch_size
    (the same shuffle on all ranks) through DistributedDataParallel.
    """
    rt.place(model)
    world, rank = distributed.world(), distributed.rank()
    if 0 < len(data["x_train"]) % cfg.batch_size < world:
        raise PipelineError(f"{name}: the last batch of {len(data['x_train']) % cfg.batch_size} images cannot be "
                            f"split over {world} ranks; change train.<run>.batch_size")
    net = model
    if world > 1:
        net = distributed.wrap(model, rt)
        torch.manual_seed(seed + rank)  # other dropout masks per rank; the weights came from rank 0
    x_train, y_train = data["x_train"], data["y_train"]
    mean, std = input_stats(model, data["mean"], data["std"])
    size, aug = cfg.input_size, cfg.augment
    optimizer = make_optimizer(model, cfg)
    steps = math.ceil(len(x_train) / cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg, steps)
    shuffle = torch.Generator().manual_seed(seed)
    augmenter = torch.Generator(device=rt.device).manual_seed(seed + rank)
    history, best_state, best_acc = [], None, -1.0
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.randperm(len(x_train), generator=shuffle).to(rt.device, non_blocking=True)
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)
        epoch_start = time.perf_counter()
        for start in tqdm(range(0, len(x_train), cfg.batch_size), desc=f"{name} epoch {epoch}/{cfg.epochs}",
                          leave=False, unit=" batch", disable=rank != 0):
            global_index = order[start:start + cfg.batch_size]
            index = global_index[rank::world]
            batch, target = resize(x_train.index_select(0, index), size), y_train.index_select(0, index)
            if aug.active:
                batch = augment(batch, aug.crop_padding, aug.flip, augmenter, aug.resized_crop_scale, aug.color_jitter)
            with rt.autocast():
                logits, _ = net(normalize(batch, mean, std, rt))
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks: weighting by this rank's share of the global batch
            # makes that average the gradient of the global batch's mean loss (factor 1 alone).
            (loss * (len(target) * world / len(global_index))).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach() * len(target)
            correct += (logits.argmax(1) == target).sum()
        distributed.sum_all(loss_sum, correct)
        train_loss = loss_sum.item() / len(x_train)
        epoch_seconds = time.perf_counter() - epoch_start
        val_loss, val_acc = evaluate(model, data["x_val"], data["y_val"], mean, std, rt, max(cfg.batch_size, 256), size)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise PipelineError(f"{name}: loss became non-finite in epoch {epoch} (train {train_loss}, validation "
                                f"{val_loss}); lower the learning rate (train.<run>.lr) or check the data")
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / len(x_train),
               "val_loss": val_loss, "val_acc": val_acc, "epoch_seconds": epoch_seconds,
               "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        if val_acc > best_acc:
            best_acc = val_acc
            best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
        if rank == 0:
            print(f"{name} epoch {epoch}: train loss {train_loss:.4f} acc {row['train_acc']:.4f} | "
                  f"validation loss {val_loss:.4f} acc {val_acc:.4f} | {epoch_seconds:.1f} s", flush=True)
        if on_epoch is not None and rank == 0:
            on_epoch(row)
    return history, best_state, time.perf_counter() - started


def fit_linear_svm(model, data: dict, cfg, rt: Runtime, seed: int, on_epoch=None, name: str = "train"):
    """The linear_svm method, shaped like fit(): frozen features of the train and validation
    images (one pass each, no augmentation), scikit-learn's LinearSVC (C = cfg.svm_c) on the
    training features, written into the model's linear head so that the checkpoint predicts
    exactly as the SVM does.  One "epoch" = the one fit.
    """
    from sklearn.svm import LinearSVC

    started = time.perf_counter()
    rt.place(model)
    mean, std = input_stats(model, data["mean"], data["std"])
    batch_size = max(cfg.batch_size, 64)

    def features(images):
        return torch.cat([f for _, f in infer(model, images, mean, std, rt, batch_size, f"{name} features",
                                              cfg.input_size)])

    train_features, val_features = features(data["x_train"]), features(data["x_val"])
    y_train = data["y_train"].cpu().numpy()
    svm = LinearSVC(C=cfg.svm_c, random_state=seed, max_iter=20000).fit(train_features.cpu().numpy(), y_train)
    weight = torch.as_tensor(svm.coef_, dtype=torch.float32)
    bias = torch.as_tensor(svm.intercept_, dtype=torch.float32)
    if len(svm.classes_) == 2:  # one decision value d: logits (-d/2, d/2) have the same argmax
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    row = {"epoch": 1}
    for split, feats, labels in (("train", train_features, data["y_train"]), ("val", val_features, data["y_val"])):
        with torch.no_grad():
            logits = model.head(feats.to(model.head.weight.dtype))
        row[f"{split}_loss"] = F.cross_entropy(logits, labels).item()
        row[f"{split}_acc"] = (logits.argmax(1) == labels).sum().item() / len(labels)
    seconds = time.perf_counter() - started
    row.update(epoch_seconds=seconds, lr=0.0)
    print(f"{name}: linear SVM (C={cfg.svm_c:g}) on {train_features.shape[1]}-d features | train acc "
          f"{row['train_acc']:.4f} | validation loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} | {seconds:.1f} s",
          flush=True)
    if on_epoch is not None:
        on_epoch(row)
    best_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    return [row], best_state, seconds
