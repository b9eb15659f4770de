"""The llama family (SmolLM2, Llama 3.x, Mistral, Qwen2/2.5, Qwen3) as plain torch modules over a
paged KV pool. Qwen3 adds an RMSNorm over each head of q and k before rope (``qk_norm``); Mistral
is llama with its own rope base and, where its config has one, a sliding window on every layer.
Other architectures subclass ``LlamaModel`` (gemma3.py)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from tandem.errors import UnsupportedModelError
from tandem.formats.gguf_packed import AffineCodes
from tandem.formats.model_config import ModelConfig
from tandem.gpu_worker.kv_cache import KVCache, available_host_memory
from tandem.gpu_worker.model.attention import AttentionMetadata, paged_attention
from tandem.gpu_worker.model.fused import add_rms_norm_, rope_and_store
from tandem.gpu_worker.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from tandem.gpu_worker.model.quant_linear import QuantLinear, choose_dense_rows, cpu_has_bf16, make_linear

# A weight as the loader hands it over: dense, or packed codes (tandem.formats.gguf_packed).
Weight = torch.Tensor | AffineCodes

log = logging.getLogger(__name__)


# Dense copies of packed layers (LlamaModel.choose_kernels) are made only if they take at most
# this much, and a quarter of the memory available: a small model's speed at a few rows, never a
# big model's memory.
DENSE_COPY_BUDGET = 1 << 30


def dense_copy_budget() -> int:
    return min(DENSE_COPY_BUDGET, available_host_memory() // 4)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _dense(w: Weight) -> torch.Tensor:
    """Vectors (norms, biases, rope factors) are never packed; a packed one is a loader bug."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a dense tensor, got packed {w.qtype.name} codes of shape {w.shape}")
    return w


