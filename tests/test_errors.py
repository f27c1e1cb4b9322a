"""Bad input, faults and safety (docs/errors.md): every case ends in one `error:` line and no
output a later `dvc repro` could take for good data, or in a counted skip recorded in metrics."""
import ast
import contextlib
import fcntl
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import TypeAdapter

from imgcls import checkpoint, files, models, params, paths, sources
from imgcls.errors import PipelineError, stage_main
from imgcls.params import DataParams
from imgcls.images import UnusableImage, decode_file
from imgcls.sources import read_source
from stages import download, preprocess, tsne
from tests.conftest import ROOT, imagefolder_files, png_bytes, write_npz, write_tree, write_zip


# ---------------------------------------------------------------- helpers
@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Stage outputs under tmp_path/ws and params from tmp_path/ws/params.yaml, so stage mains run
    in-process (fast, no torch start-up per case) without touching the real workspace."""
    root = tmp_path / "ws"
    for name in ("DATA", "METRICS", "PLOTS", "REPORT"):
        monkeypatch.setattr(paths, name, root / name.lower())
    original = params.load
    monkeypatch.setattr(params, "load", lambda path=root / "params.yaml": original(path))
    assert paths.raw("x").is_relative_to(root) and paths.train_metrics("x").is_relative_to(root)

    def configure(data: dict, **sections) -> Path:
        config = {"seed": 0, "data": data,
                  "train": {name: {"data": name, "model": {"name": "simple_cnn"}, "epochs": 1} for name in data},
                  **sections}
        root.mkdir(parents=True, exist_ok=True)
        (root / "params.yaml").write_text(yaml.safe_dump(config))
        return root

    return configure


def run_main(main, *args) -> int:
    """A stage entry point's exit code (stage_main exits 2 on a PipelineError)."""
    try:
        main(*args)
    except SystemExit as exit:
        return exit.code
    return 0


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm) and warnings: what must be exactly one `error:` line."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    return [line for line in lines if line and not re.search(r"\[\d+:\d\d", line) and not line.startswith("warning: ")]


def error_line(captured) -> str:
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.err.rstrip().endswith(lines[0])
    return lines[0]


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def folder_params(path, **extra):
    return DataParams(source="imagefolder", path=str(path), channels=3, **extra)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- params
def mutated_params(tmp_path, mutate) -> Path:
    config = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(config)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(tsne_perplexity=5), r"tsne_perplexity: Extra inputs are not permitted"),
    (lambda c: c["data"]["mnist"].update(pathh="x"), r"data\.mnist\.pathh: Extra inputs are not permitted"),
    (lambda c: c["data"]["mnist"].update(channels="three"), r"data\.mnist\.channels: Input should be 1 or 3"),
    (lambda c: c["train"]["mnist"].update(batch_size=[128]), r"train\.mnist\.batch_size: Input should be a valid integer"),
    (lambda c: c["train"]["mnist"].update(lr=-0.1), r"train\.mnist\.lr: Input should be greater than 0"),
    (lambda c: c["train"]["mnist"]["model"].update(dropout_conv=1.5), r"dropout_conv: Input should be less than 1"),
    (lambda c: c["tsne"].update(perplexity=4000, max_points=10000), r"tsne: perplexity 4000 needs more than 12000 points"),
    (lambda c: c["data"]["mnist"].update(source="s3"), r"data\.mnist\.source: Input should be 'torchvision', 'npz'"),
    (lambda c: c["data"]["mnist"].update(sha256="abc"), r"data\.mnist\.sha256: String should match pattern"),
    (lambda c: c["train"]["mnist"].update(data="mnist2"), r"train\.mnist\.data: unknown study 'mnist2'"),
    (lambda c: c["train"]["mnist"]["model"].update(name="vit_huge"), r"train\.mnist\.model: Input tag 'vit_huge'"),
    (lambda c: c["train"]["mnist"].update(method="lbfgs"), r"train\.mnist\.method: Input should be 'gradient'"),
    (lambda c: c["train"]["mnist"].update(optimizer="rmsprop"), r"train\.mnist\.optimizer: Input should be 'adam'"),
    (lambda c: c["train"]["mnist"].update(device="tpu"), r"train\.mnist\.device: Input should be 'auto'"),
    (lambda c: c.update(seed=-1), r"^params\.yaml: seed: Input should be greater than or equal to 0"),
    (lambda c: c.update(seed=2**32), r"^params\.yaml: seed: Input should be less than or equal to 4294967295"),
    (lambda c: c["train"]["mnist"].update(seed=-1), r"train\.mnist\.seed: Input should be greater than or equal to 0"),
    (lambda c: c["tsne"].update(seed=-1), r"tsne\.seed: Input should be greater than or equal to 0"),
    (lambda c: c["train"]["mnist"].update(epochs=True), r"train\.mnist\.epochs: Input should be a valid integer, not a boolean"),
    (lambda c: c["train"]["mnist"].update(batch_size=True), r"train\.mnist\.batch_size: .*not a boolean"),
    (lambda c: c["tsne"].update(max_points=True), r"tsne\.max_points: .*not a boolean"),
    (lambda c: c["data"]["mnist"].update(channels=True), r"data\.mnist\.channels: .*not a boolean"),
    (lambda c: c["data"]["mnist"].update(max_bytes=0), r"data\.mnist\.max_bytes: Input should be greater than 0"),
    (lambda c: c["data"]["mnist"].update(source="npz", path=None, copy_sha256=None), r"source npz needs `path`"),
    (lambda c: c["train"]["mnist"].update(epochs="ten"), r"train\.mnist\.epochs: Input should be a valid integer"),
    (lambda c: c["train"]["mnist"].update(epochs=-1), r"train\.mnist\.epochs: Input should be greater than 0"),
    (lambda c: c["train"]["mnist"]["model"].update(dropout_fc=1.0), r"dropout_fc: Input should be less than 1"),
    (lambda c: c["tsne"].update(perplexity=0), r"tsne\.perplexity: Input should be greater than 0"),
])
def test_bad_params_stop_with_one_line_naming_the_key(tmp_path, mutate, message):
    with pytest.raises(PipelineError, match=message) as err:
        params.load(mutated_params(tmp_path, mutate))
    assert "\n" not in str(err.value)


