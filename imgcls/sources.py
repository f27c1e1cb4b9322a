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
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from imgcls import paths
from imgcls.errors import PipelineError
from imgcls.files import fetch_dir, find_copy, is_url, load_npz, local_copy, save_npz

SPLITS = ("train", "validation")
VALIDATION_NAMES = ("validation", "val", "test")  # accepted folder names, in order of preference
SKIPPED_NAMES = ("__MACOSX", "Thumbs.db")
MAX_MEMBER_BYTES = 1 << 30  # no image file is this large: a bigger member is a decompression bomb
MAX_TOTAL_BYTES = 4 << 30  # default of data.<study>.max_bytes: all of a source's files (or arrays), decompressed
MAX_CLASSES = 100_000  # labels implying more classes than this (or than images) are not class indices


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
        allowed = f"lie in 0..{n_classes - 1}" if n_classes is not None else "be class indices 0, 1, 2, …"
        raise PipelineError(f"{where}: labels must {allowed}, got {labels.min()}..{labels.max()}")
    return labels


def _class_names(configured: list[str] | None, splits: dict[str, Split], study: str) -> list[str]:
    n_classes = int(max(split.labels.max(initial=-1) for split in splits.values())) + 1
    n_images = sum(len(split) for split in splits.values())
    if configured is None and n_classes > min(MAX_CLASSES, n_images):
        raise PipelineError(f"data.{study}: the labels reach {n_classes - 1:,}, which would make {n_classes:,} classes "
                            f"for {n_images:,} images (at most {MAX_CLASSES:,}); labels must be class indices "
                            f"0..K-1 (name them in data.{study}.classes)")
    if configured is None:
        return [str(i) for i in range(n_classes)]
    if n_classes > len(configured):
        raise PipelineError(f"data.{study}.classes names {len(configured)} classes but the labels reach {n_classes - 1}")
    return list(configured)


def _npz_size(path: Path) -> int:
    """Decompressed size an npz declares for its arrays (its zip directory), before any is loaded."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0  # load_npz says what is wrong with it


def from_npz(path: Path, study: str, classes: list[str] | None, max_bytes: int = MAX_TOTAL_BYTES,
             shown: str | None = None) -> RawDataset:
    """Keras layout: x_train, y_train, x_test, y_test (the test split is the validation set)."""
    _Budget(shown or str(path), max_bytes, f"data.{study}.max_bytes").declare(_npz_size(path))
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


def from_torchvision(dataset: str, study: str, classes: list[str] | None, copy_sha256: str | None = None) -> RawDataset:
    """torchvision's own download with its md5 checks, into a temporary folder."""
    from torchvision import datasets  # heavy import, only for this source

    splits = {}
    with fetch_dir(f"torchvision-{study}") as root:  # under data/: a killed run's leftovers go next time
        for split, is_train in (("train", True), ("validation", False)):
            try:
                ds = getattr(datasets, dataset)(root=root, train=is_train, download=True)
            except (RuntimeError, OSError) as err:
                wanted = f"the file with copy_sha256 {copy_sha256[:12]}…" if copy_sha256 else "a local copy"
                raise PipelineError(
                    f"data.{study}: torchvision {dataset} download failed ({str(err).splitlines()[0]}); offline, "
                    f"put {wanted} in the folder that {paths.COPIES_ENV} names"
                ) from None
            images = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
            images = _as_nhwc(images, f"torchvision {dataset}")
            splits[split] = Split(labels=_labels(ds.targets, len(images), None, f"torchvision {dataset}"), pixels=images)
            names = classes or [name.split(" - ")[0] for name in ds.classes]
    return RawDataset(classes=names, splits=splits)


# ---------------------------------------------------------------- ImageFolder sources
class _Budget:
    """Decompressed bytes of one source against `data.<study>.max_bytes`.

    Declared sizes (zip directory, tar headers, file sizes) are checked before anything is
    read, and the bytes actually read are counted too, because headers can lie."""

    def __init__(self, shown: str, limit: int, key: str):
        self.shown, self.limit, self.key, self.used = shown, limit, key, 0

    def declare(self, total: int) -> None:
        if total > self.limit:
            raise PipelineError(f"{self.shown}: the files add up to more than {self.limit:,} bytes decompressed "
                                f"({total:,} or more; a decompression bomb?); if the data really is this large, "
                                f"raise {self.key}")

    def read(self, fh, name: str) -> bytes:
        allowed = min(MAX_MEMBER_BYTES, self.limit - self.used)
        data = fh.read(allowed + 1)
        if len(data) > MAX_MEMBER_BYTES:
            _checked_member(name, self.shown, len(data))
        self.declare(self.used + len(data))
        self.used += len(data)
        return data


