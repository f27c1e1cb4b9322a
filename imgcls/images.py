"""Decoding image files and arrays into the pipeline's uint8 [N, C, H, W] tensors.

One implementation for every reader: the preprocess stage and anything that classifies new
images decode by content (a PNG named .jpg is fine), convert to the study's colour mode and
resize the shorter side + centre-crop exactly the same way.
"""
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from imgcls.errors import PipelineError
from imgcls.sources import MAX_TOTAL_BYTES, Split

MODES = {1: "L", 3: "RGB"}
MAX_NATIVE_PIXELS = 4096 * 4096  # kept at native size (image_size null), a bigger image is skipped


class UnusableImage(PipelineError):
    """A file that cannot stand for its class; the stage skips it and counts the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.reason = reason


def fit_size(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop a square (the usual eval transform)."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)


def decode_file(data: bytes, name: str, channels: int, size: int | None, study: str = "<study>") -> np.ndarray:
    """Decode by content (a PNG named .jpg is fine), convert to L/RGB, optionally resize.

    Raises UnusableImage for files that are empty, not images, corrupt, blank or too large
    (over PIL's limit; or, kept at native size, over MAX_NATIVE_PIXELS: judged by the header).
    """
    if not data:
        raise UnusableImage(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notes from PIL
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refuse, not warn
            image = Image.open(io.BytesIO(data))
            if size is None and image.width * image.height > MAX_NATIVE_PIXELS:
                raise UnusableImage(name, f"too large to keep at native size ({image.width}x{image.height}, over "
                                          f"{MAX_NATIVE_PIXELS:,} pixels; set data.{study}.image_size to resize)")
            image.load()
            if image.mode.startswith("I;16"):  # 16-bit greyscale: scale to 8 bits (convert() would clip)
                image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
            image = image.convert(MODES[channels])
    except UnusableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnusableImage(name, f"too large to decode safely ({err})") from None
    except Image.UnidentifiedImageError:
        raise UnusableImage(name, "not a readable image (no known image format)") from None
    except Exception as err:  # PIL raises many types for bad files; the user needs the file name
        raise UnusableImage(name, f"not a readable image ({type(err).__name__}: {err})") from None
    pixels = np.asarray(image)
    if (pixels == pixels[:1, :1]).all():
        raise UnusableImage(name, f"blank placeholder (one colour, {image.width}x{image.height})")
    return image_array(image, channels, size)


def image_array(image: Image.Image, channels: int, size: int | None) -> np.ndarray:
    """uint8 [H, W, C] in the study's colour mode, resized (shorter side + centre crop) if asked."""
    image = image.convert(MODES[channels])
    if size is not None:
        image = fit_size(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def convert_pixels(pixels: np.ndarray, channels: int, size: int | None) -> np.ndarray:
    """Arrays from npz/torchvision: converted only when the channel count or the size must change."""
    if pixels.shape[-1] == channels and (size is None or pixels.shape[1:3] == (size, size)):
        return pixels
    return np.stack([image_array(Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p), channels, size)
                     for p in pixels])


def _too_many_bytes(study: str, name: str, needed: int, max_bytes: int, size: int | None) -> PipelineError:
    return PipelineError(f"{study}: the decoded {name} images need {needed:,} bytes or more, over data.{study}.max_bytes "
                         f"({max_bytes:,}); lower data.{study}.image_size (now {size}) or data.{study}.limit, "
                         f"or raise data.{study}.max_bytes")


def decode_split(split: Split, name: str, channels: int, size: int | None, study: str,
                 max_bytes: int = MAX_TOTAL_BYTES) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """uint8 [N, C, H, W] of one split's usable images, their indices in the split, and [file, reason]
    for each skipped file.  The decoded images together may take at most `max_bytes`."""
    if split.pixels is not None:
        if 0 in split.pixels.shape[1:3]:
            raise PipelineError(f"{study}: the {name} images are {split.pixels.shape[2]}x{split.pixels.shape[1]} "
                                "pixels: nothing to learn from")
        height, width = (size, size) if size is not None else split.pixels.shape[1:3]
        if len(split.pixels) * height * width * channels > max_bytes:
            raise _too_many_bytes(study, name, len(split.pixels) * height * width * channels, max_bytes, size)
        images = convert_pixels(split.pixels, channels, size)
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), np.arange(len(images)), []
    decoded, kept, skipped, used = [], [], [], 0
    for index, (data, file) in enumerate(tqdm(zip(split.files, split.names), total=len(split.files),
                                              desc=f"decode {study} {name}", unit=" img")):
        try:
            decoded.append(decode_file(data, file, channels, size, study))
            kept.append(index)
        except UnusableImage as err:
            skipped.append([file, err.reason])
            continue
        used += decoded[-1].nbytes
        if used > max_bytes:
            raise _too_many_bytes(study, name, used, max_bytes, size)
    if skipped and not decoded:
        raise PipelineError(f"{study}: no usable image in the {name} split (all {len(skipped)} skipped, "
                            f"e.g. {skipped[0][0]}: {skipped[0][1]})")
    shapes = {image.shape for image in decoded}
    if len(shapes) > 1:
        raise PipelineError(f"{study} images differ in size ({len(shapes)} sizes, e.g. {sorted(shapes)[:2]}); "
                            f"set data.{study}.image_size to resize them")
    return np.ascontiguousarray(np.stack(decoded).transpose(0, 3, 1, 2)), np.array(kept, dtype=np.int64), skipped


def cross_split_duplicates(train: np.ndarray, validation: np.ndarray, train_names, val_names) -> list[list[str]]:
    """Pairs (train, validation) of byte-identical images, by content hash of the decoded pixels."""
    seen = {hashlib.sha1(image.tobytes()).hexdigest(): name for image, name in zip(train, train_names)}
    pairs = []
    for image, name in zip(validation, val_names):
        match = seen.get(hashlib.sha1(image.tobytes()).hexdigest())
        if match is not None:
            pairs.append([match, name])
    return pairs
