"""The race's `llama.cpp` mode: a `llama-server` binary on the same GGUF, driven by the same HTTP
client and requests as tandem's own server.

llama-server fixes its slot count at start, so it is restarted for each batch size B with
`-np B -c B*CTX` (B slots of CTX tokens each; continuous batching is on by default in it) and
`-t THREADS`. Its web UI is off; everything else is its default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tandem.bench.http_load import run_http_batch
from tandem.bench.samples import BenchError, RunSample
from tandem.bench.server_process import ServerProcess, free_port

log = logging.getLogger(__name__)

# Where the project's build of llama.cpp puts the binary; the test of this mode looks there too.
KNOWN_LLAMA_SERVER = Path.home() / ".cache/tandem-anchors/llamacpp/build/bin/llama-server"


def find_llama_server() -> Path | None:
    """$TANDEM_LLAMA_SERVER, else the known build path; None when neither is an executable file."""
    for p in (os.environ.get("TANDEM_LLAMA_SERVER"), KNOWN_LLAMA_SERVER):
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return Path(p)
    return None


def check_binary(path: Path) -> Path:
    if not path.is_file():
        raise BenchError(f"--llama-server {path}: no such file")
    if not os.access(path, os.X_OK):
        raise BenchError(f"--llama-server {path}: not executable")
    return path


class LlamaCppMode:
    name = "llama.cpp"

    def __init__(
        self, binary: Path, model_path: Path, workdir: Path, *, threads: int, context_len: int
    ) -> None:
        self.binary = check_binary(binary)
        self.model_path = model_path
        self.workdir = workdir
        self.threads = threads
        self.context_len = context_len
        self.server: ServerProcess | None = None
        self.batch_size = 0
        self.url = ""

    def start(self) -> None:
        """Nothing yet: the server starts in prepare(), once the batch size is known."""

    def wait_ready(self) -> None:
        pass

    def command(self, batch_size: int, port: int) -> list[str]:
        return [
            str(self.binary),
            "-m",
            str(self.model_path),
            "-np",
            str(batch_size),
            "-c",
            str(batch_size * self.context_len),
            "-t",
            str(self.threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-webui",
        ]

    def prepare(self, batch_size: int) -> None:
        if self.server is not None and batch_size == self.batch_size:
            return
        self.close()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log_path = self.workdir / f"llama-server-b{batch_size}.log"
        self.server = ServerProcess(
            f"llama-server (-np {batch_size})", self.command(batch_size, port), log_path
        )
        self.server.start()
        self.batch_size = batch_size
        self.server.wait_ready(self.url + "/health", timeout_s=300)

    def run(self, prompts: list[list[int]], gen_len: int, keep_trace: bool) -> RunSample:
        if self.server is None or len(prompts) != self.batch_size:
            raise BenchError(f"llama-server was started for batch {self.batch_size}, asked {len(prompts)}")
        return run_http_batch(self.url, prompts, gen_len)

    def describe(self) -> dict[str, Any]:
        return {
            "binary": str(self.binary),
            "args": f"-np B -c B*{self.context_len} -t {self.threads} --no-webui (B: the batch size)",
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
