#!/usr/bin/env bash
# One GPU-machine session in one command: build fla_aot for the local GPU's arch, then run each step named on the
# command line, logging to $OUT (default: ./gpu_logs). A failing step is recorded and the next one still runs.
#
#   tools/gpu_session.sh build tests "bench chunk.py --ops gla" "bench fused_recurrent.py"
#
# Steps: build (pip install -e ., kernels for this GPU only); tests [pytest args] (the GPU tests, -m gpu; default: all
# of tests/; with -n N add --dist loadgroup, so that each fla model's tests share one worker and autotune once);
# bench <script> [args] (benchmarks/<script>, results under $OUT/benchmarks unless args name another --out); any other word runs as a shell command.
# STEP_TIMEOUT=<seconds> caps each step after the build (a step cut off exits 124 and the next one runs).
# Wheels under .whl/ (fla-core, to compare against) are installed into /tmp/site first, when present.
# Carry .kernel_cache/ made here by `python tools/compile_kernels.py --arch 90 --export-cache .kernel_cache/sm_90.tar.xz`
# and the build step starts from those cubins instead of compiling every kernel on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT/benchmarks"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
status=0
i=0
for step in "$@"; do
    i=$((i + 1))
    read -r verb rest <<< "$step"
    start=$(date +%s)
    case "$verb" in
        build)
            arch=$(python3 -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
            cache=""  # cubins compiled elsewhere: only what changed since compiles here
            [ -f ".kernel_cache/sm_$arch.tar.xz" ] && cache="$PWD/.kernel_cache/sm_$arch.tar.xz"
            FLA_AOT_IMPORT_CACHE=$cache FLA_AOT_ARCHS=$arch python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 ;;
        tests)
            timeout "${STEP_TIMEOUT:-0}" python3 -m pytest -m gpu -q -rf --durations=15 -p no:cacheprovider ${rest:-tests} 2>&1 \
                | tee "$OUT/tests_$i.log" | tail -n 40 ;;
        bench)
            read -r script args <<< "$rest"
            timeout "${STEP_TIMEOUT:-0}" python3 "benchmarks/$script" --out "$OUT/benchmarks" ${args:-} \
                > "$OUT/bench_${i}_${script%.py}.log" 2>&1 ;;
        *)
            timeout "${STEP_TIMEOUT:-0}" bash -c "$step" 2>&1 | tee -a "$OUT/other.log" | tail -n 40 ;;
    esac
    rc=$?
    [ $rc -ne 0 ] && status=1
    echo "== step '$step': exit $rc in $(( $(date +%s) - start )) s"
done
exit $status
