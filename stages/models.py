"""The studies' networks.  Every model's forward returns ``(logits, features)``: the logits and
an intermediate representation (the flattened convolutional features that enter the
classifier), as the seed's AlexNet does; embed and tsne use both."""
import torch
from torch import nn


class SimpleCNN(nn.Module):
    """The seed's MNIST network: 813,802 parameters at 1x28x28, 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 dropout_conv: float = 0.25, dropout_fc: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(dropout_conv),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * (image_size // 2) ** 2, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout_fc),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        features = torch.flatten(self.features(x), 1)
        return self.classifier(features), features


class AlexNet(nn.Module):
    """The seed's AlexNet variant for 32x32 RGB, exactly as printed in the report (6,199,498
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
            nn.Dropout(dropout_fc),
            nn.Linear(128 * (image_size // 16) ** 2, 2048),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout_fc),
            nn.Linear(2048, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x):
        features = torch.flatten(self.features(x), 1)
        return self.classifier(features), features


MODELS = {"simple_cnn": SimpleCNN, "alexnet": AlexNet}


def build(model_params, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Instantiate from the validated `train.<run>.model` params."""
    kwargs = model_params.model_dump(exclude={"name"})
    return MODELS[model_params.name](in_channels=in_channels, num_classes=num_classes,
                                     image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict]:
    """Per leaf layer: name, output shape and trainable parameters (the seed's summary table)."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            def record(mod, _inputs, output, name=name):
                shape = list(output.shape[1:])
                rows.append({"layer": f"{name} ({type(mod).__name__})", "output_shape": "x".join(map(str, shape)),
                             "params": sum(p.numel() for p in mod.parameters() if p.requires_grad)})
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return rows
