"""The real Gemma 3 270M (catalogue gemma3:270m, Q4_K_M GGUF) against transformers loading the same
file: logits past the sliding window, greedy continuations, and `tandem generate` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paged_runner import PagedRunner, assert_close

from tandem.formats.loader import LoadedModel, load_gguf
from tandem.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def ours(gemma3_model_path: Path) -> LoadedModel:
    return load_gguf(gemma3_model_path)


@pytest.fixture(scope="module")
def hf(gemma3_model_path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_model_path.parent), gguf_file=gemma3_model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tok(gemma3_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_model_path)


def test_config_is_gemma3_with_five_sliding_layers_in_six(ours: LoadedModel, hf) -> None:
    c = ours.config
    shape = (c.architecture, c.num_layers, c.hidden_size, c.head_dim, c.vocab_size)
    assert shape == ("gemma3", 18, 640, 256, 262144)
    assert c.sliding_window == hf.config.sliding_window == 512
    assert [not s for s in c.sliding_layers] == [t == "full_attention" for t in hf.config.layer_types]


def test_logits_match_transformers_past_the_window(ours: LoadedModel, hf) -> None:
    ids = [2] + [1000 + (i * 37) % 5000 for i in range(600)]  # 601 tokens: past the 512-key window
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    r = PagedRunner(ours, num_blocks=160)
    # A prefill in two chunks, the second crossing the window, then decodes.
    r.step([("s", ids[:300])])
    assert_close(r.step([("s", ids[300:590])])[0], want[589], 1e-3)
    for i in range(590, len(ids)):
        assert_close(r.step([("s", [ids[i]])])[0], want[i], 1e-3)


def test_greedy_tokens_match_transformers(ours: LoadedModel, hf, tok: Tokenizer) -> None:
    r = PagedRunner(ours, num_blocks=64)
    prompts = {f"p{i}": tok.encode(text) for i, text in enumerate(PROMPTS)}
    got: dict[str, list[int]] = {n: [] for n in prompts}
    out = r.step(list(prompts.items()))  # the three prompts as one batch, then batched decodes
    for _ in range(16):
        for n, logits in zip(prompts, out, strict=True):
            got[n].append(int(logits.argmax()))
        out = r.step([(n, [got[n][-1]]) for n in prompts])
    for n, ids in prompts.items():
        with torch.inference_mode():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        assert got[n] == want.tolist(), n


def test_tandem_generate_runs_gemma3(gemma3_model_path: Path) -> None:
    cmd = [sys.executable, "-m", "tandem.cli", "generate", "--model", "gemma3:270m", "--device", "cpu"]
    cmd += ["--raw", "--temperature", "0", "--max-tokens", "8", "--json", PROMPTS[0]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert len(out["token_ids"]) == 8 and out["text"].strip()
    assert out["prompt_token_ids"][0] == 2  # <bos>
