"""The paged KV pool: one preallocated tensor per layer, addressed by flat slot index.

A slot is ``block_id * block_size + offset``; the scheduler's block manager decides which
blocks a sequence owns, the worker only writes and reads the slots it is told about.

Each layer's tensor is ``(2, num_kv_heads, num_slots, head_dim)``: keys then values, head-major.
Head-major keeps a block of one head contiguous (``block_size * head_dim`` elements), so the
decode path gathers whole blocks with one ``index_select`` straight into the layout the batched
matmuls read, and the Triton kernel reads a block's rows of one head as one contiguous tile.

One block past the usable ones is scratch: padded rows of a captured decode graph write their
keys and values there, so padding never touches a block the scheduler hands out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from tandem.formats.model_config import ModelConfig


class KVCacheMemoryError(MemoryError):
    """The KV pool asked for (--kv-cache-memory) cannot be had on its device."""


def available_host_memory() -> int:
    """Bytes the kernel says can be had without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class KVCache:
    layers: list[torch.Tensor]  # per layer: (2, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
    num_blocks: int  # usable blocks; block `num_blocks` is scratch
    block_size: int
    _workspace: torch.Tensor | None = field(default=None, repr=False)

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
        shape = (2, config.num_kv_heads, (num_blocks + 1) * block_size, config.head_dim)
        need = (num_blocks + 1) * cls.bytes_per_block(config, block_size, dtype)
        # Zeroing touches every page: on the CPU a pool past what the kernel can give would get
        # this process (or another) OOM-killed rather than fail its allocation.
        if torch.device(device).type == "cpu" and need > (free := available_host_memory()):
            raise KVCacheMemoryError(
                f"the KV cache (--kv-cache-memory) needs {need} bytes, {free} bytes of memory are available"
            )
        try:
            # zeros, not empty: padded gathers read unwritten slots, and NaN garbage there would
            # poison masked attention rows through 0 * NaN.
            layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        except (torch.OutOfMemoryError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = f"cannot allocate the KV cache (--kv-cache-memory) of {need} bytes on {device}: {first}"
            raise KVCacheMemoryError(msg) from e
        return cls(layers, num_blocks, block_size)

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
        # The scratch block comes out of the budget too.
        num_blocks = budget_bytes // per_block - 1
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes is below two blocks ({2 * per_block} bytes: "
                "one usable, one scratch)"
            )
        return cls.allocate(config, int(num_blocks), block_size, dtype, device)

    @property
    def k(self) -> list[torch.Tensor]:
        """Per layer keys, (num_kv_heads, num_slots, head_dim) views."""
        return [t[0] for t in self.layers]

    @property
    def v(self) -> list[torch.Tensor]:
        return [t[1] for t in self.layers]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    @property
    def num_token_slots(self) -> int:
        """Slots the scheduler may hand out (the scratch block excluded)."""
        return self.num_blocks * self.block_size

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    def workspace(self, numel: int) -> torch.Tensor:
        """A flat buffer of at least `numel` elements, reused by every layer and every step.

        Decode gathers land here instead of in a fresh allocation per layer: on the CPU a
        multi-megabyte allocation is an mmap whose page faults cost as much as the gather.
        """
        ws = self._workspace
        if ws is None or ws.numel() < numel:
            ref = self.layers[0]
            size = max(numel, 2 * (0 if ws is None else ws.numel()))
            ws = torch.empty(size, dtype=ref.dtype, device=ref.device)
            self._workspace = ws
        return ws[:numel]
