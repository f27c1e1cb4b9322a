"""Working as a team (docs/team.md): a shared remote with the run-cache, experiments and
queued sweeps, reproducible CPU runs and the multi-seed table, on the mnist chain only
(tiny data, 1 epoch) in throw-away repositories and clones of them."""
import contextlib
import hashlib
import json
import os

import pytest
import torch
import yaml

from imgcls.paths import ROOT, learning_curve
from imgcls.training import select_runtime

RUNS = ("mnist", "mnist_seed1")  # one run and a seed replica of it
S3_KEYS = {"AWS_ACCESS_KEY_ID": "team-test-key", "AWS_SECRET_ACCESS_KEY": "team-test-secret"}


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def clone(origin, dest):
    """`git clone` of the origin: code, params and dvc.lock, no data and an empty DVC cache."""
    origin.run("git", "clone", "-q", str(origin.root), str(dest))
    return type(origin)(dest)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """The mnist chain (with one seed replica) reproduced, committed and pushed with its
    run-cache to a local-directory remote, as the first teammate would."""
    from tests.conftest import repo as make_repo

    repo = make_repo.__wrapped__(tmp_path_factory.mktemp("team"))
    params = repo.params
    params["data"] = {"mnist": params["data"]["mnist"]}
    params["train"] = {run: params["train"][run] for run in RUNS}
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repo.dvc("repro")
    storage = tmp_path_factory.mktemp("team-storage")
    repo.dvc("remote", "add", "-d", "team", str(storage))
    repo.commit("mnist chain and the team remote")
    repo.dvc("push", "--run-cache")
    return repo


def test_pull_from_a_directory_remote_restores_everything(origin, tmp_path):
    teammate = clone(origin, tmp_path / "teammate")
    teammate.dvc("pull")
    assert teammate.status() == {}
    assert teammate.stages_run("repro") == set()
    for path in ("data/models/mnist.pt", "metrics/mnist.json", "plots/mnist/tsne/plots/images/tsne.png", "report/report.md"):
        assert md5(teammate.root / path) == md5(origin.root / path)


def test_repro_pull_allow_missing_on_an_empty_cache(origin, tmp_path):
    teammate = clone(origin, tmp_path / "teammate")
    assert teammate.stages_run("repro", "--pull", "--allow-missing") == set()
    assert not (teammate.root / "data" / "models").exists()  # it checked the commit without downloading


@contextlib.contextmanager
def moto_s3_server():
    """moto's S3 server in a thread of this process, on a free port of 127.0.0.1; start() returns
    once it listens, so nothing polls."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def without_aws_credentials(repo, tmp_path):
    """No AWS variable, no ~/.aws files, and never the EC2 metadata address (botocore's last resort)."""
    repo.env = {key: value for key, value in repo.env.items() if not key.startswith("AWS_")}
    repo.env.update({"AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
                     "AWS_CONFIG_FILE": str(tmp_path / "no-config")})
    return repo


def test_s3_remote_round_trip_with_run_cache(origin, tmp_path):
    import boto3

    with moto_s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="team-dvc")
        first = without_aws_credentials(clone(origin, tmp_path / "first"), tmp_path)
        first.dvc("pull", "-r", "team")
        first.dvc("remote", "add", "-d", "s3", "s3://team-dvc/cache")
        first.commit("team remote on S3")
        first.dvc("remote", "modify", "--local", "s3", "endpointurl", endpoint)
        first.env.update(S3_KEYS)
        first.dvc("push", "--run-cache")

        second = without_aws_credentials(clone(first, tmp_path / "second"), tmp_path)
        committed = (second.root / ".dvc" / "config").read_text()
        assert "s3://team-dvc/cache" in committed and endpoint not in committed
        assert not any(secret in committed for secret in S3_KEYS.values())
        second.dvc("remote", "modify", "--local", "s3", "endpointurl", endpoint)
        assert second.dvc("pull", check=False).returncode != 0  # the credentials are in no config file
        second.env.update(S3_KEYS)
        second.dvc("pull")
        assert second.status() == {}
        assert second.stages_run("repro") == set()
        assert md5(second.root / "data/models/mnist.pt") == md5(origin.root / "data/models/mnist.pt")


