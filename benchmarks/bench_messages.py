"""Encode and decode time of the inter-process messages (tandem/messages.py), per message.

    python benchmarks/bench_messages.py              # µs per encode and per decode, median of 7 runs
    python benchmarks/bench_messages.py --json-out r.json

Each case is a message the way it crosses a process boundary on a busy server: a step's
OutputBatch of 64 deltas is what the scheduler sends the gateway after every step, a StepResult
is what the worker sends back, with its sampled ids as raw bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from collections.abc import Callable
from typing import Any

from tandem import messages as m


def cases() -> dict[str, Any]:
    params = m.SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=7)
    delta = m.TokenDelta("req-000042", [1234], " the", logprobs=[-0.25])
    return {
        "Doorbell": m.Doorbell(step=1000, slot=3, num_tokens=64, num_seqs=64),
        "SubmitRequest": m.SubmitRequest("req-000042", list(range(200)), params, arrival_time=1.5),
        "GenerateRequest": m.GenerateRequest("req-000042", prompt="Why is the sky blue?", params=params),
        "TokenDelta": delta,
        "Finished": m.Finished("req-000042", m.FinishReason.STOP, 200, 64, 16, "\n\n", 0.01, 0.2, 1.3),
        "OutputBatch(64 deltas)": m.OutputBatch(
            deltas=[m.TokenDelta(f"req-{i:06d}", [1000 + i], " x", logprobs=[-0.5]) for i in range(64)],
            finished=[m.Finished("req-000001", m.FinishReason.LENGTH, 10, 64)],
        ),
        "StepResult(64 seqs)": m.StepResult(
            step=1000, slot=3, num_sampled=64, token_ids=bytes(8 * 64), logprobs=bytes(4 * 64)
        ),
        "Health+Stats": m.Health(
            1, "ok", "smollm2:135m", stats=m.Stats(1, True, *range(12), False, 1.5, 0.1, {"kv": 1})
        ),
    }


def per_call_us(fn: Callable[[], Any], repeats: int = 7) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return statistics.median(timer.repeat(repeats, number)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json-out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    results = {}
    print(f"{'message':<24} {'bytes':>6} {'encode µs':>10} {'decode µs':>10}")
    for name, msg in cases().items():
        frame = m.encode(msg)
        assert m.decode(frame) == msg, name
        enc = per_call_us(lambda msg=msg: m.encode(msg))
        dec = per_call_us(lambda frame=frame: m.decode(frame))
        results[name] = {"bytes": len(frame), "encode_us": round(enc, 3), "decode_us": round(dec, 3)}
        print(f"{name:<24} {len(frame):>6} {enc:>10.2f} {dec:>10.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
