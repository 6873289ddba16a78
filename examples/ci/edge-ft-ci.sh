#!/usr/bin/env bash
# A small edge-ft sweep on an emulated board, checked against gates: exit 0 when every gate holds, 1 when one
# fails (the table of what failed is in the log), 2 for a malformed gate. github-actions.yml and gitlab-ci.yml
# both run this script; every setting is an environment variable with the default shown.
#
# Writes into $EDGE_FT_CI_OUT: results.jsonl (one record per run), gates.xml (JUnit), summary.md (also appended to
# $GITHUB_STEP_SUMMARY on GitHub Actions) and report/ (edge-ft report: report.md and plots). Keep the folder as
# the job's artifact; results.jsonl of a good run is the baseline for the next ones (EDGE_FT_CI_BASELINE).
set -euo pipefail

EDGE_FT=${EDGE_FT:-edge-ft}                                  # the edge-ft command (host install: pip ...[host])
OUT=${EDGE_FT_CI_OUT:-runs/ci}                               # output folder (the artifact)
PROFILE=${EDGE_FT_CI_PROFILE:-rpi-zero-2w}                   # the board to emulate (edge-ft profile list)
METHODS=${EDGE_FT_CI_METHODS:-probe-cached,lora}             # one short method set
ENGINES=${EDGE_FT_CI_ENGINES:-ort-step}                      # the engine every board runs
STEPS=${EDGE_FT_CI_STEPS:-60}                                # optimizer steps per run
MODE=${EDGE_FT_CI_MODE:-auto}                                # auto: cgroup when root may write cgroups, else rlimit
TIMING=${EDGE_FT_CI_TIMING:-cpu}                             # cpu: board time from CPU time (no root); quota: paced
BASE=${EDGE_FT_CI_BASE:-}                                    # base weights (empty: pretrain once into $OUT/prep)
PRETRAIN_EPOCHS=${EDGE_FT_CI_PRETRAIN_EPOCHS:-}              # when pretraining here (empty: the recipe's)
BASELINE=${EDGE_FT_CI_BASELINE:-}                            # an earlier results.jsonl to compare with (optional)
# How much worse than the baseline a figure may get, space-separated [FIELD=]N% (step time varies most between runs
# on a shared machine: see the README's section on CI).
MAX_REGRESSION=${EDGE_FT_CI_MAX_REGRESSION:-"10% ms_per_step=50%"}
# Gates, one per line: within the board's memory budget, well inside it, and learning something in so few steps.
GATES=${EDGE_FT_CI_GATES:-"$PROFILE:*:fits
$PROFILE:*:peak_rss_mb<=200
$PROFILE:*:accuracy>=0.5"}
EXTRA_GATES=${EDGE_FT_CI_EXTRA_GATES:-}                      # more gates, one per line, added to the above

args=(bench --profiles "$PROFILE" --methods "$METHODS" --engines "$ENGINES" --steps "$STEPS" --mode "$MODE"
      --timing "$TIMING"
      --results "$OUT/results.jsonl" --junit "$OUT/gates.xml" --summary "$OUT/summary.md")
while IFS= read -r gate; do
    if [ -n "$gate" ]; then args+=(--assert "$gate"); fi
done <<< "$GATES"$'\n'"$EXTRA_GATES"
if [ -n "$BASE" ]; then args+=(--base "$BASE"); fi
if [ -n "$PRETRAIN_EPOCHS" ]; then args+=(--pretrain-epochs "$PRETRAIN_EPOCHS"); fi
if [ -n "$BASELINE" ]; then
    if [ -f "$BASELINE" ]; then
        args+=(--baseline "$BASELINE")
        for limit in $MAX_REGRESSION; do args+=(--max-regression "$limit"); done
    else
        echo "note: no baseline at $BASELINE yet; gates only" >&2
    fi
fi

mkdir -p "$OUT"
status=0
"$EDGE_FT" "${args[@]}" || status=$?
if [ "$status" -le 1 ] && [ -s "$OUT/results.jsonl" ]; then
    "$EDGE_FT" report "$OUT/results.jsonl" --out "$OUT/report"    # the report is kept whether gates held or not
fi
exit "$status"
