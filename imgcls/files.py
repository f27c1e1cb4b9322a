"""File plumbing shared by the stages: fetching, checksums, atomic writes."""
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgcls import paths
from imgcls.errors import PipelineError

FETCH_ATTEMPTS = 3
RETRY_SECONDS = 2.0  # wait before the 2nd attempt; doubled for each later one


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_copy(checksum: str) -> Path | None:
    """The file with this sha256 in the local copies folder ($IMGCLS_DATASETS), if any.

    The folder is a per-machine setting (an environment variable, never in tracked files), so
    every clone and every `dvc exp run --temp/--queue` copy of the repository finds the same
    bytes under the same params, wherever the folder lies.
    """
    folder = os.environ.get(paths.COPIES_ENV)
    if not folder:
        return None
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PipelineError(f"{paths.COPIES_ENV}={folder}: not a directory")
    for candidate in sorted(root.iterdir()):
        if candidate.is_file() and sha256(candidate) == checksum.lower():
            return candidate
    return None


def _download(url: str, target: Path) -> None:
    """Stream url into target; raise on a short read so a cut transfer never passes as whole.

    urllib rather than pooch: pooch retries 4xx answers too, so a wrong URL would wait through
    every attempt before it stops."""
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:
            raise OSError(f"transfer cut short: {received} of {total} bytes")


@contextlib.contextmanager
def fetch_dir(what: str):
    """A temporary folder for a download, under data/ (`.fetch-<what>-*`), removed afterwards.

    A run killed mid-download cannot remove its folder: the next run for the same `what`
    removes such leftovers first, unless a live process still holds the folder's lock."""
    paths.DATA.mkdir(parents=True, exist_ok=True)
    prefix = ".fetch-" + re.sub(r"[^A-Za-z0-9_.-]", "_", what) + "-"
    for leftover in paths.DATA.iterdir():
        if not (leftover.name.startswith(prefix) and leftover.is_dir() and not leftover.is_symlink()):
            continue
        lock = leftover / ".lock"
        just_made = not lock.exists() and time.time() - leftover.stat().st_mtime < 60  # its lock may be on the way
        if not just_made and not _locked(lock):
            shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=paths.DATA) as tmp:
        with open(Path(tmp) / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield tmp


@contextlib.contextmanager
def local_copy(location: str, expected_sha256: str | None, what: str):
    """Yield a local path for `location` (a path or an http(s) URL), checksum verified.

    URLs are fetched into a temporary folder under data/ (retried with back-off on network
    errors and cut transfers, not on 4xx answers) that is removed afterwards, or by the next
    download if this one is killed (fetch_dir).
    """
    with fetch_dir(what) if is_url(location) else contextlib.nullcontext() as tmp:
        if is_url(location):
            path = Path(tmp) / (Path(location.split("?")[0]).name or "download")
            for attempt in range(1, FETCH_ATTEMPTS + 1):
                try:
                    _download(location, path)
                    break
                except (OSError, http.client.HTTPException, ValueError) as err:  # URLError is an OSError
                    permanent = isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 \
                        and err.code not in (408, 429)
                    if permanent or attempt == FETCH_ATTEMPTS:
                        reason = getattr(err, "reason", None) or err
                        raise PipelineError(f"{what}: cannot fetch {location} ({reason}; {attempt} attempt"
                                            f"{'s' if attempt > 1 else ''}); check the URL and the network, "
                                            "or point it at a local copy") from None
                    delay = RETRY_SECONDS * 2 ** (attempt - 1)
                    print(f"warning: {what}: {location}: {getattr(err, 'reason', None) or err}; retrying in {delay:g} s "
                          f"(attempt {attempt + 1} of {FETCH_ATTEMPTS})", file=sys.stderr)
                    time.sleep(delay)
        else:
            path = Path(location).expanduser()
            if not path.exists():
                raise PipelineError(f"{what}: {location} does not exist")
        if expected_sha256 and path.is_file():
            actual = sha256(path)
            if actual != expected_sha256.lower():
                raise PipelineError(f"{what}: sha256 mismatch for {location}: expected {expected_sha256}, got {actual} "
                                    "(incomplete or different file; fetch it again or fix the sha256)")
        elif expected_sha256:
            raise PipelineError(f"{what}: sha256 is set but {location} is a directory, not a file")
        yield path


@contextlib.contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; move it into place only if the block succeeds.

    A writer killed mid-write (SIGKILL, power) leaves its temporary file behind: the ones of
    this target, named as below, are removed first, unless a live writer still holds the lock
    it takes on its own temporary file (released by the kernel when a process dies)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix or ".tmp"
    stale = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}" + re.escape(suffix))  # mkstemp's names
    for leftover in target.parent.iterdir():
        if stale.fullmatch(leftover.name) and leftover.is_file() and not leftover.is_symlink() \
                and not _locked(leftover):
            leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    tmp_path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


def _locked(path: Path) -> bool:
    """Whether a live process holds the lock on `path` (a temporary file or folder's lock file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def save_npz(target: Path, **arrays) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_json(target: Path, payload: dict) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def save_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def load_npz(path: Path, what: str) -> dict:
    """Load an npz without pickle, as a plain dict of arrays, with a one-line error if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise PipelineError(f"{what}: {path} not found; run the earlier stages (dvc repro)") from None
    except Exception as err:  # zipfile/pickle/format errors all mean the same to the user
        raise PipelineError(f"{what}: {path} is not a readable npz file ({type(err).__name__}: {err})") from None
