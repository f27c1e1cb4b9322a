"""Stage preprocess@<study>: decode the raw copy once into uint8 tensors [N, C, H, W],
optionally cap each split (stratified), compute the training split's per-channel mean/std
and check for identical images across train and validation (a data leak).

Reads params `data.<study>.{channels,image_size,limit}` and `seed`; writes
data/prepared/<study>.npz and metrics/data_<study>.json.
"""
import hashlib
import io
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from stages import params, paths
from stages.errors import PipelineError, stage_main
from stages.files import save_json, save_npz
from stages.sources import Split, load_raw, stratified_subset

MODES = {1: "L", 3: "RGB"}


def fit_size(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop a square (the usual eval transform)."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)


def decode_file(data: bytes, name: str, channels: int, size: int | None) -> np.ndarray:
    """Decode by content (a PNG named .jpg is fine), convert to L/RGB, optionally resize."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notes from PIL
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert(MODES[channels])
    except Exception as err:  # PIL raises many types for bad files; the user needs the file name
        raise PipelineError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    if size is not None:
        image = fit_size(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def convert_pixels(pixels: np.ndarray, channels: int, size: int | None) -> np.ndarray:
    """Arrays from npz/torchvision: match the channel count and, if asked, the image size."""
    if pixels.shape[-1] != channels:
        mode_in = MODES[pixels.shape[-1]]
        pixels = np.stack([np.asarray(Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p, mode_in)
                                      .convert(MODES[channels])) for p in pixels])
        pixels = pixels[..., None] if channels == 1 else pixels
    if size is not None and pixels.shape[1:3] != (size, size):
        pixels = np.stack([decode_array(p, channels, size) for p in pixels])
    return pixels


def decode_array(pixel: np.ndarray, channels: int, size: int) -> np.ndarray:
    image = fit_size(Image.fromarray(pixel.squeeze(-1) if channels == 1 else pixel), size)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def decode_split(split: Split, name: str, channels: int, size: int | None, study: str) -> np.ndarray:
    """uint8 [N, C, H, W] for one split."""
    if split.pixels is not None:
        images = convert_pixels(split.pixels, channels, size)
    else:
        decoded = [decode_file(data, file, channels, size)
                   for data, file in tqdm(zip(split.files, split.names), total=len(split.files),
                                          desc=f"decode {study} {name}", unit=" img")]
        shapes = {image.shape for image in decoded}
        if len(shapes) > 1:
            raise PipelineError(f"{study} images differ in size ({len(shapes)} sizes, e.g. {sorted(shapes)[:2]}); "
                                f"set data.{study}.image_size to resize them")
        images = np.stack(decoded)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def cross_split_duplicates(train: np.ndarray, validation: np.ndarray, train_names, val_names) -> list[list[str]]:
    """Pairs (train, validation) of byte-identical images, by content hash of the decoded pixels."""
    seen = {hashlib.sha1(image.tobytes()).hexdigest(): name for image, name in zip(train, train_names)}
    pairs = []
    for image, name in zip(validation, val_names):
        match = seen.get(hashlib.sha1(image.tobytes()).hexdigest())
        if match is not None:
            pairs.append([match, name])
    return pairs


@stage_main
def main(study: str) -> None:
    all_params = params.load()
    cfg = params.study(all_params, study)
    raw = load_raw(paths.raw(study))
    arrays, summary = {}, {}
    names = {}
    for split_name, key in (("train", "train"), ("validation", "val")):
        split = raw.splits[split_name]
        keep = stratified_subset(split.labels, cfg.limit, all_params.seed)
        subset = Split(labels=split.labels[keep],
                       pixels=None if split.pixels is None else split.pixels[keep],
                       files=[split.files[i] for i in keep] if split.files else [],
                       names=[split.names[i] for i in keep] if split.names else [])
        arrays[f"x_{key}"] = decode_split(subset, split_name, cfg.channels, cfg.image_size, study)
        arrays[f"y_{key}"] = subset.labels.astype(np.int64)
        names[key] = subset.names or [f"{split_name}[{i}]" for i in keep]
        summary[f"n_{key}"] = int(len(keep))
    scaled = arrays["x_train"].astype(np.float32) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    duplicates = cross_split_duplicates(arrays["x_train"], arrays["x_val"], names["train"], names["val"])
    if duplicates:
        print(f"warning: {study}: {len(duplicates)} validation image(s) identical to training images "
              f"(kept; listed in {paths.data_metrics(study).name}): {duplicates[:5]}", file=sys.stderr)
    save_npz(paths.prepared(study), **arrays, classes=np.array(raw.classes, dtype=str),
             mean=mean.astype(np.float32), std=std.astype(np.float32))
    save_json(paths.data_metrics(study), {
        **summary,
        "classes": len(raw.classes),
        "image_shape": list(arrays["x_train"].shape[1:]),
        "mean": [round(float(m), 5) for m in mean],
        "std": [round(float(s), 5) for s in std],
        "duplicates_across_splits": len(duplicates),
        "duplicate_pairs": duplicates,
    })
    print(f"preprocess@{study}: train {summary['n_train']}, validation {summary['n_val']}, "
          f"shape {list(arrays['x_train'].shape[1:])}, mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
