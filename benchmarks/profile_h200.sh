#!/usr/bin/env bash
# The memory profile of benchmarks/RESULTS.md section 10 on one H200, alone on the GPU (pynvml reads the whole device).
# `--help` lists the stages. Each stage writes OUT_DIR/<stage>/ (profile.json after every cell, the PNGs at the end).
# The 1m stage measures the disk the LMDB tier writes to (4 GiB direct write and read) and the kernel's dirty-page
# limits, and logs memory and stacks as it goes: its first decode step ran past a device call twice (section 10), and
# the stacks say where.
set -u
usage() {
    cat <<'USAGE'
usage: bash benchmarks/profile_h200.sh OUT_DIR STAGE...
kvtier profile of benchmarks/RESULTS.md section 10 on one H200 (the Llama-3.1-8B shape, random weights,
benchmarks/configs/scope-8k.yaml), one device call per stage: each writes OUT_DIR/STAGE/ and OUT_DIR/STAGE.log.
stages:
  to512k  stock, kvtier-gpu and kvtier-tiers at 8K, 32K, 128K and 512K
  1m      kvtier-tiers at 1M, 4 decode steps (the LMDB tier): first measures the disk (OUT_DIR/disk.log), logs
          /proc/meminfo and /proc/vmstat every 20 s (OUT_DIR/meminfo.log) and dumps every thread's stack to its log
          every $PROFILE_STACKS_S seconds (default 150)
environment: PROFILE_LIMIT seconds per stage (default 560). An unknown stage runs nothing and exits 2.
USAGE
}
known=" to512k 1m "
here=$(cd "$(dirname "$0")" && pwd)
source "$here/stages.sh"
config=$here/configs/scope-8k.yaml
mkdir -p "$out"
for stage in "$@"; do
    case $stage in
        to512k) args="--contexts 8k,32k,128k,512k" ;;
        1m)
            args="--contexts 1m --configs kvtier-tiers --decode-steps 4"
            {
                echo "== disk: $(df -h /tmp | tail -1)"
                grep -H . /proc/sys/vm/dirty_ratio /proc/sys/vm/dirty_background_ratio /proc/sys/vm/dirty_bytes \
                    /sys/block/*/queue/read_ahead_kb
                dd if=/dev/zero of=/tmp/kvtier-dd bs=16M count=256 oflag=direct 2>&1 | tail -1
                dd if=/tmp/kvtier-dd of=/dev/null bs=16M iflag=direct 2>&1 | tail -1
                rm -f /tmp/kvtier-dd
            } > "$out/disk.log" 2>&1
            cat "$out/disk.log"
            # memory and disk traffic every 20 s beside the run: pinned pool, page cache, dirty and written-back pages
            (while sleep 20; do echo "== $(date +%T)"; grep -E "^(MemAvailable|Cached|Dirty|Writeback|Mlocked):" /proc/meminfo
                 grep -E "^(pgpgin|pgpgout|pgmajfault) " /proc/vmstat; done) > "$out/meminfo.log" 2>&1 &
            monitor=$! ;;
    esac
    echo "== $stage: kvtier profile --model llama8b --config $config $args"
    timeout "${PROFILE_LIMIT:-560}" python3 -c "
import faulthandler, sys
faulthandler.dump_traceback_later(${PROFILE_STACKS_S:-150}, repeat=True)
from kvtier.tools.cli import main
sys.exit(main(sys.argv[1:]))" profile --model llama8b --config "$config" $args --out "$out/$stage" > "$out/$stage.log" 2>&1
    echo "== $stage: exit $?"
    [ -n "${monitor:-}" ] && kill "$monitor" 2>/dev/null
    tr '\r' '\n' < "$out/$stage.log" | grep -E "built in|skipped|^Goal|^Flatness|Thread|File .*kvtier" | tail -n 40
done
