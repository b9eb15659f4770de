"""tandem.client against a real server process: a subprocess running AsyncEngine + ZmqFrontend on a
tiny GGUF. Scheduler counters come back through the protocol's own Health message.

Run: python -m pytest tests/client -q
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from procs import descendants, running, wait_until

import tandem.client.common as common
from tandem.actors.sockets import ipc_path
from tandem.cli import main as cli
from tandem.client import (
    AsyncTandemClient,
    ContextLengthError,
    InvalidRequestError,
    ProtocolVersionError,
    ShuttingDownError,
    TandemClient,
    TandemConnectionError,
    TandemTimeout,
)
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.shm import list_segments

SERVER = r"""
import asyncio, json, signal, sys
from tandem.config import EngineConfig
from tandem.engine.aio import AsyncEngine
from tandem.gateway.zmq_frontend import ZmqFrontend

async def main(model: str) -> int:
    # float32: the tests compare batched outputs with solo runs token for token, which only the exact
    # reference path guarantees (bf16 compute rounds differently as the batch changes shape).
    cfg = EngineConfig(model_path=model, kv_cache_memory=64 * 2**20, model_name="tiny", dtype="float32")
    engine = AsyncEngine(cfg)
    await engine.start()
    fe = await ZmqFrontend(engine, ["ipc://", "tcp://127.0.0.1:0"]).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"endpoints": fe.endpoints, "engine_dir": str(engine.process.runtime_dir)}), flush=True)
    await stop.wait()
    await fe.close()
    return await engine.close() or 0

