"""params.yaml, validated in one place before any stage does work.

Every key the pipeline reads is declared here; an unknown key, a wrong type or an
out-of-range value stops the stage with one line naming the key.  Pydantic does the
checking (it ships with DVC), so this module stays a plain declaration of the config.
"""
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages import paths
from stages.errors import PipelineError

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Strict):
    """Where a study's images come from and how they are decoded."""

    source: Literal["torchvision", "npz", "imagefolder"]
    dataset: Optional[Literal["MNIST", "CIFAR10"]] = None  # torchvision class, for source torchvision
    path: Optional[str] = None  # local path or http(s) URL, for npz / imagefolder
    sha256: Optional[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = None
    subdir: Optional[str] = None  # folder inside an archive/dir holding train/ and validation/
    classes: Optional[list[str]] = None  # names of label 0..K-1 for array sources
    channels: Literal[1, 3] = 3
    image_size: Optional[PositiveInt] = None  # null: keep native size (must be uniform)
    limit: Optional[PositiveInt] = None  # stratified cap on images per split; null = all

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "torchvision" and self.dataset is None:
            raise ValueError("source torchvision needs `dataset` (MNIST or CIFAR10)")
        if self.source in ("npz", "imagefolder") and not self.path:
            raise ValueError(f"source {self.source} needs `path` (a local path or http(s) URL)")
        return self


class SimpleCNNParams(Strict):
    name: Literal["simple_cnn"]
    dropout_conv: Probability = 0.25
    dropout_fc: Probability = 0.5


class AlexNetParams(Strict):
    name: Literal["alexnet"]
    dropout_fc: Probability = 0.5


ModelParams = Annotated[Union[SimpleCNNParams, AlexNetParams], Field(discriminator="name")]


class AugmentParams(Strict):
    """Per-batch augmentation on uint8 tensors (training batches only)."""

    crop_padding: Annotated[int, Field(ge=0)] = 0  # random crop of the original size after zero padding
    flip: bool = False  # random horizontal flip


class TrainParams(Strict):
    data: str  # key of the `data` section
    model: ModelParams
    epochs: PositiveInt
    batch_size: PositiveInt = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only (Nesterov)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["constant", "onecycle"] = "constant"
    label_smoothing: Probability = 0.0
    augment: AugmentParams = AugmentParams()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"


class EmbedParams(Strict):
    batch_size: PositiveInt = 500


class TsneParams(Strict):
    perplexity: Annotated[float, Field(gt=0)] = 30.0
    seed: int = 0
    max_points: Annotated[int, Field(ge=10)] = 10000  # stratified cap on projected points
    pca_dims: PositiveInt = 50  # PCA before t-SNE, the usual speed-up on wide features


class Reference(Strict):
    """The seed report's figures for a run, printed next to ours in the report."""

    best_val_acc: Annotated[float, Field(ge=0, le=1)]
    best_epoch: Optional[PositiveInt] = None
    errors: Optional[int] = None
    note: str = ""


class Params(Strict):
    seed: int = 0
    data: dict[str, DataParams]
    train: dict[str, TrainParams]
    embed: EmbedParams = EmbedParams()
    tsne: TsneParams = TsneParams()
    reference: dict[str, Reference] = {}

    @model_validator(mode="after")
    def _cross_references(self):
        for run, cfg in self.train.items():
            if cfg.data not in self.data:
                raise ValueError(f"train.{run}.data: unknown study {cfg.data!r} (known: {', '.join(self.data)})")
        for run in self.reference:
            if run not in self.train:
                raise ValueError(f"reference.{run}: no such run in `train`")
        return self


def _format(err: ValidationError, source: Path) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{source.name}: {where + ': ' if where else ''}{message}"


def load(path: Path = paths.PARAMS) -> Params:
    """Read and validate the whole params file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path.name}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise PipelineError(_format(err, path)) from None


def study(params: Params, name: str) -> DataParams:
    if name not in params.data:
        raise PipelineError(f"unknown study {name!r}: params.yaml `data` has {', '.join(params.data)}")
    return params.data[name]


def run(params: Params, name: str) -> TrainParams:
    if name not in params.train:
        raise PipelineError(f"unknown run {name!r}: params.yaml `train` has {', '.join(params.train)}")
    return params.train[name]
