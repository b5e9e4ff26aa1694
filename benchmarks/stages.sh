# Sourced by the GPU staging scripts (niah_h200.sh, profile_h200.sh, ...) for their command line: `SCRIPT OUT_DIR STAGE...`
# or `SCRIPT --help`. The script defines usage() and `known` (its stages, each between spaces) first; afterwards $out is
# OUT_DIR and "$@" the stages, every one known: anything else prints the usage and exits 2 before any stage runs.
case ${1:-} in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
esac
out=$1
shift
for stage in "$@"; do
    if [[ $known != *" $stage "* ]]; then echo "$(basename "$0"): unknown stage '$stage'" >&2; usage >&2; exit 2; fi
done
installed_tests() {  # seconds, log file, pytest arguments...: the checkout's tests against the installed kvtier, from
    # a copy outside the checkout (its kvtier/ would shadow the installed kvtier.kernels); prints the exit and the tail
    rm -rf /tmp/kvtier-tests && mkdir -p /tmp/kvtier-tests && cp -r "$here/../tests" /tmp/kvtier-tests/
    (cd /tmp/kvtier-tests && timeout "$1" python3 -m pytest -q -p no:cacheprovider "${@:3}" > "$2" 2>&1)
    echo "== tests: exit $?"; tail -n 5 "$2"
}