def test_perplexity_above_the_actual_points_stops_tsne_before_any_output(workspace, capsys):
    root = workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}},
                     tsne={"perplexity": 10, "max_points": 100})
    rng = np.random.default_rng(0)
    files.save_npz(paths.embeddings("toy"), features=rng.normal(size=(20, 8)), logits=rng.normal(size=(20, 2)),
                   labels=np.arange(20) % 2, predictions=np.arange(20) % 2, classes=np.array(["a", "b"]))
    assert run_main(tsne.main, "toy") == 2
    assert "tsne.perplexity 10.0 is too large for 20 points" in error_line(capsys.readouterr())
    assert not paths.tsne_metrics("toy").exists() and not (root / "plots").exists()


# ---------------------------------------------------------------- downloads
class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.body, cutting the first server.cuts responses half way (Content-Length stays whole)."""

    def do_GET(self):
        self.server.hits += 1
        if self.path != "/data.npz":
            self.send_error(404)
            return
        body = self.server.body
        cut = self.server.hits <= self.server.cuts
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "RETRY_SECONDS", 0.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.hits, server.cuts = 0, 0
    server.body = write_npz(tmp_path / "served.npz", n_train=40, n_test=20).read_bytes()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def url(server, name="data.npz") -> str:
    return f"http://127.0.0.1:{server.server_port}/{name}"


def closed_port() -> int:
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_url_is_retried_then_fails(monkeypatch, capsys):
    monkeypatch.setattr(files, "RETRY_SECONDS", 0.0)
    location = f"http://127.0.0.1:{closed_port()}/mnist.npz"
    with pytest.raises(PipelineError, match=r"data\.mnist\.path: cannot fetch .*Connection refused\]?; 3 attempts"):
        read_source("mnist", DataParams(source="npz", path=location, channels=1))
    assert capsys.readouterr().err.count("retrying in 0 s") == 2


def test_http_404_is_not_retried(http_server):
    with pytest.raises(PipelineError, match=r"cannot fetch .*Not Found; 1 attempt\)"):
        read_source("mnist", DataParams(source="npz", path=url(http_server, "nope.npz"), channels=1))
    assert http_server.hits == 1


def test_cut_download_is_retried(http_server):
    http_server.cuts = 1
    dataset = read_source("mnist", DataParams(source="npz", path=url(http_server), channels=1))
    assert http_server.hits == 2 and len(dataset.splits["train"]) == 40


def test_cut_download_fails_cleanly_and_is_never_cached(http_server, workspace, capsys, tmp_path, monkeypatch):
    fetch_tmp = tmp_path / "fetch-tmp"
    fetch_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fetch_tmp))
    http_server.cuts = 99
    workspace({"mnist": {"source": "npz", "path": url(http_server), "channels": 1}})
    assert run_main(download.main, "mnist") == 2
    captured = capsys.readouterr()
    line = error_line(captured)
    assert "transfer cut short" in line and "3 attempts" in line
    assert captured.err.count("retrying in 0 s") == 2
    assert http_server.hits == 3
    assert not paths.raw("mnist").exists() and list(fetch_tmp.iterdir()) == []
    assert [p.name for p in paths.DATA.iterdir() if p.name.startswith(".fetch-")] == []


class NoLengthHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.files without Content-Length (HTTP/1.0, the body ends when the connection
    closes): a body cut short looks whole to the client."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def plain_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoLengthHandler)
    server.files = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name, body, message", [
    ("pets.tar", lambda d: tar_cut_at_a_member_boundary(d / "cut.tar").read_bytes(),
     "unreadable or truncated archive (EOFError: no end-of-archive marker"),
    ("pets.zip", lambda d: write_zip(d / "z.zip", imagefolder_files()).read_bytes()[:3000],
     "unreadable or truncated archive (BadZipFile"),
    ("pets.zip", lambda d: b"<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n",
     "not a directory, zip or tar archive (it looks like an HTML page)"),
])
def test_cut_or_wrong_body_without_content_length_is_refused_naming_the_url(plain_server, workspace, tmp_path, capsys,
                                                                            name, body, message):
    plain_server.files[name] = body(tmp_path)
    location = url(plain_server, name)
    workspace({"pets": {"source": "imagefolder", "path": location}})
    assert run_main(download.main, "pets") == 2
    line = error_line(capsys.readouterr())
    assert line.startswith(f"error: {location}: {message}"), line  # the URL, not the deleted temporary file
    assert not paths.raw("pets").exists()
    assert [p.name for p in paths.DATA.iterdir() if p.name.startswith(".fetch-")] == []


def test_download_left_by_a_killed_run_is_removed_by_the_next(plain_server, workspace, tmp_path):
    """Downloads go to data/.fetch-data.<study>.path-*, which a run killed mid-transfer cannot remove."""
    tar_with(tmp_path / "pets.tar", [])
    plain_server.files["pets.tar"] = (tmp_path / "pets.tar").read_bytes()
    workspace({"pets": {"source": "imagefolder", "path": url(plain_server, "pets.tar")}})
    leftover = paths.DATA / ".fetch-data.pets.path-k1ll3d00"
    leftover.mkdir(parents=True)
    (leftover / ".lock").touch()  # the dead run's lock: nobody holds it now
    (leftover / "pets.tar").write_bytes(b"half a download")
    busy = paths.DATA / ".fetch-data.pets.path-busy0000"  # a live download's, locked: left alone
    busy.mkdir()
    with open(busy / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert run_main(download.main, "pets") == 0
    assert not leftover.exists() and busy.exists()
    shutil.rmtree(busy)
    assert run_main(download.main, "pets") == 0
    assert paths.raw("pets").exists()
    assert [p.name for p in paths.DATA.iterdir() if p.name.startswith(".fetch-")] == []


# ---------------------------------------------------------------- archives and folders
@pytest.mark.parametrize("kind", ["tar.gz", "npz", "zip"])
def test_truncated_archive_stops(tmp_path, kind):
    if kind == "npz":
        whole, cfg = write_npz(tmp_path / "whole.npz"), dict(source="npz", channels=1)
    elif kind == "zip":
        whole, cfg = write_zip(tmp_path / "whole.zip", imagefolder_files()), dict(source="imagefolder", channels=3)
    else:
        tree = write_tree(tmp_path / "tree", imagefolder_files())
        whole, cfg = tmp_path / "whole.tar.gz", dict(source="imagefolder", channels=3)
        with tarfile.open(whole, "w:gz") as tar:
            tar.add(tree, arcname=".")
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(PipelineError, match=r"cut\.((tar\.gz|zip): unreadable or truncated archive|npz is not a readable)"):
        read_source("pets", DataParams(path=str(cut), **cfg))


def tar_cut_at_a_member_boundary(path: Path, compression: str = "") -> Path:
    """A tar of the tiny ImageFolder that stops right before its last member's header, as a cut
    download without Content-Length would: no end-of-archive marker, every member before it whole."""
    whole = tar_with(path.with_suffix(".whole"), [])
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1].offset
    raw = whole.read_bytes()[:last]
    path.write_bytes(zlib.compress(raw, wbits=31) if compression == "gz" else raw)  # wbits 31: a gzip stream
    return path


@pytest.mark.parametrize("compression", ["", "gz"])
def test_tar_cut_at_a_member_boundary_is_refused(workspace, tmp_path, capsys, compression):
    cut = tar_cut_at_a_member_boundary(tmp_path / f"cut.tar{'.gz' if compression else ''}", compression)
    workspace({"pets": {"source": "imagefolder", "path": str(cut)}})
    assert run_main(download.main, "pets") == 2
    line = error_line(capsys.readouterr())
    assert f"{cut}: unreadable or truncated archive (EOFError: no end-of-archive marker" in line
    assert not paths.raw("pets").exists()


def tar_with(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in imagefolder_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def tar_member(name, kind=tarfile.REGTYPE, linkname="", size=1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size if kind == tarfile.REGTYPE else 0
    return info


def zip_symlink(path: Path) -> Path:
    write_zip(path, imagefolder_files())
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("train/cat/link.png")
        info.external_attr = 0o120777 << 16  # S_IFLNK
        archive.writestr(info, "/etc/passwd")
    return path


def folder_with_link(root: Path, to_folder: bool) -> Path:
    write_tree(root, imagefolder_files())
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)))
    if to_folder:
        (root / "train" / "wolf").symlink_to(outside, target_is_directory=True)
    else:
        (root / "train" / "cat" / "secret.png").symlink_to(outside / "secret.png")
    return root


@pytest.mark.parametrize("build, message", [
    (lambda d: write_zip(d / "a.zip", {**imagefolder_files(), "/tmp/evil.png": b"x"}), "unsafe archive member '/tmp/evil.png'"),
    (lambda d: write_zip(d / "a.zip", {**imagefolder_files(), "..\\..\\evil.png": b"x"}), "unsafe archive member"),
    (lambda d: write_zip(d / "a.zip", {**imagefolder_files(), "C:/evil.png": b"x"}), "unsafe archive member"),
    (lambda d: zip_symlink(d / "a.zip"), "refusing symbolic link member 'train/cat/link.png'"),
    (lambda d: tar_with(d / "a.tar", [tar_member("train/../../evil.png")]), "unsafe archive member"),
    (lambda d: tar_with(d / "a.tar", [tar_member("/tmp/evil.png")]), "unsafe archive member '/tmp/evil.png'"),
    (lambda d: tar_with(d / "a.tar", [tar_member("train/cat/l.png", tarfile.SYMTYPE, "/etc/passwd")]), "refusing link"),
    (lambda d: tar_with(d / "a.tar", [tar_member("train/cat/h.png", tarfile.LNKTYPE, "../../../etc/passwd")]),
     "refusing link member 'train/cat/h.png'"),
    (lambda d: tar_with(d / "a.tar", [tar_member("train/cat/dev", tarfile.CHRTYPE)]), "refusing special member"),
    (lambda d: folder_with_link(d / "tree", to_folder=False), "refusing symbolic link that points outside"),
    (lambda d: folder_with_link(d / "tree", to_folder=True), "refusing symbolic link to a folder"),
])
def test_unsafe_archive_members_are_refused_and_nothing_is_written(tmp_path, build, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = build(inputs)
    before = all_files(tmp_path)
    with pytest.raises(PipelineError, match=re.escape(message)):
        read_source("pets", folder_params(source))
    assert all_files(tmp_path) == before
    assert not Path("/tmp/evil.png").exists()


def test_refused_archive_leaves_no_raw_output(workspace, tmp_path, capsys):
    archive = tar_with(tmp_path / "evil.tar", [tar_member("../evil.png")])
    workspace({"pets": {"source": "imagefolder", "path": str(archive)}})
    assert run_main(download.main, "pets") == 2
    assert "unsafe archive member '../evil.png'" in error_line(capsys.readouterr())
    assert not paths.raw("pets").exists() and not (tmp_path / "evil.png").exists()


def test_oversized_archive_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 50)
    archive = write_zip(tmp_path / "bomb.zip", {**imagefolder_files(), "train/cat/big.png": b"\0" * 100})
    with pytest.raises(PipelineError, match="refusing member 'train/.*bytes, over the 50-byte limit"):
        read_source("pets", folder_params(archive))


@pytest.mark.parametrize("as_zip", [False, True])
def test_empty_class_folder_stops(tmp_path, as_zip):
    files_ = imagefolder_files()
    if as_zip:
        source = write_zip(tmp_path / "pets.zip", files_)
        with zipfile.ZipFile(source, "a") as archive:
            archive.writestr("train/bird/", b"")
            archive.writestr("validation/bird/", b"")
            archive.writestr("validation/bird/.DS_Store", b"junk")  # hidden files are not images
    else:
        source = write_tree(tmp_path / "tree", files_)
        (source / "train" / "bird").mkdir()
        (source / "validation" / "bird").mkdir()
    with pytest.raises(PipelineError, match=r"class folder (train|validation)/bird is empty"):
        read_source("pets", folder_params(source))


def test_file_beside_the_class_folders_is_not_a_class(tmp_path, capsys):
    tree = write_tree(tmp_path / "tree", {**imagefolder_files(), "train/README.txt": b"about", "LICENSE": b"x"})
    dataset = read_source("pets", folder_params(tree))
    assert dataset.classes == ["cat", "dog"]
    assert "ignored 1 file(s) outside the class folders: ['train/README.txt']" in capsys.readouterr().err


def test_configured_classes_must_match_the_folders(tmp_path):
    tree = write_tree(tmp_path / "tree", imagefolder_files())
    with pytest.raises(PipelineError, match=r"data\.pets\.classes \['cat', 'wolf'\] differ from the class folders"):
        read_source("pets", folder_params(tree, classes=["cat", "wolf"]))


# ---------------------------------------------------------------- images
def pattern(size=32, seed=0, channels=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, channels) if channels > 1 else (size, size), dtype=np.uint8)


UNUSABLE = {  # file -> (bytes, reason the metrics give)
    "train/cat/empty.jpg": (b"", "empty file"),
    "train/cat/notes.jpg": (b"shopping list, not a cat\n", "not a readable image (no known image format)"),
    "train/cat/cut.jpg": (png_bytes(pattern(), "JPEG")[:400], "not a readable image (OSError: Truncated File Read)"),
    "train/cat/spacer.gif": (encoded(Image.new("P", (1, 1)), "GIF"), "blank placeholder (one colour, 1x1)"),
    "validation/dog/blank.png": (png_bytes(np.full((32, 32, 3), 200, np.uint8)), "blank placeholder (one colour, 32x32)"),
    "validation/dog/bomb.png": (png_claiming(100_000, 100_000), "too large to decode safely (Image size (10000000000 pixels)"),
}
MIXED_MODES = {  # decoded and converted, not skipped
    "train/cat/grey.png": png_bytes(pattern(channels=1)),
    "train/cat/grey16.png": encoded(Image.fromarray(pattern(channels=1).astype(np.uint16) * 257), "PNG"),
    "train/dog/rgba.png": encoded(Image.fromarray(pattern(channels=4), "RGBA"), "PNG"),
    "train/dog/palette.gif": encoded(Image.fromarray(pattern()).convert("P"), "GIF"),
    "validation/cat/cmyk.jpg": encoded(Image.fromarray(pattern()).convert("CMYK"), "JPEG"),
    "validation/cat/palette_named.jpg": encoded(Image.fromarray(pattern()).convert("P"), "PNG"),
}


def test_unusable_images_are_skipped_counted_and_mixed_modes_converted(workspace, tmp_path, capsys):
    good = imagefolder_files(n_per_class=6, size=32)
    archive = write_zip(tmp_path / "pets.zip", {**good, **MIXED_MODES, **{k: v[0] for k, v in UNUSABLE.items()}})
    workspace({"pets": {"source": "imagefolder", "path": str(archive), "channels": 3}})
    assert run_main(download.main, "pets") == 0
    assert run_main(preprocess.main, "pets") == 0
    err = capsys.readouterr().err
    assert f"warning: pets: skipped {len(UNUSABLE)} unusable image file(s)" in err
    metrics = json.loads(paths.data_summary("pets").read_text())
    assert metrics["skipped"] == len(UNUSABLE)
    reasons = dict(metrics["skipped_files"])
    assert set(reasons) == set(UNUSABLE)
    for name, (_, reason) in UNUSABLE.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert metrics["n_train"] == 12 + 4 and metrics["n_val"] == 12 + 2
    prepared = np.load(paths.prepared("pets"))
    assert prepared["x_train"].shape == (16, 3, 32, 32) and prepared["x_val"].shape == (14, 3, 32, 32)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    decoded = decode_file(encoded(Image.fromarray(grey), "PNG"), "g.png", channels=1, size=None)
    assert decoded.shape == (64, 64, 1)
    assert decoded[0, 0, 0] == 0 and decoded[-1, -1, 0] == 255 and 120 <= decoded[32, 0, 0] <= 135


def test_image_over_the_warning_limit_is_refused_not_decoded(monkeypatch):
    """Between 1x and 2x PIL's limit PIL only warns; the stage treats that as too large as well."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnusableImage, match=r"big\.png: too large to decode safely \(Image size \(1600 pixels\)"):
        decode_file(png_bytes(pattern(40)), "big.png", channels=3, size=None)


