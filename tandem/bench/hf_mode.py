"""The race's `hf` mode: transformers eager (no compile), float32, on the same GGUF weights, in
this process with the same torch thread count as tandem's worker.

A static batch: the B prompts (all `prompt_len` tokens, so no padding) go through one
`generate` call, greedy, with `min_new_tokens = max_new_tokens = gen_len` (transformers' way of
ignoring EOS). A streamer stamps each step's tokens as they come out: the first stamp is the
batch's time to first token, the gaps between stamps its inter-token latencies.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tandem.bench.samples import BenchError, RunSample

log = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count for the block; the bench process's own is put back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stamps:
    """A transformers streamer (duck-typed: put/end) that records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HfMode:
    name = "hf"

    def __init__(self, model_path: Path, *, threads: int, device: str) -> None:
        self.model_path = model_path
        self.threads = threads
        self.device = device
        self.model: Any = None
        self.attn_implementation = ""

    def start(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as e:
            raise BenchError(f"mode hf needs transformers (pip install 'tandem-llm[test]'): {e}") from None
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # its bars would garble the race's progress lines
        with torch_threads(self.threads):
            t0 = time.perf_counter()
            self.model = (
                transformers.AutoModelForCausalLM.from_pretrained(
                    str(self.model_path.parent), gguf_file=self.model_path.name, dtype=torch.float32
                )
                .eval()
                .to(self.device)
            )
        self.attn_implementation = str(getattr(self.model.config, "_attn_implementation", ""))
        log.info(
            "hf model loaded in %.1f s (attention: %s)", time.perf_counter() - t0, self.attn_implementation
        )

    def wait_ready(self) -> None:
        pass

    def prepare(self, batch_size: int) -> None:
        pass

    def run(self, prompts: list[list[int]], gen_len: int, keep_trace: bool) -> RunSample:
        import torch

        assert self.model is not None, "start() first"
        if len({len(p) for p in prompts}) != 1:
            raise BenchError("hf mode runs a static batch: every prompt must have the same length")
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        stamps = _Stamps()
        with torch_threads(self.threads), torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=gen_len,
                min_new_tokens=gen_len,
                do_sample=False,
                pad_token_id=0,
                streamer=stamps,
            )
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        new = int(out.shape[1]) - ids.shape[1]
        if new != gen_len:
            raise BenchError(f"transformers generated {new} tokens per sequence of the {gen_len} asked")
        times = stamps.times
        return RunSample(
            batch_size=len(prompts),
            tokens=new * len(prompts),
            wall_s=wall,
            ttft_ms=[(times[0] - t0) * 1000] * len(prompts) if times else [],
            itl_ms=[(b - a) * 1000 for a, b in itertools.pairwise(times)],
        )

    def describe(self) -> dict[str, Any]:
        import transformers

        return {
            "transformers": transformers.__version__,
            "dtype": "float32",
            "attn_implementation": self.attn_implementation,
            "threads": self.threads,
        }

    def close(self) -> None:
        self.model = None
