#!/usr/bin/env bash
# The natural-text needle runs of benchmarks/RESULTS.md section 14 on one H200 (SmolLM2-135M-Instruct joined at
# $KVTIER_MODEL_DIR; README, "Measuring on the GPU"): RULER's niah_single in the packaged prose, 11 depths x 2 keys.
# The stages run side by side as separate processes (each one bound by the host queueing kernels, on its own CPU
# core), each writing OUT_DIR/STAGE/results.json after every batch and OUT_DIR/STAGE.log.
set -u
usage() {
    cat <<'USAGE'
usage: bash benchmarks/natural_h200.sh OUT_DIR STAGE...
RULER niah_single in natural prose on one H200 (kvtier niah, SmolLM2-135M-Instruct), 11 depths x 2 keys; the stages
given run at once, each in its own process, and the script waits for all of them:
  16k        quest (the old default), reattention (the paper) and consensus at 16K
  64k        quest and consensus at 64K
  64k-paper  reattention at 64K
  topk       consensus with top_k 16 and 32 at 16K and 64K
  long       consensus at 256K (11 depths x 1 key)
  stock      transformers' DynamicCache at 4K (inside the window)
  tasks      consensus on multikey and multiquery (4 needles) at 16K
  ablate     consensus at 16K with one option changed: no neighbours, window 16, window 256
  long-quest quest at 256K (11 depths x 1 key), the baseline of `long`
  filler     quest and consensus on the filler passkey at 16K, 64K and 256K (5 depths)
  long-keys2 consensus at 256K (11 depths x 2 keys)
  multikey   RULER multikey (one of four keys asked), 11 depths x 2 keys: stock at 4K and consensus at 16K
  default    consensus (the default) at 16K and 64K
  chunksize  consensus at 16K and 64K with query chunks of 1024 and 2016 tokens (the default: 512)
  layout     consensus in text order (configs/consensus-text.yaml) and best-last (the default since RESULTS 23):
             niah_single at 16K and 64K, multikey at 16K, best-last at 256K; stock at 4K on both tasks
  long-1m    consensus (best-last, the first 60% of the layers voting: the default) at 1M, niah_single, 6 depths x 1 key
  filler-1m  consensus (the default) on the filler passkey at 1M, 5 depths (RESULTS 23 ran it in text order)
  diagnose   kvtier niah --diagnose at 16K, 11 depths x 2 keys (selection recall, the plain run and the oracle, one
             prompt at a time), and stock at 4K beside it (the reference of the oracle's goal)
  diagnose-1m kvtier niah --diagnose at 1M, depths 0.1 and 0.7 (long-1m's misses), 1 key
  vote-1m    the same with the layers voting by rank, by log mass and only the first 18 layers voting
             (configs/consensus-{rank,log,vote18}.yaml), side by side
  vote       consensus with every layer voting its mass (configs/consensus-all-layers.yaml: the default before RESULTS
             26), voting by rank, by log mass, and with the first 18 layers voting, at 16K and 64K, 11 depths x 2 keys
  decode     the default (decode steps of every layer reuse the whole vote's selection), each layer its own
             (configs/consensus-decode-layer.yaml, the default before RESULTS 27), the whole vote's at re-scoring decode
             steps too (configs/consensus-final-all.yaml) and every layer voting (configs/consensus-all-layers.yaml)
             at 16K and 64K, 11 depths x 2 keys, side by side
  decode-1m  kvtier niah --diagnose at 1M as diagnose-1m, with configs/consensus-final-all.yaml
  diagnose-long kvtier niah --diagnose at 64K and 256K, 6 depths x 1 key
  diagnose-64k, diagnose-256k  the same, one length each (two processes side by side)
  diagnose-64k-cell  kvtier niah --diagnose at 64K, 11 depths x 2 keys (the whole cell: the oracle beside stock's
             in-window rate), as two processes side by side (depths 0-0.5, 0.6-1)
  diagnose-256k-odd  kvtier niah --diagnose at 256K, depths 0.1, 0.3, 0.5, 0.7, 0.9 (with diagnose-256k: 11 depths),
             as two processes side by side (0.1-0.3, 0.5-0.9)
  long-1m-keys2a, long-1m-keys2b  long-1m's cell at 11 depths x 2 keys in two halves (depths 0-0.5, 0.6-1), one
             device call each (~7 minutes on the H200; not beside another 1M stage: one takes ~72 GiB of GPU memory)
  long-1m-rest  the depths of long-1m's 11 x 2 cell that RESULTS 27 did not reach (0.3, 0.4, 0.5, 1; 2 keys)
  diagnose-1m-keys2  kvtier niah --diagnose at 1M, depths 0.1 and 0.2 x 2 keys (RESULTS 27's misses and hits there),
             two processes side by side (~7 minutes)
  final-all  consensus with decode_selection final_all (configs/consensus-final-all.yaml) at 16K and 64K, 11 depths x
             2 keys (the decode stage's cell of that config, alone)
  final-all-1m-a, final-all-1m-b, final-all-1m-c  the same at 1M, 11 depths x 2 keys in three parts (depths 0-0.3,
             0.4-0.7, 0.8-1; batch 2, ~72 GiB of GPU memory: not beside another 1M niah stage), one device call each
  diagnose-1m-depth0  kvtier niah --diagnose at 1M, depth 0 (the needle across the global tokens and the first span),
             1 key, the default (RESULTS 28 ran it with configs/consensus-final-all.yaml, before keep_first_span)
  cell-1m-a  the default's 1M cell (niah_single, 11 depths x 2 keys) in three parts, all with configs/niah-gpu4.yaml
  cell-1m-b  so that the parts merge into one report (kvtier niah --report): a = depths 0 and 1 (batch 2) beside
  cell-1m-c  diagnose-1m-depth0; b = depths 0.1-0.6 as three runs of batch 1 side by side (0.1-0.2, 0.3-0.4, 0.5-0.6);
             c = depths 0.7, 0.8 and 0.9 as three runs of batch 1; one device call each
  first-span the default (span 0 always selected, since RESULTS 28) and without it
             (configs/consensus-no-first-span.yaml) at 16K and 64K, 11 depths x 2 keys, side by side
  stride     consensus at 16K and 64K scoring every 2nd, 4th and 8th query chunk of a prefill forward (configs/
             consensus-stride{2,4,8}.yaml; the default: every chunk)
  speed      kvtier bench on SmolLM2 at 32K and 128K: stock, quest and consensus prefill tokens/s, decode ms/token
Every kvtier stage caps its GPU span pool at 12 GiB (configs/niah-gpu12.yaml; the rest goes to pinned host memory),
so stages running side by side never fail to grow a pool.
environment: NATURAL_LIMIT seconds per stage (default 560). An unknown stage runs nothing and exits 2.
USAGE
}
known=" diagnose-64k diagnose-256k diagnose-64k-cell diagnose-256k-odd cell-1m-a cell-1m-b cell-1m-c first-span final-all final-all-1m-a final-all-1m-b final-all-1m-c diagnose-1m-depth0 decode decode-1m diagnose-long long-1m-rest diagnose-1m-keys2 vote vote-1m layout long-1m long-1m-keys2a long-1m-keys2b filler-1m diagnose diagnose-1m stride 16k 64k 64k-paper topk long stock tasks ablate long-quest filler speed chunksize default long-keys2 multikey "
here=$(cd "$(dirname "$0")" && pwd)
source "$here/stages.sh"
depths=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
gpu12="--config $here/configs/niah-gpu12.yaml"
best_last="--config $here/configs/consensus-best-last.yaml"
text_order="--config $here/configs/consensus-text.yaml"
final_all="--config $here/configs/consensus-final-all.yaml"
gpu4="--config $here/configs/niah-gpu4.yaml"
diagnose_depths=0,0.2,0.4,0.6,0.8,1
mkdir -p "$out"
run() {  # stage, kvtier niah arguments...
    local stage=$1
    shift
    timeout "${NATURAL_LIMIT:-560}" python3 -m kvtier niah --out "$out/$stage" "$@" > "$out/$stage.log" 2>&1
    echo "== $stage: kvtier niah $* -> exit $?"
    tr '\r' '\n' < "$out/$stage.log" | grep -E "found|^[0-9]+[KM] |^all " | tail -n 12
}
cell_1m_parts() {  # depth lists: one batch-1 run of the 1M cell (2 keys) per list, side by side
    local part
    for part in "$@"; do
        run "cell-1m-$part" --lengths 1m --depths "$part" --keys 2 --batch 1 $gpu4 &
    done
}
bench() {  # stage, kvtier bench arguments (SmolLM2)...
    local stage=$1
    shift
    timeout "${NATURAL_LIMIT:-560}" python3 -m kvtier bench --model smollm2 --out "$out/$stage" "$@" > "$out/$stage.log" 2>&1
    echo "== $stage: kvtier bench --model smollm2 $* -> exit $?"
    tr '\r' '\n' < "$out/$stage.log" | tail -n 14
}
for stage in "$@"; do
    case $stage in
        16k) run 16k --lengths 16k --depths $depths --keys 2 --policy quest,reattention,consensus --batch 11 $gpu12 & ;;
        64k) run 64k --lengths 64k --depths $depths --keys 2 --policy quest,consensus --batch 11 $gpu12 & ;;
        64k-paper) run 64k-paper --lengths 64k --depths $depths --keys 2 --policy reattention --batch 11 $gpu12 & ;;
        topk) (run topk-16 --lengths 16k,64k --depths $depths --keys 2 --policy consensus --top-k 16 --batch 11 $gpu12
               run topk-32 --lengths 16k,64k --depths $depths --keys 2 --policy consensus --top-k 32 --batch 11 $gpu12) & ;;
        long) run long --lengths 256k --depths $depths --policy consensus --batch 4 $gpu12 & ;;
        tasks) (run multikey --lengths 16k --depths $depths --task multikey --policy consensus --batch 11 $gpu12
                run multiquery --lengths 16k --depths $depths --task multiquery --policy consensus --batch 11 $gpu12) & ;;
        ablate) for option in no-neighbours window16 window256; do
                    run "ablate-$option" --lengths 16k --keys 2 --depths $depths --config "$here/configs/consensus-$option.yaml" \
                        --batch 11 &
                done ;;
        long-quest) run long-quest --lengths 256k --depths $depths --config "$here/configs/quest-gpu12.yaml" --batch 4 & ;;
        filler) run filler --haystack filler --lengths 16k,64k,256k --depths 0.1,0.3,0.5,0.7,0.9 --policy quest,consensus \
                    --batch 5 $gpu12 & ;;
        speed) (bench speed-consensus --contexts 32k,128k --methods stock,kvtier
                bench speed-quest --contexts 32k,128k --methods kvtier --config "$here/configs/policy-quest.yaml") & ;;
        long-keys2) run long-keys2 --lengths 256k --depths $depths --keys 2 --policy consensus --batch 4 $gpu12 & ;;
        multikey) run multikey-stock --lengths 4k --depths $depths --keys 2 --task multikey --policy stock --batch 11 &
                  run multikey-consensus --lengths 16k --depths $depths --keys 2 --task multikey --policy consensus \
                      --batch 11 $gpu12 & ;;
        default) run default --lengths 16k,64k --depths $depths --keys 2 --policy consensus --batch 11 $gpu12 & ;;
        chunksize) for size in 1024 2016; do
                       run "chunk-$size" --lengths 16k,64k --depths $depths --keys 2 --policy consensus --chunk-size "$size" \
                           --batch 11 $gpu12 &
                   done ;;
        layout) run layout-stock --lengths 4k --depths $depths --keys 2 --policy stock --batch 11 &
                run layout-multikey-stock --lengths 4k --depths $depths --keys 2 --task multikey --policy stock --batch 11 &
                run layout-text --lengths 16k,64k --depths $depths --keys 2 --batch 11 $text_order &
                run layout-best-last --lengths 16k,64k --depths $depths --keys 2 --batch 11 $best_last &
                run layout-multikey-text --lengths 16k --depths $depths --keys 2 --task multikey --batch 11 \
                    $text_order &
                run layout-multikey-best-last --lengths 16k --depths $depths --keys 2 --task multikey --batch 11 \
                    $best_last &
                run layout-256k-best-last --lengths 256k --depths $depths --keys 2 --batch 4 $best_last & ;;
        long-1m) run long-1m --lengths 1m --depths 0.1,0.3,0.5,0.7,0.9,1 --batch 2 $best_last & ;;
        long-1m-keys2a) run long-1m-keys2a --lengths 1m --depths 0,0.1,0.2,0.3,0.4,0.5 --keys 2 --batch 2 $best_last & ;;
        long-1m-keys2b) run long-1m-keys2b --lengths 1m --depths 0.6,0.7,0.8,0.9,1 --keys 2 --batch 2 $best_last & ;;
        long-1m-rest) run long-1m-rest --lengths 1m --depths 0.3,0.4,0.5,1 --keys 2 --batch 2 $best_last & ;;
        diagnose-1m-keys2) for depth in 0.1 0.2; do
                               run "diagnose-1m-keys2-$depth" --diagnose --lengths 1m --depths "$depth" --keys 2 $gpu12 &
                           done ;;
        filler-1m) run filler-1m --haystack filler --lengths 1m --depths 0.1,0.3,0.5,0.7,0.9 --policy consensus --batch 1 \
                       $gpu12 & ;;
        diagnose) run diagnose-stock --lengths 4k --depths $depths --keys 2 --policy stock --batch 11 &
                  run diagnose --diagnose --lengths 16k --depths $depths --keys 2 $gpu12 & ;;
        diagnose-64k|diagnose-256k) run "$stage" --diagnose --lengths "${stage#diagnose-}" --depths $diagnose_depths $gpu12 & ;;
        diagnose-64k-cell) run diagnose-64k-a --diagnose --lengths 64k --depths 0,0.1,0.2,0.3,0.4,0.5 --keys 2 $gpu12 &
                           run diagnose-64k-b --diagnose --lengths 64k --depths 0.6,0.7,0.8,0.9,1 --keys 2 $gpu12 & ;;
        diagnose-256k-odd) run diagnose-256k-a --diagnose --lengths 256k --depths 0.1,0.3 $gpu12 &
                           run diagnose-256k-b --diagnose --lengths 256k --depths 0.5,0.7,0.9 $gpu12 & ;;
        diagnose-long) run diagnose-long --diagnose --lengths 64k,256k --depths $diagnose_depths $gpu12 & ;;
        decode-1m) run decode-1m --diagnose --lengths 1m --depths 0.1,0.7 $final_all & ;;
        diagnose-1m) run diagnose-1m --diagnose --lengths 1m --depths 0.1,0.7 $gpu12 & ;;
        vote-1m) for vote in rank log vote18; do
                     run "vote-1m-$vote" --diagnose --lengths 1m --depths 0.1,0.7 --config "$here/configs/consensus-$vote.yaml" &
                 done ;;
        vote) for vote in all-layers rank log vote18; do
                  run "vote-$vote" --lengths 16k,64k --depths $depths --keys 2 --batch 11 \
                      --config "$here/configs/consensus-$vote.yaml" &
              done ;;
        decode) run decode-final --lengths 16k,64k --depths $depths --keys 2 --batch 11 $gpu12 &
                for option in decode-layer final-all all-layers; do
                    run "decode-$option" --lengths 16k,64k --depths $depths --keys 2 --batch 11 \
                        --config "$here/configs/consensus-$option.yaml" &
                done ;;
        first-span) run first-span --lengths 16k,64k --depths $depths --keys 2 --batch 11 $gpu12 &
                    run no-first-span --lengths 16k,64k --depths $depths --keys 2 --batch 11 \
                        --config "$here/configs/consensus-no-first-span.yaml" & ;;
        final-all) run final-all --lengths 16k,64k --depths $depths --keys 2 --batch 11 $final_all & ;;
        final-all-1m-a) run final-all-1m-a --lengths 1m --depths 0,0.1,0.2,0.3 --keys 2 --batch 2 $final_all & ;;
        final-all-1m-b) run final-all-1m-b --lengths 1m --depths 0.4,0.5,0.6,0.7 --keys 2 --batch 2 $final_all & ;;
        final-all-1m-c) run final-all-1m-c --lengths 1m --depths 0.8,0.9,1 --keys 2 --batch 2 $final_all & ;;
        diagnose-1m-depth0) run diagnose-1m-depth0 --diagnose --lengths 1m --depths 0 $gpu12 & ;;
        cell-1m-a) run cell-1m-0,1 --lengths 1m --depths 0,1 --keys 2 --batch 2 $gpu4 &
                   run diagnose-1m-depth0 --diagnose --lengths 1m --depths 0 $gpu12 & ;;
        cell-1m-b) cell_1m_parts 0.1,0.2 0.3,0.4 0.5,0.6 ;;
        cell-1m-c) cell_1m_parts 0.7 0.8 0.9 ;;
        stride) for every in 2 4 8; do
                    run "stride-$every" --lengths 16k,64k --depths $depths --keys 2 --batch 11 \
                        --config "$here/configs/consensus-stride$every.yaml" &
                done ;;
        stock) run stock --lengths 4k --depths $depths --keys 2 --policy stock --batch 11 & ;;
    esac
done
wait
