#!/usr/bin/env bash
# Interactive guided setup: checks the environment, tests the connection with one API call,
# offers the cluster size, then deploys. Answers can also be fed on stdin (one per line).
#
#   cd cai_integration && ./quick_start.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit "${2:-1}"; }

# ask VAR "question" "default": reads one line from stdin; an empty answer takes the default.
ask() {
    local __var="$1" __question="$2" __default="${3:-}" __answer=""
    if [ -n "$__default" ]; then
        printf '%s [%s]: ' "$__question" "$__default"
    else
        printf '%s: ' "$__question"
    fi
    IFS= read -r __answer || true
    printf -v "$__var" '%s' "${__answer:-$__default}"
}

# ask_secret VAR "question": like ask, without echoing what is typed when stdin is a terminal.
ask_secret() {
    local __var="$1" __question="$2" __answer=""
    printf '%s: ' "$__question"
    if [ -t 0 ]; then
        IFS= read -rs __answer || true
        printf '\n'
    else
        IFS= read -r __answer || true
    fi
    printf -v "$__var" '%s' "$__answer"
}

target="" host="" key="" workers="" gpus="" go=""

say "== ray-serve-cai quick start =="
say ""
say "1. Checking the environment"
command -v git >/dev/null 2>&1 || die "git is not installed" 2
command -v python3 >/dev/null 2>&1 || die "python3 is not installed" 2
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || die "Python 3.10 or newer is needed (found $(python3 --version 2>&1))" 2
if ! command -v ray-cai >/dev/null 2>&1; then
    say "   ray-cai is not installed: installing it from this checkout (deploy side only)"
    python3 -m pip install --quiet -e "$repo" || die "pip install failed" 1
fi
say "   git, python3 and ray-cai found"
ray-cai config validate >/dev/null || die "the config files are invalid: run 'ray-cai config validate'" 2
say "   ray_cluster_config.yaml and cai_integration/jobs_config.yaml are valid"

say ""
say "2. Where to deploy"
ask target "Deploy to (cml = a CML workspace, local = the local workspace on this machine)" "cml"
declare -a where=()
case "$target" in
    local)
        where=(--local)
        ;;
    cml)
        ask host "CML workspace URL" "${CML_HOST:-}"
        [ -n "$host" ] || die "a CML workspace URL is needed (e.g. https://ml.example.cloudera.site)" 2
        export CML_HOST="$host"
        if [ -n "${CML_API_KEY:-}" ]; then
            say "CML API key: using CML_API_KEY from the environment"
        else
            ask_secret key "CML API key (input hidden)"
            [ -n "$key" ] || die "a CML API key is needed (User Settings > API Keys)" 2
            export CML_API_KEY="$key"
        fi
        ;;
    *)
        die "answer 'cml' or 'local', not '$target'" 2
        ;;
esac

say ""
say "3. Testing the connection (one API call)"
ray-cai check "${where[@]}" || die "cannot reach the workspace: see the message above" 1

say ""
say "4. Cluster size (environment overrides of ray_cluster_config.yaml)"
ask workers "Number of Ray workers" "${RAY_NUM_WORKERS:-$(ray-cai config validate --json | python3 -c 'import json,sys; print(sum(g["replicas"] for g in json.load(sys.stdin)["cluster"]["worker_groups"]))')}"
case "$workers" in
    ''|*[!0-9]*) die "the number of workers must be a whole number, not '$workers'" 2 ;;
esac
export RAY_NUM_WORKERS="$workers"
ask gpus "GPUs per worker" "${RAY_WORKER_GPUS:-0}"
case "$gpus" in
    ''|*[!0-9]*) die "GPUs per worker must be a whole number, not '$gpus'" 2 ;;
esac
export RAY_WORKER_GPUS="$gpus"

say ""
ask go "Deploy now? (yes/no)" "yes"
case "$go" in
    y|yes) ;;
    *) say "Not deploying. Run 'ray-cai deploy ${where[*]}' when ready."; exit 0 ;;
esac

say ""
say "5. Deploying"
ray-cai deploy "${where[@]}"
say ""
say "Done. Next: 'ray-cai status ${where[*]}', 'ray-cai connect ${where[*]}', 'ray-cai down ${where[*]}'."
