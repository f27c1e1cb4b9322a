"""Decoding by content, resizing, stratified caps and the cross-split duplicate check."""
import numpy as np
import pytest

from imgcls import images
from imgcls.errors import PipelineError
from imgcls.images import cross_split_duplicates, decode_file, decode_split
from imgcls.sources import Split, stratified_subset
from tests.conftest import png_bytes


def test_png_named_jpg_and_palette_image_decode_by_content():
    palette = np.zeros((20, 30), np.uint8)
    palette[5:10] = 3
    from PIL import Image
    import io

    buffer = io.BytesIO()
    image = Image.fromarray(palette, mode="L").convert("P")
    image.save(buffer, format="PNG")
    decoded = decode_file(buffer.getvalue(), "train/alien/192.jpg", channels=3, size=16)
    assert decoded.shape == (16, 16, 3) and decoded.dtype == np.uint8


def test_unreadable_image_names_the_file():
    with pytest.raises(PipelineError, match="train/cat/7.jpg: not a readable image"):
        decode_file(b"GIF89a nonsense", "train/cat/7.jpg", channels=3, size=None)


def test_mixed_sizes_need_image_size():
    split = Split(labels=np.array([0, 1]), files=[png_bytes(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)),
                                                  png_bytes(np.arange(9 * 8 * 3, dtype=np.uint8).reshape(9, 8, 3))],
                  names=["a", "b"])
    with pytest.raises(PipelineError, match="image_size"):
        decode_split(split, "train", 3, None, "pets")
    assert decode_split(split, "train", 3, 6, "pets")[0].shape == (2, 3, 6, 6)


def noise_png(side: int, seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_image_too_large_to_keep_at_native_size_is_skipped_unless_resized(monkeypatch):
    """Just under PIL's limit an 86 KB file decodes to 268 MB: kept at native size, a few such files
    took gigabytes. Over MAX_NATIVE_PIXELS the header alone rules it out; resized, it is decoded."""
    monkeypatch.setattr(images, "MAX_NATIVE_PIXELS", 100)
    with pytest.raises(images.UnusableImage, match=r"big\.png: too large to keep at native size \(16x16, over 100 "
                                                   r"pixels; set data\.pets\.image_size to resize\)"):
        decode_file(noise_png(16), "big.png", channels=3, size=None, study="pets")
    assert decode_file(noise_png(16), "big.png", channels=3, size=8, study="pets").shape == (8, 8, 3)


def test_decoded_images_are_capped_by_max_bytes():
    split = Split(labels=np.array([0, 1, 0]), files=[noise_png(16, seed) for seed in range(3)], names=["a", "b", "c"])
    with pytest.raises(PipelineError, match=r"^pets: the decoded train images need 1,536 bytes or more, over "
                                            r"data\.pets\.max_bytes \(1,000\); lower data\.pets\.image_size \(now None\) "
                                            r"or data\.pets\.limit, or raise data\.pets\.max_bytes$"):
        decode_split(split, "train", 3, None, "pets", max_bytes=1000)
    assert decode_split(split, "train", 3, 8, "pets", max_bytes=1000)[0].shape == (3, 3, 8, 8)
    pixels = Split(labels=np.array([0, 1]), pixels=np.zeros((2, 20, 20, 3), np.uint8))
    with pytest.raises(PipelineError, match=r"need 2,400 bytes or more, over data\.pets\.max_bytes \(1,000\)"):
        decode_split(pixels, "train", 3, None, "pets", max_bytes=1000)


def test_stratified_cap_that_cannot_be_drawn_is_one_line():
    labels = np.array([0] * 10 + [1])  # class 1 has one image: nothing to stratify with
    with pytest.raises(PipelineError, match=r"^data limit 5: no stratified subset of 11 images in 2 classes \("):
        stratified_subset(labels, 5, seed=0)


def test_gray_arrays_become_rgb_when_asked():
    split = Split(labels=np.array([0]), pixels=np.full((1, 4, 4, 1), 7, np.uint8))
    out, kept, skipped = decode_split(split, "train", 3, None, "x")
    assert kept.tolist() == [0] and skipped == []
    assert out.shape == (1, 3, 4, 4) and (out == 7).all()


def test_stratified_subset_keeps_proportions():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    chosen = stratified_subset(labels, 100, seed=0)
    assert len(chosen) == 100 and np.all(np.diff(chosen) > 0)
    assert np.bincount(labels[chosen]).tolist() == [10, 20, 30, 40]
    assert len(stratified_subset(labels, None, 0)) == 1000


def test_identical_images_across_splits_are_reported():
    train = np.arange(3 * 12, dtype=np.uint8).reshape(3, 1, 3, 4)
    validation = np.stack([train[2], train[0] + 1])
    pairs = cross_split_duplicates(train, validation, ["t0", "t1", "t2"], ["v0", "v1"])
    assert pairs == [["t2", "v0"]]
