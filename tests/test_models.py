"""The reference's networks, layer by layer, against the tables printed in its report."""
import pytest
import torch

from imgcls import models
from imgcls.models import AlexNet, Dropout, SimpleCNN, count_parameters, flatten, summarize

REFERENCE_SIMPLECNN = [  # (output shape, trainable params) from the report's section 1 table
    ("32x28x28", 320), ("32x28x28", 0), ("32x28x28", 9248), ("32x28x28", 0), ("32x14x14", 0),
    ("32x14x14", 0), ("128", 802944), ("128", 0), ("128", 0), ("10", 1290),
]
REFERENCE_ALEXNET = [  # from the report's section 2 torchsummary listing
    ("48x16x16", 3648), ("48x8x8", 0), ("48x8x8", 0), ("128x8x8", 153728), ("128x4x4", 0), ("128x4x4", 0),
    ("192x4x4", 221376), ("192x4x4", 0), ("192x4x4", 331968), ("192x4x4", 0), ("128x4x4", 221312),
    ("128x2x2", 0), ("128x2x2", 0), ("512", 0), ("2048", 1050624), ("2048", 0), ("2048", 0),
    ("2048", 4196352), ("2048", 0), ("10", 20490),
]


def test_simple_cnn_matches_the_reference_table():
    model = SimpleCNN()
    assert count_parameters(model) == 813_802
    rows = [(row["output_shape"], row["params"]) for row in summarize(model, (1, 28, 28))]
    assert rows == REFERENCE_SIMPLECNN


def test_alexnet_matches_the_reference_summary():
    model = AlexNet()
    assert count_parameters(model) == 6_199_498
    rows = [(row["output_shape"], row["params"]) for row in summarize(model, (3, 32, 32))]
    assert rows == REFERENCE_ALEXNET


@pytest.mark.parametrize("model, shape, features", [(SimpleCNN(), (1, 28, 28), 6272), (AlexNet(), (3, 32, 32), 512)])
def test_forward_returns_logits_and_intermediate_features(model, shape, features):
    logits, feats = model.eval()(torch.randn(4, *shape))
    assert logits.shape == (4, 10)
    assert feats.shape == (4, features)


def test_dropout_rates_come_from_params():
    model = SimpleCNN(dropout_conv=0.1, dropout_fc=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.1, 0.3]
    assert all(isinstance(m, Dropout) for m in model.modules() if isinstance(m, torch.nn.Dropout))  # the models' own


def test_the_summary_leaves_the_random_stream_alone():
    """train writes the table before it trains: drawing from the stream would change the run."""
    model = SimpleCNN()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    summarize(model, (1, 28, 28))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("model_class, shape", [(SimpleCNN, (1, 28, 28)), (AlexNet, (3, 32, 32))])
def test_channels_last_gradients_reach_the_features_in_their_layout_with_the_same_values(model_class, shape):
    """flatten hands its gradient back in channels_last, so the layers below get it without a
    conversion; every weight gradient is bit for bit what torch.flatten gives."""
    torch.manual_seed(0)
    model = model_class().to(memory_format=torch.channels_last)
    model.eval()  # no dropout: both passes must see the same network
    images = torch.randn(8, *shape).contiguous(memory_format=torch.channels_last)
    layouts = []

    def gradients(flat):
        model.zero_grad()
        features = model.features(images)
        logits = model.classifier(flat(features))
        # registered after flatten's own hook: sees the gradient the feature layers receive
        features.register_hook(lambda grad: layouts.append(grad.is_contiguous(memory_format=torch.channels_last)))
        logits.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, ours = gradients(lambda x: torch.flatten(x, 1)), gradients(flatten)
    assert layouts == [False, True]
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))


def test_flatten_without_gradients_or_in_nchw_is_torch_flatten():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(flatten(x), x.flatten(1))
    assert torch.equal(flatten(x.contiguous(memory_format=torch.channels_last)), x.flatten(1))


@pytest.mark.parametrize("vendor, mkl, drawn_by_mkl", [
    ("GenuineIntel", True, True),   # PyTorch's vectorised draw: nn.Dropout itself
    ("AuthenticAMD", True, False),  # MKL present but not used on this vendor
    ("GenuineIntel", False, False),
    ("", True, False),              # vendor unknown (Arm, Apple silicon)
])
def test_dropout_masks_come_from_mkl_only_with_mkl_on_intel(vendor, mkl, drawn_by_mkl):
    assert models.mkl_draws_dropout_masks(vendor, mkl) is drawn_by_mkl


def dropout_pass(layer, x):
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drawn_by_rand_keeps_pytorchs_semantics(monkeypatch, dtype):
    """The torch.rand draw: a share p zeroed, the rest scaled as PyTorch's CPU dropout scales them
    (in the input's dtype), the gradient through the same mask, the layout and dtype kept."""
    monkeypatch.setattr(models, "dropout_draws_with_rand", lambda: True)
    p = 0.25
    x = (torch.rand(64, 32, 14, 14) + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    y, grad = dropout_pass(Dropout(p).train(), x)
    kept = y != 0
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 401,408 draws: 0.0007 standard deviation
    scale = torch.ones((), dtype=dtype).div_(1 - p)
    assert torch.equal(y[kept], x[kept] * scale)
    assert torch.equal(grad, kept.to(dtype) * scale)
    torch.manual_seed(0)
    assert torch.equal(dropout_pass(Dropout(p).train(), x)[0], y)  # the global seed decides the mask
    assert not torch.equal(dropout_pass(Dropout(p).train(), x)[0], y)
    torch.manual_seed(0)
    assert torch.equal(kept, torch.rand_like(x, dtype=torch.float32) >= p)  # torch.rand's draw, not bernoulli_'s


def test_dropout_is_nn_dropout_where_mkl_draws_and_in_evaluation(monkeypatch):
    x = torch.randn(64, 256)
    monkeypatch.setattr(models, "dropout_draws_with_rand", lambda: True)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    monkeypatch.setattr(models, "dropout_draws_with_rand", lambda: False)
    torch.manual_seed(0)
    expected = torch.nn.Dropout(0.5).train()(x)
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.5).train()(x), expected)
