"""benchmarks.train_speed on tiny data: both paths report throughput, they are comparable, and the
counted FLOPs and measured peaks say how close to the hardware each is."""
import numpy as np
import pytest
import torch

from benchmarks import train_speed
from tests.conftest import write_npz


@pytest.fixture
def tiny_studies(tmp_path):
    return {"mnist": write_npz(tmp_path / "mnist.npz", n_train=64, n_test=32, size=28, channels=1),
            "cifar10": write_npz(tmp_path / "cifar10.npz", n_train=64, n_test=32, size=32, channels=3)}


def test_benchmark_reports_both_paths_on_the_same_loss(tiny_studies, capsys):
    results = train_speed.main(["--mnist", str(tiny_studies["mnist"]), "--cifar10", str(tiny_studies["cifar10"]),
                                "--steps", "2", "--warmup", "1", "--batch-size", "16", "--repeats", "1",
                                "--embed-batches", "2", "--embed-batch-size", "16", "--device", "cpu", "--epoch",
                                "--peak-seconds", "0.05"])
    assert set(results["studies"]) == {"mnist", "cifar10"}
    assert results["peaks"]["fp32"] > 0 and results["peaks"]["bf16"] > 0
    for study, r in results["studies"].items():
        assert r["train"]["project"] > 0 and r["train"]["reference"] > 0 and r["train"]["ratio"] > 0
        assert r["embed"]["project"] > 0 and r["embed"]["reference"] > 0
        assert len(r["matrix"]) == 4 and all(speed > 0 for speed in r["matrix"].values())
        project, reference = r["same_loss"]
        assert np.isfinite(project) and project == pytest.approx(reference, rel=1e-5, abs=0)
        epoch = r["epoch"]  # two epochs of each path: the cold first and a warm second
        assert len(epoch["project"]) == len(epoch["reference"]) == 2
        assert all(seconds > 0 for seconds in epoch["project"] + epoch["reference"])
        assert epoch["steps"] == [64 // 16] * 2  # every training batch timed once, validation batches not
        for i in range(2):  # the epoch is its model steps, the rest of its loop and what follows the loop
            assert 0 < epoch["step"][i] < epoch["project"][i] and 0 < epoch["after_loop"][i]
            assert epoch["step"][i] + epoch["in_loop"][i] + epoch["after_loop"][i] == pytest.approx(epoch["project"][i])
            assert 0 < epoch["outside_step"][i] < 1
    printed = capsys.readouterr().out
    assert "| mnist | SimpleCNN |" in printed and "| cifar10 | AlexNet |" in printed and "load average" in printed


def test_flops_are_counted_from_the_model():
    """A train step costs about three forward passes (no input gradient for the first layer); SimpleCNN's
    forward pass counted by hand: 3x3 convolutions 1->32 and 32->32 at 28x28, then 6272->128->10."""
    arrays = {"x_train": np.zeros((4, 1, 28, 28), np.uint8), "y_train": np.zeros(4, np.int64),
              "x_val": np.zeros((1, 1, 28, 28), np.uint8), "y_val": np.zeros(1, np.int64)}
    model, _ = train_speed.build_model("mnist", arrays, batch_size=4)
    forward = 2 * (28 * 28 * 32 * 9 + 28 * 28 * 32 * 32 * 9 + 6272 * 128 + 128 * 10)
    flops = train_speed.step_flops(model, arrays, 4, torch.device("cpu"))
    assert 2.5 * forward <= flops <= 3 * forward


def test_loss_check_notices_a_different_input_pipeline(tiny_studies, monkeypatch):
    arrays = train_speed.load_arrays(tiny_studies["cifar10"])
    project, reference = train_speed.same_loss("cifar10", arrays, torch.device("cpu"))
    assert project == pytest.approx(reference, rel=1e-5, abs=0)
    original = train_speed.ReferenceStyleDataset.__getitem__
    monkeypatch.setattr(train_speed.ReferenceStyleDataset, "__getitem__",
                        lambda self, i: (original(self, i)[0].flip(2), int(self.targets[i])))  # mirrored images
    project, reference = train_speed.same_loss("cifar10", arrays, torch.device("cpu"))
    assert project != pytest.approx(reference, rel=1e-5, abs=0)


def test_augment_benchmark_times_the_same_operations_in_kornia():
    from benchmarks import augment_speed
    from imgcls.params import TrainParams

    cfg = TrainParams(data="toy", model={"name": "alexnet"}, epochs=1, batch_size=4,
                      augment={"resized_crop_scale": [0.5, 1.0], "color_jitter": 0.2, "crop_padding": 2, "flip": True})
    pipeline = augment_speed.kornia_pipeline(cfg.augment, 16)
    assert [type(step).__name__ for step in pipeline.children()] == [
        "RandomResizedCrop", "ColorJitter", "RandomCrop", "RandomHorizontalFlip"]  # the project's order
    flip_only = augment_speed.kornia_pipeline(TrainParams(**{**cfg.model_dump(), "augment": {"flip": True}}).augment, 16)
    torch.manual_seed(0)  # kornia draws from the global stream: half of 32 copies come back mirrored
    image = torch.rand(1, 3, 16, 16)
    outputs = flip_only(image.repeat(32, 1, 1, 1))
    mirrored = [torch.equal(out, image[0].flip(2)) for out in outputs]
    assert all(m or torch.equal(out, image[0]) for m, out in zip(mirrored, outputs)) and 0 < sum(mirrored) < 32
    result = augment_speed.measure(cfg, [3, 16, 16], repeats=1)
    assert result["shape"] == (4, 3, 16, 16) and result["own"] > 0 and result["kornia"] > 0


def test_dropout_benchmark_times_both_layers_at_every_size():
    from benchmarks import dropout_speed

    result = dropout_speed.measure(repeats=1, steps=1)
    assert set(result) == set(dropout_speed.SHAPES)
    for name, (shape, _) in dropout_speed.SHAPES.items():
        assert result[name]["elements"] == np.prod(shape) and result[name]["torch"] > 0 and result[name]["models"] > 0
