"""Milliseconds per training batch of the project's augmentation (imgcls.training.augment)
against kornia.augmentation doing the same operations, for every run in params.yaml that
augments, at its batch size and image size (after `dvc repro preprocess`, which records it):

    python -m benchmarks.augment_speed [--repeats 30]

kornia works on float images in [0, 1], so its figure includes the uint8 -> float -> uint8
conversions the train step would need around it; the float-only time is shown too.  Random
images: the cost of these operations does not depend on the pixels.
"""
import argparse
import json
import statistics
import time

import torch

from imgcls import params, paths
from imgcls.training import augment


def kornia_pipeline(aug, size: int):
    """kornia's equivalent of `aug`: the same operations in the same order."""
    import kornia.augmentation as K

    steps = []
    if aug.resized_crop_scale is not None:
        steps.append(K.RandomResizedCrop((size, size), scale=tuple(aug.resized_crop_scale)))
    if aug.color_jitter:
        steps.append(K.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter, p=1.0))
    if aug.crop_padding:
        steps.append(K.RandomCrop((size, size), padding=aug.crop_padding))
    if aug.flip:
        steps.append(K.RandomHorizontalFlip())
    return K.AugmentationSequential(*steps)


def milliseconds(fn, batch: torch.Tensor, repeats: int) -> float:
    """Median over `repeats` calls, after one untimed call."""
    fn(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def measure(cfg, image_shape: list[int], repeats: int, batch_size: int | None = None) -> dict:
    """`image_shape`: the prepared data's [C, H, W]; the run's input_size replaces H and W."""
    channels, size = image_shape[0], cfg.input_size or image_shape[1]
    batch = torch.randint(0, 256, (batch_size or cfg.batch_size, channels, size, size), dtype=torch.uint8)
    aug, generator = cfg.augment, torch.Generator().manual_seed(0)
    pipeline = kornia_pipeline(aug, size)

    def own(images):
        return augment(images, aug.crop_padding, aug.flip, generator, aug.resized_crop_scale, aug.color_jitter)

    def kornia_uint8(images):
        return (pipeline(images.float() / 255) * 255).round_().clamp_(0, 255).to(torch.uint8)

    return {"shape": tuple(batch.shape), "own": milliseconds(own, batch, repeats),
            "kornia": milliseconds(kornia_uint8, batch, repeats),
            "kornia_float": milliseconds(pipeline, batch.float() / 255, repeats)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.augment_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, help="instead of each run's own")
    args = parser.parse_args(argv)
    results = {}
    for run, cfg in params.load().train.items():
        if cfg.augment.active:
            summary = paths.data_summary(cfg.data)
            if not summary.exists():
                parser.error(f"{summary} not found: run `dvc repro preprocess@{cfg.data}`")
            image_shape = json.loads(summary.read_text())["image_shape"]
            results[run] = measure(cfg, image_shape, args.repeats, args.batch_size)
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats}\n")
    print("| run | batch | project ms | kornia ms (uint8 in and out) | kornia ms (float only) | kornia / project |")
    print("|---|---|---|---|---|---|")
    for run, r in results.items():
        print(f"| {run} | {'x'.join(map(str, r['shape']))} | {r['own']:.2f} | {r['kornia']:.2f} | "
              f"{r['kornia_float']:.2f} | {r['kornia'] / r['own']:.2f}x |")
    return results


if __name__ == "__main__":
    main()
