#!/usr/bin/env bash
# slurm/submit.sh CONFIG CATEGORY_FILE [-- extra vsad-fit args]
#
# Submits slurm/array.sbatch with one task per category of CATEGORY_FILE, then a report job
# (--dependency=afterok on the whole array) that runs vsad-report over the run root, and
# prints both job ids. Environment:
#   VSAD_RUN_ROOT     where the runs go (default: <repo>/runs/slurm)
#   VSAD_ARGS         extra vsad-fit arguments (the ones after -- are appended)
#   VSAD_VENV         virtualenv to activate in the jobs (default: <repo>/.venv)
#   VSAD_SBATCH_ARGS  words passed to every sbatch call, e.g. "--partition=gpu --account=x"
#                     or "--gres=none" on a CPU-only cluster; they override the #SBATCH lines.
set -euo pipefail

usage() {
    echo "usage: $0 CONFIG CATEGORY_FILE [-- extra vsad-fit args]" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
config="$1"
categories="$2"
shift 2
if [[ $# -gt 0 ]]; then
    [[ "$1" == "--" ]] || usage
    shift
fi
[[ -f "$config" ]] || { echo "error: no config file $config" >&2; exit 2; }
[[ -f "$categories" ]] || { echo "error: no category file $categories" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=slurm/common.sh
VSAD_REPO="$repo" source "$repo/slurm/common.sh"
count="$(vsad_categories "$categories" | wc -l)"
((count > 0)) || { echo "error: $categories lists no category" >&2; exit 2; }

export VSAD_REPO="$repo"
export VSAD_VENV
export VSAD_CONFIG="$(realpath "$config")"
export VSAD_CATEGORIES="$(realpath "$categories")"
export VSAD_RUN_ROOT="$(realpath -m "${VSAD_RUN_ROOT:-$repo/runs/slurm}")"
export VSAD_ARGS="${VSAD_ARGS:-}${*:+ $*}"
read -r -a sbatch_args <<< "${VSAD_SBATCH_ARGS:-}"
logs="$VSAD_RUN_ROOT/logs"
mkdir -p "$logs"

# --parsable prints "jobid" or "jobid;cluster".
fit_job="$(sbatch --parsable --export=ALL --chdir="$repo" --array="0-$((count - 1))" \
    --output="$logs/fit_%A_%a.log" "${sbatch_args[@]}" "$repo/slurm/array.sbatch")"
fit_job="${fit_job%%;*}"
report_job="$(sbatch --parsable --export=ALL --chdir="$repo" \
    --dependency="afterok:$fit_job" --output="$logs/report_%j.log" \
    "${sbatch_args[@]}" "$repo/slurm/report.sbatch")"
report_job="${report_job%%;*}"

echo "fit array job: $fit_job ($count tasks, logs in $logs)"
echo "report job: $report_job (after all tasks succeed: $VSAD_RUN_ROOT/report/report.md)"
