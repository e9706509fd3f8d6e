"""B-cos layers: dynamic-linear convolutions and linear maps, their normalisations and the input encoding.

Böhle, Fritz and Schiele, "B-cos Networks: Alignment is All We Need for Interpretability", CVPR 2022
(https://arxiv.org/abs/2205.10268), and "B-cos Alignment for Inherently Interpretable CNNs and Vision Transformers",
TPAMI 2024 (B-cos v2, https://github.com/B-cos/B-cos-v2). Written for pellucid, 1D, 2D and 3D alike.

A B-cos unit with weight ``w`` maps an input (patch) ``x`` to

    B-cos(x; w) = |cos(x, w)|^(B-1) · (ŵᵀx),     ŵ = w / ||w||,   cos(x, w) = ŵᵀx / ||x||,

so its output is ``W(x) x`` with the *dynamic* weight ``W(x) = |cos(x, w)|^(B-1) ŵᵀ``. ``B = 1`` is a linear unit
with unit-norm weights; a larger ``B`` suppresses every unit whose weight is not aligned with its input. A network
built from B-cos units, sums, average/max pooling and the bias-free normalisations below is *dynamic linear*:
``logits = W(x) x``. Passing ``detach=True`` to a layer's ``forward`` detaches every input-dependent scale (the
``|cos|^(B-1)`` factor, the normalisations' statistics) from the autograd graph; the network's gradient with respect
to its input is then exactly ``W(x)``, and ``input × gradient`` is the exact contribution of each input element to
each logit (Euler's theorem for a function that is linear once its scales are held fixed). The values computed with
and without ``detach`` are identical; only the gradients differ (training uses ``detach=False``).

Normalisations (B-cos v2 keeps them bias-free, so that nothing but ``W(x) x`` reaches the logits):

- ``"batch"``: un-centred batch norm, ``γ · x / sqrt(Var[x] + ε)`` per channel (batch statistics in training, the
  running variance in eval); the mean is never subtracted and there is no shift ``β``.
- ``"position"``: position norm (layer norm over the channels at each location, B-cos v2's ResNet default),
  ``γ · (x - mean_c x) / sqrt(Var_c[x] + ε)``; centring over channels is linear in ``x``, so it is allowed; no ``β``.
- ``"none"``.

The grey-scale input encoding ``[x, 1 - x]`` (:func:`encode_inverse`) gives every pixel a non-zero norm and lets an
intensity be told by the angle of its 2-vector, which a unit that only sees alignment needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "position", "none")
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PATCH_NORM_EPS = 1e-6  # inside the square root of a patch's squared norm: keeps an all-zero patch finite


def encode_inverse(image: Tensor) -> Tensor:
    """``[x, 1 - x]`` along the channel axis: (B, C, *S) -> (B, 2C, *S) (B-cos input encoding)."""
    return torch.cat([image, 1.0 - image], dim=1)


def _tuple(value: int | Sequence[int], spatial_dims: int, what: str) -> tuple[int, ...]:
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != spatial_dims or any(v < 0 for v in values):
        raise ValueError(f"B-cos conv: {what} must be a non-negative int or {spatial_dims} of them, got {value!r}")
    return values


def dynamic_scale(linear: Tensor, norm: Tensor, b: float, detach: bool) -> Tensor:
    """``|cos|^(B-1)`` from ``ŵᵀx`` (``linear``) and ``||x||`` (``norm``), detached from the graph when asked.

    ``B = 2`` needs no power; otherwise ``|cos|`` is floored at 1e-6 so that the power's gradient stays finite.
    """
    if detach:
        linear, norm = linear.detach(), norm.detach()
    cosine = linear / norm
    if b == 2:
        return cosine.abs()
    return cosine.abs().clamp_min(1e-6).pow(b - 1)


def _check_b(b: float, max_out: int, where: str) -> None:
    if not isinstance(b, int | float) or isinstance(b, bool) or not math.isfinite(b) or b < 1:
        raise ValueError(f"{where}: b must be a finite number >= 1 (1 is linear, 2 the B-cos default), got {b!r}")
    if not isinstance(max_out, int) or max_out < 1:
        raise ValueError(f"{where}: max_out must be an integer >= 1, got {max_out!r}")


class BcosConv(nn.Module):
    """B-cos convolution in 1D, 2D or 3D: the B-cos unit applied to every patch, without bias.

    ``ŵᵀx`` is a convolution with the unit-norm kernel; the patch norm ``||x||`` is the square root of the
    convolution of ``Σ_c x_c²`` with a kernel of ones (plus :data:`PATCH_NORM_EPS`), with the same stride and zero
    padding, so a padded patch counts only its real voxels.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (units).
        kernel_size: Kernel size (an int or one per axis).
        stride: Stride.
        padding: Zero padding per side; ``None``: ``kernel_size // 2`` (same size at stride 1, odd kernels).
        b: The exponent ``B`` (>= 1; 2 by default).
        max_out: MaxOut: each output is the largest of ``max_out`` B-cos units (1: none).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] | None = None, b: float = 2.0,
                 max_out: int = 1) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"B-cos conv: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"B-cos conv: channels must be >= 1, got in={in_channels} out={out_channels}")
        _check_b(b, max_out, "B-cos conv")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.kernel_size = _tuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = _tuple(stride, spatial_dims, "stride")
        self.padding = _tuple(padding if padding is not None else [k // 2 for k in self.kernel_size],
                              spatial_dims, "padding")
        self.b, self.max_out = float(b), max_out
        self.weight = nn.Parameter(torch.empty(out_channels * max_out, in_channels, *self.kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the weights as a plain convolution's (only their direction matters)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def unit_weight(self) -> Tensor:
        """``ŵ``: every unit's kernel scaled to norm 1."""
        return self.weight / self.weight.flatten(1).norm(dim=1).view(-1, *[1] * (self.weight.ndim - 1))

    def patch_norm(self, x: Tensor) -> Tensor:
        """(B, 1, *s) norm of the input patch under each output location."""
        squares = x.square().sum(dim=1, keepdim=True)
        ones = torch.ones((1, 1, *self.kernel_size), dtype=squares.dtype, device=squares.device)
        return (_CONV[self.spatial_dims](squares, ones, stride=self.stride, padding=self.padding)
                + PATCH_NORM_EPS).sqrt()

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, in_channels, *S) -> (B, out_channels, *s); ``detach``: explanation mode (module docstring)."""
        linear = _CONV[self.spatial_dims](x, self.unit_weight(), stride=self.stride, padding=self.padding)
        if self.max_out > 1:
            linear = linear.unflatten(1, (self.out_channels, self.max_out)).amax(dim=2)
        if self.b == 1:
            return linear
        return dynamic_scale(linear, self.patch_norm(x), self.b, detach) * linear

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return (f"{self.spatial_dims}D, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, b={self.b:g}, max_out={self.max_out}")


class BcosLinear(nn.Module):
    """B-cos linear layer: the B-cos unit on a feature vector (B, in_features) -> (B, out_features), no bias.

    Args:
        in_features: Input features.
        out_features: Output features (units).
        b: The exponent ``B`` (>= 1).
        max_out: MaxOut units per output (1: none).
    """

    def __init__(self, in_features: int, out_features: int, b: float = 2.0, max_out: int = 1) -> None:
        super().__init__()
        _check_b(b, max_out, "B-cos linear")
        self.in_features, self.out_features, self.b, self.max_out = in_features, out_features, float(b), max_out
        self.weight = nn.Parameter(torch.empty(out_features * max_out, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the weights as a plain linear layer's (only their direction matters)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, in_features) -> (B, out_features); ``detach``: explanation mode (module docstring)."""
        linear = F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True))
        if self.max_out > 1:
            linear = linear.unflatten(-1, (self.out_features, self.max_out)).amax(dim=-1)
        if self.b == 1:
            return linear
        norm = (x.square().sum(dim=-1, keepdim=True) + PATCH_NORM_EPS).sqrt()
        return dynamic_scale(linear, norm, self.b, detach) * linear

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"{self.in_features}, {self.out_features}, b={self.b:g}, max_out={self.max_out}"


