"""Stage preprocess@<study>: decode the raw copy once into uint8 tensors [N, C, H, W],
optionally cap each split (stratified), compute the training split's per-channel mean/std
and check for identical images across train and validation (a data leak).

Image files that cannot stand for their class (empty, not an image, corrupt or truncated,
a one-colour placeholder, over PIL's decompression-bomb limit) are skipped, counted and
listed in the data summary; a class left without images stops the stage.

Reads params `data.<study>.{channels,image_size,limit}` and `seed`; writes
data/prepared/<study>.npz and its summary data/prepared/<study>.json.
"""
import sys

import numpy as np

from imgcls import params, paths
from imgcls.errors import PipelineError, stage_main
from imgcls.files import save_json, save_npz
from imgcls.images import cross_split_duplicates, decode_split
from imgcls.sources import Split, load_raw, stratified_subset

LISTED_SKIPS = 100  # skipped files named in the metrics (all are counted)


@stage_main
def main(study: str) -> None:
    all_params = params.load()
    cfg = params.study(all_params, study)
    raw = load_raw(paths.raw(study))
    arrays, summary = {}, {}
    names, skipped = {}, []
    for split_name, key in (("train", "train"), ("validation", "val")):
        split = raw.splits[split_name]
        if len(split) == 0:
            raise PipelineError(f"{study}: the {split_name} split of {paths.raw(study)} is empty; training and "
                                f"validation both need images (check data.{study}.path and rerun download@{study})")
        keep = stratified_subset(split.labels, cfg.limit, all_params.seed)
        subset = Split(labels=split.labels[keep],
                       pixels=None if split.pixels is None else split.pixels[keep],
                       files=[split.files[i] for i in keep] if split.files else [],
                       names=[split.names[i] for i in keep] if split.names else [])
        arrays[f"x_{key}"], kept, split_skipped = decode_split(subset, split_name, cfg.channels, cfg.image_size, study,
                                                               cfg.max_bytes)
        labels = subset.labels[kept]
        emptied = sorted(set(subset.labels.tolist()) - set(labels.tolist()))
        if emptied:
            example = subset.names[np.flatnonzero(subset.labels == emptied[0])[0]]
            raise PipelineError(f"{study}: class {raw.classes[emptied[0]]!r} has no usable image in the {split_name} "
                                f"split (e.g. {example}: {dict(split_skipped)[example]})")
        arrays[f"y_{key}"] = labels.astype(np.int64)
        skipped += split_skipped
        names[key] = [subset.names[i] for i in kept] if subset.names else [f"{split_name}[{i}]" for i in keep]
        summary[f"n_{key}"] = int(len(labels))
    train_size, val_size = arrays["x_train"].shape[2:], arrays["x_val"].shape[2:]
    if 0 in train_size or 0 in val_size:
        raise PipelineError(f"{study}: images of {train_size[1]}x{train_size[0]} (train) and {val_size[1]}x{val_size[0]} "
                            "(validation) pixels: an image without pixels has nothing to learn from")
    if train_size != val_size:
        raise PipelineError(f"{study}: train images are {train_size[1]}x{train_size[0]} but validation images are "
                            f"{val_size[1]}x{val_size[0]}; set data.{study}.image_size to resize both to one size")
    scaled = arrays["x_train"].astype(np.float32) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    duplicates = cross_split_duplicates(arrays["x_train"], arrays["x_val"], names["train"], names["val"])
    if skipped:
        print(f"warning: {study}: skipped {len(skipped)} unusable image file(s) (listed in "
              f"{paths.data_summary(study).name}): {skipped[:3]}", file=sys.stderr)
    if duplicates:
        print(f"warning: {study}: {len(duplicates)} validation image(s) identical to training images "
              f"(kept; listed in {paths.data_summary(study).name}): {duplicates[:5]}", file=sys.stderr)
    save_npz(paths.prepared(study), **arrays, classes=np.array(raw.classes, dtype=str),
             mean=mean.astype(np.float32), std=std.astype(np.float32))
    save_json(paths.data_summary(study), {
        **summary,
        "classes": len(raw.classes),
        "image_shape": list(arrays["x_train"].shape[1:]),
        "mean": [round(float(m), 5) for m in mean],
        "std": [round(float(s), 5) for s in std],
        "duplicates_across_splits": len(duplicates),
        "duplicate_pairs": duplicates,
        "skipped": len(skipped),
        "skipped_files": skipped[:LISTED_SKIPS],
    })
    print(f"preprocess@{study}: train {summary['n_train']}, validation {summary['n_val']}, "
          f"shape {list(arrays['x_train'].shape[1:])}, mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