def test_class_left_without_usable_images_stops_preprocess(workspace, tmp_path, capsys):
    files_ = {name: data for name, data in imagefolder_files().items() if not name.startswith("train/dog/")}
    files_.update({f"train/dog/{i}.jpg": b"<html>404</html>" for i in range(3)})
    workspace({"pets": {"source": "imagefolder", "path": str(write_tree(tmp_path / "tree", files_))}})
    assert run_main(download.main, "pets") == 0
    assert run_main(preprocess.main, "pets") == 2
    line = error_line(capsys.readouterr())
    assert "class 'dog' has no usable image in the train split (e.g. train/dog/0.jpg: not a readable image (no known" in line
    assert not paths.prepared("pets").exists() and not paths.data_summary("pets").exists()


# ---------------------------------------------------------------- loading
SOURCE_TREES = ("stages", "imgcls", "tools", "benchmarks", "tests")


def python_files():
    return [path for tree in SOURCE_TREES for path in sorted((ROOT / tree).rglob("*.py"))]


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    loads, problems = 0, []
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports_pyyaml = any(isinstance(node, ast.Import) and any(a.name == "yaml" for a in node.names)
                             for node in ast.walk(tree))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve") for m in modules):
                    problems.append(f"{where}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            hub_load = name.endswith(("load_state_dict_from_url", ".get_state_dict"))  # torchvision weights enums
            if name == "torch.load" or hub_load:
                loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name} without weights_only=True")
            if hub_load and not (isinstance(keywords.get("check_hash"), ast.Constant) and keywords["check_hash"].value):
                problems.append(f"{where}: {name} without check_hash=True")
            if name in ("torch.hub.load", "hub.load"):
                problems.append(f"{where}: {name} runs a repository's hubconf.py (load weights, not code)")
            if name.endswith("np.load") or name == "numpy.load":
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
            if imports_pyyaml and name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(f"{where}: {name} (use yaml.safe_load)")
    assert loads >= 1, "the scan found no torch.load at all: it is looking in the wrong place"
    assert problems == []


