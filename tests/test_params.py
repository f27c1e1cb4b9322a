"""params.yaml validation: one line naming the key, before any work starts."""
import pytest
import yaml

from imgcls import params
from imgcls.errors import PipelineError
from tests.conftest import ROOT


def write(tmp_path, mutate):
    config = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(config)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_committed_params_are_valid():
    loaded = params.load(ROOT / "params.yaml")
    assert loaded.train["mnist"].epochs == 10
    assert loaded.train["mnist"].model.dropout_conv == 0.25


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["train"]["mnist"].update(epoch=3), r"train\.mnist\.epoch: Extra inputs are not permitted"),
    (lambda c: c["train"]["mnist"].update(epochs="ten"), r"train\.mnist\.epochs: Input should be a valid integer"),
    (lambda c: c["train"]["mnist"].update(epochs=-1), r"train\.mnist\.epochs: Input should be greater than 0"),
    (lambda c: c["train"]["mnist"]["model"].update(dropout_fc=1.0), r"dropout_fc: Input should be less than 1"),
    (lambda c: c["data"]["mnist"].update(source="ftp"), r"data\.mnist\.source: Input should be"),
    (lambda c: c["data"]["mnist"].update(source="npz", path=None, copy_sha256=None), r"source npz needs `path`"),
    (lambda c: c["train"]["mnist"].update(data="svhn"), r"train\.mnist\.data: unknown study 'svhn'"),
    (lambda c: c["train"]["mnist"]["model"].update(name="vgg"), r"train\.mnist\.model: Input tag 'vgg'"),
    (lambda c: c["tsne"].update(perplexity=0), r"tsne\.perplexity: Input should be greater than 0"),
])
def test_bad_params_give_one_line_naming_the_key(tmp_path, mutate, message):
    with pytest.raises(PipelineError, match=message) as err:
        params.load(write(tmp_path, mutate))
    assert "\n" not in str(err.value)


def test_unknown_run_and_study():
    loaded = params.load(ROOT / "params.yaml")
    with pytest.raises(PipelineError, match="unknown run 'svhn'"):
        params.run(loaded, "svhn")
    with pytest.raises(PipelineError, match="unknown study 'svhn'"):
        params.study(loaded, "svhn")


def test_reference_figures_are_validated_apart_from_params(tmp_path):
    assert params.load_reference()["mnist"].errors == 102
    bad = tmp_path / "reference.yaml"
    bad.write_text("mnist: {best_val_acc: 98.98}\n")
    with pytest.raises(PipelineError, match=r"reference\.yaml: mnist\.best_val_acc: Input should be less than or equal to 1"):
        params.load_reference(bad)
