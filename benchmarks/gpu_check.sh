#!/usr/bin/env bash
# One run on a lent GPU machine, in under 8 minutes: install what the machine lacks (wheels
# carried in benchmarks/wheels: it has no network), run the GPU tests, an end-to-end generate
# with and without CUDA graphs, and the decode benchmark; JSON and PNG land in $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to benchmarks/results/gpu-DATE
#
# Every step is timed and has its own timeout; a failing step is recorded and the rest still run;
# the exit status is 0 only when every step passed. Files written to $OUT (7):
#   gpu_check.log, gpu_check.json (versions, steps, end-to-end result), gpu-tests.xml,
#   gpu-decode-smollm2-135m.{json,png}, gpu-decode-llama-3.1-8b.{json,png}
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="${TMPDIR:-/tmp}/tandem-site"
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
BUDGET_S=460  # the whole script stays under 8 minutes, timeouts' grace included
START_NS=$(date +%s%N)
FAILED=0
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed_s() { echo $(( ($(date +%s%N) - START_NS) / 1000000000 )); }

step() {  # step NAME LIMIT_S COMMAND... : run with a timeout, record rc and seconds
  local name=$1 limit=$2 rc=0 t0
  shift 2
  t0=$(date +%s%N)
  echo "=== $(date -u +%T) $name (limit ${limit}s, $(elapsed_s)s elapsed)"
  # A child bash runs the step (timeout cannot run a shell function); it sees the exported ones.
  timeout --kill-after=5 "$limit" bash -euo pipefail -c '"$@"' step "$@" || rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "=== $name: exit $rc after ${ms} ms"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$limit" >>"$STEPS"
  if [ "$rc" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
}

versions() {
  uname -a
  nvidia-smi -L || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: NOT INSTALLED (the paged kernel and CUDA graphs will be off)")
EOF
}

install() {
  # --no-deps: the machine has the rest (numpy, pyyaml, tqdm, msgpack, tokenizers, jinja2, click).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    benchmarks/wheels/*.whl
  "$PY" -c "import gguf, zmq, msgpack, tokenizers, jinja2, click, tandem; print('imports ok')"
}

gpu_tests() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: GPU tests would only skip')"
  "$PY" -m pytest -q -p no:cacheprovider -rs --timeout 120 --junitxml "$OUT/gpu-tests.xml" \
    tests/gpu_worker/test_gpu_launch.py tests/gpu_worker/test_triton_attention.py \
    tests/gpu_worker/test_launch.py tests/gpu_worker/test_model_forward.py
}

end_to_end() {
  # The real engine (scheduler + worker processes) on the GPU: greedy tokens with CUDA graphs must
  # equal those of --enforce-eager (both run the same paged kernel, so they are bit-identical).
  "$PY" -c "from tandem.formats.tiny import TinySpec, write_tiny_gguf as w; \
w('$WORK/tiny.gguf', TinySpec(hidden=256, ffn=512, layers=4, heads=8, kv_heads=2, context=1024))"
  local args=(generate --model "$WORK/tiny.gguf" --device cuda --raw --json --temperature 0 --max-tokens 48)
  "$PY" -m tandem.cli "${args[@]}" "The quick brown fox" >"$WORK/graphs.json"
  "$PY" -m tandem.cli "${args[@]}" --enforce-eager "The quick brown fox" >"$WORK/eager.json"
  "$PY" - "$WORK/graphs.json" "$WORK/eager.json" "$WORK/e2e.json" <<'EOF'
import json, sys
g, e = (json.load(open(p)) for p in sys.argv[1:3])
same = g["token_ids"] == e["token_ids"]
res = {"graphs_equal_eager": same, "tokens": len(g["token_ids"]),
       "graphs_decode_tok_s": g["timings"]["decode_tokens_per_s"],
       "eager_decode_tok_s": e["timings"]["decode_tokens_per_s"]}
json.dump(res, open(sys.argv[3], "w"))
print(res)
sys.exit(0 if same and len(g["token_ids"]) == 48 else 1)
EOF
}

bench() {  # bench SHAPE BATCHES STEPS REPEATS
  "$PY" benchmarks/bench_decode.py --device cuda --synthetic "$1" --dtype bfloat16 --batches "$2" \
    --contexts 128,2048 --steps "$3" --repeats "$4" \
    --json-out "$OUT/gpu-decode-$1.json" --plot "$OUT/gpu-decode-$1.png"
}

export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PY SITE OUT WORK
export -f versions install gpu_tests end_to_end bench
step versions 30 versions
step install 60 install
step gpu-tests 150 gpu_tests
step end-to-end 90 end_to_end
step bench-smollm2-135m 120 bench smollm2-135m 1,8,32,64 8 3
left=$(( BUDGET_S - $(elapsed_s) ))
if [ "$left" -ge 60 ]; then
  step bench-llama-3.1-8b "$left" bench llama-3.1-8b 1,8,64 4 2
else
  echo "=== skipping the llama-3.1-8b shape: ${left}s left of the ${BUDGET_S}s budget"
fi

"$PY" - "$STEPS" "$WORK/e2e.json" "$OUT/gpu_check.json" "$FAILED" <<'EOF'
import json, os, platform, sys
steps = [dict(zip(("name", "exit", "ms", "limit_s"), line.rstrip("\n").split("\t"))) for line in open(sys.argv[1])]
info = {"python": platform.python_version()}
try:
    import torch
    info |= {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    import triton
    info["triton"] = triton.__version__
except ImportError:
    pass
e2e = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
json.dump({"versions": info, "steps": steps, "end_to_end": e2e, "failed_steps": int(sys.argv[4])},
          open(sys.argv[3], "w"), indent=2)
EOF
echo "=== done in $(elapsed_s)s, $FAILED step(s) failed; files in $OUT:"
ls -la "$OUT"
rm -rf "$WORK"
[ "$FAILED" -eq 0 ]
