# Sourced by the H200 staging scripts (niah_h200.sh, profile_h200.sh) for their command line: `SCRIPT OUT_DIR STAGE...`
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
