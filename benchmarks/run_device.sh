#!/usr/bin/env bash
# One-shot script for the device machine (one H100/H200): GPU tests of the fast path, then the
# DiT benchmark with its floor kernels. Run from the repository root:
#   bash benchmarks/run_device.sh tests        # GPU parity / fast-path tests only
#   bash benchmarks/run_device.sh 480          # GPU tests, kernels, 480p baseline / fast bf16 / guidance / fp8
#   bash benchmarks/run_device.sh 720          # 720p baseline / fast bf16 / fp8
#   bash benchmarks/run_device.sh vae          # VAE fp32 vs bf16 fast variants; DiT bf16 fast, both SDPA layouts
#   bash benchmarks/run_device.sh attn8        # fp8 attention kernels; DiT bf16, FFN chunks, bf16 + fp8 attention
#   bash benchmarks/run_device.sh fp8attn      # DiT fp8, + fp8 attention, + fast accumulation; kernel profile
#   bash benchmarks/run_device.sh accuracy     # DiT variants vs the reference path, cached conditions or not
#   bash benchmarks/run_device.sh v5           # GPU tests; DiT bf16 / bf16 + fp8 attention / fp8 / fp8 + fp8 attention
#   bash benchmarks/run_device.sh v6           # fp8 attention GPU tests; DiT and window with fp8 attention
#   bash benchmarks/run_device.sh v7           # GPU tests; DiT bf16 / fp8x, profile; memory at the peak (profile_memory.py)
#   bash benchmarks/run_device.sh v7window     # one --preset fast window: fp8 + fp8 attention, bf16
#   bash benchmarks/run_device.sh v12probe     # DiT bf16 / fp8x with GPU power, kernel profiles 1 and 2 speakers, bf16 2-speaker memory
#   bash benchmarks/run_device.sh window       # one --preset fast window: bf16, fp8, fp8 + fp8 attention
#   bash benchmarks/run_device.sh offload-tests  # GPU tests of the VRAM-budget offloading
#   bash benchmarks/run_device.sh offload 480 fp8 [24,16,12,8,6]  # budgets emulated with a memory fraction (H200)
#   bash benchmarks/run_device.sh v17a / v17b  # offload GPU tests + 480p fp8 6 GB windows / 720p windows
#   bash benchmarks/run_device.sh sweep 720 fp8 [24,16,12]  # forward sweep over budgets, 1 and 2 speakers, pinned vs pageable
#   bash benchmarks/run_device.sh v20          # offload GPU tests, then v18d
#   bash benchmarks/run_device.sh v21          # generate --vram 6 --fp8 (random 14B layout), host memory sampled
#   bash benchmarks/run_device.sh v22          # host memory of generate --vram 6 --fp8 and --vram 8 (bf16), sampled
#   bash benchmarks/run_device.sh v23 [fp8-only]  # offload GPU tests, then the 480p windows: fp8 under 6 GB, bf16 under 8 GB
#   bash benchmarks/run_device.sh v24a / v24b / v24h200 / v24h200w  # generate --vram 8 (random 14B layout) + the 480p fp8 6 GB window / the bf16 8 GB window
#   bash benchmarks/run_device.sh v24h200g     # generate --vram 8 on the random 14B layout, H200 only
#   bash benchmarks/run_device.sh v25          # v24a on an H200, v21 on any other card
#   bash benchmarks/run_device.sh v26          # v24a on an H200, `v23 fp8-only` on any other card
#   bash benchmarks/run_device.sh v27          # v24h200g on an H200, the offload GPU tests on any other card
#   bash benchmarks/run_device.sh v18a / v18b / v18c / v18d  # 720p fp8 12 GB / bf16 16 GB windows; 480p bf16
#                                                  # forward sweep; generate --vram 6 --fp8 on the random 14B layout
# fp8 attention needs the cuDNN frontend: put its wheel in .whl/ (carried) and it is installed to /tmp/site.
# Needs the parity fixtures under .bench/shared/parity (copy ../shared/parity/dit there and
# carry .bench) and the commit in .bench/COMMIT (`git rev-parse HEAD > .bench/COMMIT`), since
# .git does not travel. Results and logs go to $OUT (or benchmarks/results when unset).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1; fi
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
export INFINITETALK_SHARED=${INFINITETALK_SHARED:-.bench/shared}
export INFINITETALK_COMMIT=${INFINITETALK_COMMIT:-$(cat .bench/COMMIT 2>/dev/null || echo unknown)}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
what=${1:-480}
step() {  # step SECONDS CMD...: run under a time limit, warnings dropped, with the seconds it took
  local limit=$1; shift; local t0=$SECONDS
  echo "=== $* (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | grep -v -i -E "warn|^ *$" | tail -${STEP_TAIL:-14}
  echo "=== took $((SECONDS - t0)) s (exit ${PIPESTATUS[0]})"
}
window480() {  # window480 DTYPE BUDGET_GB LIMIT_S: one warm 480p --preset fast window under the budget vs resident
  step "$3" python3 benchmarks/bench_offload.py --size 480 --dtype "$1" --budgets "$2" --speakers 1 --reps 1 \
    --no-pageable --no-forward --out "$OUT/offload_480_$1_$2_window.json"
}
generate_vram8() {  # the random 14B layout through `generate --vram 8` (bf16), the GPU capped at 8 GB, host memory sampled
  [ -f /tmp/w14/.complete ] || { step 150 python3 benchmarks/random_layout.py --out /tmp/w14 && touch /tmp/w14/.complete; }
  STEP_TAIL=6 step 260 python3 benchmarks/generate_capped.py --weights /tmp/w14 --vram 8 \
    --image "$INFINITETALK_SHARED/media/portrait.png" --audio "$INFINITETALK_SHARED/media/speaker1.wav" \
    --preset fast --max-seconds 3 --output "$OUT/random14b_vram8.mp4" --memory-trace "$OUT/generate_bf16_vram8_memory.json"
}
offload_gpu_tests() {  # the GPU tests of the VRAM-budget offloading, the slowest eight listed
  STEP_TAIL=20 step 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py --durations=8
}
is_h200() { nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; }
need_h200() {  # stop at once on any other card, keeping the device time for a later try
  is_h200 || { echo "not an H200: stopped"; exit 3; }
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
case "$what" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py -s 2>&1 | tee "$OUT/gpu_tests.log"
    ;;
  480)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py -s 2>&1 | tee "$OUT/gpu_tests.log"
    python3 benchmarks/bench_dit.py --sizes 480 --phases kernels,baseline,fast,guidance,fp8 --reps 3 \
      --out "$OUT/dit_480p.json" 2>&1 | tee "$OUT/bench_480p.log"
    ;;
  720)
    python3 benchmarks/bench_dit.py --sizes 720 --phases baseline,fast,fp8 --reps 2 --fp8-speakers 1 \
      --skip-720-baseline-2spk --out "$OUT/dit_720p.json" 2>&1 | tee "$OUT/bench_720p.log"
    ;;
  extra)  # the routing-map check at 480p, then max-autotune compilation of the bf16 fast path
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 2 --phases fast,routingcheck --reps 2 \
      --out "$OUT/dit_480p_routing.json" 2>&1 | tee "$OUT/bench_480p_routing.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1 --phases fast --reps 3 \
      --compile-mode max-autotune-no-cudagraphs --out "$OUT/dit_480p_autotune.json" 2>&1 | tee "$OUT/bench_480p_autotune.log"
    ;;
  vae)  # the VAE benchmark, then the bf16 fast DiT forward at 480p with both attention layouts
    python3 benchmarks/bench_vae.py --reps 3 --out "$OUT/vae.json" 2>&1 | tee "$OUT/bench_vae.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1 --phases kernels,fast,fastbhld --reps 3 \
      --out "$OUT/dit_480p_v2.json" 2>&1 | tee "$OUT/bench_480p_v2.log"
    ;;
  attn8)  # fp8 self-attention kernels (cuDNN frontend), then the DiT: bf16, FFN in 4 chunks, bf16 + fp8 attention
    python3 benchmarks/bench_fp8_attention.py --out "$OUT/fp8_attention.json" 2>&1 | tee "$OUT/bench_fp8_attention.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --phases kernels,fast,ffnchunk,bf16attn8 --reps 3 \
      --out "$OUT/dit_480p_v4a.json" 2>&1 | tee "$OUT/bench_480p_v4a.log"
    ;;
  fp8attn)  # fp8 linears; + fp8 attention; + fast accumulation and FFN chunks; kernel profile of the last
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1 --fp8-speakers 1,2 --phases fp8,fp8attn,fp8attnfa,profile \
      --reps 3 --out "$OUT/dit_480p_v4b.json" 2>&1 | tee "$OUT/bench_480p_v4b.log"
    ;;
  accuracy)  # every variant against the reference path (1 speaker), with and without cached conditions
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1 --fp8-speakers 1 \
      --phases baseline,fast,nocache,fp8,fp8attn,fp8attnfa,fp8attnfanc --reps 2 \
      --out "$OUT/dit_480p_v4c.json" 2>&1 | tee "$OUT/bench_480p_v4c.log"
    ;;
  window)  # one full window with --preset fast: bf16; fp8 linears (fast accumulation) + fp8 attention
    python3 benchmarks/bench_window.py --variants bf16,fp8x --out "$OUT/window_v4.json" 2>&1 | tee "$OUT/bench_window_v4.log"
    ;;
  v5)  # GPU tests (fast path, fp8 attention); DiT forwards as the pipeline runs them (cached text/CLIP only)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py tests/test_fp8_attention.py -s 2>&1 \
      | grep -E "passed|failed|error|\[parity\]|\[fp8" | tee "$OUT/gpu_tests_v5.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases fast,bf16attn8,fp8,fp8x \
      --reps 3 --out "$OUT/dit_480p_v5.json" 2>&1 | tee "$OUT/bench_480p_v5.log"
    ;;
  v7)  # after the row-major residual stream and the traceable fp8 check: GPU tests, DiT bf16 / fp8x with kernel
        # floors and profile, memory at the peak, kernel plans, sustained clocks
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py tests/test_fast_path.py 2>&1 \
      | tail -15 | tee "$OUT/gpu_tests_v7.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fast,fp8x,profile \
      --reps 3 --out "$OUT/dit_480p_v7.json" 2>&1 | grep -v "^ *[0-9a-zA-Z_:]*Warning" | tail -60 | tee "$OUT/bench_480p_v7.log"
    python3 benchmarks/profile_memory.py --variant fp8x --out "$OUT/memory_fp8x_v7.json" 2>&1 | tail -14
    ;;
  v8)  # bounded q/k scales for fp8 attention, narrow routing-map values: GPU tests, DiT bf16 / fp8x, window fp8x
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py tests/test_fast_path.py -s 2>&1 \
      | grep -E "passed|failed|rror|\[fp8|\[parity" | tail -30 | tee "$OUT/gpu_tests_v8.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fast,fp8x,profile \
      --reps 3 --out "$OUT/dit_480p_v8.json" 2>&1 | grep -v "Warning\|warn" | tail -42 | tee "$OUT/bench_480p_v8.log"
    python3 benchmarks/bench_window.py --variants fp8x --out "$OUT/window_v8.json" 2>&1 | tail -4 | tee "$OUT/bench_window_v8.log"
    ;;
  v10|v9)  # (v10: RoPE without stack) the cuDNN call as a custom op (one graph per block): GPU tests, DiT bf16 / fp8x, memory, window fp8x
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py tests/test_fast_path.py -s 2>&1 \
      | grep -E "passed|failed|rror|\[fp8" | tail -12 | tee "$OUT/gpu_tests_${what}.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fast,fp8x,profile \
      --reps 3 --out "$OUT/dit_480p_${what}.json" 2>&1 | grep -v "Warning\|warn" | tail -40 | tee "$OUT/bench_480p_${what}.log"
    python3 benchmarks/profile_memory.py --variant fp8x --out "$OUT/memory_fp8x_${what}.json" 2>&1 | grep "GB" | head -8
    python3 benchmarks/bench_window.py --variants fp8x --out "$OUT/window_${what}.json" 2>&1 | tail -4 | tee "$OUT/bench_window_${what}.log"
    ;;
  v12)  # fused GELU + fp8 quantisation, q/k in bf16 after RoPE, 1-D RoPE table: GPU tests, the GELU kernel, DiT bf16 / fp8x
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_gelu.py tests/test_fp8_attention.py tests/test_fast_path.py -s 2>&1 \
      | grep -E "passed|failed|rror|\[fp8|\[parity" | tail -30 | tee "$OUT/gpu_tests_${what}.log"
    python3 benchmarks/bench_fp8_gelu.py --out "$OUT/fp8_gelu_${what}.json" 2>&1 | tail -7
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fast,fp8x,profile \
      --profile-speakers 1,2 --reps 3 --out "$OUT/dit_480p_${what}.json" 2>&1 | grep -v "Warning\|warn" | tail -12 \
      | tee "$OUT/bench_480p_${what}.log"
    ;;
  v12window)  # one --preset fast window (fp8x); memory at the peak, bf16 2 speakers and fp8x 1 speaker
    python3 benchmarks/bench_window.py --variants fp8x --out "$OUT/window_v12.json" 2>&1 | tail -4 | tee "$OUT/bench_window_v12.log"
    python3 benchmarks/profile_memory.py --variant bf16 --speakers 2 --out "$OUT/memory_bf16_2spk_v12.json" 2>&1 | grep "GB" | head -6
    python3 benchmarks/profile_memory.py --variant fp8x --speakers 1 --out "$OUT/memory_fp8x_v12.json" 2>&1 | grep "GB" | head -6
    ;;
  v12check)  # review of the final commit: GPU tests, DiT fp8x 1 and 2 speakers with the floor kernels
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_gelu.py tests/test_fp8_attention.py tests/test_fast_path.py -s 2>&1 \
      | grep -E "passed|failed|rror|\[fp8" | tail -12 | tee "$OUT/gpu_tests_${what}.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fp8x \
      --reps 3 --out "$OUT/dit_480p_${what}.json" 2>&1 | grep -v "Warning\|warn" | tail -8
    ;;
  codedump)  # the generated code of the compiled blocks (2 layers), bf16 2 speakers and fp8x 1 speaker, with memory
    python3 benchmarks/profile_memory.py --variant bf16 --speakers 2 --layers 2 --dump-code "$OUT/code" 2>&1 | grep "GB" | head -5
    python3 benchmarks/profile_memory.py --variant fp8x --speakers 1 --layers 2 --dump-code "$OUT/code" 2>&1 | grep "GB" | head -5
    ;;
  v12probe)  # DiT bf16 / fp8x, 1 and 2 speakers, with GPU power; kernel profiles of both; memory of bf16 2 speakers
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1,2 --fp8-speakers 1,2 --phases kernels,fast,fp8x,profile \
      --profile-speakers 1,2 --reps 3 --out "$OUT/dit_480p_${what}.json" 2>&1 | grep -v "Warning\|warn" | tail -60 \
      | tee "$OUT/bench_480p_${what}.log"
    python3 benchmarks/profile_memory.py --variant bf16 --speakers 2 --out "$OUT/memory_bf16_2spk_${what}.json" 2>&1 \
      | grep "GB" | head -14
    ;;
  v7window)  # routing-map value widths; one --preset fast window, fp8 + fp8 attention, then bf16
    python3 benchmarks/bench_routing_map.py --out "$OUT/routing_map.json" 2>&1 | tail -14
    python3 benchmarks/bench_window.py --variants fp8x,bf16 --out "$OUT/window_v7.json" 2>&1 | tail -8 | tee "$OUT/bench_window_v7.log"
    ;;
  v6)  # GPU tests of fp8 attention; DiT and window with fp8 attention after the liveness fix
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py tests/test_fast_path.py 2>&1 \
      | tail -25 | tee "$OUT/gpu_tests_v6.log"
    python3 benchmarks/bench_dit.py --sizes 480 --speakers 1 --fp8-speakers 1,2 --phases bf16attn8,fp8x \
      --reps 3 --out "$OUT/dit_480p_v6.json" 2>&1 | tee "$OUT/bench_480p_v6.log"
    python3 benchmarks/bench_window.py --variants fp8x --out "$OUT/window_v6.json" 2>&1 | tee "$OUT/bench_window_v6.log"
    ;;
  offload-tests)  # GPU tests of runtime.offload (streamed 14B forward bit-identical in bf16 and fp8)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py -s 2>&1 | tee "$OUT/offload_gpu_tests.log"
    ;;
  offload)  # bash benchmarks/run_device.sh offload SIZE DTYPE [BUDGETS]: one process per size/dtype (H200)
    size=${2:-480}; dt=${3:-bf16}; budgets=${4:-24,16,12,8,6}
    python3 benchmarks/bench_offload.py --size "$size" --dtype "$dt" --budgets "$budgets" \
      --out "$OUT/offload_${size}_${dt}_${budgets//,/-}.json" 2>&1 | tee "$OUT/bench_offload_${size}_${dt}_${budgets//,/-}.log"
    ;;
  v13ab) bash "$0" v13a; bash "$0" v13b ;;
  v13dc) bash "$0" v13d; bash "$0" v13c ;;
  v13x)  # offload GPU tests, the parallel path at world size 1, 480p fp8 under 6 GB
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py 2>&1 | tail -15 | tee "$OUT/offload_gpu_tests_v13.log"
    python3 benchmarks/bench_parallel.py --gpus 1 --steps 2 --repeat 4 --out "$OUT/parallel_w1_v13.json" 2>&1 | grep -v -i "warn" | tail -6
    python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --out "$OUT/offload_480_fp8_v13.json" 2>&1 | grep -v -i "warn" | tail -5
    ;;
  v13y)  # GGUF Q8_0 / Q4_K vs bf16; 480p bf16 under 8 GB
    python3 benchmarks/bench_gguf.py --dir /tmp/gguf --warmup 1 --reps 2 --out "$OUT/gguf_v13.json" 2>&1 | grep -v -i "warn" | tail -6
    bash "$0" v13b
    ;;
  v13a)  # GPU tests of the offloading; 480p fp8 under 6 GB (1 and 2 speakers, window, pinned vs pageable)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py 2>&1 | tail -15 | tee "$OUT/offload_gpu_tests_v13.log"
    python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --out "$OUT/offload_480_fp8_v13.json" 2>&1 | grep -v -i "warn" | tail -5
    ;;
  v13b)  # 480p bf16 under 8 GB (one speaker, window)
    python3 benchmarks/bench_offload.py --size 480 --dtype bf16 --budgets 8 --speakers 1 --reps 2 --no-pageable \
      --out "$OUT/offload_480_bf16_v13.json" 2>&1 | grep -v -i "warn" | tail -5
    ;;
  v13c)  # 720p fp8 under 12 GB and bf16 under 16 GB: DiT forwards, one speaker
    python3 benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 12 --speakers 1 --reps 2 --no-window --no-pageable \
      --out "$OUT/offload_720_fp8_v13.json" 2>&1 | grep -v -i "warn" | tail -5
    python3 benchmarks/bench_offload.py --size 720 --dtype bf16 --budgets 16 --speakers 1 --reps 2 --no-window --no-pageable \
      --out "$OUT/offload_720_bf16_v13.json" 2>&1 | grep -v -i "warn" | tail -5
    ;;
  v13d)  # GGUF Q8_0 / Q4_K vs bf16; the parallel code path at world size 1 vs the plain path
    python3 benchmarks/bench_gguf.py --dir /tmp/gguf --warmup 1 --reps 2 --out "$OUT/gguf_v13.json" 2>&1 | grep -v -i "warn" | tail -6
    python3 benchmarks/bench_parallel.py --gpus 1 --steps 2 --repeat 4 --out "$OUT/parallel_w1_v13.json" 2>&1 | grep -v -i "warn" | tail -12
    ;;
  v14a)  # 480p fp8 under 6 GB (1 and 2 speakers, window, pinned vs pageable); 720p fp8 under 12 GB; small offload GPU tests
    step 330 python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --out "$OUT/offload_480_fp8.json"
    step 200 python3 benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 12 --speakers 1 --reps 2 --no-window \
      --no-pageable --out "$OUT/offload_720_fp8.json"
    step 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py -k "placer or tiny_pipeline"
    ;;
  v14b)  # 480p bf16 under 8 GB (one speaker, window); 720p bf16 under 16 GB (DiT forwards)
    step 350 python3 benchmarks/bench_offload.py --size 480 --dtype bf16 --budgets 8 --speakers 1 --reps 2 --no-pageable \
      --out "$OUT/offload_480_bf16.json"
    step 230 python3 benchmarks/bench_offload.py --size 720 --dtype bf16 --budgets 16 --speakers 1 --reps 2 --no-window \
      --no-pageable --out "$OUT/offload_720_bf16.json"
    ;;
  v14c)  # GGUF Q8_0 / Q4_K vs bf16; the streamed 14B forward bit-identical (GPU tests); the parallel path at world size 1
    step 330 python3 benchmarks/bench_gguf.py --dir /tmp/gguf --warmup 1 --reps 2 --out "$OUT/gguf.json"
    rm -rf /tmp/gguf
    step 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py -k "not placer and not tiny_pipeline"
    step 100 python3 benchmarks/bench_parallel.py --gpus 1 --steps 2 --repeat 4 --out "$OUT/parallel_w1.json"
    ;;
  v15a)  # 480p fp8 under 6 GB (1 and 2 speakers, window, pinned vs pageable); GGUF Q8_0 / Q4_K vs bf16
    step 330 python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --out "$OUT/offload_480_fp8.json"
    step 250 python3 benchmarks/bench_gguf.py --dir /tmp/gguf --warmup 1 --reps 2 --out "$OUT/gguf.json"
    ;;
  v15b)  # 480p bf16 under 8 GB (window); 720p fp8 under 12 GB and bf16 under 16 GB (DiT forwards)
    step 280 python3 benchmarks/bench_offload.py --size 480 --dtype bf16 --budgets 8 --speakers 1 --reps 2 --no-pageable \
      --out "$OUT/offload_480_bf16.json"
    step 150 python3 benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 12 --speakers 1 --reps 1 --no-window \
      --no-pageable --out "$OUT/offload_720_fp8.json"
    step 150 python3 benchmarks/bench_offload.py --size 720 --dtype bf16 --budgets 16 --speakers 1 --reps 1 --no-window \
      --no-pageable --out "$OUT/offload_720_bf16.json"
    ;;
  v15c)  # offload GPU tests; the random 14B layout through `generate --vram 8`; the parallel path at world size 1
    step 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py
    step 200 python3 benchmarks/random_layout.py --out /tmp/w14
    STEP_TAIL=30 step 170 python3 -m infinitetalk generate --weights /tmp/w14 --vram 8 --image "$INFINITETALK_SHARED/media/portrait.png" \
      --audio "$INFINITETALK_SHARED/media/speaker1.wav" --preset fast --max-seconds 3 --output "$OUT/random14b_vram8.mp4"
    ;;
  v16a)  # after the VAE-step plan and the pinned arenas: 480p fp8 under 6 GB (window, 1 and 2 speakers, pageable);
         # 480p bf16 under 8 GB (window); an out-of-memory case writes its largest live allocations to the JSON
    step 300 python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --out "$OUT/offload_480_fp8.json"
    step 280 python3 benchmarks/bench_offload.py --size 480 --dtype bf16 --budgets 8 --speakers 1 --reps 2 --no-pageable \
      --out "$OUT/offload_480_bf16.json"
    ;;
  v16b)  # the offload GPU tests; the random 14B layout through `generate --vram 8`
    step 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py
    step 150 python3 benchmarks/random_layout.py --out /tmp/w14
    STEP_TAIL=30 step 230 python3 -m infinitetalk generate --weights /tmp/w14 --vram 8 --image "$INFINITETALK_SHARED/media/portrait.png" \
      --audio "$INFINITETALK_SHARED/media/speaker1.wav" --preset fast --max-seconds 3 --output "$OUT/random14b_vram8.mp4"
    ;;
  v17a)  # after the traced VAE terms, slots freed outside sampling, expandable segments, views outside inference
         # mode: the offload GPU tests and the determinism check, then 480p fp8 under 6 GB (window, 1 and 2 speakers)
    step 220 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload_gpu.py
    step 100 python3 benchmarks/check_stream_determinism.py --out "$OUT/stream_determinism.json"
    step 260 python3 benchmarks/bench_offload.py --size 480 --dtype fp8 --budgets 6 --speakers 1,2 --reps 2 \
      --no-pageable --out "$OUT/offload_480_fp8.json"
    ;;
  v17b)  # 720p windows: fp8 under 12 GB, bf16 under 16 GB (one speaker), pinned vs pageable on the first
    step 290 python3 benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 12 --speakers 1 --reps 2 \
      --out "$OUT/offload_720_fp8.json"
    step 290 python3 benchmarks/bench_offload.py --size 720 --dtype bf16 --budgets 16 --speakers 1 --reps 2 --no-pageable \
      --out "$OUT/offload_720_bf16.json"
    ;;
  v17c)  # (commit 41a2e54, run with --cold-budget-window: no warm-up window under the budget) 720p fp8 under 12 GB
    step 560 python3 benchmarks/bench_offload.py --size 720 --dtype fp8 --budgets 12 --speakers 1 --reps 1 \
      --no-pageable --out "$OUT/offload_720_fp8.json"
    ;;
  v18a|v18b)  # after the plan's largest-fitting decode tile: 720p windows, a one-step warm-up window (it compiles
              # and autotunes every shape) then the timed one, one call each: fp8 under 12 GB (v18a), bf16 under 16 GB (v18b)
    if [ "$what" = v18a ]; then dt=fp8; gb=12; else dt=bf16; gb=16; fi
    step 585 python3 benchmarks/bench_offload.py --size 720 --dtype $dt --budgets $gb --speakers 1 --reps 1 \
      --no-pageable --no-forward --warmup-steps 1 --out "$OUT/offload_720_$dt.json"
    ;;
  v18c)  # the budget sweep of the DiT forward at 480p bf16 (24 to 6 GB), one and two speakers, pinned vs pageable
    # (ran at 010ed5c with --reps 1: every budget failed in the benchmark's own pageable step, which brought
    # the whole DiT back to the GPU under the budget's cap; fixed since)
    step 420 python3 benchmarks/bench_offload.py --size 480 --dtype bf16 --budgets 24,16,12,8,6 --speakers 1,2 --reps 1 \
      --no-window --out "$OUT/offload_480_bf16_sweep.json"
    ;;
  sweep)  # bash benchmarks/run_device.sh sweep SIZE DTYPE [BUDGETS]: the DiT forward under each budget (largest
          # first), one and two speakers, pinned then pageable; one call per size/dtype, results saved per budget
    size=${2:-480}; dt=${3:-bf16}; budgets=${4:-24,16,12,8,6}
    step 570 python3 benchmarks/bench_offload.py --size "$size" --dtype "$dt" --budgets "$budgets" --speakers 1,2 --reps 1 \
      --no-window --out "$OUT/offload_${size}_${dt}_sweep.json"
    ;;
  v18d)  # the random 14B layout through `generate --vram 6 --fp8` on a GPU capped at 6 GB (the 480p fp8 target, end to end)
    step 150 python3 benchmarks/random_layout.py --out /tmp/w14
    STEP_TAIL=30 step 300 python3 benchmarks/generate_capped.py --weights /tmp/w14 --vram 6 --fp8 --image "$INFINITETALK_SHARED/media/portrait.png" \
      --audio "$INFINITETALK_SHARED/media/speaker1.wav" --preset fast --max-seconds 3 --output "$OUT/random14b_vram6_fp8.mp4"
    ;;
  v20)  # the offload GPU tests (with the release of freed pinned arenas), then v18d
    offload_gpu_tests
    bash "$0" v18d
    ;;
  v21)  # generate --vram 6 --fp8 on the random 14B layout, host memory sampled (after the heap trim and placer arenas)
    step 150 python3 benchmarks/random_layout.py --out /tmp/w14
    STEP_TAIL=4 step 300 python3 benchmarks/generate_capped.py --weights /tmp/w14 --vram 6 --fp8 --image "$INFINITETALK_SHARED/media/portrait.png" \
      --audio "$INFINITETALK_SHARED/media/speaker1.wav" --preset fast --max-seconds 3 --output /tmp/v21_fp8.mp4 \
      --memory-trace "$OUT/generate_fp8_vram6_memory.json"
    ;;
  v22)  # after the per-block heap trim and the placer's arenas: the host memory of two whole jobs on the random
         # 14B layout, sampled: fp8 under 6 GB, then bf16 under 8 GB (the host bound is read on the bf16 one)
    [ -f /tmp/w14/.complete ] || { step 150 python3 benchmarks/random_layout.py --out /tmp/w14 && touch /tmp/w14/.complete; }
    for job in "6 --fp8" "8"; do
      set -- $job; tag=$([ "${2:-}" = --fp8 ] && echo fp8 || echo bf16)
      STEP_TAIL=6 step 280 python3 benchmarks/generate_capped.py --weights /tmp/w14 --vram "$@" \
        --image "$INFINITETALK_SHARED/media/portrait.png" --audio "$INFINITETALK_SHARED/media/speaker1.wav" \
        --preset fast --max-seconds 3 --output "/tmp/v22_$tag.mp4" --memory-trace "$OUT/generate_${tag}_vram$1_memory.json"
      rm -f "/tmp/v22_$tag.mp4"
    done
    ;;
  v23)  # the offload GPU tests, then the 480p windows at the current commit: fp8 under 6 GB, bf16 under 8 GB
    offload_gpu_tests
    window480 fp8 6 190
    [ "${2:-}" = fp8-only ] || window480 bf16 8 330
    ;;
  v24a)  # the random 14B layout through `generate --vram 8` (bf16) on a GPU capped at 8 GB, host memory sampled
          # (after colour correction and the uint8 conversion one chunk at a time), then the 480p fp8 window under 6 GB
    generate_vram8
    window480 fp8 6 190
    ;;
  v24h200)  # v24a only on an H200 (stops at once on any other card, to save device time for a later try)
    need_h200
    bash "$0" v24a
    ;;
  v24h200g)  # `generate --vram 8` on the random 14B layout, only on an H200 (v24a without the window: a short device budget)
    need_h200
    generate_vram8
    ;;
  v24h200w)  # the 480p fp8 window under 6 GB, only on an H200 (a short device budget)
    need_h200
    window480 fp8 6 190
    ;;
  v24b)  # the 480p bf16 window under 8 GB
    window480 bf16 8 330
    ;;
  v25)  # on an H200: v24a (generate --vram 8 on the random 14B layout, then the 480p fp8 6 GB window);
         # on an H100: the host memory of generate --vram 6 --fp8 after the chunked colour correction (v21)
    if is_h200; then bash "$0" v24a; else bash "$0" v21; fi
    ;;
  v26)  # on an H200: v24a (generate --vram 8 on the random 14B layout, then the 480p fp8 6 GB window);
         # on any other card: the offload GPU tests at this commit, then the 480p fp8 6 GB window
    if is_h200; then bash "$0" v24a; else bash "$0" v23 fp8-only; fi
    ;;
  v27)  # a short device budget: on an H200 `generate --vram 8` on the random 14B layout (v24h200g);
         # on any other card the offload GPU tests at this commit
    if is_h200; then bash "$0" v24h200g; else offload_gpu_tests; fi
    ;;
  *) echo "unknown: $what"; exit 2 ;;
esac
