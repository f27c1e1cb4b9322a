"""Data sources (torchvision, npz, ImageFolder dir/zip/tar) and the canonical raw form.

Whatever the source, the download stage writes one npz (``data/raw/<study>.npz``):
``classes`` (names of labels 0..K-1) and, per split (``train``, ``validation``),
``<split>_labels`` plus either ``<split>_pixels`` (uint8 [N, H, W, C], for sources that ship
decoded arrays) or the original file bytes ``<split>_bytes`` / ``<split>_offsets`` /
``<split>_names`` (for image files, decoded later by content, not by extension).
Archives are read member by member in memory: nothing is ever extracted to disk, and
members with absolute paths, ``..``, links or an implausible size are refused.  An
ImageFolder source may name a per-file sha256 manifest (`data.<study>.manifest`): archives
such as GitHub's are not byte-stable, their files are.
"""
import hashlib
import os
import re
import stat
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from imgcls import paths
from imgcls.errors import PipelineError
from imgcls.files import load_npz, local_copy, save_npz

SPLITS = ("train", "validation")
VALIDATION_NAMES = ("validation", "val", "test")  # accepted folder names, in order of preference
SKIPPED_NAMES = ("__MACOSX", "Thumbs.db")
MAX_MEMBER_BYTES = 1 << 30  # no image file is this large: a bigger member is a decompression bomb


@dataclass
class Split:
    labels: np.ndarray
    pixels: np.ndarray | None = None  # uint8 [N, H, W, C]
    files: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class RawDataset:
    classes: list[str]
    splits: dict[str, Split]


# ---------------------------------------------------------------- array sources
def _as_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise PipelineError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise PipelineError(f"{where}: images must have shape [N, H, W] or [N, H, W, 1|3], got {list(images.shape)}")
    return np.ascontiguousarray(images)


