"""Qwen3, Mistral and Gemma 3 (text) against transformers: random-weight models built from its config
classes, loaded from a safetensors folder and from a GGUF file of the same weights, run through the
paged, batched forward (prefill chunks beside decodes, sliding layers past their window)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from paged_runner import PagedRunner, assert_close
from step_driver import BLOCK, Seq, make_runner, tokens_of, write_step

from tandem.formats.loader import LoadedModel, load_gguf, load_model_weights
from tandem.formats.tiny import tiny_vocab
from tandem.formats.tiny_from_hf import write_gguf_from_hf
from tandem.gpu_worker.model.quant_linear import QuantLinear

transformers = pytest.importorskip("transformers")

VOCAB = len(tiny_vocab()[0])  # the GGUF files carry tiny.py's vocabulary
WINDOW = 8
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
SLIDING_GLOBAL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# name: (config class, model class, config arguments, formats)
CASES = {
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=24, rope_theta=1e6, tie_word_embeddings=False),  # head_dim != hidden / heads
        ("safetensors", "gguf"),
    ),
    "mistral-swa": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=WINDOW, rope_theta=1e6, tie_word_embeddings=False),
        ("safetensors", "gguf"),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,  # llama.cpp's GGUF convention: head_dim
            sliding_window=WINDOW,
            layer_types=SLIDING_GLOBAL_SLIDING,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=3.0,  # low enough to bend these logits
        ),
        ("safetensors", "gguf"),
    ),
    "gemma3-scalar": (  # an attention scale other than head_dim, which GGUF files cannot say
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16, query_pre_attn_scalar=40, sliding_window=WINDOW, layer_types=SLIDING_GLOBAL_SLIDING
        ),
        ("safetensors",),
    ),
}
PARAMS = [(case, fmt) for case, (*_, formats) in CASES.items() for fmt in formats]


def _hf_model(case: str) -> torch.nn.Module:
    cfg_cls, model_cls, extra, _ = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # init leaves norms at 1 (Gemma: at 0, i.e. 1 + 0): make them matter
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    return hf


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{c}-{f}" for c, f in PARAMS])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(transformers model, tandem's load of it, the case name, the file or folder)."""
    case, fmt = request.param
    hf = _hf_model(case)
    folder = tmp_path_factory.mktemp(case)
    if fmt == "safetensors":
        hf.save_pretrained(folder, safe_serialization=True)
        path = folder
    else:
        state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
        path = write_gguf_from_hf(folder / "m.gguf", hf.config.to_dict(), state)
    return hf, load_model_weights(path), case, path


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0]


def test_config_read_from_both_formats(pair: tuple) -> None:
    _, loaded, case, _ = pair
    c = loaded.config
    assert c.architecture == {"qwen3": "qwen3", "mistral-swa": "llama"}.get(case, "gemma3")
    assert c.qk_norm == (case != "mistral-swa")
    if case == "qwen3":
        assert c.head_dim == 24 and c.sliding_window is None and not c.attention_bias
    elif case == "mistral-swa":
        assert c.sliding_window == WINDOW and c.sliding_layers == (True, True, True)
    else:
        assert c.sliding_window == WINDOW and c.sliding_layers == (True, False, True)
        assert c.rope_local_theta == 10000.0
        assert c.attention_scale == (40 if case == "gemma3-scalar" else 16) ** -0.5
    if case == "gemma3":
        assert c.rope_scaling is not None and c.rope_scaling.kind == "linear" and c.rope_scaling.factor == 2
        assert c.final_logit_softcap == 3.0


def test_mixed_batches_match_transformers(pair: tuple) -> None:
    hf, loaded, _, _ = pair
    rng = random.Random(7)
    # b and a grow past the window (8 keys) during prefill, d and c only while decoding.
    lens = {"a": 13, "b": 21, "c": 5, "d": 1}
    prompts = {n: [rng.randrange(VOCAB) for _ in range(k)] for n, k in lens.items()}
    extra = {n: [rng.randrange(VOCAB) for _ in range(12)] for n in prompts}
    ref = {n: _hf_logits(hf, prompts[n] + extra[n]) for n in prompts}
    r = PagedRunner(loaded, dtype=torch.float32)
    fed = dict.fromkeys(prompts, 0)  # tokens of extra fed so far

    def check(work: list[tuple[str, list[int]]]) -> None:
        out = r.step(work)
        for (n, _), got in zip(work, out, strict=True):
            assert_close(got, ref[n][r.done[n] - 1], 1e-4)

    check([("a", prompts["a"]), ("b", prompts["b"][:6]), ("d", prompts["d"])])
    check([("a", extra["a"][:1]), ("b", prompts["b"][6:]), ("c", prompts["c"]), ("d", extra["d"][:1])])
    fed.update(a=1, d=1)
    for step in range(7):  # decodes across block and window boundaries beside chunks of c
        work = [(n, extra[n][fed[n] : fed[n] + 1]) for n in ("a", "b", "d")]
        chunk = 2 if step < 3 else 1
        work.append(("c", extra["c"][fed["c"] : fed["c"] + chunk]))
        for n, new in work:
            fed[n] += len(new)
        check(work)


def test_greedy_through_the_worker_matches_transformers(pair: tuple) -> None:
    """The real ModelRunner on ring slots (--dtype float32): the window reaches its step plan."""
    hf, _, _, path = pair
    prompt = [random.Random(1).randrange(VOCAB) for _ in range(11)]  # past the window
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
    runner, ring = make_runner(path, context=64)
    try:
        slot = ring.slot(0)
        seq = Seq(0, list(range(5, 5 + -(-64 // BLOCK))), prompt_len=len(prompt))
        got = tokens_of(runner, runner.launch(slot, write_step(slot, 0, [(seq, prompt)]), 0.0))
        for step in range(1, 8):
            got += tokens_of(runner, runner.launch(slot, write_step(slot, step, [(seq, [got[-1]])]), 0.0))
    finally:
        ring.unlink()
    assert got == want.tolist()


@pytest.mark.parametrize("case", ["qwen3", "gemma3"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda t: t.name)
def test_packed_weights_track_the_float32_forward(tmp_path: Path, case: str, qtype: Q) -> None:
    """--dtype auto on a CPU: quantized matrices stay packed (bf16 kernels, fp32 activations)."""
    hf = _hf_model(case)
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    path = write_gguf_from_hf(tmp_path / "q.gguf", hf.config.to_dict(), state, qtype)
    exact: LoadedModel = load_gguf(path)
    packed = load_gguf(path, dtype=torch.bfloat16, packed=True)
    r, ref = PagedRunner(packed, dtype=torch.bfloat16), PagedRunner(exact)
    assert isinstance(r.model.layers[0].mlp.gate_up, QuantLinear)
    ids = list(np.random.default_rng(0).integers(0, VOCAB, 20))
    for chunk in (ids[:14], *[[i] for i in ids[14:]]):  # a prefill past the window, then decodes
        want = ref.step([("s", chunk)])[0]
        assert_close(r.step([("s", chunk)])[0], want, 3e-2)
