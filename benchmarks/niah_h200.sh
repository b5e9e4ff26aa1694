#!/usr/bin/env bash
# The needle-in-a-haystack runs of benchmarks/RESULTS.md on one H200 (SmolLM2-135M-Instruct joined at
# $KVTIER_MODEL_DIR; see README, "Measuring on the GPU"), in stages small enough for one device call each.
# `--help` lists the stages. With $NIAH_TAR set, each stage's folder and log are appended to that tar file afterwards,
# so a later stage cut short loses nothing of the earlier ones.
# The stages up to 128K (keys stock policies distractors) are sized to run beside a 1M stage on the same GPU, e.g.
#   NIAH_TAR=a.tar bash niah_h200.sh OUT 1m-a & NIAH_TAR=b.tar bash niah_h200.sh OUT keys stock distractors; wait
# (both are bound by the host queueing kernels, one CPU core each): 4 prompts per forward in a 12 GiB span pool
# beside the 1M stage's 100 GiB.
set -u
usage() {
    cat <<'USAGE'
usage: bash benchmarks/niah_h200.sh OUT_DIR STAGE...
The needle runs of benchmarks/RESULTS.md on one H200 (kvtier niah, SmolLM2-135M-Instruct), one device call per stage:
each writes OUT_DIR/STAGE/results.json (after every batch) and OUT_DIR/STAGE.log.
stages:
  to512k       quest at 8K, 32K, 128K and 512K, 11 depths, 6 prompts per forward (section 8)
  1m-a         quest at 1M, depths 0 to 0.7, 4 prompts per forward
  1m-b         quest at 1M, depths 0.8 to 1
  2m           quest at 2M, depths 0.1, 0.5, 0.9, 3 prompts per forward (100 GiB GPU pool, the rest pinned host)
  2m-b         quest at 2M, depths 0, 0.3, 0.7
  2m-c         quest at 2M, depths 0.2, 0.6, 0.8
  keys         two more keys per cell (seeds 1 and 2) at 8K, 32K and 128K, 11 depths
  keys-512k    two more keys per cell at 512K
  stock        transformers' DynamicCache at 8K and 32K, 11 depths
  policies     every policy at 128K, 11 depths (section 8b)
  streaming    streaming at 128K, the depths 0.4 to 1 that policies did not reach
  distractors  quest with one labelled distractor key at 32K and 128K
  merge        join what OUT_DIR holds of to512k 1m-a 1m-b 2m 2m-b 2m-c stock (seed 0) into OUT_DIR/merged
environment: NIAH_LIMIT_<stage> seconds per stage (default 590, '-' written '_'); NIAH_TAR=FILE appends each stage's
folder and log to that tar file. An unknown stage runs nothing and exits 2.
USAGE
}
known=" to512k 1m-a 1m-b 2m 2m-b 2m-c keys keys-512k stock policies streaming distractors merge "
here=$(cd "$(dirname "$0")" && pwd)
source "$here/stages.sh"
all_depths=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
gpu100=$here/configs/niah-gpu100.yaml
gpu12=$here/configs/niah-gpu12.yaml
mkdir -p "$out"
run() {  # stage, kvtier niah arguments...
    local stage=$1 limit_var="NIAH_LIMIT_${1//-/_}"
    shift
    echo "== $stage: kvtier niah $*"
    # the filler passkey of section 8 (kvtier niah defaults to natural text since issue 16)
    timeout "${!limit_var:-590}" python3 -m kvtier niah --haystack filler --out "$out/$stage" "$@" > "$out/$stage.log" 2>&1
    echo "== $stage: exit $?"
    tr '\r' '\n' < "$out/$stage.log" | grep -E "compiled|found|^[0-9]+[KM] |^all " | tail -n 12
    if [ -n "${NIAH_TAR:-}" ]; then tar -rf "$NIAH_TAR" -C "$out" "$stage.log" $(cd "$out" && ls -d "$stage" 2>/dev/null); fi
}
for stage in "$@"; do
    case $stage in
        # 11 depths x 1 key, 6 prompts per forward (RESULTS section 8)
        to512k) run to512k --lengths 8k,32k,128k,512k --depths $all_depths --policy quest --batch 6 --config "$gpu100" ;;
        # 1M: 4 rows of 22.5 GiB of KV per forward; ~3 min per batch, so the 11 depths take two device calls
        1m-a) run 1m-a --lengths 1m --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7 --policy quest --batch 4 --config "$gpu100" ;;
        1m-b) run 1m-b --lengths 1m --depths 0.8,0.9,1 --policy quest --batch 4 --config "$gpu100" ;;
        # 2M, 3 depths per forward, one stage per device call (~280 s a batch, plus 74 s compiling the selection kernels
        # on a fresh machine): 135 GiB of KV, 100 GiB in the GPU pool and the rest in pinned host memory
        2m) run 2m --lengths 2m --depths 0.1,0.5,0.9 --policy quest --batch 3 --config "$gpu100" ;;
        2m-b) run 2m-b --lengths 2m --depths 0,0.3,0.7 --policy quest --batch 3 --config "$gpu100" ;;
        2m-c) run 2m-c --lengths 2m --depths 0.2,0.6,0.8 --policy quest --batch 3 --config "$gpu100" ;;
        # two more keys per cell up to 128K (seeds 1 and 2: other passkeys than to512k's seed 0)
        keys) run keys --lengths 8k,32k,128k --depths $all_depths --keys 2 --seed 1 --policy quest --batch 4 --config "$gpu12" ;;
        stock) run stock --lengths 8k,32k --depths $all_depths --policy stock --batch 4 ;;
        policies) run policies --lengths 128k --depths $all_depths --policy all --batch 4 --config "$gpu12" ;;
        # the depths the policies stage did not reach for streaming (cut by its time limit after depth 0.3)
        streaming) run streaming --lengths 128k --depths 0.4,0.5,0.6,0.7,0.8,0.9,1 --policy streaming --batch 4 --config "$gpu12" ;;
        # two more keys per cell at 512K (seeds 1 and 2, as `keys` up to 128K)
        keys-512k) run keys-512k --lengths 512k --depths $all_depths --keys 2 --seed 1 --policy quest --batch 6 --config "$gpu100" ;;
        # one labelled distractor: the variant SmolLM2 solves inside its window (11/11 at 4K; with 5 it finds 3/11 there)
        distractors) run distractors --lengths 32k,128k --depths $all_depths --policy quest --distractors 1 --batch 4 --config "$gpu12" ;;
        merge)
            # one heatmap per method over every length: the stages that share seed 0 and hold no cell twice
            parts=$(cd "$out" && ls {to512k,1m-a,1m-b,2m,2m-b,2m-c,stock}/results.json 2>/dev/null)
            (cd "$out" && python3 -m kvtier niah --report $parts --out merged > merged.log 2>&1; tail -n 30 merged.log) ;;
    esac
done