def _labels(labels, count: int, n_classes: int | None, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(f"{where}: labels must be {count} integers, got {labels.dtype} {list(labels.shape)}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or (n_classes is not None and labels.max() >= n_classes)):
        raise PipelineError(f"{where}: labels must lie in 0..{(n_classes or 1) - 1}, got {labels.min()}..{labels.max()}")
    return labels


def _class_names(configured: list[str] | None, splits: dict[str, Split], study: str) -> list[str]:
    n_classes = int(max(split.labels.max(initial=-1) for split in splits.values())) + 1
    if configured is None:
        return [str(i) for i in range(n_classes)]
    if n_classes > len(configured):
        raise PipelineError(f"data.{study}.classes names {len(configured)} classes but the labels reach {n_classes - 1}")
    return list(configured)


def from_npz(path: Path, study: str, classes: list[str] | None) -> RawDataset:
    """Keras layout: x_train, y_train, x_test, y_test (the test split is the validation set)."""
    arrays = load_npz(path, f"data.{study}.path")
    splits = {}
    for split, suffix in (("train", "train"), ("validation", "test")):
        missing = [key for key in (f"x_{suffix}", f"y_{suffix}") if key not in arrays]
        if missing:
            raise PipelineError(f"{path}: missing array(s) {', '.join(missing)} (expected x_train, y_train, x_test, y_test)")
        images = _as_nhwc(arrays[f"x_{suffix}"], f"{path}: x_{suffix}")
        labels = _labels(arrays[f"y_{suffix}"], len(images), len(classes) if classes else None, f"{path}: y_{suffix}")
        splits[split] = Split(labels=labels, pixels=images)
    return RawDataset(classes=_class_names(classes, splits, study), splits=splits)


def from_torchvision(dataset: str, study: str, classes: list[str] | None) -> RawDataset:
    """torchvision's own download with its md5 checks, into a temporary folder."""
    from torchvision import datasets  # heavy import, only for this source

    splits = {}
    with tempfile.TemporaryDirectory(prefix=f"torchvision-{study}-") as root:
        for split, is_train in (("train", True), ("validation", False)):
            try:
                ds = getattr(datasets, dataset)(root=root, train=is_train, download=True)
            except (RuntimeError, OSError) as err:
                raise PipelineError(
                    f"data.{study}: torchvision {dataset} download failed ({err}); offline, set "
                    f"data.{study}.source to npz or imagefolder with a local path"
                ) from None
            images = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
            images = _as_nhwc(images, f"torchvision {dataset}")
            splits[split] = Split(labels=_labels(ds.targets, len(images), None, f"torchvision {dataset}"), pixels=images)
            names = classes or [name.split(" - ")[0] for name in ds.classes]
    return RawDataset(classes=names, splits=splits)


# ---------------------------------------------------------------- ImageFolder sources
def _checked_member(name: str, archive: Path, size: int = 0) -> PurePosixPath:
    if size > MAX_MEMBER_BYTES:
        raise PipelineError(f"{archive}: refusing member {name!r}: {size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte "
                            "limit for one image file (a decompression bomb?)")
    member = PurePosixPath(name.replace("\\", "/"))  # archives written on Windows may use backslashes
    if member.is_absolute() or ".." in member.parts or (member.parts and ":" in member.parts[0]):
        raise PipelineError(f"{archive}: refusing unsafe archive member {name!r} (absolute path or '..')")
    return member


def _skipped(member: PurePosixPath) -> bool:
    return any(part.startswith(".") or part in SKIPPED_NAMES for part in member.parts)


def _iter_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            member = _checked_member(info.filename, path, info.file_size)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PipelineError(f"{path}: refusing symbolic link member {info.filename!r}")
            if info.is_dir():
                yield member, None
            elif not _skipped(member):
                yield member, archive.read(info)


def _iter_tar(path: Path):
    with tarfile.open(path, "r:*") as archive:
        for info in archive:
            member = _checked_member(info.name, path, info.size)
            if info.issym() or info.islnk():
                raise PipelineError(f"{path}: refusing link member {info.name!r}")
            if info.isdir():
                yield member, None
            elif not info.isfile():
                raise PipelineError(f"{path}: refusing special member {info.name!r} (device or fifo)")
            elif not _skipped(member):
                yield member, archive.extractfile(info).read()


def _iter_dir(path: Path):
    root = path.resolve()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs):
            if Path(folder, name).is_symlink():
                raise PipelineError(f"{Path(folder, name)}: refusing symbolic link to a folder (copy the folder instead)")
            yield PurePosixPath(Path(folder, name).relative_to(path).as_posix()), None
        for name in sorted(files):
            full = Path(folder, name)
            if full.is_symlink() and not full.resolve().is_relative_to(root):
                raise PipelineError(f"{full}: refusing symbolic link that points outside {path}")
            member = _checked_member(full.relative_to(path).as_posix(), path, full.stat().st_size)
            if not _skipped(member):
                yield member, full.read_bytes()


def _entries(path: Path) -> dict[PurePosixPath, bytes | None]:
    """All members of a directory or archive: file path -> bytes, directory path -> None."""
    kind = "folder" if path.is_dir() else "or truncated archive"
    try:
        if path.is_dir():
            reader = _iter_dir(path)
        elif zipfile.is_zipfile(path):
            reader = _iter_zip(path)
        elif tarfile.is_tarfile(path):
            reader = _iter_tar(path)
        else:
            raise PipelineError(f"{path}: not a directory, zip or tar archive")
        return dict(tqdm(reader, desc=f"read {path.name}", unit=" files", leave=False))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise PipelineError(f"{path}: unreadable {kind} ({type(err).__name__}: {err})") from None


def _split_root(entries, subdir: str | None, path: Path) -> PurePosixPath:
    if subdir:
        root = PurePosixPath(subdir.strip("/"))
        if not any(member.parts[: len(root.parts) + 1] == (*root.parts, "train") for member in entries):
            raise PipelineError(f"{path}: no train/ folder under subdir {subdir!r}")
        return root
    roots = {member.parents[2] for member, data in entries.items()
             if data is not None and len(member.parts) >= 3 and member.parts[-3] == "train"}
    if not roots:
        raise PipelineError(f"{path}: no train/<class>/<image> files found (ImageFolder layout expected)")
    shallowest = min(len(root.parts) for root in roots)
    candidates = sorted(str(root) for root in roots if len(root.parts) == shallowest)
    if len(candidates) > 1:
        raise PipelineError(f"{path}: several train/ folders ({', '.join(candidates)}); choose one with data.<study>.subdir")
    return PurePosixPath(candidates[0])


def from_imagefolder(path: Path, subdir: str | None) -> RawDataset:
    """`train/<class>/*` and `validation/` (or `val/`, `test/`) `<class>/*` in a dir or archive."""
    entries = _entries(path)
    root = _split_root(entries, subdir, path)
    depth = len(root.parts)
    by_split: dict[str, dict[str, list]] = {}
    stray = []
    for member, data in entries.items():
        if member.parts[:depth] != root.parts or len(member.parts) < depth + 2:
            continue
        if data is not None and len(member.parts) == depth + 2:
            stray.append(str(member))  # a README beside the class folders is not a class
            continue
        split, cls = member.parts[depth], member.parts[depth + 1]
        files = by_split.setdefault(split, {}).setdefault(cls, [])
        if data is not None and len(member.parts) > depth + 2:
            files.append((str(member.relative_to(root)), data))
    validation = next((name for name in VALIDATION_NAMES if name in by_split), None)
    if validation is None:
        raise PipelineError(f"{path}: no validation split (a validation/, val/ or test/ folder beside train/)")
    classes = sorted(by_split["train"])
    val_classes = sorted(by_split[validation])
    if classes != val_classes:
        raise PipelineError(f"{path}: train classes {classes} differ from {validation} classes {val_classes}")
    if len(classes) < 2:
        raise PipelineError(f"{path}: need at least two class folders, found {classes}")
    splits = {}
    for split, folder in (("train", "train"), ("validation", validation)):
        files, names, labels = [], [], []
        for label, cls in enumerate(classes):
            members = sorted(by_split[folder][cls])
            if not members:
                raise PipelineError(f"{path}: class folder {folder}/{cls} is empty (add images or remove it)")
            for name, data in members:
                names.append(name)
                files.append(data)
                labels.append(label)
        splits[split] = Split(labels=np.array(labels, dtype=np.int64), files=files, names=names)
    if stray:
        print(f"warning: {path}: ignored {len(stray)} file(s) outside the class folders: {stray[:5]}", file=sys.stderr)
    return RawDataset(classes=classes, splits=splits)


# ---------------------------------------------------------------- per-file manifest
def manifest_lines(dataset: RawDataset) -> list[str]:
    """`sha256sum` lines (`<hex>  <path from the split root>`) of every image file, by path."""
    files = sorted((name, data) for split in dataset.splits.values() for name, data in zip(split.names, split.files))
    return [f"{hashlib.sha256(data).hexdigest()}  {name}" for name, data in files]


def read_manifest(path: Path, what: str) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{what}: manifest {path} not found") from None
    entries = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if match is None:
            raise PipelineError(f"{path}:{number}: expected `<sha256>  <path>` (sha256sum format)")
        entries[match.group(2)] = match.group(1).lower()
    return entries


def verify_manifest(dataset: RawDataset, manifest: Path, what: str) -> None:
    """Every image file present, unchanged and listed; the first offender is named."""
    expected = read_manifest(manifest, what)
    actual = {name: digest for digest, name in (line.split("  ", 1) for line in manifest_lines(dataset))}
    problems = [(name, f"changed (sha256 {actual[name][:12]}…, {manifest.name} says {expected[name][:12]}…)")
                for name in sorted(expected.keys() & actual.keys()) if expected[name] != actual[name]]
    problems += [(name, f"listed in {manifest.name} but missing") for name in sorted(expected.keys() - actual.keys())]
    problems += [(name, f"not listed in {manifest.name}") for name in sorted(actual.keys() - expected.keys())]
    if problems:
        name, problem = problems[0]
        more = f" ({len(problems) - 1} more file(s) disagree)" if len(problems) > 1 else ""
        raise PipelineError(f"{what}: {name} {problem}{more}")


# ---------------------------------------------------------------- canonical raw form
def read_source(study: str, cfg) -> RawDataset:
    """Fetch and validate a study's data as configured by `data.<study>` in params.yaml."""
    if cfg.source == "torchvision":
        return from_torchvision(cfg.dataset, study, cfg.classes)
    with local_copy(cfg.path, cfg.sha256, f"data.{study}.path") as path:
        if cfg.source == "npz":
            return from_npz(path, study, cfg.classes)
        dataset = from_imagefolder(path, cfg.subdir)
    if cfg.manifest:
        verify_manifest(dataset, paths.manifest(cfg.manifest), f"data.{study}.manifest")
    if cfg.classes is not None and cfg.classes != dataset.classes:
        raise PipelineError(f"data.{study}.classes {cfg.classes} differ from the class folders {dataset.classes}")
    return dataset


def save_raw(dataset: RawDataset, target: Path) -> None:
    arrays = {"classes": np.array(dataset.classes, dtype=str)}
    for name, split in dataset.splits.items():
        arrays[f"{name}_labels"] = split.labels
        if split.pixels is not None:
            arrays[f"{name}_pixels"] = split.pixels
        else:
            sizes = np.array([len(blob) for blob in split.files], dtype=np.int64)
            arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(sizes)])
            arrays[f"{name}_bytes"] = np.frombuffer(b"".join(split.files), dtype=np.uint8)
            arrays[f"{name}_names"] = np.array(split.names, dtype=str)
    save_npz(target, **arrays)


def load_raw(path: Path) -> RawDataset:
    arrays = load_npz(path, "raw data")
    splits = {}
    for name in SPLITS:
        if f"{name}_pixels" in arrays:
            splits[name] = Split(labels=arrays[f"{name}_labels"], pixels=arrays[f"{name}_pixels"])
        else:
            blob, offsets = arrays[f"{name}_bytes"].tobytes(), arrays[f"{name}_offsets"]
            files = [blob[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
            splits[name] = Split(labels=arrays[f"{name}_labels"], files=files,
                                 names=[str(n) for n in arrays[f"{name}_names"]])
    return RawDataset(classes=[str(c) for c in arrays["classes"]], splits=splits)


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices (in original order) of at most `limit` items, keeping the class proportions."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(labels))
    if limit < n_classes:
        raise PipelineError(f"data limit {limit} is smaller than the number of classes ({n_classes})")
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(chosen)
