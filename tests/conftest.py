"""Shared fixtures: tiny generated datasets and throw-away copies of the repository."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
# What a stage needs to run: everything git tracks except tests and docs.
REPO_FILES = ("stages", "imgcls", "sources", "dvc.yaml", "params.yaml", "reference.yaml", "manifests", ".dvc/config", ".dvc/.gitignore", ".dvc/plots",
              ".dvcignore", ".gitignore")
HOOKS = ROOT / "tests" / "hooks"  # sitecustomize: which stages ran, and a pause for the kill test
TEST_IMAGE_SIZE = 48  # cap on generated image sides: ImageNet backbones take any size >= 32


def class_pattern_images(n: int, size: int, channels: int, n_classes: int, seed: int):
    """Learnable toy images: each class lights up its own square of the image, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    cell = size // 4
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 16, 4)
        images[i, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = 230
    return (images[..., 0] if channels == 1 else images), labels.astype(np.uint8)


def write_npz(path: Path, n_train=200, n_test=100, size=28, channels=1, n_classes=10, **overrides) -> Path:
    x_train, y_train = class_pattern_images(n_train, size, channels, n_classes, 0)
    x_test, y_test = class_pattern_images(n_test, size, channels, n_classes, 1)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def imagefolder_files(n_per_class=6, size=32, classes=("cat", "dog"), validation="validation", channels=3):
    """{relative path: encoded bytes} of a tiny ImageFolder tree."""
    files = {}
    for split, seed in (("train", 0), (validation, 1)):
        images, labels = class_pattern_images(n_per_class * len(classes), size, channels, len(classes), seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            files[f"{split}/{classes[label]}/{i}.png"] = png_bytes(image)
    return files


def write_tree(root: Path, files: dict) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_zip(path: Path, files: dict) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return write_npz(tmp_path / "tiny-mnist.npz")


class Repo:
    """A git + DVC repository copied from this one into a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.stage_log = root.parent / f".{root.name}.stages"  # outside the repository: no DVC or git sees it
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "IMGCLS_STAGE_LOG": str(self.stage_log),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))}

    def run(self, *args, check=True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args, check=True):
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def stages_run(self, *args) -> set[str]:
        """Run `dvc *args`; the stages whose commands ran meanwhile, as the stage processes
        recorded them (tests/hooks), not as DVC words its output."""
        self.stage_log.write_text("")
        self.dvc(*args)
        return set(self.stage_log.read_text().split())

    def status(self, *targets) -> dict:
        """`dvc status --json`: {} when every stage is up to date."""
        return json.loads(self.dvc("status", "--json", *targets).stdout)

    def stage(self, module: str, *args, check=False):
        return self.run(sys.executable, "-m", f"stages.{module}", *args, check=check)

    @property
    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, **updates) -> None:
        """Set dotted keys, e.g. set_params(**{"train.mnist.epochs": 2})."""
        params = self.params
        for dotted, value in updates.items():
            *parents, last = dotted.split(".")
            node = params
            for key in parents:
                node = node[key]
            node[last] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def copy(self, dest: Path) -> "Repo":
        """A copy of the whole repository (git history, DVC cache and outputs) at `dest`."""
        shutil.copytree(self.root, dest, symlinks=True)
        return Repo(dest)

    def commit(self, message="update"):
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


@pytest.fixture
def repo(tmp_path) -> Repo:
    """A fresh repository with the pipeline and tiny generated data for every study (1 epoch)."""
    root = tmp_path / "repo"
    for name in REPO_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    repo = Repo(root)
    data = tmp_path / "inputs"
    data.mkdir()
    updates = {"tsne.max_points": 60, "tsne.perplexity": 5}
    for study, cfg in repo.params["data"].items():
        if cfg["channels"] == 1:
            path = write_npz(data / f"{study}.npz", n_train=120, n_test=60, size=28, channels=1)
            updates.update({f"data.{study}.source": "npz", f"data.{study}.path": str(path)})
        else:
            classes = cfg.get("classes") or ["alpha", "beta"]
            size = min(cfg.get("image_size") or 32, TEST_IMAGE_SIZE)
            files = imagefolder_files(n_per_class=12 if len(classes) <= 2 else 6, size=size, classes=classes)
            path = write_zip(data / f"{study}.zip", files)
            updates.update({f"data.{study}.source": "imagefolder", f"data.{study}.path": str(path),
                            f"data.{study}.subdir": None,
                            f"data.{study}.image_size": size if cfg.get("image_size") else None})
        updates.update({f"data.{study}.sha256": None, f"data.{study}.copy_sha256": None, f"data.{study}.limit": None,
                        f"data.{study}.manifest": None})
    for run, cfg in repo.params["train"].items():
        updates[f"train.{run}.epochs"] = 1
        if cfg.get("input_size"):
            updates[f"train.{run}.input_size"] = 32
        if cfg.get("warmup_epochs"):
            updates[f"train.{run}.warmup_epochs"] = 0.5
    repo.set_params(**updates)
    repo.run("git", "init", "-q")
    repo.commit("initial")
    return repo


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Repo:
    """One full `dvc repro` of the tiny repository, shared by the tests of every module that
    only read it or work on their own copy (the DAG holds several studies: run it once)."""
    shared = repo.__wrapped__(tmp_path_factory.mktemp("pipeline"))
    shared.dvc("repro")
    shared.commit("reproduced")
    return shared


@pytest.fixture(scope="session")
def two_epochs(reproduced, tmp_path_factory) -> Repo:
    """A copy of `reproduced` with a second commit: mnist trained for 2 epochs through tsne@mnist.
    For tests that compare two revisions and change nothing."""
    repo = reproduced.copy(tmp_path_factory.mktemp("two-epochs") / "repo")
    repo.set_params(**{"train.mnist.epochs": 2})
    repo.dvc("repro", "tsne@mnist")
    repo.commit("two epochs")
    return repo