def _checked_member(name: str, archive, size: int = 0) -> PurePosixPath:
    if size > MAX_MEMBER_BYTES:
        raise PipelineError(f"{archive}: refusing member {name!r}: {size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte "
                            "limit for one image file (a decompression bomb?)")
    member = PurePosixPath(name.replace("\\", "/"))  # archives written on Windows may use backslashes
    if member.is_absolute() or ".." in member.parts or (member.parts and ":" in member.parts[0]):
        raise PipelineError(f"{archive}: refusing unsafe archive member {name!r} (absolute path or '..')")
    return member


def _skipped(member: PurePosixPath) -> bool:
    return any(part.startswith(".") or part in SKIPPED_NAMES for part in member.parts)


def _iter_zip(path: Path, shown: str, budget: _Budget):
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        budget.declare(sum(info.file_size for info in infos))  # the central directory, before any member is read
        for info in infos:
            member = _checked_member(info.filename, shown, info.file_size)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PipelineError(f"{shown}: refusing symbolic link member {info.filename!r}")
            if _skipped(member):  # hidden files and folders (.DS_Store, .ipynb_checkpoints/), __MACOSX
                continue
            if info.is_dir():
                yield member, None
            else:
                with archive.open(info) as fh:
                    yield member, budget.read(fh, info.filename)


