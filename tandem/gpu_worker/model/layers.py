"""Small building blocks of the decoder models: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tandem.formats.model_config import ModelConfig, RopeScaling
from tandem.gpu_worker.model import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.norm_applies(x, self.weight):  # fp32 rows on the CPU: one kernel call
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # torch's rms_norm keeps its statistics in fp32 for 16-bit inputs (bf16 variance loses
        # too much) and is one fused kernel where the backend has one.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half rope with a precomputed cos/sin table indexed by absolute position.

    ``theta`` overrides the config's base and ``scaled=False`` drops its rope scaling (Gemma 3's
    sliding layers: their own base, unscaled).
    """

    def __init__(
        self,
        config: ModelConfig,
        freq_factors: torch.Tensor | None = None,
        theta: float | None = None,
        scaled: bool = True,
    ) -> None:
        super().__init__()
        dim = config.head_dim
        base = config.rope_theta if theta is None else theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        s = config.rope_scaling if scaled else None
        if s is not None and s.kind == "linear":
            inv_freq = inv_freq / s.factor
        elif s is not None:
            inv_freq = _llama3_inv_freq(inv_freq, s)
        if freq_factors is not None:  # GGUF llama 3.x stores its scaling as per-frequency divisors
            inv_freq = inv_freq / freq_factors.double()
        pos = torch.arange(config.context_length, dtype=torch.float64)
        freqs = torch.outer(pos, inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows of this step's positions, (T, D/2) fp32: gathered once, used by every layer."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


class Linear(nn.Module):
    """``x @ W.T (+ b)`` with dense float weights (packed ones: quant_linear.QuantLinear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU (silu), or GeGLU with tanh gelu (``gelu_tanh``, Gemma)."""

    def __init__(self, gate_up: nn.Module, down: nn.Module, inter: int, gelu_tanh: bool = False) -> None:
        super().__init__()
        # One matmul for gate and up (stacked rows): half the kernel launches on the decode path.
        self.gate_up = gate_up
        self.down = down
        self.inter = inter
        self.gelu_tanh = gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu_tanh else F.silu(gate)
        return self.down(act * up)
