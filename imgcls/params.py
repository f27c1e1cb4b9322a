"""params.yaml, validated in one place before any stage does work.

Every key the pipeline reads is declared here; an unknown key, a wrong type or an
out-of-range value stops the stage with one line naming the key.  Pydantic does the
checking (it ships with DVC), so this module stays a plain declaration of the config.
"""
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from imgcls import paths
from imgcls.errors import PipelineError



def _not_bool(value):
    """YAML's `true` would pass as the integer 1 (`epochs: true`): integers must be written as numbers."""
    if isinstance(value, bool):
        raise ValueError(f"Input should be a valid integer, not a boolean ({str(value).lower()})")
    return value


def _on_off(value):
    """YAML 1.1 reads a bare `on`/`off` as true/false (and DVC's `-S key=off` writes it bare)."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
Int = Annotated[int, BeforeValidator(_not_bool)]
PositiveInt = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=2**32 - 1)]  # numpy's and sklearn's seed range
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Strict):
    """Where a study's images come from and how they are decoded."""

    source: Literal["torchvision", "npz", "imagefolder"]
    dataset: Optional[Literal["MNIST", "CIFAR10"]] = None  # torchvision class, for source torchvision
    path: Optional[str] = None  # local path or http(s) URL, for npz / imagefolder
    sha256: Optional[Sha256] = None  # checksum of the file at `path`
    copy_sha256: Optional[Sha256] = None  # identity of a local copy that stands in for the source (README)
    subdir: Optional[str] = None  # folder inside an archive/dir holding train/ and validation/
    classes: Optional[list[str]] = None  # names of label 0..K-1 for array sources
    channels: Annotated[Literal[1, 3], BeforeValidator(_not_bool)] = 3
    image_size: Optional[PositiveInt] = None  # null: keep native size (must be uniform)
    limit: Optional[PositiveInt] = None  # stratified cap on images per split; null = all
    max_bytes: PositiveInt = 4 << 30  # cap on the decompressed source files, and on each split's decoded images
    manifest: Optional[str] = None  # per-file sha256 list (sha256sum format, paths from the split root)

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "torchvision" and self.dataset is None:
            raise ValueError("source torchvision needs `dataset` (MNIST or CIFAR10)")
        if self.source in ("npz", "imagefolder") and not (self.path or self.copy_sha256):
            raise ValueError(f"source {self.source} needs `path` (a local path or http(s) URL) or `copy_sha256`")
        if self.manifest and self.source != "imagefolder":
            raise ValueError("`manifest` lists image files, so it needs source imagefolder")
        return self


class SimpleCNNParams(Strict):
    name: Literal["simple_cnn"]
    dropout_conv: Probability = 0.25
    dropout_fc: Probability = 0.5


class AlexNetParams(Strict):
    name: Literal["alexnet"]
    dropout_fc: Probability = 0.5


class BackboneParams(Strict):
    """An ImageNet architecture with a new linear head; pretrained: start from ImageNet weights."""

    pretrained: bool = True
    drop_rate: Probability = 0.2  # dropout between the pooled features and the head


class EfficientNetLite0Params(BackboneParams):
    name: Literal["efficientnet_lite0"]


class ResNet18Params(BackboneParams):
    name: Literal["resnet18"]


class TimmParams(BackboneParams):
    """Any timm architecture by name; pretrained weights come from a local file pinned by sha256."""

    name: Literal["timm"]
    arch: str
    pretrained: bool = False
    weights: Optional[str] = None  # .safetensors or .pth, e.g. under sources/
    weights_sha256: Optional[Sha256] = None

    @model_validator(mode="after")
    def _weights_pinned(self):
        if self.pretrained and not (self.weights and self.weights_sha256):
            raise ValueError("pretrained timm weights load only from a local file: set `weights` and `weights_sha256`")
        return self


ModelParams = Annotated[Union[SimpleCNNParams, AlexNetParams, EfficientNetLite0Params, ResNet18Params, TimmParams],
                        Field(discriminator="name")]


class AugmentParams(Strict):
    """Per-batch augmentation on uint8 tensors (training batches only)."""

    crop_padding: Annotated[Int, Field(ge=0)] = 0  # random crop of the original size after zero padding
    flip: bool = False  # random horizontal flip
    resized_crop_scale: Optional[tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]]] = None
    # ^ random resized crop: area fraction range, e.g. [0.25, 1.0] (aspect 3/4..4/3); null = off
    color_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0  # brightness/contrast/saturation factor range 1 ± this

    @model_validator(mode="after")
    def _scale_order(self):
        if self.resized_crop_scale and self.resized_crop_scale[0] > self.resized_crop_scale[1]:
            raise ValueError("resized_crop_scale must be [low, high] with low <= high")
        return self

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.resized_crop_scale or self.color_jitter)


