"""The llama family (SmolLM2, Llama 3.x, Qwen2/2.5) as plain torch modules over a paged KV pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata, paged_attention, write_kv
from tandem.gpu_worker.model.fused import add_rms_norm_, rotate_half_
from tandem.gpu_worker.model.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from tandem.models.config import ModelConfig, UnsupportedModelError


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        # Fused QKV: one matmul instead of three per layer.
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = torch.cat(
                [w[f"{prefix}.attn_q.bias"], w[f"{prefix}.attn_k.bias"], w[f"{prefix}.attn_v.bias"]], dim=0
            )
        self.qkv = Linear(
            torch.cat(
                [w[f"{prefix}.attn_q.weight"], w[f"{prefix}.attn_k.weight"], w[f"{prefix}.attn_v.weight"]],
                dim=0,
            ),
            qkv_bias,
        )
        self.o = Linear(w[f"{prefix}.attn_output.weight"])
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        layer: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv(x)
        t = x.shape[0]
        # q and k rotated together, in place in the fused output; then k and v go to the cache
        # in one indexed copy, straight from the same buffer.
        rotate_half_(qkv[:, : self.q_size + self.kv_size].unflatten(1, (-1, self.head_dim)), *rope)
        write_kv(kv.layers[layer], qkv[:, self.q_size :].unflatten(1, (-1, self.head_dim)), meta.slot_mapping)
        q = qkv[:, : self.q_size].unflatten(1, (self.num_heads, self.head_dim))
        o = paged_attention(q, kv, layer, meta, self.scale)
        return self.o(o.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], index: int) -> None:
        super().__init__()
        p = f"blk.{index}"
        self.index = index
        self.attn_norm = RMSNorm(w[f"{p}.attn_norm.weight"], config.rms_norm_eps)
        self.attn = Attention(config, w, p)
        self.ffn_norm = RMSNorm(w[f"{p}.ffn_norm.weight"], config.rms_norm_eps)
        self.mlp = GatedMLP(w[f"{p}.ffn_gate.weight"], w[f"{p}.ffn_up.weight"], w[f"{p}.ffn_down.weight"])

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Updates `x`, the running hidden state the model owns, in place and returns it."""
        h = self.attn(self.attn_norm(x), rope, kv, self.index, meta)
        x.add_(self.mlp(add_rms_norm_(x, h, self.ffn_norm.weight, self.ffn_norm.eps)))
        return x


class LlamaModel(nn.Module):
    """Forward over a flat token batch; returns logits only for the rows asked for."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in weights]
        if missing:
            raise UnsupportedModelError(f"model file lacks tensor(s) {', '.join(missing)}")
        self.config = config
        self.embed = _frozen(weights["token_embd.weight"])
        self.layers = nn.ModuleList(DecoderLayer(config, weights, i) for i in range(config.num_layers))
        self.norm = RMSNorm(weights["output_norm.weight"], config.rms_norm_eps)
        # A tied head shares the embedding's storage until int8 gives it its own copy.
        self.lm_head = Linear(weights.get("output.weight", weights["token_embd.weight"]))
        self.rope = RotaryEmbedding(config, weights.get("rope_freqs.weight"))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64, all references already resolved
        positions: torch.Tensor,  # (T,) int64
        kv: KVCache,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,  # (N,) token rows whose next-token logits are needed
    ) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        rope = self.rope.tables(positions)
        for layer in self.layers:
            x = layer(x, rope, kv, meta)
        x = self.norm(x[logits_rows])
        return self.lm_head(x).float()

    def quantize_int8(self) -> None:
        """Switch every matmul to int8 weights (CPU weight-only mode; see layers.Linear)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.quantize_int8()
