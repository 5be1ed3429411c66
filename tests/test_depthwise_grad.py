"""The faster depthwise backward: the same gradients as PyTorch's, and out of the way elsewhere."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from inat_finetune.models.backbones import get_model
from inat_finetune.speed.depthwise_grad import (
    FastGradDepthwiseConv2d,
    eligible,
    use_fast_depthwise_grad,
)


def _grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    conv.zero_grad()
    conv(x).backward(grad_out)
    return [x.grad, conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size", "bias", "channels_last"),
    [
        (3, 2, 1, 16, False, True),  # MobileNetV2's downsampling layers
        (3, 2, 1, 15, True, False),  # odd input: the spread grid overhangs by a row and column
        (3, 1, 1, 9, False, True),
        (5, 2, 2, 14, False, True),  # EfficientNet's 5x5 downsampling layers
        (5, 2, 0, 13, True, False),
        ((3, 5), (2, 1), (1, 2), 12, False, False),
    ],
)
def test_gradients_equal_pytorchs(kernel, stride, padding, size, bias, channels_last):
    torch.manual_seed(0)
    native = nn.Conv2d(6, 6, kernel, stride, padding, groups=6, bias=bias).double()
    fast = nn.Conv2d(6, 6, kernel, stride, padding, groups=6, bias=bias).double()
    fast.load_state_dict(native.state_dict())
    assert use_fast_depthwise_grad(fast) == 1 and type(fast) is FastGradDepthwiseConv2d
    x = torch.randn(3, 6, size, size + 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = native(x)
    assert torch.equal(fast(x), out)
    grad_out = torch.randn_like(out)
    for got, want in zip(_grads(fast, x, grad_out), _grads(native, x, grad_out), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_frozen_weights_get_no_gradient_and_bf16_autocast_matches():
    torch.manual_seed(0)
    native = nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False)
    fast = nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False)
    fast.load_state_dict(native.state_dict())
    use_fast_depthwise_grad(fast)
    for conv in (native, fast):
        conv.weight.requires_grad_(False)
    x = torch.randn(4, 8, 20, 20)
    results = []
    for conv in (native, fast):
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16):
            out = conv(inp)
        out.float().square().sum().backward()
        results.append((out, inp.grad))
        assert conv.weight.grad is None
    (out_a, grad_a), (out_b, grad_b) = results
    assert out_b.dtype == out_a.dtype == torch.bfloat16  # as autocast would compute it
    assert torch.equal(out_a, out_b)
    assert grad_b.dtype == torch.float32
    torch.testing.assert_close(grad_b, grad_a, rtol=2e-2, atol=2e-2)  # bf16 rounding only


def test_mobilenet_switch_keeps_state_and_steps_aside_for_tracing_and_no_grad():
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", num_classes=3, weights="none").model.eval()
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    assert use_fast_depthwise_grad(model) == 17  # every depthwise layer of MobileNetV2
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # Tracing (as ONNX export does) sees plain convolutions, never the Python function.
    traced = torch.jit.trace(model, x.requires_grad_(True), check_trace=False)
    assert "DepthwiseConv2dFunction" not in str(traced.inlined_graph)
    torch.jit.save(traced, io.BytesIO())


def test_only_plain_depthwise_convolutions_are_switched():
    assert eligible(nn.Conv2d(4, 4, 3, groups=4))
    assert not eligible(nn.Conv2d(4, 8, 3, groups=4))  # a channel multiplier
    assert not eligible(nn.Conv2d(4, 4, 3))  # not depthwise
    assert not eligible(nn.Conv2d(4, 4, 3, groups=4, dilation=2))
    assert not eligible(nn.Conv2d(4, 4, 3, groups=4, padding="same"))
    assert not eligible(nn.Conv2d(4, 4, 3, groups=4, padding_mode="reflect"))

    class Subclass(nn.Conv2d):  # timm's Conv2dSame pads in its own forward
        pass

    assert not eligible(Subclass(4, 4, 3, groups=4))


@pytest.mark.parametrize("strategy", ["freeze_k_percent", "freeze_except_bn_and_fc"])
def test_bf16_gradients_are_as_close_to_fp32_as_pytorchs(strategy):
    """Under bf16 autocast no path is exact; the fast one must not be further from fp32."""
    import copy

    from inat_finetune.models.freezing import apply_strategy

    torch.manual_seed(0)
    built = get_model("mobilenet_v2", num_classes=2, weights="none")
    apply_strategy(built.model, built.head, strategy)
    model = built.model.train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 0, 1])

    def gradients(net: nn.Module, bf16: bool) -> torch.Tensor:
        net = copy.deepcopy(net)
        torch.manual_seed(1)  # the same dropout mask every time
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            nn.functional.cross_entropy(net(x), y).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad])

    fast_model = copy.deepcopy(model)
    use_fast_depthwise_grad(fast_model)
    reference = gradients(model, bf16=False)
    torch.testing.assert_close(gradients(fast_model, bf16=False), reference, rtol=1e-4, atol=1e-5)
    error = {
        name: ((gradients(net, bf16=True) - reference).norm() / reference.norm()).item()
        for name, net in (("native", model), ("fast", fast_model))
    }
    assert error["fast"] <= 1.1 * error["native"] + 1e-3, error
