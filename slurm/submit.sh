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
#   VSAD_SUBMIT_CHECK seconds to wait for SLURM's first verdict on the array (default 15)
#
# Right after submitting, the array's pending reason is read (squeue). A request that no node
# of the partition can ever meet (reason PartitionConfig, PartitionNodeLimit,
# PartitionTimeLimit or BadConstraints: e.g. the default --cpus-per-task=8 on 2-CPU nodes)
# would leave the jobs pending forever without a word from sbatch: both jobs are cancelled
# and one line says which request and what the nodes offer (exit 2).
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

# job_field JOB NAME: one field of `scontrol -o show job` (the array's first record).
job_field() {
    scontrol -o show job "$1" 2>/dev/null | head -n 1 | tr ' ' '\n' |
        awk -v key="$2=" 'index($0, key) == 1 { print substr($0, length(key) + 1); exit }'
}

# unmet_request JOB REASON: which request of JOB no node of its partition meets, in words.
unmet_request() {
    local job="$1" reason="$2" partition cpus per_task largest limit
    partition="$(job_field "$job" Partition)"
    cpus="$(job_field "$job" MinCPUsNode)"
    per_task="$(job_field "$job" CPUs/Task)"
    largest="$(sinfo -h -N -p "$partition" -o '%c' 2>/dev/null | sort -n | tail -n 1)"
    if [[ "$cpus" =~ ^[0-9]+$ && "$largest" =~ ^[0-9]+$ ]] && ((cpus > largest)); then
        echo "it asks for $cpus CPUs on one node (--cpus-per-task=$per_task) but the largest" \
            "node of partition $partition has $largest; add e.g. --cpus-per-task=$largest to" \
            "VSAD_SBATCH_ARGS"
        return
    fi
    if [[ "$reason" == PartitionTimeLimit ]]; then
        limit="$(sinfo -h -p "$partition" -o '%l' 2>/dev/null | head -n 1)"
        echo "it asks for --time=$(job_field "$job" TimeLimit) but partition $partition allows" \
            "at most $limit; set --time in VSAD_SBATCH_ARGS"
        return
    fi
    echo "no node of partition $partition meets its request (scontrol show job $job says what" \
        "it asks for, sinfo -N -l what the nodes have)"
}

# The scheduler gives a new job its pending reason within a second or two; wait for it.
reason=""
state=""
for ((waited = 0; waited < ${VSAD_SUBMIT_CHECK:-15}; waited++)); do
    read -r state reason < <(squeue -h -j "$fit_job" -o '%T %r' 2>/dev/null | head -n 1) || true
    [[ "$state" == PENDING && ( -z "$reason" || "$reason" == None ) ]] || break
    sleep 1
done
case "$reason" in
    PartitionConfig | PartitionNodeLimit | PartitionTimeLimit | BadConstraints)
        why="$(unmet_request "$fit_job" "$reason")"
        scancel "$fit_job" "$report_job" || true
        echo "error: fit array job $fit_job can never start (pending, reason $reason): $why;" \
            "cancelled it and report job $report_job" >&2
        exit 2
        ;;
esac

echo "fit array job: $fit_job ($count tasks, logs in $logs)"
echo "report job: $report_job (after all tasks succeed: $VSAD_RUN_ROOT/report/report.md)"
