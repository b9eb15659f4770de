"""The paged KV pool: one preallocated tensor pair per layer, addressed by flat slot index.

A slot is ``block_id * block_size + offset``; the scheduler's block manager decides which
blocks a sequence owns, the worker only writes and reads the slots it is told about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.models.config import ModelConfig


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer: (num_blocks * block_size, num_kv_heads, head_dim)
    v: list[torch.Tensor]
    num_blocks: int
    block_size: int

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if num_blocks < 1:
            raise ValueError(f"KV cache needs at least one block, got {num_blocks}")
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        # zeros, not empty: padded gathers read unwritten slots, and NaN garbage there would
        # poison masked attention rows through 0 * NaN.
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(k, v, num_blocks, block_size)

    @classmethod
    def from_memory_budget(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        per_block = cls.bytes_per_block(config, block_size, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes is below one block ({per_block} bytes)"
            )
        return cls.allocate(config, int(num_blocks), block_size, dtype, device)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def num_token_slots(self) -> int:
        return self.num_blocks * self.block_size