class Payload:
    """Pickles to a call that creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_hostile_checkpoint_is_refused_without_running_it(workspace, tmp_path):
    workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}})
    marker = tmp_path / "pwned"
    paths.model("toy").parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "model": Payload(marker)}, paths.model("toy"))
    with pytest.raises(PipelineError, match=r"toy: .*toy\.pt is not a checkpoint train@toy wrote \(UnpicklingError"):
        checkpoint.load("toy")
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(workspace):
    workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}})
    paths.model("toy").parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, paths.model("toy"))
    paths.model("toy").write_bytes(paths.model("toy").read_bytes()[:500])
    with pytest.raises(PipelineError, match=r"is not a checkpoint train@toy wrote .*rerun train@toy"):
        checkpoint.load("toy")


def toy_checkpoint() -> dict:
    """What train@toy writes for a 1x28x28, ten-class SimpleCNN run (built here, not trained)."""
    model_params = params.SimpleCNNParams(name="simple_cnn")
    model = models.build(model_params, in_channels=1, num_classes=10, image_size=28)
    return {"state_dict": model.state_dict(), "model": model_params.model_dump(), "input_shape": [1, 28, 28],
            "input_size": None, "classes": [str(i) for i in range(10)], "epoch": 1}


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(input_shape=[1, 10**7, 10**7]), r"input_shape \[1, 10000000, 10000000\] is not \[1 or 3"),
    (lambda c: c.update(input_shape=[1, 28]), r"input_shape \[1, 28\] is not"),
    (lambda c: c.update(input_size=-5), r"input_size -5 is not null"),
    (lambda c: c.update(classes=["a", 2]), r"classes is not a list of 2 to"),
    (lambda c: c.update(classes="0123456789"), r"classes is not a list"),
    (lambda c: c.pop("epoch"), r"no epoch"),
    (lambda c: c.update(model={"name": "simple_cnn", "dropout_fc": 2}), r"model\.simple_cnn\.dropout_fc: Input should be"),
    (lambda c: c.update(state_dict=[1, 2]), r"state_dict is not a dict of tensors"),
    (lambda c: c["state_dict"].pop("features.0.weight"), r"1 missing tensors, e\.g\. \['features\.0\.weight'\]"),
    (lambda c: c["state_dict"].update(extra=torch.zeros(1)), r"1 unexpected, e\.g\. \['extra'\]"),
    (lambda c: c["state_dict"].update({"classifier.3.weight": torch.zeros(5, 128)}),
     r"tensor classifier\.3\.weight has shape \[5, 128\], the network expects \[10, 128\]"),
    (lambda c: c.update(input_shape=[1, 1, 1]), r"simple_cnn needs images of at least 2x2"),
])
def test_checkpoint_of_the_wrong_structure_is_one_line_naming_the_file(workspace, mutate, message):
    """Checked before anything is allocated from its values: [1, 10**7, 10**7] once asked embed for 160 TB."""
    workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}})
    paths.model("toy").parent.mkdir(parents=True)
    torch.save(toy_checkpoint(), paths.model("toy"))
    assert type(checkpoint.load("toy")[0]).__name__ == "SimpleCNN"
    broken = toy_checkpoint()
    mutate(broken)
    torch.save(broken, paths.model("toy"))
    with pytest.raises(PipelineError, match=rf"^toy: .*toy\.pt is not a checkpoint train@toy wrote \(.*{message}.*"
                                            r"rerun train@toy$") as err:
        checkpoint.load("toy")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model, size, smallest", [
    ({"name": "simple_cnn"}, 1, 2),
    ({"name": "alexnet"}, 8, 16),
    ({"name": "resnet18", "pretrained": False}, 16, 32),
])
def test_images_too_small_for_the_network_stop_building_it(model, size, smallest):
    model_params = TypeAdapter(params.ModelParams).validate_python(model)
    with pytest.raises(PipelineError, match=rf"^{model['name']} needs images of at least {smallest}x{smallest} pixels, "
                                            rf"the input is {size} pixels high; set data\.<study>\.image_size"):
        models.build(model_params, 3, 2, size)
    assert models.build(model_params, 3, 2, smallest) is not None


def test_one_pixel_images_stop_train_with_one_line(workspace, tmp_path, capsys):
    from stages import train

    path = write_npz(tmp_path / "dots.npz", n_train=40, n_test=20, size=1)
    workspace({"dots": {"source": "npz", "path": str(path), "channels": 1}})
    assert run_main(download.main, "dots") == 0 and run_main(preprocess.main, "dots") == 0
    capsys.readouterr()
    assert run_main(train.main, "dots") == 2
    assert "simple_cnn needs images of at least 2x2 pixels, the input is 1 pixels high" in error_line(capsys.readouterr())
    assert not paths.model("dots").exists() and not paths.train_metrics("dots").exists()


HUB_PAYLOAD_NAME = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file: the hash prefix is in the name


def test_pretrained_weights_in_the_hub_cache_are_hash_checked_before_loading(tmp_path, monkeypatch):
    """A pickle planted in torch's hub cache under the weights' file name used to run on load."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    marker = tmp_path / "pwned"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "hub" / "checkpoints" / HUB_PAYLOAD_NAME)
    with pytest.raises(PipelineError, match=rf"{HUB_PAYLOAD_NAME}: sha256 does not start with f37072fd, the hash in its "
                                            r"name \(corrupt or replaced\); delete it"):
        models.build(params.ResNet18Params(name="resnet18"), 3, 2, 224)
    assert not marker.exists()


