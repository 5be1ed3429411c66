"""A faster backward pass for depthwise convolutions on the CPU.

PyTorch's CPU kernel for the input gradient of a depthwise convolution (a transposed depthwise
convolution in oneDNN) is slow: for MobileNetV2's stride-2 depthwise layers in bf16
channels-last it takes 25-130x the forward pass (``benchmarks/cpu_probes.py depthwise``), and
those four layers alone are about 40% of a ``freeze_except_bn_and_fc`` training step. The same
gradient is a stride-1 depthwise convolution, with the kernel flipped, of the output gradient
spread back onto the input grid (zeros between its values), which the forward kernel computes
quickly. The weight gradient keeps PyTorch's own kernel, which is fast.

``use_fast_depthwise_grad(model)`` switches a model's eligible layers to it in place. Their
parameters, state dict and forward results are unchanged; only the backward pass differs, by
rounding. It applies while a gradient is being taken on the CPU and steps aside for scripting,
tracing (ONNX export) and ``torch.compile``, which see a plain ``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        # Autocast is still on inside a custom Function's forward but off in its backward: cast
        # here, as autocast would for conv2d, and keep the cast tensors for the backward pass.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_output = grad_output.to(x.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _input_grad(grad_output, weight, x.shape, ctx.stride, ctx.padding)
            grad_input = grad_input.to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1],
                False, [0, 0], x.shape[1], [False, True, False],
            )  # fmt: skip
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3)).to(ctx.weight_dtype)
        return grad_input, grad_weight, grad_bias, None, None


def _input_grad(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    input_shape: torch.Size,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    batch, channels, height, width = input_shape
    out_height, out_width = grad_output.shape[2:]
    kernel_height, kernel_width = weight.shape[2:]
    if stride == (1, 1):
        spread = grad_output
    else:
        # Built as NHWC so that the copy moves whole channel vectors; the permuted view is the
        # channels-last NCHW tensor the convolution kernels want.
        spread = grad_output.new_zeros(batch, out_height, stride[0], out_width, stride[1], channels)
        spread[:, :, 0, :, 0, :] = grad_output.permute(0, 2, 3, 1)
        spread = spread.view(
            batch, out_height * stride[0], out_width * stride[1], channels
        ).permute(0, 3, 1, 2)
    grad = F.conv2d(
        spread,
        weight.flip(2, 3),
        padding=(kernel_height - 1 - padding[0], kernel_width - 1 - padding[1]),
        groups=channels,
    )
    # The spread grid may reach past the input's last row or column (when the stride does not
    # divide it evenly): those positions are not part of the input.
    return grad[:, :, :height, :width]


class FastGradDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose backward pass on the CPU takes the faster route above."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if (
            input.device.type == "cpu"
            and torch.is_grad_enabled()
            and (input.requires_grad or weight.requires_grad)
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return _DepthwiseConv2dFunction.apply(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)


def eligible(module: nn.Module) -> bool:
    """A plain depthwise ``nn.Conv2d`` that the faster backward computes exactly."""
    if type(module) is not nn.Conv2d:  # subclasses (e.g. timm's Conv2dSame) have own forwards
        return False
    padding = module.padding
    return (
        module.groups == module.in_channels == module.out_channels
        and module.padding_mode == "zeros"
        and module.dilation == (1, 1)
        and not isinstance(padding, str)
        and all(0 <= p < k for p, k in zip(padding, module.kernel_size, strict=True))
    )


def use_fast_depthwise_grad(model: nn.Module) -> int:
    """Switch ``model``'s depthwise convolutions to the faster CPU backward; returns how many."""
    switched = 0
    for module in model.modules():
        if eligible(module):
            module.__class__ = FastGradDepthwiseConv2d
            switched += 1
    return switched
