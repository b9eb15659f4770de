"""Multi-model serving with both real catalogue models (slow): smollm2:135m as the server's own
model, gemma3:270m loaded on demand, streams to both at once, then gemma3 unloaded."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import Server, wait_for

GEMMA = "gemma3:270m"
N = 64


def _link_into(home: Path, name: str) -> None:
    """Share the test process's pulled copy of ``name`` (its manifest copied, its data linked)."""
    from tandem.paths import models_dir
    from tandem.store.registry import data_dir, manifest_path

    src = models_dir()
    dst = home / "models"
    manifest = manifest_path(name)
    (dst / manifest.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(manifest, dst / manifest.relative_to(src))
    rel_data = data_dir(name).relative_to(src)
    (dst / rel_data).parent.mkdir(parents=True, exist_ok=True)
    (dst / rel_data).symlink_to(data_dir(name), target_is_directory=True)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, default_model_path: Path, gemma3_model_path: Path
) -> Iterator[Server]:
    from tandem.store.registry import DEFAULT_MODEL

    home = tmp_path_factory.mktemp("multi-real")
    for name in (DEFAULT_MODEL, GEMMA):
        _link_into(home, name)
    s = Server(home, model=DEFAULT_MODEL, args=("--kv-cache-memory", "128M")).start(timeout=300)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def _stream(server: Server, model: str, out: dict[str, float]) -> None:
    body = {
        "model": model,
        "prompt": "Tell me about rivers.",
        "options": {"num_predict": N, "ignore_eos": True},
    }
    first = last = 0.0
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line:
                continue
            msg = json.loads(line)
            now = time.monotonic()
            first = first or now
            last = now
            if msg["done"]:
                out[model] = msg["eval_count"] / max(last - first, 1e-9)
                out[model + " load_s"] = msg["load_duration"] / 1e9


@pytest.mark.slow
def test_both_real_models_serve_side_by_side(server: Server) -> None:
    from tandem.store.registry import DEFAULT_MODEL

    alone: dict[str, float] = {}
    for model in (DEFAULT_MODEL, GEMMA):  # gemma3 loads on the first request
        _stream(server, model, alone)
    names = {m["name"] for m in httpx.get(server.url + "/api/ps", timeout=10).json()["models"]}
    assert {DEFAULT_MODEL, GEMMA} <= names
    together: dict[str, float] = {}
    threads = [threading.Thread(target=_stream, args=(server, m, together)) for m in (DEFAULT_MODEL, GEMMA)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together.get(DEFAULT_MODEL, 0) > 0 and together.get(GEMMA, 0) > 0
    print(
        f"\nalone: {DEFAULT_MODEL} {alone[DEFAULT_MODEL]:.1f} tok/s, {GEMMA} {alone[GEMMA]:.1f} tok/s "
        f"(gemma3 load {alone[GEMMA + ' load_s']:.2f} s); together: {together[DEFAULT_MODEL]:.1f} and "
        f"{together[GEMMA]:.1f} tok/s"
    )
    r = httpx.post(server.url + "/api/generate", json={"model": GEMMA, "keep_alive": 0}, timeout=60)
    assert r.json()["done_reason"] == "unload"
    wait_for(lambda: GEMMA not in {m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]})
