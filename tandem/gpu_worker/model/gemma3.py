"""Gemma 3 (text): the llama layout with four norms a layer, GeGLU and a scaled embedding.

Per layer: ``x += post_attn_norm(attn(attn_norm(x)))``, then ``x += post_ffw_norm(mlp(ffn_norm(x)))``,
the MLP ``down(gelu_tanh(gate) * up)``. Five of every six layers attend over a sliding window with
their own rope base (``rope_local_theta``, unscaled); the others are global (``rope_theta`` and the
config's rope scaling). q and k are RMS-normed per head before rope, attention is scaled by
``query_pre_attn_scalar ** -0.5``, the embedding rows are multiplied by sqrt(hidden) rounded to the
compute dtype (as transformers does), logits may be soft-capped, and the head is tied.

Gemma's RMSNorm multiplies by ``1 + w``. llama.cpp's converter stores ``1 + w`` in the GGUF file;
Hugging Face checkpoints store ``w`` and the loader adds the 1 (formats/loader.py), so every norm
here is a plain RMSNorm over the stored multiplier.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.formats.model_config import ModelConfig
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.layers import GatedMLP, RMSNorm
from tandem.gpu_worker.model.llama import Attention, LlamaModel, Weight, _dense
from tandem.gpu_worker.model.quant_linear import make_linear


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, Weight], index: int) -> None:
        super().__init__()
        p = f"blk.{index}"
        self.index = index
        self.sliding = config.is_sliding(index)
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(_dense(w[f"{p}.attn_norm.weight"]), eps)
        self.attn = Attention(config, w, p)
        self.post_attn_norm = RMSNorm(_dense(w[f"{p}.post_attention_norm.weight"]), eps)
        self.ffn_norm = RMSNorm(_dense(w[f"{p}.ffn_norm.weight"]), eps)
        gate = w[f"{p}.ffn_gate.weight"]
        gate_up = make_linear([gate, w[f"{p}.ffn_up.weight"]])
        down = make_linear([w[f"{p}.ffn_down.weight"]])
        self.mlp = GatedMLP(gate_up, down, gate.shape[0], gelu_tanh=True)
        self.post_ffw_norm = RMSNorm(_dense(w[f"{p}.post_ffw_norm.weight"]), eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Updates `x`, the running hidden state the model owns, in place and returns it."""
        h = self.attn(self.attn_norm(x), rope, kv, self.index, meta.for_layer(self.sliding))
        x.add_(self.post_attn_norm(h))
        x.add_(self.post_ffw_norm(self.mlp(self.ffn_norm(x))))
        return x


class Gemma3Model(LlamaModel):
    def __init__(
        self, config: ModelConfig, weights: dict[str, Weight], dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(config, weights, dtype)
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=self.embed.dtype)

    def make_layer(self, config: ModelConfig, weights: dict[str, Weight], index: int) -> nn.Module:
        return Gemma3DecoderLayer(config, weights, index)
