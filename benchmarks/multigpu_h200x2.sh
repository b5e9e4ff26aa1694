#!/usr/bin/env bash
# Issue 19's runs on the two-GPU machine (nvidia-h200-x2; after `source benchmarks/gpu_setup.sh`): the multigpu tests,
# then the Llama-3.1-8B shape (random weights, saved once under $MULTIGPU_WEIGHTS) with the paper's 8K scope and
# consensus held three ways by benchmarks/multigpu.py, one stage per device call; each writes OUT_DIR/STAGE/ and
# OUT_DIR/STAGE.log. NCCL's NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0 unless already set).
set -u
usage() {
    cat <<'USAGE'
usage: bash benchmarks/multigpu_h200x2.sh OUT_DIR STAGE...
  tests    pytest -m multigpu: device_map and tensor parallel (NCCL) against one GPU, tiny Llama, the same tokens
  weights  save random Llama-3.1-8B-shape weights (bf16, 16 GB) into $MULTIGPU_WEIGHTS (default /tmp/llama8b), once
  single   the 8B shape on one GPU at 128K and 1M: a 32 GiB GPU span pool (consensus' 64 GiB of
           keys beside it), the rest of 1M's 128 GiB of K/V in pinned host memory
  layers   its layers split over the 2 GPUs by a device_map (every span on the GPUs)
  tp       tensor parallel over the 2 GPUs under torchrun, 4 of the 8 KV heads per rank (every span on the GPUs)
  report   the three merged: prefill tok/s, decode ms/token, GiB per device, the same tokens, the goals (OUT_DIR/report)
environment: MULTIGPU_LIMIT seconds per stage (default 560), MULTIGPU_CONTEXTS (default 128k,1m).
An unknown stage runs nothing and exits 2.
USAGE
}
known=" tests weights single layers tp report "
here=$(cd "$(dirname "$0")" && pwd)
source "$here/stages.sh"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
weights=${MULTIGPU_WEIGHTS:-/tmp/llama8b}
scope="--config $here/configs/scope-8k-consensus-stride32.yaml --contexts ${MULTIGPU_CONTEXTS:-128k,1m}"
measure() {  # stage, launcher (words), benchmarks/multigpu.py arguments...: one layout
    local stage=$1 launcher=$2
    shift 2
    timeout "${MULTIGPU_LIMIT:-560}" $launcher "$here/multigpu.py" --weights "$weights" --layout "$stage" $scope \
        --out "$out/$stage" "$@" > "$out/$stage.log" 2>&1
    echo "== $stage -> exit $?"
    tr '\r' '\n' < "$out/$stage.log" | grep -E " @ |rror" | tail -n 8
}
for stage in "$@"; do
    case $stage in
        tests) installed_tests "${MULTIGPU_LIMIT:-560}" "$out/tests.log" -m multigpu tests/core/test_device_map.py \
                   tests/core/test_tensor_parallel.py ;;
        weights)
            python3 "$here/multigpu.py" --save-weights "$weights" > "$out/weights.log" 2>&1
            echo "== weights -> exit $?"; tail -n 2 "$out/weights.log" ;;
        single) measure single python3 --gpu-budget 32GiB ;;
        layers) measure layers python3 --gpus 2 ;;
        tp) measure tp "python3 -m torch.distributed.run --standalone --nproc_per_node 2" ;;
        report)
            python3 "$here/multigpu.py" --report $(ls "$out"/{single,layers,tp}/multigpu.json 2>/dev/null) \
                --out "$out/report" > "$out/report.log" 2>&1
            echo "== report -> exit $?"; cat "$out/report.log" ;;
    esac
done
