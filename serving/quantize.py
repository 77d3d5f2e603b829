"""Weight-only quantized decoding for small batches (``FLYWHEEL_QUANTIZE``).

One decoding stream is memory-bound: each token reads every weight once, so its speed is the bytes
of the weights over the memory bandwidth, and llama.cpp's lead at one stream is its 4-bit weights
(Q4_1 reads about a quarter of bf16's bytes). Here every linear layer of the served model
(attention, MLP, the LM head) also gets its weight as int8 per output channel (``int8``) or as int4
in groups of ``INT4_GROUP`` input columns with a scale and a zero point each (``int4``: the layout of
torch's CPU kernel ``_weight_int4pack_mm_for_cpu``, as torchao's ``int4_weight_only``); activations
go into torch's fused kernels, which dequantize as they multiply, in bfloat16 whatever the model's
dtype: with float32 activations the same kernels are 10-30x slower (measured per layer shape at one
row on a CPU without native bf16, where ``dtype auto`` serves float32), so a float32 model's layer
casts its input to bf16 and its output back.

The quantized kernels win only while a forward has few rows: at one row they read a half or a
quarter of the bytes, but from ~16 rows on the matmul is compute-bound and bf16's kernel is faster
(``bench/serve.py --quantize`` measures the single stream both ways). So a layer keeps its
full-precision weight as well and picks by the rows of each call: decode steps of up to ``max_rows`` rows use the quantized weight,
prefills and bigger batches the original one. The embedding is left as it is (a lookup reads one
row). The served model is a copy of the module tree that shares the original weights, so the base
model the policy loader merges LoRA versions into is never changed.
"""

from __future__ import annotations

import copy
from typing import get_args

import torch

from flywheel.config import Quantize

QUANTIZE_SCHEMES: tuple[str, ...] = get_args(Quantize)
INT4_GROUP = 32
DEFAULT_MAX_ROWS = 8
KERNEL_DTYPE = torch.bfloat16  # the activations' dtype the quantized kernels are fast in


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scales [out]): w ≈ code · scale, scale = the row's absmax / 127."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8)
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def int4_weight(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int32 [out, in] in 0..15, scales and minima [out, in / group, 2]): w ≈ code · s + m for
    the group's scale s and minimum m (asymmetric, 16 levels)."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"int4 needs input features divisible by {group}; got {in_features}")
    grouped = weight.detach().float().reshape(out_features, in_features // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-8)
    codes = torch.round((grouped - low) / scales).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    return codes, torch.cat([scales, low], dim=-1)


class QuantizedWeight(torch.nn.Module):
    """A weight ``[out, in]`` as ``scheme`` codes, and the fused kernel that multiplies activations
    (any rows, bf16 inside, returned in their dtype) by it."""

    def __init__(self, weight: torch.Tensor, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme
        if scheme == "int8":
            codes, scales = int8_weight(weight)
            self.register_buffer("codes", codes, persistent=False)
            self.register_buffer("scales", scales.to(KERNEL_DTYPE), persistent=False)
        elif scheme == "int4":
            codes, scales_and_minima = int4_weight(weight)
            self.register_buffer("codes", torch._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False)
            # the kernel computes (q - 8) · scale + zero, so its zero is the minimum + 8 scales
            scales, low = scales_and_minima.unbind(-1)
            zeros = torch.stack([scales, low + 8 * scales], dim=-1)
            self.register_buffer("scales", zeros.transpose(0, 1).contiguous().to(KERNEL_DTYPE), persistent=False)
        else:
            raise ValueError(f"quantize must be int8 or int4 here; got {scheme!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1]).to(KERNEL_DTYPE).contiguous()  # the int4 kernel takes no strides
        if self.scheme == "int8":
            y = torch._weight_int8pack_mm(flat, self.codes, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.codes, INT4_GROUP, self.scales)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


class QuantizedLinear(torch.nn.Module):
    """A linear layer with a quantized copy of its weight, used for calls of at most ``max_rows``
    rows; the original ``linear`` (shared, not copied) serves the others."""

    def __init__(self, linear: torch.nn.Linear, scheme: str, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        super().__init__()
        self.linear = linear
        self.scheme = scheme
        self.max_rows = max_rows
        self.quantized = QuantizedWeight(linear.weight, scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > self.max_rows:
            return self.linear(x)
        y = self.quantized(x)
        return y if self.linear.bias is None else y + self.linear.bias


def fused_quantized(linears: list[torch.nn.Module]) -> QuantizedWeight | None:
    """One quantized weight for quantized linears that read the same input (q, k, v; gate, up): their
    weights' rows concatenated, so one kernel call does what several did, with the same numbers
    (codes and scales are per output row). None unless all are bias-free ``QuantizedLinear`` of one
    scheme. A caller uses it only for calls of at most ``max_rows`` rows, as the layers would."""
    if not all(isinstance(m, QuantizedLinear) and m.linear.bias is None for m in linears):
        return None
    if len({(m.scheme, m.max_rows) for m in linears}) != 1:
        return None
    return QuantizedWeight(torch.cat([m.linear.weight.detach() for m in linears]), linears[0].scheme)


def _with_quantized_linears(module: torch.nn.Module, scheme: str, max_rows: int) -> torch.nn.Module:
    """A shallow copy of ``module`` whose submodule tree is copied too (parameters shared) and whose
    linear layers are wrapped; the original tree is left as it was (hooks registered on the copy
    too: a shallow copy would share the hook dicts)."""
    if isinstance(module, torch.nn.Linear):
        return QuantizedLinear(module, scheme, max_rows)
    clone = copy.copy(module)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if name in module.__dict__:
            setattr(clone, name, type(module.__dict__[name])(module.__dict__[name]))
    clone._modules = {name: None if child is None else _with_quantized_linears(child, scheme, max_rows)
                      for name, child in module._modules.items()}
    return clone


def quantized(model: torch.nn.Module, scheme: str, max_rows: int = DEFAULT_MAX_ROWS) -> torch.nn.Module:
    """The model to serve: ``model`` itself for "none", else a copy sharing its weights whose linear
    layers decode small batches from ``scheme`` weights."""
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_SCHEMES)}; got {scheme!r}")
    if scheme == "none":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize={scheme} uses torch's CPU kernels; the model is on {device} "
                         f"(set FLYWHEEL_DEVICE=cpu, or FLYWHEEL_QUANTIZE=none on a GPU)")
    return _with_quantized_linears(model, scheme, max_rows)
