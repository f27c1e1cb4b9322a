"""Bad input, faults and safety (docs/errors.md): every case ends in one `error:` line and no
output a later `dvc repro` could take for good data, or in a counted skip recorded in metrics."""
import ast
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
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imgcls import download, embed, files, params, paths, preprocess, sources, tsne
from imgcls.errors import PipelineError, stage_main
from imgcls.params import DataParams
from imgcls.images import UnusableImage, decode_file
from imgcls.sources import read_source
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


# ---------------------------------------------------------------- archives and folders
@pytest.mark.parametrize("kind", ["tar.gz", "npz"])
def test_truncated_archive_stops(tmp_path, kind):
    if kind == "npz":
        whole, cfg = write_npz(tmp_path / "whole.npz"), dict(source="npz", channels=1)
    else:
        tree = write_tree(tmp_path / "tree", imagefolder_files())
        whole, cfg = tmp_path / "whole.tar.gz", dict(source="imagefolder", channels=3)
        with tarfile.open(whole, "w:gz") as tar:
            tar.add(tree, arcname=".")
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(PipelineError, match=r"cut\.(tar\.gz: unreadable or truncated archive|npz is not a readable)"):
        read_source("pets", DataParams(path=str(cut), **cfg))


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
    metrics = json.loads(paths.data_metrics("pets").read_text())
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
    assert not paths.prepared("pets").exists() and not paths.data_metrics("pets").exists()


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
            if name in ("torch.load", "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"):
                loads += 1
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name} without weights_only=True")
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
    with pytest.raises(PipelineError, match=r"embed@toy: .*toy\.pt is not a checkpoint train@toy wrote \(UnpicklingError"):
        embed.load_model("toy")
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(workspace):
    workspace({"toy": {"source": "npz", "path": "unused.npz", "channels": 1}})
    paths.model("toy").parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, paths.model("toy"))
    paths.model("toy").write_bytes(paths.model("toy").read_bytes()[:500])
    with pytest.raises(PipelineError, match=r"is not a checkpoint train@toy wrote .*rerun train@toy"):
        embed.load_model("toy")


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


def copy_of(repo, tmp_path):
    copy = type(repo)(tmp_path / "copy")
    shutil.copytree(repo.root, copy.root, symlinks=True)
    return copy


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
    repo = copy_of(prepared, tmp_path)
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
# The train stage stops itself (SIGSTOP) right after printing epoch 1, so the kill lands mid-run
# however fast the machine: racing a running stage lost on CI, where 20 tiny epochs took 3 s.
KILL_EPOCHS = 3
PAUSE_AFTER_FIRST_EPOCH = """
import builtins, os, pathlib, signal, sys

_print = builtins.print


def print(*args, **kwargs):
    _print(*args, **kwargs)
    if args and str(args[0]).startswith("train@mnist epoch 1:"):
        sys.stdout.flush()
        pid_file = pathlib.Path(os.environ["PAUSED_PID_FILE"])
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").replace(pid_file)
        os.kill(os.getpid(), signal.SIGSTOP)


builtins.print = print
"""


def test_training_killed_mid_run_is_not_accepted_and_the_next_repro_completes(repo, tmp_path):
    import psutil

    repo.set_params(**{"train.mnist.epochs": KILL_EPOCHS})
    repo.commit("many epochs")
    repo.dvc("repro", "preprocess@mnist")
    hook = tmp_path / "pause_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_AFTER_FIRST_EPOCH)
    # The hook names the paused process itself: with SHELL unset dvc runs the stage under a
    # forking /bin/sh whose command line also mentions stages.train.
    paused_pid_file = tmp_path / "paused.pid"
    env = {**repo.env, "PAUSED_PID_FILE": str(paused_pid_file),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), repo.env.get("PYTHONPATH")]))}
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@mnist"], cwd=repo.root, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed, seen = None, []
    try:
        for line in dvc.stdout:
            seen.append(line)
            if "train@mnist epoch 1:" in line:
                deadline = time.monotonic() + 30
                while not paused_pid_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                stage = psutil.Process(int(paused_pid_file.read_text()))
                while stage.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert stage.status() == psutil.STATUS_STOPPED
                killed = stage.pid
                os.kill(killed, signal.SIGKILL)
                break
        rest = dvc.communicate(timeout=120)[0]
    finally:
        if dvc.poll() is None:
            os.killpg(dvc.pid, signal.SIGKILL)
    assert killed is not None, "".join(seen)
    assert dvc.returncode != 0
    assert "train@mnist epoch 2:" not in rest
    assert not (repo.root / "data/models/mnist.pt").exists()
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    assert "train@mnist" not in lock["stages"]
    status = repo.dvc("status", "train@mnist").stdout
    assert "train@mnist" in status and "up to date" not in status
    output = repo.dvc("repro", "train@mnist").stdout
    assert "Running stage 'train@mnist'" in output
    assert "up to date" in repo.dvc("status", "train@mnist").stdout
    assert json.loads((repo.root / "metrics/mnist.json").read_text())["epochs"] == KILL_EPOCHS