class TrainParams(Strict):
    data: str  # key of the `data` section
    model: ModelParams
    epochs: PositiveInt
    batch_size: PositiveInt = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only (Nesterov)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    schedule: Literal["constant", "onecycle", "warmup_cosine"] = "constant"
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0  # warmup_cosine: linear warm-up, then per-batch cosine to 0
    label_smoothing: Probability = 0.0
    augment: AugmentParams = AugmentParams()
    input_size: Optional[PositiveInt] = None  # resize batches on the device to this square size; null = as prepared
    method: Literal["gradient", "linear_svm"] = "gradient"  # linear_svm: frozen features + LinearSVC as the head
    svm_c: Annotated[float, Field(gt=0)] = 1.0  # linear_svm: the SVM's C
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: CUDA, then MPS, then CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = "auto"
    seed: Optional[Seed] = None  # overrides the global `seed`: runs differing only by it form the report's seed table
    deterministic: bool = False  # deterministic kernels only (CUDA: slower; see docs/team.md)
    nproc: PositiveInt = 1  # > 1: data-parallel under torchrun, one process per GPU (docs/distributed.md)
    nnodes: PositiveInt = 1  # machines running this stage together (the same command on each)
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous, for nnodes > 1

    @model_validator(mode="after")
    def _method_needs(self):
        if self.method == "linear_svm":
            if not getattr(self.model, "pretrained", False):
                raise ValueError("method linear_svm classifies frozen features: it needs a backbone model "
                                 "with pretrained: true")
            if self.epochs != 1:
                raise ValueError("method linear_svm fits once: set epochs to 1")
        world = self.nproc * self.nnodes
        if world > 1 and self.method != "gradient":
            raise ValueError("method linear_svm runs in one process: set nproc and nnodes to 1")
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is the global batch: it must split evenly over "
                             f"nproc x nnodes = {world} processes")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port reachable from every machine)")
        if self.warmup_epochs >= self.epochs and self.schedule == "warmup_cosine":
            raise ValueError("warmup_epochs must be smaller than epochs")
        return self


class EmbedParams(Strict):
    batch_size: PositiveInt = 500


class TsneParams(Strict):
    perplexity: Annotated[float, Field(gt=0)] = 30.0
    seed: Seed = 0
    max_points: Annotated[Int, Field(ge=10)] = 10000  # stratified cap on projected points
    pca_dims: PositiveInt = 50  # PCA before t-SNE, the usual speed-up on wide features

    @model_validator(mode="after")
    def _perplexity_fits(self):
        """t-SNE needs more than 3 x perplexity points; tsne.py checks the actual count again."""
        if self.perplexity * 3 >= self.max_points:
            raise ValueError(f"perplexity {self.perplexity:g} needs more than {3 * self.perplexity:g} points "
                             f"but max_points is {self.max_points}")
        return self


class Reference(Strict):
    """The reference report's figures for a run (reference.yaml), printed next to ours in the report."""

    best_val_acc: Annotated[float, Field(ge=0, le=1)]
    best_epoch: Optional[PositiveInt] = None
    errors: Optional[Annotated[Int, Field(ge=0)]] = None
    note: str = ""


class Params(Strict):
    seed: Seed = 0
    data: dict[str, DataParams]
    train: dict[str, TrainParams]
    embed: EmbedParams = EmbedParams()
    tsne: TsneParams = TsneParams()

    @model_validator(mode="after")
    def _cross_references(self):
        for run, cfg in self.train.items():
            if cfg.data not in self.data:
                raise ValueError(f"train.{run}.data: unknown study {cfg.data!r} (known: {', '.join(self.data)})")
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


def load_reference(path: Path = paths.REFERENCE) -> dict[str, Reference]:
    """reference.yaml, validated like params; runs it names that `train` lacks are simply not shown."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return TypeAdapter(dict[str, Reference]).validate_python(raw)
    except FileNotFoundError:
        raise PipelineError(f"{path}: reference file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path.name}: not valid YAML ({str(err).splitlines()[0]})") from None
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


def run_seed(params: Params, name: str) -> int:
    """The random seed a run trains with: its own `seed`, else the global one."""
    own = params.train[name].seed
    return params.seed if own is None else own
