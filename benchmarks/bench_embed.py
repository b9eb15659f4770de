"""all-minilm embeddings per second through tandem's engine against sentence-transformers, one run.

    python benchmarks/bench_embed.py                      # batch 32 of 64-token inputs, 1 thread
    python benchmarks/bench_embed.py --threads 2 --dtype float32 --rounds 20

Both sides get the same token ids (batch x tokens, [CLS] ... [SEP]) and the same torch thread
count: sentence-transformers runs its modules (BertModel, mean pooling, Normalize) on them in this
process; tandem runs the whole engine (scheduler + worker processes, each batch submitted at once
as embedding requests and packed into one step). Rounds alternate A B A B so drift lands on both;
the figures are medians of per-round embeddings/s, and the ratio is tandem's over theirs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.messages import EmbedRequest, OutputBatch, decode, encode
from tandem.store.model_store import ensure_model


def inputs(batch: int, tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[101, *rng.integers(1000, vocab, tokens - 2).tolist(), 102] for _ in range(batch)]


def tandem_round(engine: EngineProcess, batch: list[list[int]], tag: str) -> tuple[float, np.ndarray]:
    assert engine.to_sched is not None and engine.from_sched is not None
    t0 = time.perf_counter()
    for i, ids in enumerate(batch):
        engine.to_sched.send(encode(EmbedRequest(f"{tag}-{i}", ids, time.monotonic())))
    vectors: dict[str, np.ndarray] = {}
    done = 0
    while done < len(batch):
        msg = decode(engine.from_sched.recv())
        if isinstance(msg, OutputBatch):
            for e in msg.embeddings:
                vectors[e.request_id] = np.frombuffer(e.vector, dtype="<f4")
            done += len(msg.finished) + len(msg.errors)
            if msg.errors:
                raise RuntimeError(msg.errors[0].message)
    elapsed = time.perf_counter() - t0
    return elapsed, np.stack([vectors[f"{tag}-{i}"] for i in range(len(batch))])


def st_round(model, batch: list[list[int]]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    ids = torch.tensor(batch)
    features = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    with torch.inference_mode():
        out = model(features)["sentence_embedding"]
    return time.perf_counter() - t0, out.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="tandem's --dtype (auto: bf16 where the CPU has it)")
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    path = ensure_model("all-minilm").path
    torch.set_num_threads(args.threads)
    st = SentenceTransformer(str(path), device="cpu").eval()
    batch = inputs(args.batch, args.tokens, 30522)
    cfg = EngineConfig(
        model_path=str(path),
        model_name="all-minilm",
        dtype=args.dtype,
        threads=args.threads,
        max_num_batched_tokens=max(2048, args.batch * args.tokens),
        max_num_seqs=max(64, args.batch),
    )
    engine = EngineProcess(cfg).start()
    ours, theirs = [], []
    try:
        for r in range(2):  # warm-up: first steps allocate, oneDNN picks kernels
            tandem_round(engine, batch, f"w{r}")
            st_round(st, batch)
        for r in range(args.rounds):
            t, got = tandem_round(engine, batch, f"r{r}")
            ours.append(args.batch / t)
            t, ref = st_round(st, batch)
            theirs.append(args.batch / t)
    finally:
        engine.close()
    cos = float(np.min(np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"all-minilm, batch {args.batch} x {args.tokens} tokens, {args.threads} thread(s), "
        f"tandem --dtype {args.dtype}"
    )
    print(f"  tandem engine:          {a:8.1f} embeddings/s")
    print(f"  sentence-transformers:  {b:8.1f} embeddings/s (float32)")
    print(f"  ratio:                  {a / b:8.2f}x   (min cosine to sentence-transformers {cos:.6f})")


if __name__ == "__main__":
    main()
