"""BERT encoders (all-MiniLM, bge, e5...) as plain torch modules: embeddings only, no KV cache.

A step is a packed batch: every input's tokens back to back, ``cu_seqlens`` marking where each
starts. Attention is bidirectional within an input and never across inputs, so the linear layers
run on the packed tokens and only attention pads them to (inputs, longest input), with a key
mask; the padding indices are computed on the host (`bert_batch_arrays`) and reach the device
with the step's one upload. Every input is whole in its step: an encoder has no cache to
continue from.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import UnsupportedModelError
from tandem.formats.model_config import ModelConfig


def bert_batch_arrays(query_lens: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side indices of a packed batch's padded view: ``bert_pad_rows`` (the padded row of each
    token) and ``bert_key_mask`` (inputs, longest) True where a key is a real token."""
    lens = query_lens.astype(np.int64)
    width = int(lens.max()) if len(lens) else 0
    starts = np.cumsum(lens) - lens
    within = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    rows = np.repeat(np.arange(len(lens)) * width, lens) + within
    return {"bert_pad_rows": rows, "bert_key_mask": np.arange(width)[None, :] < lens[:, None]}


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _LayerNorm(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], name: str, eps: float) -> None:
        super().__init__()
        self.weight = _frozen(w[f"{name}.weight"])
        self.bias = _frozen(w[f"{name}.bias"])
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = _frozen(weight)
        self.bias = _frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class EncoderLayer(nn.Module):
    """Post-LN: x = LN(x + attention(x)); x = LN(x + down(gelu(up(x))))."""

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], index: int) -> None:
        super().__init__()
        p = f"blk.{index}"
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        # Fused QKV: one matmul instead of three.
        self.qkv = _Linear(
            torch.cat([w[f"{p}.attn_{n}.weight"] for n in "qkv"]),
            torch.cat([w[f"{p}.attn_{n}.bias"] for n in "qkv"]),
        )
        self.o = _Linear(w[f"{p}.attn_output.weight"], w[f"{p}.attn_output.bias"])
        self.attn_norm = _LayerNorm(w, f"{p}.attn_output_norm", config.layer_norm_eps)
        self.up = _Linear(w[f"{p}.ffn_up.weight"], w[f"{p}.ffn_up.bias"])
        self.down = _Linear(w[f"{p}.ffn_down.weight"], w[f"{p}.ffn_down.bias"])
        self.out_norm = _LayerNorm(w, f"{p}.layer_output_norm", config.layer_norm_eps)

    def attention(self, x: torch.Tensor, pad_rows: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, width = key_mask.shape
        qkv = self.qkv(x)
        padded = qkv.new_zeros(n * width, qkv.shape[1]).index_copy_(0, pad_rows, qkv)
        # (3, inputs, heads, width, head_dim)
        q, k, v = padded.view(n, width, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        o = o.transpose(1, 2).reshape(n * width, -1).index_select(0, pad_rows)
        return self.o(o)

    def forward(self, x: torch.Tensor, pad_rows: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attention(x, pad_rows, key_mask))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class BertModel(nn.Module):
    """Final hidden states of a packed batch of whole inputs (token type 0 throughout)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        w = {k: v.to(dtype) for k, v in weights.items()}
        if "position_embd.weight" not in w:
            raise UnsupportedModelError("BERT file lacks its position embeddings (position_embd.weight)")
        if w["position_embd.weight"].shape[0] < config.context_length:
            raise UnsupportedModelError(
                f"BERT position table holds {w['position_embd.weight'].shape[0]} positions, "
                f"its config says {config.context_length}"
            )
        self.config = config
        self.embed = _frozen(w["token_embd.weight"])
        self.position = _frozen(w["position_embd.weight"])
        self.token_type = _frozen(w["token_types.weight"][0].clone())
        self.embed_norm = _LayerNorm(w, "token_embd_norm", config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config, w, i) for i in range(config.num_layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def has_packed_weights(self) -> bool:
        return False

    dense_copy_bytes = 0  # its weights are dense as loaded

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64, from 0 in every input
        pad_rows: torch.Tensor,  # (T,) int64: bert_batch_arrays
        key_mask: torch.Tensor,  # (inputs, longest) bool
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed) + F.embedding(positions, self.position) + self.token_type
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, pad_rows, key_mask)
        return x
