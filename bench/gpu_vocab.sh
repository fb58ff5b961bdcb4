#!/usr/bin/env bash
# Device side: the vocabulary-offload runs of docs/benchmarks.md, one step per `run` call
# (each under the device's 10-minute limit), logs and results under $OUT as they go.
#   bash bench/gpu_vocab.sh 8b        Qwen3-8B shape: 4 and 6 GiB, planned as lowvram plans
#   bash bench/gpu_vocab.sh 8b-old    the same at 6 GiB with ENGINE_OFFLOAD_VOCAB=none (the
#                                     plan before the plugin), then UVA against prefetch
#   bash bench/gpu_vocab.sh 70b-2     Llama-3.3-70B AWQ shape at 2 GiB, 8 streams
#   bash bench/gpu_vocab.sh 70b-10    the same at 10 GiB, 16 streams
#   bash bench/gpu_vocab.sh 70b-10-old  ... with ENGINE_OFFLOAD_VOCAB=none
set -euo pipefail
export PYTHONPATH=/tmp/site VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! python3 -c "import lowvram.engine.vllm.plugin" 2>/dev/null || [ ! -e /tmp/.lowvram-installed ]; then
  # Installed, not just importable: vLLM finds the plugin by its entry point.
  { python3 -m pip install -q --no-deps --no-build-isolation -e . ||
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . ; } \
    >"$OUT/pip.log" 2>&1 && touch /tmp/.lowvram-installed
  python3 -c "from lowvram.engine.vllm.environment import missing_plugin as m; print('plugin:', m(None) or 'found')" | tee -a "$OUT/plans.log"
fi
plans() { python3 -m bench.gpu_plans "$@" --out "$OUT/plans.jsonl" --work "$OUT" 2>&1 | tee -a "$OUT/plans.log"; }
case "$1" in
  install) ;;
  8b)
    [ -d /tmp/m8 ] || python3 -m bench.gpu_models /tmp/m8 qwen3-8b | tee -a "$OUT/plans.log"
    plans /tmp/m8 --vram 4 6 --context 4096 --concurrency 8 --tokens 96 --ttft-samples 3 ;;
  8b-old)
    plans /tmp/m8 --vram 6 --context 4096 --concurrency 8 --tokens 96 --ttft-samples 3 --offload-vocab none
    python3 -m bench.offload_backends /tmp/m8 --vram 5 --streams 8 --tokens 64 --work "$OUT" 2>&1 | tee "$OUT/backends.log" ;;
  70b-2)
    rm -rf /tmp/m8
    [ -d /tmp/m70 ] || python3 -m bench.gpu_models /tmp/m70 llama-70b-awq | tee -a "$OUT/plans.log"
    plans /tmp/m70 --vram 2 --context 4096 --concurrency 8 --tokens 24 --ttft-samples 2 ;;
  70b-10)
    plans /tmp/m70 --vram 10 --context 4096 --concurrency 16 --tokens 24 --ttft-samples 2 ;;
  70b-10-old)
    plans /tmp/m70 --vram 10 --context 4096 --concurrency 16 --tokens 24 --ttft-samples 2 --offload-vocab none ;;
esac
