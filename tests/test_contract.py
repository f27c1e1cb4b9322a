"""The DVC contract on every clone: the committed dvc.lock describes the committed code and
params, each stage depends on every module its command imports, local data are dependencies,
and no tracked file names this machine."""
import ast
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, Repo, write_npz

PROJECT_PACKAGES = ("stages", "imgcls")


def tracked_files() -> list[str]:
    """What a clone gets: tracked files, plus new ones not yet committed (so the check runs before a commit)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def imported_modules(path: Path) -> set[str]:
    """Dotted names a module imports anywhere (top level or inside functions), `from a import b` as a and a.b."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_closure(entry: str) -> set[str]:
    """Every project file the module `entry` imports, transitively, itself included."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(ROOT / path):
            candidate = Path(*name.split(".")).with_suffix(".py")
            if name.split(".")[0] in PROJECT_PACKAGES and (ROOT / candidate).is_file():
                todo.append(candidate.as_posix())
    return seen


def stage_definitions() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def command_module(stage: dict) -> str:
    command = stage.get("do", stage)["cmd"].split()
    assert command[:2] == ["python", "-m"], command
    return command[2].replace(".", "/") + ".py"


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_stage_deps_are_the_import_closure_of_its_command(name):
    stage = stage_definitions()[name]
    body = stage.get("do", stage)
    code_deps = {dep for dep in body["deps"] if dep.split("/")[0] in PROJECT_PACKAGES}
    assert code_deps == import_closure(command_module(stage))


def test_no_tracked_file_names_this_machine():
    places = {str(ROOT), str(ROOT.parent), str(Path.home())} - {"/", ""}
    offenders = [f"{name}: {place}" for name in tracked_files()
                 for place in places if f"{place}/" in (ROOT / name).read_text(errors="ignore")]
    assert offenders == []


def fresh_copy(dest: Path) -> Repo:
    """The repository as a clone in another directory gets it: tracked files only, no outputs, no cache."""
    for name in tracked_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    repo = Repo(dest)
    repo.run("git", "init", "-q")
    return repo


def test_committed_lock_matches_params_commands_and_data(tmp_path):
    """On a fresh copy, `dvc status` may report outputs not yet pulled (and the data deps they are),
    never a changed param, command or data file. Code deps are left out: only reproducing the
    stages refreshes them, and the closing note of a change names any stage left stale."""
    status = json.loads(fresh_copy(tmp_path / "clone").dvc("status", "--json").stdout)
    problems = []
    for stage, entries in status.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                problems.append(f"{stage}: {entry}")
                continue
            for dep, state in (entry.get("changed deps") or {}).items():
                if isinstance(state, dict):
                    problems += [f"{stage}: param {key} {change}" for key, change in state.items()]
                elif dep.split("/")[0] not in PROJECT_PACKAGES and state != "deleted":
                    problems.append(f"{stage}: dep {dep} {state}")
            for out, state in (entry.get("changed outs") or {}).items():
                if state not in ("not in cache", "deleted"):
                    problems.append(f"{stage}: out {out} {state}")
            problems += [f"{stage}: {key}" for key in entry if key not in ("changed deps", "changed outs")]
    assert problems == [], "dvc.lock is stale: reproduce and commit it with the params and commands that made it"


def test_a_local_copy_found_by_checksum_stands_in_for_the_source(repo, tmp_path):
    """Offline route: the same params on every machine; the copy's folder is per machine (env)."""
    copies = tmp_path / "copies"
    copies.mkdir()
    copy = write_npz(copies / "any-name.npz")
    checksum = hashlib.sha256(copy.read_bytes()).hexdigest()
    repo.set_params(**{"data.mnist.source": "torchvision", "data.mnist.dataset": "MNIST", "data.mnist.path": None,
                       "data.mnist.copy_sha256": checksum})
    missing = repo.stage("download", "mnist")
    assert missing.returncode == 2 and checksum[:12] in missing.stderr
    repo.env["IMGCLS_DATASETS"] = str(copies)
    repo.stage("download", "mnist", check=True)
    from_copy = (repo.root / "data/raw/mnist.npz").read_bytes()
    repo.set_params(**{"data.mnist.source": "npz", "data.mnist.path": str(copy), "data.mnist.copy_sha256": None})
    repo.stage("download", "mnist", check=True)
    assert (repo.root / "data/raw/mnist.npz").read_bytes() == from_copy  # same bytes in, same raw copy out


def test_changing_a_local_source_under_sources_reruns_its_download(repo):
    source = write_npz(repo.root / "sources" / "digits.npz")
    repo.set_params(**{"data.mnist.path": "sources/digits.npz"})
    repo.dvc("repro", "preprocess@mnist")
    assert json.loads(repo.dvc("status", "--json", "download@mnist").stdout) == {}
    with np.load(source) as arrays:
        relabelled = {key: arrays[key] for key in arrays.files}
    relabelled["y_train"] = (relabelled["y_train"] + 1) % 10
    np.savez(source, **relabelled)
    status = json.loads(repo.dvc("status", "--json", "download@mnist").stdout)
    assert status["download@mnist"][0]["changed deps"] == {"sources": "modified"}
