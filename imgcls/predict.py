"""Classify image files with a trained run.

    python -m imgcls.predict <run> <image or folder>... [--csv predictions.csv]

Prints, per image, the predicted class and its probability. Images are decoded, converted,
resized and normalised exactly as the pipeline does (imgcls.images, the training split's
statistics stored in the checkpoint), and run through the same inference path as embed, so
the prepared validation images get embed's predictions. Needs data/models/<run>.pt
(`dvc pull data/models/<run>.pt` or `dvc repro train@<run>`).
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from imgcls import checkpoint as checkpoints, params
from imgcls.errors import PipelineError, stage_main
from imgcls.images import UnusableImage, decode_file
from imgcls.training import infer, input_stats, select_runtime

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


def image_files(locations: list[str]) -> list[Path]:
    """Files as given, and the image files inside folders (sorted, hidden ones skipped)."""
    files = []
    for location in map(Path, locations):
        if location.is_dir():
            files += sorted(path for path in location.rglob("*") if path.is_file()
                            and path.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in path.relative_to(location).parts))
        elif location.is_file():
            files.append(location)
        else:
            raise PipelineError(f"{location}: no such file or folder")
    if not files:
        raise PipelineError(f"no image files in {', '.join(locations)}")
    return files


def decode(path: Path, channels: int, image_size: int | None, trained: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] as preprocess makes it; a study kept at its native size is fitted to the trained size."""
    try:
        data = path.read_bytes()
        array = decode_file(data, str(path), channels, image_size)
        if image_size is None and array.shape[:2] != trained:
            array = decode_file(data, str(path), channels, trained[0])
    except UnusableImage as err:
        raise PipelineError(str(err)) from None
    except OSError as err:
        raise PipelineError(f"{path}: cannot read ({err.strerror})") from None
    return array


def predict(run: str, files: list[Path]) -> tuple[list[str], torch.Tensor]:
    """The run's class names and the softmax probabilities [N, classes] of the files."""
    all_params = params.load()
    cfg = params.run(all_params, run)
    study = params.study(all_params, cfg.data)
    model, checkpoint = checkpoints.load(run)
    channels, height, width = checkpoint["input_shape"]
    arrays = [decode(path, channels, study.image_size, (height, width)) for path in files]
    images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))
    rt = select_runtime(cfg.device, cfg.precision, cfg.channels_last)
    rt.place(model)
    mean, std = input_stats(model, checkpoint["mean"].to(rt.device), checkpoint["std"].to(rt.device))
    logits = torch.cat([batch.float().cpu() for batch, _ in infer(
        model, images, mean, std, rt, all_params.embed.batch_size, f"predict {run}", checkpoint["input_size"])])
    return list(checkpoint["classes"]), logits.softmax(1)


def write_csv(target: Path, files: list[Path], classes: list[str], probabilities: torch.Tensor) -> None:
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "predicted", "probability", *classes])
        for path, row in zip(files, probabilities.tolist()):
            best = int(np.argmax(row))
            writer.writerow([str(path), classes[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imgcls.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run of params.yaml `train` (its weights: data/models/<run>.pt)")
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    parser.add_argument("--csv", type=Path, help="also write file, predicted class, probability and per-class probabilities")
    args = parser.parse_args(argv)
    params.run(params.load(), args.run)  # an unknown run is named before any file is read
    files = image_files(args.images)
    classes, probabilities = predict(args.run, files)
    confidence, predicted = probabilities.max(1)
    for path, label, p in zip(files, predicted.tolist(), confidence.tolist()):
        print(f"{path}\t{classes[label]}\t{p:.4f}")
    if args.csv:
        write_csv(args.csv, files, classes, probabilities)


if __name__ == "__main__":
    main(sys.argv[1:])