def test_pretrained_weights_load_without_pickle_even_when_the_hash_matches(tmp_path, monkeypatch):
    """Were the hash check fooled, weights_only still refuses the payload (one line, no code run)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "sha256", lambda path: "f37072fd" + "0" * 56)
    marker = tmp_path / "pwned"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "hub" / "checkpoints" / HUB_PAYLOAD_NAME)
    with pytest.raises(PipelineError, match=rf"{HUB_PAYLOAD_NAME}: not the ResNet18_Weights\.IMAGENET1K_V1 weights "
                                            r"\(UnpicklingError"):
        models.build(params.ResNet18Params(name="resnet18"), 3, 2, 224)
    assert not marker.exists()


# ---------------------------------------------------------------- red-team pass (issue 14): data
@pytest.mark.parametrize("written, expected", [("off", "off"), ("on", "on"), ("false", "off"), ("true", "on"),
                                               ("auto", "auto")])
def test_on_off_params_take_yaml_booleans(tmp_path, written, expected):
    """YAML 1.1 reads a bare `off` as false, and `dvc exp run -S train.mnist.channels_last=off` writes it bare."""
    path = mutated_params(tmp_path, lambda c: c["train"]["mnist"].update(channels_last="CHANNELS_LAST"))
    path.write_text(path.read_text().replace("channels_last: CHANNELS_LAST", f"channels_last: {written}"))
    assert params.load(path).train["mnist"].channels_last == expected


def toy_npz_study(workspace, tmp_path, **overrides) -> Path:
    path = write_npz(tmp_path / "toy.npz", n_train=40, n_test=20, **overrides)
    return workspace({"toy": {"source": "npz", "path": str(path), "channels": 1}})


@pytest.mark.parametrize("overrides, message", [
    (dict(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)), "data.toy: the validation split is empty"),
    (dict(y_train=np.zeros(40, np.uint8), y_test=np.zeros(20, np.uint8)), "data.toy: one class (['0']); a classifier"),
    (dict(y_train=np.zeros(40, np.uint8)), "data.toy: every train image has the same label ('0')"),
    (dict(y_train=np.r_[np.zeros(39), [2**40]].astype(np.int64)),
     "data.toy: the labels reach 1,099,511,627,776, which would make 1,099,511,627,777 classes for 60 images"),
    (dict(y_train=np.r_[[-3], np.zeros(39)].astype(np.int64)), "labels must be class indices 0, 1, 2, …, got -3..0"),
])
def test_array_data_a_classifier_cannot_use_stops_the_download(workspace, tmp_path, capsys, overrides, message):
    toy_npz_study(workspace, tmp_path, **overrides)
    assert run_main(download.main, "toy") == 2
    assert message in error_line(capsys.readouterr())
    assert not paths.raw("toy").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(x_test=np.zeros((20, 20, 20), np.uint8)),
     "toy: train images are 28x28 but validation images are 20x20; set data.toy.image_size to resize both"),
    (dict(x_train=np.zeros((40, 0, 0), np.uint8), x_test=np.zeros((20, 0, 0), np.uint8)),
     "toy: the train images are 0x0 pixels: nothing to learn from"),
])
def test_images_training_cannot_use_stop_preprocess(workspace, tmp_path, capsys, overrides, message):
    toy_npz_study(workspace, tmp_path, **overrides)
    assert run_main(download.main, "toy") == 0
    capsys.readouterr()
    assert run_main(preprocess.main, "toy") == 2
    assert message in error_line(capsys.readouterr())
    assert not paths.prepared("toy").exists() and not paths.data_summary("toy").exists()


def test_empty_split_in_the_raw_copy_stops_preprocess(workspace, capsys):
    workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}})
    sources.save_raw(sources.RawDataset(classes=["a", "b"], splits={
        "train": sources.Split(labels=np.arange(8) % 2, pixels=np.arange(8 * 16, dtype=np.uint8).reshape(8, 4, 4, 1)),
        "validation": sources.Split(labels=np.zeros(0, np.int64), pixels=np.zeros((0, 4, 4, 1), np.uint8))}),
        paths.raw("toy"))
    assert run_main(preprocess.main, "toy") == 2
    assert "toy: the validation split of " in error_line(capsys.readouterr())
    assert not paths.prepared("toy").exists() and not paths.data_summary("toy").exists()


def with_hidden_folders(files_: dict) -> dict:
    """Jupyter's checkpoints beside the class folders and inside one: neither is a class."""
    hidden = png_bytes(pattern(32, seed=9))
    return {**files_, "train/.ipynb_checkpoints/0-checkpoint.png": hidden, "validation/.ipynb_checkpoints/x.png": hidden,
            "train/cat/.ipynb_checkpoints/1-checkpoint.png": hidden}


