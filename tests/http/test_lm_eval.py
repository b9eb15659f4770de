"""lm-evaluation-harness against a live `tandem serve`: a multiple-choice (loglikelihood) task from
a JSONL file the test ships, through lm-eval's `local-completions` model with its default
tokenizer backend (it finds /tokenizer_info and /tokenize, so nothing is downloaded), batched and
concurrent. Every choice's loglikelihood and greedy flag equal a float32 transformers forward of
the same tiny GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from live_server import Server

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent.parent / "data" / "lm_eval_mc.jsonl"
TASK = "tandem_tiny_mc"


def _task_dir(folder: Path) -> Path:
    """The task as a user writes it for `lm_eval --include_path DIR --tasks tandem_tiny_mc`."""
    import yaml

    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    return folder


def _reference(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split of the pair (trailing context spaces join the continuation; the whole is
    encoded, no BOS), then the sum of the continuation's log-probabilities and whether each was
    the argmax."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_bos=False)
    ctx = len(tok.encode(context, add_bos=False))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = logp[ctx - 1 : len(whole) - 1]
    target = torch.tensor(whole[ctx:])
    picked = rows[torch.arange(len(target)), target]
    return float(picked.sum()), bool((rows.argmax(-1) == target).all())


def test_multiple_choice_loglikelihoods_equal_the_reference(
    tiny_server: Server, tiny_gguf: Path, tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions",
        # batch_size 4: several prompts (token-id lists) per request; num_concurrent 2: two at once.
        model_args={
            "model": "tiny",
            "base_url": tiny_server.url + "/v1/completions",
            "batch_size": 4,
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=[TASK],
        # Only this task: indexing lm-eval's thousands of built-in ones takes seconds.
        task_manager=TaskManager(include_path=str(_task_dir(tmp_path / "tasks")), include_defaults=False),
        log_samples=True,
    )
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    best = []
    for sample, doc in zip(samples, docs, strict=True):
        got = sample["filtered_resps"]
        assert len(got) == len(doc["choices"])
        for (ll, greedy), (context, continuation) in zip(got, sample["arguments"], strict=True):
            want_ll, want_greedy = _reference(model, tiny_tokenizer, context, continuation)
            assert ll == pytest.approx(want_ll, abs=1e-4)
            assert greedy == want_greedy
        best.append(int(np.argmax([ll for ll, _ in got])) == doc["answer"])
    assert out["results"][TASK]["acc,none"] == pytest.approx(np.mean(best))


def test_tokenizer_info_names_the_special_tokens(tiny_server: Server, tiny_tokenizer) -> None:
    """What lm-eval's remote tokenizer reads: eos_token's text, which /tokenize (no BOS) turns
    back into the EOS id."""
    with tiny_server.client() as c:
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
        assert info["chat_template"] == tiny_tokenizer.chat_template and info["model_max_length"] == 4096
        ids = c.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
        assert ids["tokens"] == [tiny_tokenizer.eos_id]
        assert c.get("/tokenizer_info", params={"model": "nope"}).status_code == 404