def _dense_opt(w: Weight | None) -> torch.Tensor | None:
    return None if w is None else _dense(w)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, Weight], prefix: str) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(_dense(w[f"{prefix}.attn_q_norm.weight"]), config.rms_norm_eps)
            self.k_norm = RMSNorm(_dense(w[f"{prefix}.attn_k_norm.weight"]), config.rms_norm_eps)
        # Fused QKV: one matmul instead of three per layer.
        qkv_bias = None
        if config.attention_bias:
            qkv_bias = torch.cat([_dense(w[f"{prefix}.attn_{n}.bias"]) for n in "qkv"], dim=0)
        # Attention logits are the most sensitive to packed weights' bf16 scales (quant_linear).
        self.qkv = make_linear([w[f"{prefix}.attn_{n}.weight"] for n in "qkv"], qkv_bias, exact_scales=True)
        self.o = make_linear([w[f"{prefix}.attn_output.weight"]], exact_scales=True)
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
        if self.q_norm is not None and self.k_norm is not None:  # per head, in place in the fused output
            q = qkv[:, : self.q_size].unflatten(1, (-1, self.head_dim))
            k = qkv[:, self.q_size : self.q_size + self.kv_size].unflatten(1, (-1, self.head_dim))
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        # q and k rotated together, in place in the fused output; then k and v go to the cache
        # straight from the same buffer.
        rope_and_store(qkv, self.q_size, self.head_dim, rope, kv.layers[layer], meta.slot_mapping)
        q = qkv[:, : self.q_size].unflatten(1, (self.num_heads, self.head_dim))
        if x.device.type == "cpu" and x.dtype != torch.float32:
            # CPU attention in bf16 ran 6-8x slower than in fp32 for decode here (1.2x for a prefill),
            # so it runs in fp32 (as its softmax should); the KV cache keeps the compute dtype.
            q = q.float()
        o = paged_attention(q, kv, layer, meta, self.scale)
        return self.o(o.reshape(t, self.q_size).to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, w: dict[str, Weight], index: int) -> None:
        super().__init__()
        p = f"blk.{index}"
        self.index = index
        self.sliding = config.is_sliding(index)
        self.attn_norm = RMSNorm(_dense(w[f"{p}.attn_norm.weight"]), config.rms_norm_eps)
        self.attn = Attention(config, w, p)
        self.ffn_norm = RMSNorm(_dense(w[f"{p}.ffn_norm.weight"]), config.rms_norm_eps)
        gate = w[f"{p}.ffn_gate.weight"]
        gate_up = make_linear([gate, w[f"{p}.ffn_up.weight"]])
        self.mlp = GatedMLP(gate_up, make_linear([w[f"{p}.ffn_down.weight"]]), gate.shape[0])

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Updates `x`, the running hidden state the model owns, in place and returns it."""
        h = self.attn(self.attn_norm(x), rope, kv, self.index, meta.for_layer(self.sliding))
        x.add_(self.mlp(add_rms_norm_(x, h, self.ffn_norm.weight, self.ffn_norm.eps)))
        return x


class LlamaModel(nn.Module):
    """Forward over a flat token batch; returns logits only for the rows asked for."""

    def __init__(
        self, config: ModelConfig, weights: dict[str, Weight], dtype: torch.dtype | None = None
    ) -> None:
        """``dtype``: of tables decoded from packed codes (the embedding); default the norms'."""
        super().__init__()
        missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in weights]
        if missing:
            raise UnsupportedModelError(f"model file lacks tensor(s) {', '.join(missing)}")
        self.config = config
        dtype = dtype or _dense(weights["output_norm.weight"]).dtype
        embed = weights["token_embd.weight"]
        # The lookup reads a few rows a step, so a dense table costs memory, not bandwidth.
        self.embed = _frozen(embed.dequantize(dtype) if isinstance(embed, AffineCodes) else embed)
        self.layers = nn.ModuleList(self.make_layer(config, weights, i) for i in range(config.num_layers))
        self.norm = RMSNorm(_dense(weights["output_norm.weight"]), config.rms_norm_eps)
        head = weights.get("output.weight", embed)
        self.lm_head = make_linear([head])  # a dense tied head shares the embedding's storage
        if head is embed and isinstance(self.lm_head, QuantLinear):
            # Tied: the embedding table is the head's dense copy, a faster GEMM at large M.
            self.lm_head.use_dense_copy(self.embed)
        self.rope = RotaryEmbedding(config, _dense_opt(weights.get("rope_freqs.weight")))
        # Sliding layers with a rope base of their own (Gemma 3) read a second table.
        self.rope_local: RotaryEmbedding | None = None
        if config.rope_local_theta is not None and any(config.sliding_layers):
            self.rope_local = RotaryEmbedding(config, theta=config.rope_local_theta, scaled=False)
        self.embed_scale: torch.Tensor | None
        self.register_buffer("embed_scale", None, persistent=False)  # multiplies the looked-up rows (Gemma)
        # Packed kernels take bf16 and hand back their output, so the residual stream, norms and
        # attention cost nothing extra in fp32 around them, and their rounding error is not added
        # (KL to float32 3.5e-3 against 4.6e-3 with bf16 activations, same speed here). The KV
        # cache and the embedding table keep the compute dtype.
        self.activation_dtype = torch.float32 if self.has_packed_weights else None
        if self.activation_dtype is not None:
            for norm in self.modules():
                if isinstance(norm, RMSNorm):  # one dtype for input and weight: the fused kernel
                    norm.weight.data = norm.weight.data.to(self.activation_dtype)

    def make_layer(self, config: ModelConfig, weights: dict[str, Weight], index: int) -> nn.Module:
        return DecoderLayer(config, weights, index)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the compute dtype, bf16 with packed weights.

        With packed weights the activations are fp32, but the CPU's paged decode kernel reads a
        bf16 cache at half the bytes and converts it exactly as it reads
        (model/cpu_kernels.py). Without that kernel the chunk path would convert a bf16 cache
        on every read (batch-8 steps 303 ms at context 2048 with bf16, 264 ms with fp32), so the
        cache keeps the activations' fp32 there.
        """
        if self.activation_dtype is None:
            return self.dtype
        from tandem.gpu_worker.model import cpu_kernels

        return torch.bfloat16 if cpu_kernels.available() else self.activation_dtype

    def check_metadata(self, meta: AttentionMetadata) -> None:
        """A step planned without this model's window would let sliding layers see every key."""
        if meta.window != self.config.sliding_window:
            window = self.config.sliding_window
            raise ValueError(f"attention metadata planned for window {meta.window}, the model's is {window}")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64, all references already resolved
        positions: torch.Tensor,  # (T,) int64
        kv: KVCache,
        meta: AttentionMetadata,
        logits_rows: torch.Tensor,  # (N,) token rows whose next-token logits are needed
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, kv, meta), logits_rows)

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The residual stream after the last layer, every token (before the final norm)."""
        self.check_metadata(meta)
        x = F.embedding(input_ids, self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.activation_dtype is not None:
            x = x.to(self.activation_dtype)
        rope = self.rope.tables(positions)
        local = rope if self.rope_local is None else self.rope_local.tables(positions)
        for layer in self.layers:
            x = layer(x, local if layer.sliding else rope, kv, meta)
        return x

    def final_hidden(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The normed final hidden states of ``rows``: what the head reads, and embeddings pool."""
        return self.norm(x[rows])

    def logits(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) of ``rows`` of the residual stream ``x``, soft-capped where the
        config says."""
        logits = self.lm_head(self.final_hidden(x, rows)).float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def has_packed_weights(self) -> bool:
        return any(isinstance(m, QuantLinear) for m in self.modules())

    def choose_kernels(self) -> None:
        """Time the alternatives of each layer that has them (once, at load) and keep the fastest.

        The tied output head has the embedding table as its dense copy. The layers' packed
        kernels lose to a GEMM over a dense copy once a step has a few rows (the int4 kernel's
        cost grows with them: at 32 rows it took 4x a bf16 GEMM's time on the default model's
        shapes, 2.3x at 256), so where copies of every layer fit ``DENSE_COPY_BUDGET`` they are
        decoded, and kept if a pass over the whole model finds a row count from which they win.
        """
        for name, m in self.named_modules():
            if isinstance(m, QuantLinear) and m.dense is not None:
                log.info("%s: dense GEMM from %s rows on", name, m.calibrate())
        linears = [m for m in self.layers.modules() if isinstance(m, QuantLinear)]
        dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        need = sum(ql.num_weights for ql in linears) * torch.empty((), dtype=dtype).element_size()
        if linears and need <= dense_copy_budget():
            for ql in linears:
                ql.make_dense_copy(dtype)
            rows = choose_dense_rows(linears)
            for ql in linears:
                if rows == math.inf:
                    ql.drop_dense_copy()
                else:
                    ql.dense_min_rows = rows
            kept = "kept" if rows != math.inf else "dropped: the packed kernels won at every row count"
            log.info("layers' dense %s copies (%.0f MB): from %s rows on, %s", dtype, need / 1e6, rows, kept)
        elif linears:
            log.info("layers' dense copies (%.0f MB) exceed the budget: packed kernels only", need / 1e6)
        for m in self.modules():
            if isinstance(m, QuantLinear):
                m.release_sources()

    @property
    def dense_copy_bytes(self) -> int:
        """The part of `weights_bytes` that is the layers' dense copies of packed weights."""
        return sum(
            m.dense.untyped_storage().nbytes()
            for m in self.layers.modules()
            if isinstance(m, QuantLinear) and m.dense is not None
        )

    @property
    def weights_bytes(self) -> int:
        """Bytes of every parameter and buffer of the weights, storage shared between them once."""
        seen: dict[int, int] = {}
        tables = {id(t) for m in self.modules() if isinstance(m, RotaryEmbedding) for t in (m.cos, m.sin)}
        for t in [*self.parameters(), *self.buffers()]:
            if id(t) in tables:
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())
