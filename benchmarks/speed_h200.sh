#!/usr/bin/env bash
# The speed runs of issue 17 on one H200 (benchmarks/RESULTS.md section 18): graph-captured decode against the eager
# path, SmolLM2-135M-Instruct (joined at $KVTIER_MODEL_DIR; README, "Measuring on the GPU") and the Llama-3.1-8B
# shape. Stages run one after the other (timings need the GPU alone); each writes OUT_DIR/STAGE/ and OUT_DIR/STAGE.log.
set -u
usage() {
    cat <<'USAGE'
usage: bash benchmarks/speed_h200.sh OUT_DIR STAGE...
  tests    pytest -m gpu on the static decode and its graphs, and on consensus' window scoring kernel
  kernels  benchmarks/kernels.py: the Triton kernels against their references at the 8B shape, 1M tokens
  prefill  kvtier bench --model smollm2 at 32K and 128K, real prefills: stock and consensus (the default)
  prefill-quest the same with quest
  forwards kvtier bench --model smollm2 at 128K, real prefills of 32K- and 128K-token forwards (the bench's default is
           8K; generate takes a prompt in one forward): stock and consensus; then llama8b at 128K the same way
  prefill8b kvtier bench --model llama8b at 128K, real prefills, the paper's 8K scope with consensus: stock and kvtier
  smollm2  kvtier bench --model smollm2 at 32K and 1M (kvtier filled, stock prefilled): stock, kvtier with graphs, eager
  llama8b  kvtier bench --model llama8b at 8K and 128K (filled), the paper's 8K scope with consensus: graphs vs eager
  decode8b   the same, graphs only (stock beside)
  decode-smollm2 kvtier bench --model smollm2 at 32K and 1M (filled), graphs only (stock beside)
  long8b   kvtier bench --model llama8b at 8K and 1M (filled), kvtier-host (a 36 GiB span pool, at 1M the other 92 GiB
           of K/V pinned; consensus' 64 GiB of keys on the GPU beside it), graphs: decode_flat from one run
  prefill1m kvtier bench --model llama8b at 1M, a real prefill in 16K forwards, kvtier-host with a 32 GiB span pool,
           consensus scoring the first and last query chunk of each forward (configs/scope-8k-consensus-stride32.yaml);
           8 decode steps. The kvtier command pins host blocks by cudaHostRegister (kvtier.allocator)
  prefill1m-8k the same in 8K forwards, every 8th chunk scoring (configs/scope-8k-consensus-stride8.yaml)
  prefill1m-hostalloc prefill1m with the host blocks pinned by cudaHostAlloc (pinned_use_cuda_host_register:False)
  profile1m benchmarks/decode_profile.py --chunk 8k at 960K on the 8B shape, kvtier-host as long8b, consensus (every
           chunk scores): a prefill forward's time per query chunk and layer at 1M of depth
  profile1m-stride8 the same with consensus scoring every 8th chunk (configs/scope-8k-consensus-stride8.yaml), the allocator as is
  profile1m-expandable the same as profile1m-stride8 under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  pinning  benchmarks/pinning.py: each 256 MiB pinned host block's allocation, and host-bound launches beside a thread
           allocating them (could the host tier's growth leave the prefill's critical path?); then the same under
           kvtier.allocator's setting (cudaHostRegister, pages mapped by 8 threads)
  forwards-stride kvtier bench --model smollm2 at 128K in 32K forwards: consensus (a first run compiling the kernels'
           variants), consensus scoring every 4th query chunk, then consensus again
  disk2m   kvtier bench --model smollm2 at 2M (filled): kvtier (every span on the GPU) and kvtier-disk (a 2 GiB pool,
           8 GiB of pinned host, the rest of the 46 GiB of K/V in LMDB under /tmp/kvtier-disk2m)
  profile  benchmarks/decode_profile.py at 8K on the 8B shape with consensus: where a (replayed) decode step's time goes
  chunksize kvtier bench --model smollm2 at 32K and 128K, real prefills, consensus with query chunks of 1024 and 2016
  chunks-smollm2 benchmarks/decode_profile.py --model smollm2 --chunk 8k at 32K, query chunks of 512 and 2016
  chunks-smollm2-128k the same at 128K of depth, query chunks of 512 (the default)
  syncs    benchmarks/sync_points.py: where SmolLM2's prefill and decode make the host wait for the GPU
  chunks   benchmarks/decode_profile.py --chunk 8k at 128K on the 8B shape with consensus: a prefill forward's time
           per query chunk and layer, by step of the scope attention (ingest, select, gather, attend)
environment: SPEED_LIMIT seconds per stage (default 280), SPEED_STEPS decode steps per cell (default 128: a seal group
of the default scope, so the mean holds one eager step).
An unknown stage runs nothing and exits 2.
USAGE
}
known=" tests kernels prefill prefill-quest forwards prefill8b chunksize smollm2 llama8b decode8b decode-smollm2 long8b profile "
known+="syncs chunks chunks-smollm2 chunks-smollm2-128k disk2m prefill1m profile1m profile1m-stride8 profile1m-expandable "
known+="forwards-stride pinning prefill1m-8k prefill1m-hostalloc "
here=$(cd "$(dirname "$0")" && pwd)
source "$here/stages.sh"
mkdir -p "$out"
steps=${SPEED_STEPS:-128}
register=pinned_use_cuda_host_register:True,pinned_num_register_threads:8
bench() {  # name, kvtier bench arguments...
    local name=$1
    shift
    timeout "${SPEED_LIMIT:-280}" python3 -m kvtier bench --decode-steps "$steps" --out "$out/$name" "$@" \
        > "$out/$name.log" 2>&1
    echo "== $name: kvtier bench $* -> exit $?"
    tr '\r' '\n' < "$out/$name.log" | grep -E " @ |error|Error" | tail -n 12
}
for stage in "$@"; do
    case $stage in
        tests) installed_tests "${SPEED_LIMIT:-280}" "$out/tests.log" -m gpu tests/core/test_fast_decode.py \
                   tests/core/test_prefill.py tests/kernels/test_window_mass.py tests/kernels/test_decode_attention.py ;;
        kernels)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/kernels.py" --out "$out/kernels" > "$out/kernels.log" 2>&1
            echo "== kernels: exit $?"; tail -n 40 "$out/kernels.log" ;;
        prefill)
            bench prefill-consensus --model smollm2 --contexts 32k,128k --methods stock,kvtier ;;
        forwards)
            for size in 32768 131072; do
                bench "forwards-smollm2-$size" --model smollm2 --contexts 128k --methods stock,kvtier \
                    --prefill-chunk "$size"
            done
            for size in 32768 131072; do
                bench "forwards-8b-$size" --model llama8b --contexts 128k --methods stock,kvtier --prefill-chunk "$size" \
                    --config "$here/configs/scope-8k-consensus.yaml"
            done ;;
        prefill-quest)
            bench prefill-quest --model smollm2 --contexts 32k,128k --methods kvtier \
                --config "$here/configs/policy-quest.yaml" ;;
        prefill8b)
            bench prefill8b --model llama8b --contexts 128k --methods stock,kvtier \
                --config "$here/configs/scope-8k-consensus.yaml" ;;
        chunksize)
            for size in 1024 2016; do
                bench "prefill-chunk$size" --model smollm2 --contexts 32k,128k --methods kvtier \
                    --config "$here/configs/chunk-$size.yaml"
            done ;;
        chunks-smollm2)
            for size in 512 2016; do
                config=()
                [ "$size" = 512 ] || config=(--config "$here/configs/chunk-$size.yaml")
                timeout "${SPEED_LIMIT:-280}" python3 "$here/decode_profile.py" --model smollm2 --context 32k \
                    --chunk 8k --steps 2 "${config[@]}" --out "$out/chunks-smollm2-$size" \
                    > "$out/chunks-smollm2-$size.log" 2>&1
                echo "== chunks-smollm2 $size: exit $?"; grep -E "^===|kvtier\.|^\|" "$out/chunks-smollm2-$size.log" | tail -n 20
            done ;;
        chunks-smollm2-128k)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/decode_profile.py" --model smollm2 --context 128k --chunk 8k \
                --steps 2 --out "$out/chunks-smollm2-128k" > "$out/chunks-smollm2-128k.log" 2>&1
            echo "== chunks-smollm2-128k: exit $?"; grep -E "^===|kvtier\.|^\|" "$out/chunks-smollm2-128k.log" | tail -n 20 ;;
        long8b)
            bench long8b-graphs --model llama8b --contexts 8k,1m --prefill fill --methods kvtier-host \
                --config "$here/configs/scope-8k-consensus.yaml" --gpu-budget 36GiB ;;
        prefill1m|prefill1m-8k|prefill1m-hostalloc)
            size=16384 config=scope-8k-consensus-stride32.yaml allocator=${PYTORCH_CUDA_ALLOC_CONF:-}
            [ "$stage" = prefill1m-8k ] && size=8192 config=scope-8k-consensus-stride8.yaml
            [ "$stage" = prefill1m-hostalloc ] && allocator=pinned_use_cuda_host_register:False
            PYTORCH_CUDA_ALLOC_CONF=$allocator bench "$stage" --model llama8b --contexts 1m --methods kvtier-host \
                --prefill-chunk "$size" --decode-steps 8 --max-prefill 1m --config "$here/configs/$config" \
                --gpu-budget 32GiB ;;
        profile1m|profile1m-stride8|profile1m-expandable)
            config=scope-8k-consensus-stride8.yaml
            [ "$stage" = profile1m ] && config=scope-8k-consensus.yaml
            allocator=${PYTORCH_CUDA_ALLOC_CONF:-}
            [ "$stage" = profile1m-expandable ] && allocator=expandable_segments:True
            PYTORCH_CUDA_ALLOC_CONF=$allocator timeout "${SPEED_LIMIT:-280}" python3 "$here/decode_profile.py" \
                --context 960k --chunk 8k --steps 2 --profile-steps 1 --configs host --gpu-budget 36GiB \
                --config "$here/configs/$config" --out "$out/$stage" > "$out/$stage.log" 2>&1
            echo "== $stage: exit $?"; grep -E "^===|kvtier\.|^\|" "$out/$stage.log" | tail -n 20 ;;
        pinning)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/pinning.py" --out "$out/pinning" > "$out/pinning.log" 2>&1
            echo "== pinning: exit $?"; grep -E "^\|" "$out/pinning.log"
            PYTORCH_CUDA_ALLOC_CONF=$register timeout "${SPEED_LIMIT:-280}" python3 "$here/pinning.py" \
                --out "$out/pinning-register" > "$out/pinning-register.log" 2>&1
            echo "== pinning-register: exit $?"; grep -E "^\|" "$out/pinning-register.log" ;;
        forwards-stride)
            for run in compile stride4 stride1; do
                config=()
                [ "$run" = stride4 ] && config=(--config "$here/configs/consensus-stride4.yaml")
                bench "forwards-$run-smollm2-32768" --model smollm2 --contexts 128k --methods kvtier \
                    --prefill-chunk 32768 "${config[@]}"
            done ;;
        disk2m)
            bench disk2m --model smollm2 --contexts 2m --prefill fill --methods kvtier,kvtier-disk \
                --gpu-budget 2GiB --host-budget 8GiB --disk-path /tmp/kvtier-disk2m ;;
        profile)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/decode_profile.py" --context 8k --steps 32 \
                --config "$here/configs/scope-8k-consensus.yaml" --out "$out/profile" > "$out/profile.log" 2>&1
            echo "== profile: exit $?"; grep -E "^===|^\|" "$out/profile.log" | tail -n 12 ;;
        chunks)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/decode_profile.py" --context 128k --chunk 8k --steps 2 \
                --config "$here/configs/scope-8k-consensus.yaml" --out "$out/chunks" > "$out/chunks.log" 2>&1
            echo "== chunks: exit $?"; grep -E "^===|kvtier\.|^\|" "$out/chunks.log" | tail -n 20 ;;
        syncs)
            timeout "${SPEED_LIMIT:-280}" python3 "$here/sync_points.py" --out "$out/syncs" > "$out/syncs.log" 2>&1
            echo "== syncs: exit $?"; grep -E "^==|^  " "$out/syncs.log" | head -n 60 ;;
        smollm2|decode-smollm2)
            bench smollm2-graphs --model smollm2 --contexts 32k,1m --prefill fill --methods stock,kvtier
            [ "$stage" = decode-smollm2 ] || bench smollm2-eager --model smollm2 --contexts 32k,1m --prefill fill \
                --methods kvtier --config "$here/configs/graphs-off.yaml" ;;
        llama8b|decode8b)
            bench llama8b-graphs --model llama8b --contexts 8k,128k --prefill fill --methods stock,kvtier \
                --config "$here/configs/scope-8k-consensus.yaml"
            [ "$stage" = decode8b ] || bench llama8b-eager --model llama8b --contexts 8k,128k --prefill fill \
                --methods kvtier --config "$here/configs/scope-8k-consensus-eager.yaml" ;;
    esac
done
