"""params.yaml and reference.yaml as loaded; bad values: tests/test_errors.py."""
import pytest

from imgcls import params
from imgcls.errors import PipelineError
from tests.conftest import ROOT


def test_committed_params_are_valid():
    loaded = params.load(ROOT / "params.yaml")
    assert loaded.train["mnist"].epochs == 10
    assert loaded.train["mnist"].model.dropout_conv == 0.25


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
