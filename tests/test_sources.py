"""Every data source on small generated files, and the one-line errors for bad input."""
import functools
import shutil
import hashlib
import http.server
import tarfile
import threading

import numpy as np
import pytest

from imgcls.errors import PipelineError
from imgcls.params import DataParams
from imgcls.sources import load_raw, read_source, save_raw
from tests.conftest import imagefolder_files, write_npz, write_tree, write_zip


def npz_params(path, **extra):
    return DataParams(source="npz", path=str(path), channels=1, **extra)


def folder_params(path, **extra):
    return DataParams(source="imagefolder", path=str(path), channels=3, **extra)


def assert_tiny_folder(dataset, n_per_class=6):
    assert dataset.classes == ["cat", "dog"]
    for split in dataset.splits.values():
        assert len(split) == 2 * n_per_class
        assert sorted(np.bincount(split.labels).tolist()) == [n_per_class, n_per_class]
        assert all(name.split("/")[0] in ("train", "validation", "test") for name in split.names)


def test_npz_source_keeps_pixels_and_labels(tiny_npz):
    dataset = read_source("mnist", npz_params(tiny_npz))
    original = np.load(tiny_npz)
    assert dataset.classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(dataset.splits["train"].pixels[..., 0], original["x_train"])
    np.testing.assert_array_equal(dataset.splits["validation"].labels, original["y_test"])


def test_raw_form_round_trips(tmp_path, tiny_npz):
    for dataset in (read_source("mnist", npz_params(tiny_npz)),
                    read_source("pets", folder_params(write_tree(tmp_path / "tree", imagefolder_files())))):
        save_raw(dataset, tmp_path / "raw.npz")
        again = load_raw(tmp_path / "raw.npz")
        assert again.classes == dataset.classes
        for name, split in dataset.splits.items():
            np.testing.assert_array_equal(again.splits[name].labels, split.labels)
            assert again.splits[name].files == split.files


def test_imagefolder_directory(tmp_path):
    assert_tiny_folder(read_source("pets", folder_params(write_tree(tmp_path / "tree", imagefolder_files()))))


def test_imagefolder_zip_with_top_folder_and_test_split(tmp_path):
    files = {f"export/pets/{name}": data for name, data in imagefolder_files(validation="test").items()}
    dataset = read_source("pets", folder_params(write_zip(tmp_path / "pets.zip", files)))
    assert_tiny_folder(dataset)


def test_imagefolder_tar_gz(tmp_path):
    tree = write_tree(tmp_path / "tree", imagefolder_files())
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "validation", arcname="validation")
    assert_tiny_folder(read_source("pets", folder_params(archive)))


def test_url_source_through_local_http_server(tmp_path, tiny_npz):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_npz.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{tiny_npz.name}"
        digest = hashlib.sha256(tiny_npz.read_bytes()).hexdigest()
        dataset = read_source("mnist", npz_params(url, sha256=digest))
        assert len(dataset.splits["train"]) == 200
        with pytest.raises(PipelineError, match="cannot fetch"):
            read_source("mnist", npz_params(url + ".missing"))
    finally:
        server.shutdown()


def test_sha256_mismatch_names_the_file(tiny_npz):
    with pytest.raises(PipelineError, match=f"sha256 mismatch for {tiny_npz}"):
        read_source("mnist", npz_params(tiny_npz, sha256="0" * 64))


def test_missing_path(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        read_source("mnist", npz_params(tmp_path / "nope.npz"))


def test_corrupt_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(PipelineError, match="not a readable npz"):
        read_source("mnist", npz_params(bad))


@pytest.mark.parametrize("override, message", [
    ({"x_train": np.zeros((5, 28), np.uint8)}, "must have shape"),
    ({"x_train": np.zeros((200, 28, 28), np.float32)}, "must be uint8"),
    ({"y_train": np.zeros(7, np.uint8)}, "labels must be 200 integers"),
    ({"y_test": None}, "missing array"),
])
def test_wrong_arrays(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(PipelineError, match=message):
        read_source("mnist", npz_params(path))


def test_imagefolder_without_train_split(tmp_path):
    files = {name.replace("train/", "training/"): data for name, data in imagefolder_files().items()}
    with pytest.raises(PipelineError, match="no train/<class>/<image>"):
        read_source("pets", folder_params(write_tree(tmp_path / "tree", files)))


def test_imagefolder_without_validation_split(tmp_path):
    files = {name: data for name, data in imagefolder_files().items() if name.startswith("train/")}
    with pytest.raises(PipelineError, match="no validation split"):
        read_source("pets", folder_params(write_tree(tmp_path / "tree", files)))


def test_imagefolder_class_sets_must_agree(tmp_path):
    files = {name.replace("validation/dog/", "validation/wolf/"): data for name, data in imagefolder_files().items()}
    with pytest.raises(PipelineError, match="differ from validation classes"):
        read_source("pets", folder_params(write_tree(tmp_path / "tree", files)))


def test_imagefolder_with_one_class_is_refused(tmp_path):
    files = {name: data for name, data in imagefolder_files().items() if "/dog/" not in name}
    with pytest.raises(PipelineError, match=r"need at least two class folders, found \['cat'\]"):
        read_source("pets", folder_params(write_tree(tmp_path / "tree", files)))


def test_zip_slip_member_is_refused(tmp_path):
    files = {**imagefolder_files(), "../evil.png": b"x"}
    with pytest.raises(PipelineError, match="unsafe archive member"):
        read_source("pets", folder_params(write_zip(tmp_path / "evil.zip", files)))
    assert not (tmp_path / "evil.png").exists()


def test_truncated_archive(tmp_path):
    archive = write_zip(tmp_path / "pets.zip", imagefolder_files())
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(PipelineError, match="cut.zip"):
        read_source("pets", folder_params(truncated))


# ---------------------------------------------------------------- local copies by checksum (IMGCLS_DATASETS)
def test_copies_folder_that_is_not_a_folder_stops(tmp_path, monkeypatch, tiny_npz):
    monkeypatch.setenv("IMGCLS_DATASETS", str(tiny_npz))
    with pytest.raises(PipelineError, match=r"^IMGCLS_DATASETS=.*tiny-mnist\.npz: not a directory$"):
        read_source("mnist", npz_params(tiny_npz, copy_sha256="a" * 64))


def test_no_copy_with_the_checksum_and_no_path_names_both(tmp_path, monkeypatch, tiny_npz):
    (tmp_path / "copies").mkdir()
    shutil.copy(tiny_npz, tmp_path / "copies" / "other.npz")  # bytes with another checksum
    monkeypatch.setenv("IMGCLS_DATASETS", str(tmp_path / "copies"))
    cfg = DataParams(source="imagefolder", path=None, channels=3, copy_sha256="a" * 64)
    with pytest.raises(PipelineError, match=r"^data\.pets: no file with copy_sha256 aaaaaaaaaaaa… in the local "
                                            r"copies folder \(IMGCLS_DATASETS=.*copies\) and no `path`$"):
        read_source("pets", cfg)


def test_failed_torchvision_download_says_where_a_local_copy_goes(monkeypatch):
    """No network here, and none anywhere for this test: every URL goes to a closed local port."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("IMGCLS_DATASETS", raising=False)
    cfg = DataParams(source="torchvision", dataset="MNIST", channels=1, copy_sha256="b" * 64)
    with pytest.raises(PipelineError, match=r"^data\.mnist: torchvision MNIST download failed \(.*\); offline, put "
                                            r"the file with copy_sha256 bbbbbbbbbbbb… in the folder that "
                                            r"IMGCLS_DATASETS names$"):
        read_source("mnist", cfg)
