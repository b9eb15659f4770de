"""Drive a model the way the worker does, minus the ring: flat batches, block tables, chunked prefill."""

from __future__ import annotations

import random

import torch

from tandem.formats.loader import LoadedModel
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.architectures import make_model
from tandem.gpu_worker.model.attention import AttentionMetadata

BLOCK = 4


class PagedRunner:
    """Drives LlamaModel the way the worker will: flat batches, block tables, chunked prefill."""

    def __init__(self, m: LoadedModel, num_blocks: int = 64, dtype: torch.dtype = torch.float32) -> None:
        self.model = make_model(m.config, m.tensors, dtype)
        self.kv = KVCache.allocate(m.config, num_blocks, BLOCK, dtype)
        free = list(range(num_blocks))
        random.Random(0).shuffle(free)  # non-contiguous blocks catch indexing mistakes
        self.free = free
        self.tables: dict[str, list[int]] = {}
        self.done: dict[str, int] = {}

    def step(self, work: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """work: (sequence name, its new token ids). Returns each sequence's last-row logits."""
        ids, pos, qlens, ctxs = [], [], [], []
        for name, new in work:
            start = self.done.get(name, 0)
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK < start + len(new):
                table.append(self.free.pop())
            ids += new
            pos += range(start, start + len(new))
            qlens.append(len(new))
            ctxs.append(start + len(new))
            self.done[name] = start + len(new)
        width = max(len(self.tables[n]) for n, _ in work)
        bt = torch.zeros(len(work), width, dtype=torch.int32)
        for i, (n, _) in enumerate(work):
            bt[i, : len(self.tables[n])] = torch.tensor(self.tables[n])
        positions = torch.tensor(pos)
        window = self.model.config.sliding_window
        meta = AttentionMetadata.build(positions, qlens, ctxs, bt, BLOCK, sliding_window=window)
        last_rows = torch.tensor(qlens).cumsum(0) - 1
        logits = self.model(torch.tensor(ids), positions, self.kv, meta, last_rows)
        return list(logits)


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = (a - b).abs().max() / b.abs().max()
    assert err < rel, f"relative error {err:.2e} >= {rel:.0e}"