@pytest.mark.parametrize("kind", ["folder", "zip", "tar"])
def test_hidden_folders_are_not_classes(tmp_path, kind):
    files_ = with_hidden_folders(imagefolder_files())
    source = write_tree(tmp_path / "tree", files_)
    if kind == "zip":
        source = write_zip(tmp_path / "pets.zip", files_)
        with zipfile.ZipFile(source, "a") as archive:
            archive.writestr("train/.ipynb_checkpoints/", b"")  # directory entries too
    elif kind == "tar":
        with tarfile.open(tmp_path / "pets.tar", "w") as tar:
            tar.add(source, arcname=".")
        source = tmp_path / "pets.tar"
    dataset = read_source("pets", folder_params(source))
    assert dataset.classes == ["cat", "dog"]
    assert not any(".ipynb_checkpoints" in name for split in dataset.splits.values() for name in split.names)
    assert [len(split) for split in dataset.splits.values()] == [12, 12]


def test_fifo_in_a_folder_source_is_refused_not_waited_on(tmp_path):
    tree = write_tree(tmp_path / "tree", imagefolder_files())
    os.mkfifo(tree / "train" / "cat" / "pipe.png")

    def hung(*_):
        raise AssertionError("the download waited on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(PipelineError, match=r"train/cat/pipe\.png: refusing special file \(a FIFO, socket or device"):
            read_source("pets", folder_params(tree))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_decompressed_total_is_capped_from_the_zip_directory_before_reading(workspace, tmp_path, capsys, monkeypatch):
    """Three highly compressible members, each under the per-member limit: their sum is refused,
    from the sizes the zip declares, before any member is decompressed."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in imagefolder_files().items():
            archive.writestr(name, data)
        for i in range(3):
            archive.writestr(f"train/cat/zeros{i}.png", b"\0" * 400_000)
    assert bomb.stat().st_size < 100_000
    workspace({"pets": {"source": "imagefolder", "path": str(bomb), "max_bytes": 1_000_000}})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was read"))
    assert run_main(download.main, "pets") == 2
    line = error_line(capsys.readouterr())
    assert f"{bomb}: the files add up to more than 1,000,000 bytes decompressed" in line
    assert line.endswith("raise data.pets.max_bytes")
    assert not paths.raw("pets").exists()


def test_decompressed_total_counts_the_bytes_read_not_only_the_headers(tmp_path):
    budget = sources._Budget("src.zip", 250, "data.pets.max_bytes")
    budget.read(io.BytesIO(b"\0" * 200), "a.png")
    with pytest.raises(PipelineError, match=r"src\.zip: the files add up to more than 250 bytes decompressed \(251 or"):
        budget.read(io.BytesIO(b"\0" * 200), "b.png")  # a header may say 0 bytes; 200 came out


@pytest.mark.parametrize("kind", ["folder", "tar", "npz"])
def test_decompressed_total_is_capped_for_every_source(tmp_path, kind):
    if kind == "npz":
        source, cfg = write_npz(tmp_path / "big.npz"), dict(source="npz", channels=1)
    else:
        source, cfg = write_tree(tmp_path / "tree", imagefolder_files()), dict(source="imagefolder", channels=3)
        if kind == "tar":
            with tarfile.open(tmp_path / "pets.tar.gz", "w:gz") as tar:
                tar.add(source, arcname=".")
            source = tmp_path / "pets.tar.gz"
    with pytest.raises(PipelineError, match=rf"{re.escape(str(source))}: the files add up to more than 5,000 bytes"):
        read_source("pets", DataParams(path=str(source), max_bytes=5_000, **cfg))


def test_kill_during_an_atomic_write_leaves_a_file_the_next_write_removes(tmp_path):
    target = tmp_path / "raw" / "toy.npz"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\nfrom pathlib import Path\nfrom imgcls.files import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(target)], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in target.parent.iterdir()]
    assert len(leftovers) == 1 and re.fullmatch(r"\.toy\.npz\.\w{8}\.npz", leftovers[0])
    (target.parent / ".toy.npz.notes").write_text("not ours")  # only atomic_path's own names are removed
    files.save_npz(target, x=np.zeros(3))
    assert sorted(p.name for p in target.parent.iterdir()) == [".toy.npz.notes", "toy.npz"]


# ---------------------------------------------------------------- out of memory
def test_out_of_memory_anywhere_in_a_stage_is_one_line(capsys):
    @stage_main
    def cuda_stage():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB of which 1.2 GiB is free.\nmore detail")

    @stage_main
    def host_stage():
        raise MemoryError()

    @stage_main
    def buggy_stage():
        raise RuntimeError("a bug, not the user's fault")

    assert run_main(cuda_stage) == 2
    assert error_line(capsys.readouterr()) == (
        "error: CUDA out of memory (Tried to allocate 20.00 GiB); lower the batch size (train.<run>.batch_size, "
        "embed.batch_size) or set train.<run>.device: cpu")
    assert run_main(host_stage) == 2
    assert "error: out of memory; lower data.<study>.limit" in error_line(capsys.readouterr())
    with pytest.raises(RuntimeError, match="a bug"):  # our bugs keep their traceback
        buggy_stage()


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    @stage_main
    def interrupted_stage():
        raise KeyboardInterrupt

    assert run_main(interrupted_stage) == 130
    assert error_line(capsys.readouterr()) == "error: interrupted"


# ---------------------------------------------------------------- stages as subprocesses
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A repository copy with mnist downloaded and preprocessed by the stage modules (no DVC)."""
    from tests.conftest import repo as make_repo

    repo = make_repo.__wrapped__(tmp_path_factory.mktemp("errors"))
    for stage in ("download", "preprocess"):
        result = repo.stage(stage, "mnist")
        assert result.returncode == 0, result.stderr
    return repo


def assert_one_error_line(result, expected: str):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stderr.rstrip().endswith(lines[0])


def other_study(repo) -> str:
    """A study (and run) with nothing downloaded yet: every stage of its chain lacks its input."""
    return next(name for name in repo.params["train"] if name != "mnist" and repo.params["train"][name]["data"] == name)


@pytest.mark.parametrize("module, expected", [
    ("preprocess", "raw data: {root}/data/raw/{study}.npz not found; run the earlier stages (dvc repro)"),
    ("train", "prepared data of {study}: {root}/data/prepared/{study}.npz not found"),
    ("embed", "not found"),
    ("tsne", "embeddings of {study}: {root}/data/embeddings/{study}.npz not found"),
    ("report", "report: {root}/metrics/"),
])
def test_stage_with_missing_input_prints_one_error_line(prepared, module, expected):
    study = other_study(prepared)
    args = () if module == "report" else (study,)
    assert_one_error_line(prepared.stage(module, *args), expected.format(root=prepared.root, study=study))


@pytest.mark.parametrize("change, module, expected", [
    ({"data.mnist.path": "/nonexistent/mnist.npz"}, "download", "data.mnist.path: /nonexistent/mnist.npz does not exist"),
    ({"train.mnist.epochz": 3}, "download", "params.yaml: train.mnist.epochz: Extra inputs are not permitted"),
    ({"train.mnist.lr": 1e12, "train.mnist.optimizer": "sgd"}, "train", "loss became non-finite in epoch 1"),
])
def test_stage_failure_prints_one_error_line_and_writes_nothing(prepared, tmp_path, change, module, expected):
    repo = prepared.copy(tmp_path / "copy")
    (repo.root / "data" / "raw" / "mnist.npz").unlink()
    repo.set_params(**change)
    assert_one_error_line(repo.stage(module, "mnist"), expected)
    assert not (repo.root / "data/raw/mnist.npz").exists()
    assert not (repo.root / "data/models/mnist.pt").exists() and not (repo.root / "metrics/mnist.json").exists()



OOM_FIT = """
import sys, torch, stages.train as train
def fit(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has 1 GiB free.")
train.fit = fit
train.main(sys.argv[1])
"""


def test_cuda_out_of_memory_in_training_suggests_a_smaller_batch(prepared):
    result = prepared.run(sys.executable, "-c", OOM_FIT, "mnist", check=False)
    batch = prepared.params["train"]["mnist"]["batch_size"]
    assert_one_error_line(result, f"train@mnist: CUDA out of memory; lower train.mnist.batch_size (now {batch})")
    assert not (prepared.root / "data/models/mnist.pt").exists()


# ---------------------------------------------------------------- SIGKILL during dvc repro
# The train stage stops itself (SIGSTOP) when it first writes its epoch history (tests/hooks), so
# the kill lands mid-run however fast the machine: racing a running stage lost on CI, where 20
# tiny epochs took 3 s.
KILL_EPOCHS = 3


def paused_stage(fifo: Path, dvc: subprocess.Popen) -> int | None:
    """The PID that the paused stage writes into `fifo`; None if dvc ends before any stage pauses."""
    def unblock_when_dvc_ends():
        dvc.wait()
        with contextlib.suppress(OSError), open(fifo, "w"):  # lets the reader's open return with nothing
            pass

    threading.Thread(target=unblock_when_dvc_ends, daemon=True).start()
    with open(fifo) as reader:
        written = reader.read()
    return int(written) if written else None


def test_training_killed_mid_run_is_not_accepted_and_the_next_repro_completes(repo, tmp_path):
    repo.set_params(**{"train.mnist.epochs": KILL_EPOCHS})
    repo.commit("many epochs")
    repo.dvc("repro", "preprocess@mnist")
    fifo = tmp_path / "paused.fifo"
    os.mkfifo(fifo)
    log = tmp_path / "repro.log"  # a file, not a pipe: a full pipe would block dvc before the pause
    with open(log, "w") as out:
        dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@mnist"], cwd=repo.root,
                               env={**repo.env, "IMGCLS_PAUSE_FIFO": str(fifo)}, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed = paused_stage(fifo, dvc)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
            dvc.wait(timeout=120)
        finally:
            if dvc.poll() is None:
                os.killpg(dvc.pid, signal.SIGKILL)
    output = log.read_text()
    assert killed is not None, output
    assert dvc.returncode != 0
    assert not (repo.root / "data/models/mnist.pt").exists()
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    assert "train@mnist" not in lock["stages"]
    assert "train@mnist" in repo.status("train@mnist")
    assert repo.stages_run("repro", "train@mnist") == {"train@mnist"}
    assert repo.status("train@mnist") == {}
    assert json.loads((repo.root / "metrics/mnist.json").read_text())["epochs"] == KILL_EPOCHS