class UncenteredBatchNorm(nn.Module):
    """Batch norm that only divides by the standard deviation: ``γ · x / sqrt(Var[x] + ε)``, no mean, no shift.

    Training mode normalises with the batch variance (over batch and space, per channel) and updates the running
    variance, except in explanation mode (``detach=True``), which uses the batch variance as a constant and leaves
    the running statistics alone; eval mode uses the running variance.

    Args:
        channels: Channels.
        momentum: Weight of the new batch in the running variance.
        eps: Added to the variance.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.momentum, self.eps = channels, momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def reset_parameters(self) -> None:
        """Scale 1, running variance 1."""
        nn.init.ones_(self.weight)
        nn.init.ones_(self.running_var)

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        shape = (1, -1, *[1] * (x.ndim - 2))
        if self.training:
            axes = [0, *range(2, x.ndim)]
            variance = x.detach().var(dim=axes, unbiased=False) if detach else x.var(dim=axes, unbiased=False)
            if not detach:
                with torch.no_grad():
                    self.running_var.lerp_(variance.detach().to(self.running_var.dtype), self.momentum)
        else:
            variance = self.running_var
        return x * (self.weight / (variance + self.eps).sqrt()).view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"{self.channels}, momentum={self.momentum}, eps={self.eps}, uncentered, no shift"


class PositionNorm(nn.Module):
    """Layer norm over the channels at every location, scale only: ``γ · (x - mean_c x) / sqrt(Var_c[x] + ε)``.

    Args:
        channels: Channels.
        eps: Added to the variance.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))

    def reset_parameters(self) -> None:
        """Scale 1."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """(B, C, *S) -> (B, C, *S); the standard deviation is a constant in explanation mode."""
        centred = x - x.mean(dim=1, keepdim=True)
        variance = centred.square().mean(dim=1, keepdim=True)
        std = (variance.detach() if detach else variance).add(self.eps).sqrt()
        return centred / std * self.weight.view(1, -1, *[1] * (x.ndim - 2))

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"{self.channels}, eps={self.eps}, scale only"


class NoNorm(nn.Module):
    """The identity, with the layers' ``forward(x, detach)`` signature."""

    def forward(self, x: Tensor, detach: bool = False) -> Tensor:
        """Return ``x``."""
        return x


def create_norm(name: str, channels: int) -> nn.Module:
    """A bias-free normalisation by name (:data:`NORMS`).

    Raises:
        ValueError: naming the valid names.
    """
    if name == "batch":
        return UncenteredBatchNorm(channels)
    if name == "position":
        return PositionNorm(channels)
    if name == "none":
        return NoNorm()
    raise ValueError(f"B-cos norm must be one of {list(NORMS)}, got {name!r}")


__all__ = ["NORMS", "PATCH_NORM_EPS", "BcosConv", "BcosLinear", "NoNorm", "PositionNorm", "UncenteredBatchNorm",
           "create_norm", "dynamic_scale", "encode_inverse"]
