"""Weight-only quantized linear layers for CPU decoding, on PyTorch's own packed int8/int4 kernels.

Decoding a small model is memory-bound: every token reads every weight. Storing weights in 8 or 4 bits
cuts the bytes read per token by 4x or 8x against fp32. The kernels (`aten::_weight_int8pack_mm`,
`aten::_weight_int4pack_mm_for_cpu`) take bf16 activations, so a quantized layer computes in bf16 and
returns the caller's dtype; tolerances against the fp32 model are stated in the tests.

- int8: symmetric, one scale per output row.
- int4: asymmetric groups of 32 along the input (the layout of GGUF's Q4_1, so Q4_1 checkpoints lose
  almost nothing more), scales and zero points in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from swarmlm.model.llama import SparseMoE

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32


class QuantizedLinear(nn.Module):
    """What both kinds share: the optional bias (Qwen2's q/k/v), added in the caller's dtype."""

    bias: Tensor | None

    def __init__(self, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def finish(self, y: Tensor, x: Tensor) -> Tensor:
        y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Linear(QuantizedLinear):
    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__(bias)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.out_features, self.in_features = w.shape
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return self.finish(torch._weight_int8pack_mm(flat, self.qweight, self.scale), x)


class Int4Linear(QuantizedLinear):
    def __init__(self, weight: Tensor, bias: Tensor | None = None, group: int = INT4_GROUP) -> None:
        super().__init__(bias)
        w = weight.detach().float()
        n, k = w.shape
        if k % group:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group}")
        groups = w.view(n, k // group, group)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale; layout [k/group, n, 2].
        zeros = lo + 8 * scale
        self.out_features, self.in_features, self.group = n, k, group
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        )

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return self.finish(torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros), x)


def quantize_(module: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear inside `module` (in place). The output head, tied to the embedding in
    many checkpoints and the layer most sensitive to error, is always int8 (llama.cpp also keeps it at 8
    bits); the embedding itself stays dense since a lookup reads only a few rows. In a mixture of experts
    the router stays dense (as llama.cpp keeps it: a flipped choice of expert is a large error) and so do
    the stacked experts, which are not nn.Linear layers."""
    if mode == "none":
        return module
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, not {mode!r}")
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if isinstance(module, SparseMoE) and name == "gate":
                continue
            kind = Int8Linear if mode == "int8" or name == "lm_head" else Int4Linear
            setattr(module, name, kind(child.weight, child.bias))
        else:
            quantize_(child, mode)
    return module
