"""The shared training loop: augmentation, normalisation, runtime choice, determinism."""
import os
import subprocess
import sys

import pytest
import torch

from imgcls.params import TrainParams
from imgcls.paths import ROOT
from imgcls.training import (Runtime, augment, cpu_has_native_bf16, fastest_settings, fit, keep_freed_memory,
                             normalize, select_runtime)

CPU_FP32 = Runtime(torch.device("cpu"), bf16=False, channels_last=False)


def test_augment_keeps_shape_and_dtype_and_moves_pixels():
    batch = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(batch, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert (out != batch).float().mean() > 0.3
    # every output image is a crop of its padded, possibly mirrored input
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_augment_without_options_is_identity():
    batch = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(augment(batch, 0, False, torch.Generator()), batch)


def test_normalize_standardises_per_channel():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(batch, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.25, 0.5]), CPU_FP32)
    assert torch.allclose(out[:, 1], torch.full((2, 4, 4), 2.0))


@pytest.mark.parametrize("device, native_bf16, expected", [
    ("cpu", True, (True, True)),     # AVX-512 BF16 / AMX: bf16 autocast + channels_last
    ("cpu", False, (False, True)),   # AVX2 only: never emulated bf16; fp32 convolutions faster channels_last
    ("cuda", True, (True, True)),    # Ampere and newer
    ("cuda", False, (False, False)), # pre-Ampere: fp32, contiguous
    ("mps", True, (False, False)),   # Apple GPUs: fp32, contiguous (untested here)
])
def test_auto_picks_the_fastest_settings_per_device_kind(device, native_bf16, expected):
    assert fastest_settings(device, native_bf16) == expected


def test_an_isa_limit_to_avx2_rules_out_bf16_on_any_cpu():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how an AVX2-only CPU is approximated) leaves oneDNN no native bf16."""
    probe = "from imgcls.training import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    limited = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert limited.stdout.split() == ["False"]
    assert select_runtime("cpu").bf16 == cpu_has_native_bf16()


@pytest.mark.skipif(not keep_freed_memory(), reason="glibc's malloc only")
def test_a_cpu_runtime_reuses_freed_memory_instead_of_faulting_it_in_every_step():
    """A full-batch SimpleCNN step: glibc's defaults page-fault its activations in again on every
    step (thousands of faults); with the CPU runtime selected, the freed memory is reused."""
    from benchmarks import page_faults

    # NCHW faults most by default; ten steps dilute a late growth of the heap (1,500 faults once)
    default, _ = page_faults.measure("default", "nchw", warmup=20, steps=10)
    selected, _ = page_faults.measure("runtime", "nchw", warmup=20, steps=10)
    assert default > 1000 and selected < default / 20


def test_explicit_settings_override_auto():
    assert fastest_settings("cpu", True, "fp32", "off") == (False, False)
    assert fastest_settings("cpu", False, "bf16", "auto") == (True, True)
    assert fastest_settings("mps", False, "auto", "on") == (False, True)


def test_runtime_auto_and_explicit():
    assert select_runtime("cpu", "fp32", "off") == CPU_FP32
    forced = select_runtime("cpu", "bf16", "auto")
    assert forced.bf16 and forced.channels_last and forced.precision == "bf16"
    conv = forced.place(torch.nn.Conv2d(3, 8, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


def tiny_data(n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 40, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    images[labels == 1, :, :14] = 220
    return images, labels


def train_once(augment_flip: bool = False):
    from imgcls.models import SimpleCNN

    torch.manual_seed(0)
    x, y = tiny_data()
    data = {"x_train": x, "y_train": y, "x_val": x[:32], "y_val": y[:32],
            "mean": torch.tensor([0.3]), "std": torch.tensor([0.3])}
    cfg = TrainParams(data="toy", model={"name": "simple_cnn"}, epochs=2, batch_size=32,
                      augment={"flip": augment_flip}, device="cpu", precision="fp32")
    model = SimpleCNN(num_classes=2)
    history, best, _ = fit(model, data, cfg, CPU_FP32, seed=0)
    return history, best


def test_fit_learns_and_is_deterministic_on_cpu():
    first_history, first_best = train_once(augment_flip=True)
    second_history, second_best = train_once(augment_flip=True)
    assert first_history[-1]["val_acc"] > 0.9
    assert [r["val_loss"] for r in first_history] == [r["val_loss"] for r in second_history]
    assert all(torch.equal(first_best[k], second_best[k]) for k in first_best)


def test_nan_loss_stops_with_the_epoch():
    from imgcls.errors import PipelineError

    x, y = tiny_data()
    data = {"x_train": x, "y_train": y, "x_val": x, "y_val": y,
            "mean": torch.tensor([0.3]), "std": torch.tensor([0.3])}
    cfg = TrainParams(data="toy", model={"name": "simple_cnn"}, epochs=1, lr=1e12, optimizer="sgd")
    from imgcls.models import SimpleCNN

    with pytest.raises(PipelineError, match="in epoch 1"):
        fit(SimpleCNN(num_classes=2), data, cfg, CPU_FP32, seed=0)


def test_augmentation_touches_training_batches_only(monkeypatch):
    """fit() augments every training image once per epoch and never a validation image."""
    import imgcls.training as training
    from imgcls.models import SimpleCNN

    seen = []

    def recording_augment(batch, *args, **kwargs):
        seen.append(batch.clone())
        return augment(batch, *args, **kwargs)

    monkeypatch.setattr(training, "augment", recording_augment)
    x, y = tiny_data()
    x_val = torch.full((16, 1, 28, 28), 7, dtype=torch.uint8)  # no training image looks like these
    data = {"x_train": x, "y_train": y, "x_val": x_val, "y_val": y[:16],
            "mean": torch.tensor([0.3]), "std": torch.tensor([0.3])}
    cfg = TrainParams(data="toy", model={"name": "simple_cnn"}, epochs=2, batch_size=32,
                      augment={"crop_padding": 2, "flip": True}, device="cpu", precision="fp32")
    fit(SimpleCNN(num_classes=2), data, cfg, CPU_FP32, seed=0)
    inputs = torch.cat(seen)  # what augment() was given, over both epochs
    assert len(inputs) == 2 * len(x)
    assert not (inputs == 7).flatten(1).all(1).any()
    # each epoch augments a permutation of the training set
    epoch_sums = sorted(int(b.sum()) for b in inputs.flatten(1)[:len(x)])
    assert epoch_sums == sorted(int(b.sum()) for b in x.flatten(1))
