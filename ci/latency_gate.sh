#!/usr/bin/env bash
# CI latency regression gate: one `deploy check` per committed baseline in ci/baselines/,
# one JUnit XML report per baseline in $REPORTS. See ci/README.md.
#
# Environment (all optional):
#   REPORTS=reports/latency   where the JUnit reports go
#   TOLERANCE=10%             override every baseline's own tolerance
#   MIN_TIME=2                seconds of timed runs per engine (UPDATE: 10)
#   UPDATE=1                  re-measure and rewrite the baselines instead of checking
#   ALLOW_UNAVAILABLE=1       a target this runner cannot time (exit 3) does not fail the job
#   SKIP_INSTALL=1            use the deploy in $VENV as it is
#   VENV=.venv                the virtual environment to create or use
#   TORCH_INDEX_URL=...       install torch from this index first (e.g. the CPU-only wheels)
#
# Exit: 0 all passed; 5 if any baseline found a latency regression; otherwise the first other
# non-zero `deploy check` exit code (2 bad input, 3 backend cannot be timed here, ...).
set -uo pipefail
cd "$(dirname "$0")/.."

REPORTS=${REPORTS:-reports/latency}
VENV=${VENV:-.venv}
UPDATE=${UPDATE:-0}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    python3 -m venv "$VENV" || exit 1
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$VENV/bin/pip" install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL" || exit 1
    fi
    "$VENV/bin/pip" install -q -e . || exit 1
fi

mkdir -p "$REPORTS"
status=0
shopt -s nullglob
baselines=(ci/baselines/*.json)
if [ ${#baselines[@]} -eq 0 ]; then
    echo "no baselines in ci/baselines/" >&2
    exit 2
fi
for baseline in "${baselines[@]}"; do
    name=$(basename "$baseline" .json)
    args=(--baseline "$baseline" --junit "$REPORTS/$name.xml")
    if [ "$UPDATE" = 1 ]; then
        args+=(--update-baseline --min-time "${MIN_TIME:-10}")
    else
        args+=(--min-time "${MIN_TIME:-2}")
    fi
    if [ -n "${TOLERANCE:-}" ]; then
        args+=(--tolerance "$TOLERANCE")
    fi
    echo "== $name"
    "$VENV/bin/deploy" check "${args[@]}"
    code=$?
    if [ $code -eq 3 ] && [ "${ALLOW_UNAVAILABLE:-0}" = 1 ]; then
        echo "$name: not timed on this runner (allowed by ALLOW_UNAVAILABLE=1)"
    elif [ $code -eq 5 ]; then
        status=5
    elif [ $code -ne 0 ] && [ $status -eq 0 ]; then
        status=$code
    fi
done
exit $status
