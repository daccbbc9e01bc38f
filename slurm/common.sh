# Sourced by the sbatch scripts: the repo, the virtualenv and the category of this task.
# shellcheck shell=bash

# sbatch runs a copy of the script from its spool folder, so the repo comes from submit.sh
# (VSAD_REPO) or from the folder sbatch was called in.
VSAD_REPO="${VSAD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
VSAD_VENV="${VSAD_VENV:-$VSAD_REPO/.venv}"
if [[ ! -f "$VSAD_VENV/bin/activate" ]]; then
    echo "error: no virtualenv at $VSAD_VENV (set VSAD_VENV, or run 'make install' in $VSAD_REPO)" >&2
    exit 2
fi
# shellcheck disable=SC1091
source "$VSAD_VENV/bin/activate"

# vsad_category FILE INDEX: the INDEX-th (0-based) category of FILE; blank lines and
# '#' comments do not count (submit.sh sizes the array the same way).
vsad_categories() {
    grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$1" | sed 's/[[:space:]]*$//'
}
vsad_category() {
    local name
    name="$(vsad_categories "$1" | sed -n "$(($2 + 1))p")"
    if [[ -z "$name" ]]; then
        echo "error: $1 has no category number $2 (0-based)" >&2
        exit 2
    fi
    printf '%s\n' "$name"
}

# VSAD_ARGS is split on whitespace into extra vsad-fit arguments.
read -r -a VSAD_EXTRA_ARGS <<< "${VSAD_ARGS:-}"