class _EndMarkedTarInfo(tarfile.TarInfo):
    """Notes on the archive when its end-of-archive marker (a zero block) is read: tarfile itself
    ends just as quietly when the file stops at a member boundary (a cut download)."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.end_marker_seen = True
            raise


def _iter_tar(path: Path, shown: str, budget: _Budget):
    with tarfile.open(path, "r:*", tarinfo=_EndMarkedTarInfo) as archive:
        archive.end_marker_seen = False
        for info in archive:
            member = _checked_member(info.name, shown, info.size)
            if info.issym() or info.islnk():
                raise PipelineError(f"{shown}: refusing link member {info.name!r}")
            if info.isdir():
                if not _skipped(member):
                    yield member, None
            elif not info.isfile():
                raise PipelineError(f"{shown}: refusing special member {info.name!r} (device or fifo)")
            elif not _skipped(member):
                budget.declare(budget.used + info.size)
                yield member, budget.read(archive.extractfile(info), info.name)
        if not archive.end_marker_seen:
            raise EOFError("no end-of-archive marker: the file stops before the archive does")
        while archive.fileobj.read(1 << 20):  # to the end: a compressed stream checks its own end there
            pass


def _iter_dir(path: Path, shown: str, budget: _Budget):
    root = path.resolve()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(name for name in dirs if not _skipped(PurePosixPath(name)))  # hidden folders are not walked
        for name in dirs:
            if Path(folder, name).is_symlink():
                raise PipelineError(f"{Path(folder, name)}: refusing symbolic link to a folder (copy the folder instead)")
            yield PurePosixPath(Path(folder, name).relative_to(path).as_posix()), None
        for name in sorted(files):
            full = Path(folder, name)
            if full.is_symlink() and not full.resolve().is_relative_to(root):
                raise PipelineError(f"{full}: refusing symbolic link that points outside {path}")
            member = PurePosixPath(full.relative_to(path).as_posix())
            if _skipped(member):
                continue
            info = full.stat()
            if not stat.S_ISREG(info.st_mode):  # reading a FIFO would wait forever; a device never ends
                raise PipelineError(f"{full}: refusing special file (a FIFO, socket or device, not an image file)")
            _checked_member(member.as_posix(), shown, info.st_size)
            budget.declare(budget.used + info.st_size)
            with open(full, "rb") as fh:
                yield member, budget.read(fh, member.as_posix())


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip whose end (the central directory) is cut is still a zip
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: a compressed tar


def _entries(path: Path, shown: str | None = None, max_bytes: int = MAX_TOTAL_BYTES,
             key: str = "data.<study>.max_bytes") -> dict[PurePosixPath, bytes | None]:
    """All members of a directory or archive: file path -> bytes, directory path -> None.

    `shown` names the source in messages (the URL, not the temporary file it was fetched to)."""
    shown = shown or str(path)
    budget = _Budget(shown, max_bytes, key)
    kind = "folder" if path.is_dir() else "or truncated archive"
    try:
        if path.is_dir():
            reader = _iter_dir(path, shown, budget)
        else:
            with open(path, "rb") as fh:
                head = fh.read(8)
            if zipfile.is_zipfile(path) or head.startswith(ZIP_MAGIC):
                reader = _iter_zip(path, shown, budget)
            elif tarfile.is_tarfile(path) or head.startswith(COMPRESSED_MAGIC):
                reader = _iter_tar(path, shown, budget)
            else:
                looks = " (it looks like an HTML page)" if head.lstrip().startswith(b"<") else ""
                raise PipelineError(f"{shown}: not a directory, zip or tar archive{looks}")
        return dict(tqdm(reader, desc=f"read {Path(shown).name}", unit=" files", leave=False))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise PipelineError(f"{shown}: unreadable {kind} ({type(err).__name__}: {err})") from None


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


def from_imagefolder(source: Path, subdir: str | None, shown: str | None = None, max_bytes: int = MAX_TOTAL_BYTES,
                     study: str = "<study>") -> RawDataset:
    """`train/<class>/*` and `validation/` (or `val/`, `test/`) `<class>/*` in a dir or archive.

    `shown` names the source in messages (a URL rather than the temporary file fetched from it);
    `max_bytes` caps the decompressed size of all its files (data.<study>.max_bytes)."""
    entries = _entries(source, shown, max_bytes, f"data.{study}.max_bytes")
    path = shown or str(source)
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


def check_dataset(dataset: RawDataset, study: str) -> None:
    """What training needs of any source: both splits non-empty and at least two classes in each."""
    if len(dataset.classes) < 2:
        raise PipelineError(f"data.{study}: one class ({dataset.classes}); a classifier needs at least two")
    for name, split in dataset.splits.items():
        if len(split) == 0:
            raise PipelineError(f"data.{study}: the {name} split is empty; training and validation both need images")
        present = np.unique(split.labels)
        if len(present) < 2:
            raise PipelineError(f"data.{study}: every {name} image has the same label ({dataset.classes[present[0]]!r}); "
                                f"a classifier needs at least two classes")


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
    """Fetch and validate a study's data as configured by `data.<study>` in params.yaml.

    A local copy named by `copy_sha256` and present in the local copies folder is read in place
    of the source: an npz (Keras layout) for array sources, an ImageFolder archive otherwise.
    """
    copy = find_copy(cfg.copy_sha256) if cfg.copy_sha256 else None
    if copy is None and cfg.source == "torchvision":
        return from_torchvision(cfg.dataset, study, cfg.classes, cfg.copy_sha256)
    if copy is None and not cfg.path:
        raise PipelineError(f"data.{study}: no file with copy_sha256 {cfg.copy_sha256[:12]}… in the local copies "
                            f"folder ({paths.COPIES_ENV}={os.environ.get(paths.COPIES_ENV) or 'unset'}) and no `path`")
    location, checksum, subdir = (str(copy), None, None) if copy else (cfg.path, cfg.sha256, cfg.subdir)
    if copy is None:
        warn_if_untracked(study, cfg)
    with local_copy(location, checksum, f"data.{study}.path") as path:
        if cfg.source in ("npz", "torchvision"):
            return from_npz(path, study, cfg.classes, cfg.max_bytes, location)
        dataset = from_imagefolder(path, subdir, location, cfg.max_bytes, study)
    if cfg.manifest:
        verify_manifest(dataset, paths.manifest(cfg.manifest), f"data.{study}.manifest")
    if cfg.classes is not None and cfg.classes != dataset.classes:
        raise PipelineError(f"data.{study}.classes {cfg.classes} differ from the class folders {dataset.classes}")
    return dataset


def warn_if_untracked(study: str, cfg) -> None:
    """DVC tracks the bytes of local sources under sources/ only (a dependency of every download);
    elsewhere a checksum or manifest must pin them, or changed data would go unnoticed."""
    if is_url(cfg.path) or cfg.sha256 or cfg.manifest:
        return
    location = (paths.ROOT / Path(cfg.path).expanduser()).resolve()
    if not location.is_relative_to(paths.SOURCES.resolve()):
        print(f"warning: data.{study}.path {cfg.path} lies outside sources/ and has no sha256: DVC will not "
              f"notice if its bytes change (move or link it under sources/, or set data.{study}.sha256)",
              file=sys.stderr)


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
    try:
        chosen, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    except ValueError as err:  # a class with one image, or too few left over to stratify
        raise PipelineError(f"data limit {limit}: no stratified subset of {len(labels)} images in {n_classes} classes "
                            f"({err}); raise the limit or set it to null") from None
    return np.sort(chosen)
