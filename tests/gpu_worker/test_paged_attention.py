"""Decode attention reads the blocks each sequence owns, not `batch x max_ctx` padded rows."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton_cases import BLOCK, pool, scattered_tables, sdpa_reference

from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata, paged_attention

_GATHERS = ("aten.index.Tensor", "aten.index_select", "aten.gather", "aten.take")


class KVReads(TorchDispatchMode):
    """Elements that gather ops read out of the KV pool, and every op dispatched."""

    def __init__(self, kv: KVCache) -> None:
        super().__init__()
        self.pool = {t.untyped_storage().data_ptr() for t in kv.layers}
        self.elements = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        src = args[0] if args else None
        if str(func).startswith(_GATHERS) and isinstance(src, torch.Tensor):
            if src.untyped_storage().data_ptr() in self.pool:
                self.elements += out.numel()
        return out


def _decode(kv: KVCache, lens: list[int]) -> tuple[torch.Tensor, KVReads, torch.Tensor]:
    tables = scattered_tables(lens, kv.num_blocks)
    n = len(lens)
    q = torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(4))
    ctx = np.array(lens)
    meta = AttentionMetadata.build(ctx - 1, np.ones(n, dtype=np.int64), ctx, tables, BLOCK)
    with KVReads(kv) as reads:
        out = paged_attention(q, kv, 0, meta, 0.25)
    return out, reads, sdpa_reference(q, kv, tables, lens, 0.25)


def test_decode_reads_only_owned_blocks() -> None:
    kv = pool(4, 2, 16, torch.float32, "cpu")  # 48 blocks of 4 tokens, 2 KV heads of 16
    lens = [70] + [2] * 15  # one long sequence beside many short ones
    out, reads, want = _decode(kv, lens)
    assert (out - want).abs().max().item() < 1e-5
    keys_read = reads.elements / (2 * 2 * 16)  # keys and values of 2 heads of 16 per key
    owned = sum(-(-n // BLOCK) * BLOCK for n in lens)
    # Blocks grouped by powers of two of their count: at most twice what is owned, where
    # padding every row to the longest would read 16 x 70 = 1120 keys.
    assert keys_read <= 2 * owned, (keys_read, owned)


def test_decode_ops_do_not_grow_with_the_batch() -> None:
    kv = pool(4, 2, 16, torch.float32, "cpu")
    _decode(kv, [5, 9, 2] * 6)  # grows the gather workspace once, as the first steps of a server do
    _, small, _ = _decode(kv, [5, 9, 2] * 2)
    out, large, want = _decode(kv, [5, 9, 2] * 6)
    assert (out - want).abs().max().item() < 1e-5
    assert large.ops == small.ops, "decode attention dispatches ops per sequence"
