"""Paged attention over a mixed batch of prefill chunks and decode tokens (torch SDPA path).

The batch is flat: the tokens of every sequence back to back, ``cu_seqlens`` marking where
each sequence's new tokens start. Every sequence's keys and values live in the paged pool;
this step's new ones are written there first, then read back through the block table, so a
prefill chunk that continues a cached prefix and a decode step take the same path.

Decode rows (one new token) are gathered into one padded SDPA call; prefill rows are few and
long, so each gets its own call instead of padding every decode row to the longest prompt.
This is the portable path; a paged decode kernel on GPU goes beside it, not instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.gpu_worker.kv_cache import KVCache


@dataclass
class PrefillSeq:
    token_start: int
    token_end: int
    kv_slots: torch.Tensor  # (context_len,) flat slot ids of the whole context
    mask: torch.Tensor | None  # (q_len, context_len) bool, None when plain causal suffices


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    decode_token_rows: torch.Tensor  # (Bd,) token rows of single-token sequences
    decode_kv_slots: torch.Tensor  # (Bd, max_ctx) flat slot ids, padded with 0
    decode_mask: torch.Tensor  # (Bd, 1, 1, max_ctx) True where the key is visible
    prefills: list[PrefillSeq]
    num_tokens: int

    @classmethod
    def build(
        cls,
        positions: torch.Tensor,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        block_size: int,
    ) -> AttentionMetadata:
        """Host-side index arithmetic done once per step and shared by every layer."""
        device = positions.device
        num_seqs = len(query_lens)
        qlens = torch.tensor(query_lens, dtype=torch.long, device=device)
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), qlens)
        bt = block_tables[:num_seqs].long()
        slot_mapping = bt[seq_of_token, positions // block_size] * block_size + positions % block_size

        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        if decode:
            d_idx = torch.tensor(decode, dtype=torch.long, device=device)
            d_ctx = torch.tensor([context_lens[i] for i in decode], dtype=torch.long, device=device)
            max_ctx = int(d_ctx.max())
            j = torch.arange(max_ctx, device=device)
            visible = j.unsqueeze(0) < d_ctx.unsqueeze(1)
            blocks = bt[d_idx][:, j // block_size]
            d_slots = torch.where(visible, blocks * block_size + j % block_size, 0)
            d_rows = torch.tensor([starts[i] for i in decode], dtype=torch.long, device=device)
            d_mask = visible[:, None, None, :]
        else:
            d_rows = torch.empty(0, dtype=torch.long, device=device)
            d_slots = torch.empty(0, 0, dtype=torch.long, device=device)
            d_mask = torch.empty(0, 1, 1, 0, dtype=torch.bool, device=device)

        prefills: list[PrefillSeq] = []
        for i, q in enumerate(query_lens):
            if q == 1:
                continue
            ctx = context_lens[i]
            j = torch.arange(ctx, device=device)
            kv_slots = bt[i, j // block_size] * block_size + j % block_size
            mask = None
            if ctx != q:  # a chunk after a cached prefix: query r sees keys up to ctx - q + r
                rows = torch.arange(q, device=device).unsqueeze(1)
                mask = j.unsqueeze(0) <= rows + (ctx - q)
            prefills.append(PrefillSeq(starts[i], starts[i + 1], kv_slots, mask))
        return cls(slot_mapping, d_rows, d_slots, d_mask, prefills, int(positions.shape[0]))


def paged_attention(
    q: torch.Tensor,  # (T, H, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,
    kv: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    k_cache, v_cache = kv.k[layer], kv.v[layer]
    k_cache[meta.slot_mapping] = k.to(k_cache.dtype)
    v_cache[meta.slot_mapping] = v.to(v_cache.dtype)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]

    if meta.decode_token_rows.numel():
        qd = q[meta.decode_token_rows].unsqueeze(2)  # (Bd, H, 1, D)
        kd = k_cache[meta.decode_kv_slots].transpose(1, 2)  # (Bd, Hkv, L, D)
        vd = v_cache[meta.decode_kv_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=meta.decode_mask, scale=scale, enable_gqa=gqa
        )
        out[meta.decode_token_rows] = od.squeeze(2)

    for p in meta.prefills:
        qp = q[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
        kp = k_cache[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        vp = v_cache[p.kv_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=gqa
        )
        out[p.token_start : p.token_end] = op.squeeze(0).transpose(0, 1)
    return out
