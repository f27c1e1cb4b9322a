"""Every path the pipeline reads or writes, in one place (cookiecutter-data-science style).

Stages receive a study name (``mnist``) or a run name (``mnist``, ``avp_finetune``) and ask
this module where things live, so dvc.yaml and the code cannot drift apart silently.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
DATA = ROOT / "data"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"
REPORT = ROOT / "report"


def manifest(location: str) -> Path:
    """A data manifest named in params (`data.<study>.manifest`), relative to the repository."""
    return ROOT / location


def raw(study: str) -> Path:
    """Canonical raw copy of a study's data, whatever its source (written by download)."""
    return DATA / "raw" / f"{study}.npz"


def prepared(study: str) -> Path:
    """Decoded uint8 tensors and normalisation statistics (written by preprocess)."""
    return DATA / "prepared" / f"{study}.npz"


def data_metrics(study: str) -> Path:
    return METRICS / f"data_{study}.json"


def model(run: str) -> Path:
    return DATA / "models" / f"{run}.pt"


def architecture(run: str) -> Path:
    return DATA / "models" / f"{run}_architecture.csv"


def train_metrics(run: str) -> Path:
    return METRICS / f"{run}.json"


def live(run: str) -> Path:
    """DVCLive directory with the per-epoch history (plots/<run>/live/plots/metrics/...)."""
    return PLOTS / run / "live"


def learning_curves_png(run: str) -> Path:
    return PLOTS / run / "learning_curves.png"


def embeddings(run: str) -> Path:
    return DATA / "embeddings" / f"{run}.npz"


def predictions(run: str) -> Path:
    """Validation labels and predictions as class names, for DVC's confusion template."""
    return PLOTS / run / "predictions.csv"


def confusion_png(run: str) -> Path:
    return PLOTS / run / "confusion.png"


def tsne_csv(run: str) -> Path:
    return PLOTS / run / "tsne.csv"


def tsne_png(run: str) -> Path:
    return PLOTS / run / "tsne.png"


def tsne_metrics(run: str) -> Path:
    return METRICS / f"tsne_{run}.json"


def report_md() -> Path:
    return REPORT / "report.md"
