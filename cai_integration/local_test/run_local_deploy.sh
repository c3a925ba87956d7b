#!/usr/bin/env bash
# The local flow end to end, on a private local workspace (a stand-in for CML):
#   1. `ray-cai config validate` on a small cluster config (1 CPU / 1 GiB nodes, free ports),
#   2. `ray-cai deploy --local`: project cloned from this checkout, the three chained jobs, real Ray,
#   3. `ray-cai status --local`: exit 0 only when Ray reports every node alive,
#   4. `ray-cai down --local`, then the workspace is stopped (also when a step fails).
#
#   cai_integration/local_test/run_local_deploy.sh [WORKERS]     # default 1 worker
#
# Needs `pip install -e ".[all]"` and a git checkout (deploy clones the committed tree; the cluster
# config below is sent from the working tree). RAY_CAI_WORKSPACE_HOME picks the workspace home
# (default: a new temporary directory, removed at the end).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

workers="${1:-1}"
case "$workers" in
    '' | *[!0-9]*) printf 'error: WORKERS must be a whole number, got %s\n' "$workers" >&2; exit 2 ;;
esac

scratch="$(mktemp -d)"
if [ -z "${RAY_CAI_WORKSPACE_HOME:-}" ]; then
    export RAY_CAI_WORKSPACE_HOME="$scratch/workspace-home"
fi
project="ray-cai-local-test"
config="$scratch/ray_cluster_config.yaml"
cat >"$config" <<YAML
ray_cluster:
  name: localtest
  num_workers: $workers
  head_cpu: 1
  head_memory: 1
  worker_cpu: 1
  worker_memory: 1
  ports: {gcs: 0, client: 0, dashboard: 0}
  startup_timeout: 300
  join_timeout: 240
YAML

if command -v ray-cai >/dev/null 2>&1; then
    ray_cai=(ray-cai)
else
    ray_cai=(python -m ray_serve_cai.cli.main)
fi
target=(--local --project "$project" --config "$config")

step() { printf '\n== %s\n' "$*"; }

cleanup() {
    status=$?
    step "tear down"
    "${ray_cai[@]}" down "${target[@]}" || status=1
    "${ray_cai[@]}" workspace stop || true
    rm -rf "$scratch"
    if [ "$status" -eq 0 ]; then
        printf '\nlocal deploy test passed\n'
    else
        printf '\nlocal deploy test FAILED (exit %s)\n' "$status" >&2
    fi
    exit "$status"
}
trap cleanup EXIT

step "validate the config"
"${ray_cai[@]}" config validate --config "$config"

step "deploy this checkout to the local workspace"
"${ray_cai[@]}" deploy "${target[@]}"

step "status (exit 0 = every node alive in Ray)"
"${ray_cai[@]}" status "${target[@]}"