if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
"""
CONTEXT = 4096
# ~10 s on the tiny model: a test that sees it end early knows it was cancelled
LONG = {"max_tokens": CONTEXT - 100, "temperature": 0.0, "ignore_eos": True}


@dataclass
class Server:
    proc: subprocess.Popen[str]
    ipc: str
    tcp: str
    dirs: list[Path]
    pids: set[int] = field(default_factory=set)

    def idle(self) -> bool:
        with TandemClient(self.tcp, timeout=5) as c:
            s = c.health().stats
        assert s is not None
        return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(20)


def _start(model: Path) -> Server:
    script = model.parent / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(model)], stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "server did not start"
    info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    ipc, tcp = info["endpoints"]
    srv = Server(proc, ipc, tcp, [ipc_path(ipc).parent, Path(info["engine_dir"])])  # type: ignore[union-attr]
    srv.pids = descendants(proc.pid) | {proc.pid}
    assert len(srv.pids) >= 3, "server, scheduler and worker processes"
    return srv


def _check_nothing_left(srv: Server, killed: bool = False) -> None:
    wait_until(lambda: not any(running(p) for p in srv.pids), 5.0)
    assert not any(list_segments(pid=p) for p in srv.pids), "shared-memory segments left behind"
    if killed:  # a SIGKILLed server cannot remove its runtime directories; only its next start could
        for d in srv.dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert not any(d.exists() for d in srv.dirs), "runtime directories (ipc sockets) left behind"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", TinySpec(context=CONTEXT))


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[Server]:
    srv = _start(model)
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0
    _check_nothing_left(srv)


# --------------------------------------------------------------------------------------
def test_sync_generate_and_stream(server: Server) -> None:
    with TandemClient(server.ipc, timeout=10) as c:
        assert c.server is not None and c.server.model == "tiny"
        full = c.generate("Once upon", max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
        chat = c.generate(
            messages=[{"role": "user", "content": "Once upon"}], max_tokens=8, temperature=0, ignore_eos=True
        )
        with c.stream("Once upon", max_tokens=8, temperature=0, ignore_eos=True) as s:
            parts = list(s)
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    assert full.usage == {
        "prompt_tokens": len(full.prompt_token_ids),
        "completion_tokens": 8,
        "cached_tokens": full.usage["cached_tokens"],
    }
    assert full.logprobs is not None and len(full.logprobs) == 8 and len(full.top_logprobs or []) == 8
    assert set(full.timings) == {"queued_s", "prefill_s", "decode_s", "total_s"}
    assert chat.prompt_token_ids == full.prompt_token_ids  # one user turn: the same chat template
    assert [t for p in parts for t in p.token_ids] == full.token_ids == chat.token_ids
    assert s.finished is not None and s.prompt_token_ids == full.prompt_token_ids


def test_concurrent_async_requests_match_single_runs(server: Server) -> None:
    cases = [
        dict(
            prompt=f"case {i}: " + "x" * (i * 7),
            max_tokens=4 + 3 * i,
            ignore_eos=True,
            temperature=0.0 if i % 2 else 0.8,
            seed=100 + i,
            top_k=0 if i % 3 else 20,
        )
        for i in range(16)
    ]
    with TandemClient(server.ipc, timeout=10) as c:
        single = [c.generate(**case).token_ids for case in cases]

    async def together() -> list[Any]:
        async with AsyncTandemClient(server.tcp, timeout=20) as ac:
            streamed = ac.stream(**cases[0])
            results = await asyncio.gather(_collect(streamed), *[ac.generate(**case) for case in cases[1:]])
            return [results[0], *[r.token_ids for r in results[1:]]]

    assert asyncio.run(together()) == single
    assert [len(s) for s in single] == [4 + 3 * i for i in range(16)]


async def _collect(stream: Any) -> list[int]:
    async with stream as s:
        return [t async for d in s for t in d.token_ids]


def test_invalid_parameters_name_the_parameter(server: Server) -> None:
    with TandemClient(server.ipc, timeout=10) as c:
        for kw, param in [
            ({"temperature": -1}, "temperature"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"top_p": 2.0}, "top_p"),
            ({"logprobs": 99}, "logprobs"),
        ]:
            with pytest.raises(InvalidRequestError) as ei:
                c.generate("hi", **kw)
            assert ei.value.param == param and ei.value.code == "invalid_request"
        with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
            c.generate(prompt_token_ids=[10**6])
        with pytest.raises(TypeError):
            c.generate("hi", no_such_param=1)
        assert c.generate("still fine", max_tokens=2).finish_reason in ("length", "stop")


def test_embeddings_over_zeromq(server: Server, model: Path) -> None:
    """EmbedInputRequest (1.3): the last token's final hidden state, normalized, as transformers
    computes it for the same GGUF; text and ids alike, sync and async; cut past the limit (512
    tokens, --max-num-batched-tokens), or refused with truncate=False."""
    import numpy as np
    import torch
    import transformers

    with TandemClient(server.ipc, timeout=30) as c:
        assert c.server is not None and c.server.revision == "1.3" and "embeddings" in c.server.capabilities
        text = c.embed("Once upon a time")
        ids = c.embed(prompt_token_ids=text.prompt_token_ids)
        long = c.embed(prompt_token_ids=[7] * 600)
        with pytest.raises(ContextLengthError, match="600 tokens"):
            c.embed(prompt_token_ids=[7] * 600, truncate=False)
        with pytest.raises(InvalidRequestError, match="exactly one of"):
            c.embed()
    assert text.finished.prompt_tokens == len(text.prompt_token_ids) and text.finished.completion_tokens == 0
    assert long.prompt_token_ids == [7] * 512 and long.finished.prompt_tokens == 512
    np.testing.assert_allclose(ids.vector, text.vector, atol=1e-6)

    async def together() -> list[Any]:
        async with AsyncTandemClient(server.tcp, timeout=30) as ac:
            return await asyncio.gather(*(ac.embed(t) for t in ("Once upon a time", "the end")))

    first, second = asyncio.run(together())
    np.testing.assert_allclose(first.vector, text.vector, atol=1e-5)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(model.parent), gguf_file=model.name, dtype=torch.float32
    ).eval()
    for got in (text, second):
        with torch.no_grad():
            h = ref(torch.tensor([got.prompt_token_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(got.vector, (h / h.norm()).numpy(), atol=1e-4)


def test_structured_output_over_zeromq(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    with TandemClient(server.ipc, timeout=30) as c:
        assert "structured_output" in (c.server.capabilities if c.server else [])
        r = c.generate("hi", max_tokens=50, grammar_kind="json_schema", grammar=json.dumps(schema), seed=1)
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), schema)
        r = c.generate("hi", max_tokens=10, temperature=0, grammar_kind="regex", grammar="[xyz]{3}")
        assert re.fullmatch("[xyz]{3}", r.text)
        with pytest.raises(InvalidRequestError) as ei:
            c.generate("hi", grammar_kind="json_schema", grammar='{"type": "nonsense"}')
        assert ei.value.param == "grammar" and "nonsense" in str(ei.value)
        with pytest.raises(InvalidRequestError) as ei:
            c.generate("hi", grammar_kind="xml", grammar="<a/>")
        assert ei.value.param == "grammar_kind"


def test_tools_over_zeromq(server: Server) -> None:
    params = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    ask = [{"role": "user", "content": "Weather?"}]
    with TandemClient(server.ipc, timeout=30) as c:
        r = c.generate(messages=ask, tools=tools, tool_choice="required", max_tokens=80, seed=2)
        (call,) = r.tool_calls or []
        assert call["name"] == "get_weather" and call["arguments"]["city"] in ("Paris", "Oslo")
        history = [
            *ask,
            {"role": "assistant", "content": "", "tool_calls": [{"id": call["id"], "function": call}]},
            {"role": "tool", "content": "sunny", "tool_call_id": call["id"]},
        ]
        again = c.generate(messages=history, tools=tools, max_tokens=4, temperature=0)
        assert again.tool_calls is None and len(again.prompt_token_ids) > len(r.prompt_token_ids)
        with pytest.raises(InvalidRequestError) as ei:
            c.generate(messages=ask, tools=tools, tool_choice={"type": "function", "function": {"name": "x"}})
        assert ei.value.param == "tool_choice"


def test_timeout_cancels_the_request(server: Server) -> None:
    with TandemClient(server.ipc) as c:
        t0 = time.monotonic()
        with pytest.raises(TandemTimeout):
            c.generate("slow", timeout=0.3, **LONG)
        assert time.monotonic() - t0 < 2.0
    wait_until(server.idle, 2.0)


def test_leaving_streams_early_cancels_them(server: Server) -> None:
    async def leave_async() -> None:
        async with AsyncTandemClient(server.ipc) as ac, ac.stream("story", **LONG) as s:
            async for _ in s:
                break

    asyncio.run(leave_async())
    wait_until(server.idle, 1.0)
    with TandemClient(server.ipc) as c:
        for _ in c.stream("story", **LONG):
            break  # no `with`: the dropped stream cancels itself
        wait_until(server.idle, 1.0)
        s = c.stream("story", **LONG)
        next(s)
    # the client closed with a stream in flight: the server sees it go and cancels
    wait_until(server.idle, 2.0)


def test_version_mismatch_and_no_server(
    server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(common, "PROTOCOL_VERSION", common.PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolVersionError, match=r"speaks tandem protocol v1, this client speaks v2"):
        TandemClient(server.tcp)
    with pytest.raises(ProtocolVersionError):
        asyncio.run(AsyncTandemClient(server.ipc).connect())
    monkeypatch.undo()
    with pytest.raises(TandemTimeout, match="no tandem server answered"):
        TandemClient(str(tmp_path / "nobody.sock"), connect_timeout=0.3)


def test_cli_generate_url(server: Server) -> None:
    runner = CliRunner()
    args = ["generate", "--url", server.tcp, "--temperature", "0", "--max-tokens", "6", "Hello"]
    res = runner.invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    with TandemClient(server.ipc) as c:
        ref = c.generate("Hello", max_tokens=6, temperature=0, top_k=40, top_p=0.9)
    assert out["prompt_token_ids"] == ref.prompt_token_ids and out["token_ids"] == ref.token_ids
    assert out["text"] == ref.text and out["finish_reason"] == ref.finish_reason
    assert {"total_s", "prefill_s", "decode_s", "prompt_tokens", "completion_tokens"} <= set(out["timings"])
    res = runner.invoke(cli, args)
    assert res.exit_code == 0 and res.output == ref.text + "\n"
    res = runner.invoke(cli, [*args, "--model", "another"])
    assert res.exit_code == 1 and "serves 'tiny', not 'another'" in res.output
    res = runner.invoke(cli, ["generate", "--url", server.ipc, "--temperature", "-3", "x"])
    assert res.exit_code != 0 and "temperature" in res.output


def test_server_shutdown_and_crash_end_streams(model: Path) -> None:
    srv = _start(model)
    try:
        with TandemClient(srv.ipc, timeout=10) as c:
            s = c.stream("story", **LONG)
            next(s)
            srv.stop(signal.SIGTERM)  # the front end ends what is in flight with an error frame
            with pytest.raises(ShuttingDownError):
                list(s)
        assert srv.proc.returncode == 0
        _check_nothing_left(srv)
        srv = _start(model)
        with TandemClient(srv.ipc, timeout=10) as c:
            s = c.stream("story", **LONG)
            next(s)
            os.kill(srv.proc.pid, signal.SIGKILL)  # no goodbye: the dropped connection says it
            with pytest.raises(TandemConnectionError):
                list(s)
        srv.proc.wait(10)
        _check_nothing_left(srv, killed=True)  # parent death takes the scheduler and worker down
    finally:
        srv.stop(signal.SIGKILL)
