#!/usr/bin/env bash
# The needle-in-a-haystack runs of benchmarks/RESULTS.md section 8 on one H200 (SmolLM2-135M-Instruct joined at
# $KVTIER_MODEL_DIR; see README, "Measuring on the GPU"). Usage: bash benchmarks/niah_h200.sh OUT_DIR [STAGE...]
# Stages (default all, in this order): short 1m 512k stock policies distractors. Each stage writes OUT_DIR/<stage>/
# and its log OUT_DIR/<stage>.log under its own time limit (seconds, $NIAH_LIMIT_<stage>, default 600), then appends
# both to $NIAH_TAR when set (so a later stage cut short loses nothing of the earlier ones).
set -u
out=${1:?usage: niah_h200.sh OUT_DIR [STAGE...]}
shift
stages=${*:-short 1m 512k stock policies distractors}
here=$(cd "$(dirname "$0")" && pwd)
depths=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
mkdir -p "$out"
run() {  # stage, kvtier niah arguments...
    local stage=$1 limit_var="NIAH_LIMIT_$1"
    shift
    echo "== $stage: kvtier niah $*"
    timeout "${!limit_var:-600}" python3 -m kvtier niah --depths "$depths" --out "$out/$stage" "$@" \
        > "$out/$stage.log" 2>&1
    echo "== $stage: exit $?"
    tail -n 16 "$out/$stage.log"
    if [ -n "${NIAH_TAR:-}" ]; then tar -rf "$NIAH_TAR" -C "$out" "$stage" "$stage.log"; fi
}
for stage in $stages; do
    case $stage in
        short) run short --lengths 8k,32k,128k --keys 2 --policy quest --batch 11 ;;
        stock) run stock --lengths 8k,32k --keys 2 --policy stock --batch 11 ;;
        1m) run 1m --lengths 1m --keys 1 --policy quest --batch 4 --config "$here/configs/niah-gpu100.yaml" ;;
        512k) run 512k --lengths 512k --keys 1 --policy quest --batch 6 --config "$here/configs/niah-gpu100.yaml" ;;
        policies) run policies --lengths 128k --keys 1 --policy all --batch 11 ;;
        distractors) run distractors --lengths 32k,128k --keys 1 --policy quest --distractors 5 --batch 11 ;;
        *) echo "unknown stage $stage (short stock 1m 512k policies distractors)"; exit 2 ;;
    esac
done