def test_a_param_change_already_pushed_is_a_run_cache_hit(origin, tmp_path):
    change = {"train.mnist.model.dropout_fc": 0.3}
    first = clone(origin, tmp_path / "first")
    first.dvc("pull")
    first.set_params(**change)
    assert "train@mnist" in first.stages_run("repro")
    first.dvc("push", "--run-cache")

    second = clone(origin, tmp_path / "second")
    second.dvc("pull")
    second.set_params(**change)
    # fetches the run-cache and the outputs it names: first's outputs, nothing trained again
    assert second.stages_run("repro", "--pull") == set()
    for path in ("data/models/mnist.pt", "data/embeddings/mnist.npz", "metrics/tsne_mnist.json"):
        assert md5(second.root / path) == md5(first.root / path), path
    assert second.status() == {}

    # committed and pushed, the change reaches a clone of first: pull, nothing to run, diff with HEAD~1
    first.commit("dropout 0.3")
    third = clone(first, tmp_path / "third")
    third.dvc("pull")
    assert third.status() == {}
    assert third.stages_run("repro") == set()
    diff = json.loads(third.dvc("metrics", "diff", "HEAD~1", "--json").stdout)
    assert "final_val_loss" in diff["metrics/mnist.json"]


def test_two_cpu_runs_give_identical_weights_and_metrics(origin, tmp_path):
    again = clone(origin, tmp_path / "again")
    again.dvc("pull")
    chain = ("train@mnist", "embed@mnist", "tsne@mnist")
    assert again.stages_run("repro", "--force", "--single-item", *chain) == set(chain)
    for path in ("data/models/mnist.pt", "data/embeddings/mnist.npz", "metrics/tsne_mnist.json"):
        assert md5(again.root / path) == md5(origin.root / path), path
    assert json.loads((origin.root / "metrics/mnist.json").read_text()) == \
        json.loads((again.root / "metrics/mnist.json").read_text())


def test_report_summarises_seed_replicas(origin):
    assert md5(origin.root / "data/models/mnist.pt") != md5(origin.root / "data/models/mnist_seed1.pt")
    report = (origin.root / "report/report.md").read_text()
    section = report.split("## Variation over random seeds", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| mnist |"))
    assert "| 2 | 0, 1 |" in row and row.count("±") == 3
    assert "## mnist:" in report and "## mnist_seed1:" not in report  # the replica has no section of its own
    assert "| mnist_seed1 |" in report.split("## Variation over random seeds")[0]  # but is in the summary


def exp_results(repo) -> dict[str, dict]:
    """{experiment name: its `dvc exp show --json` data} for the experiments of HEAD."""
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    return {rev["name"]: rev["data"] for entry in shown for exp in entry.get("experiments") or []
            for rev in exp["revs"] if rev.get("name")}


def test_experiments_set_param_and_queued_sweep(origin, tmp_path):
    repo = clone(origin, tmp_path / "exps")
    repo.dvc("pull")
    assert repo.stages_run("exp", "run", "-n", "epochs2", "-S", "train.mnist.epochs=2", "train@mnist") == {"train@mnist"}
    for name, rate in (("drop02", 0.2), ("drop04", 0.4)):
        repo.dvc("exp", "run", "--queue", "-n", name, "-S", f"train.mnist.model.dropout_fc={rate}", "train@mnist")
    repo.dvc("queue", "start", "-j", "1")
    for name in ("drop02", "drop04"):
        repo.dvc("queue", "logs", "--follow", name)  # returns when that task has ended

    results = exp_results(repo)
    assert {"epochs2", "drop02", "drop04"} <= set(results)
    assert results["epochs2"]["metrics"]["metrics/mnist.json"]["data"]["epochs"] == 2
    for name, rate in (("drop02", 0.2), ("drop04", 0.4)):
        assert results[name]["params"]["params.yaml"]["data"]["train"]["mnist"]["model"]["dropout_fc"] == rate
    metrics = json.loads(repo.dvc("metrics", "diff", "drop02", "drop04", "--json").stdout)
    assert "final_val_loss" in metrics["metrics/mnist.json"]
    params = json.loads(repo.dvc("params", "diff", "drop02", "drop04", "--json").stdout)
    change = params["params.yaml"]["train.mnist.model.dropout_fc"]
    assert (change["old"], change["new"]) == (0.2, 0.4)
    plots = json.loads(repo.dvc("plots", "diff", "drop02", "drop04", "--json").stdout)
    (losses,) = plots["data"][str(learning_curve("mnist", "loss").relative_to(ROOT))]
    losses = losses["content"]["data"]["values"]
    assert {row["rev"] for row in losses} == {"drop02", "drop04"}


def test_deterministic_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        select_runtime("cpu", "fp32", "off", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        select_runtime("cpu", "fp32", "off")
    assert not torch.are_deterministic_algorithms_enabled()
