#!/usr/bin/env bash
# Lints and validates everything we hand to a cluster:
#   1. `helm lint --strict` of charts/dspark (defaults, and with every option on);
#   2. `helm template` output (CRD included) validated with `kubernetes-validate --strict`;
#   3. the children the operator renders for every examples/*.yaml (`dspark-operator render`)
#      validated the same way (StatefulSets, Services, PDBs against the Kubernetes schemas);
#   4. the chart's CRD equals crds/ (the generated one; `cargo test` checks crds/ against the code).
# DSparkDeployment objects themselves are checked against the CRD's schema and CEL rules by
# `cargo test -p dspark-operator --test crd` (kubernetes-validate knows only built-in kinds).
#
# Tools: helm from PATH, else $TOOLS/bin/helm, else installed there by ../shared/tools/install-helm.sh
# (relative to the repo root; HELM_INSTALLER overrides); kubernetes-validate from PATH, else a venv in $TOOLS/venv (pip).
# TOOLS defaults to <repo>/.tools (git-ignored). KUBE_VERSION picks the schema version.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tools=${TOOLS:-$root/.tools}
kube_version=${KUBE_VERSION:-1.33.0}
cd "$root"

log() { printf '==> %s\n' "$*" >&2; }

ensure_helm() {
  if command -v helm >/dev/null 2>&1; then return; fi
  if [[ -x "$tools/bin/helm" ]]; then export PATH="$tools/bin:$PATH"; return; fi
  local installer=${HELM_INSTALLER:-$root/../shared/tools/install-helm.sh}
  if [[ -f "$installer" ]]; then
    log "installing helm into $tools/bin"
    bash "$installer" "$tools/bin" >&2
    export PATH="$tools/bin:$PATH"
    return
  fi
  echo "helm not found: put it on PATH or provide $installer" >&2
  exit 2
}

ensure_validator() {
  if command -v kubernetes-validate >/dev/null 2>&1; then return; fi
  if [[ ! -x "$tools/venv/bin/kubernetes-validate" ]]; then
    log "installing kubernetes-validate into $tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet kubernetes-validate
  fi
  export PATH="$tools/venv/bin:$PATH"
}

ensure_helm
ensure_validator
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

log "helm lint"
helm lint --strict charts/dspark
helm lint --strict charts/dspark --set networkPolicy.enabled=true --set metrics.serviceMonitor.enabled=true \
  --set replicaCount=2 --set serverImage=registry.local/dspark:dev

log "helm template | kubernetes-validate --strict (Kubernetes $kube_version)"
helm template dspark charts/dspark --namespace dspark-system --include-crds > "$out/chart.yaml"
helm template dspark charts/dspark --namespace dspark-system --set networkPolicy.enabled=true \
  > "$out/chart-netpol.yaml"
kubernetes-validate --strict --quiet -k "$kube_version" "$out/chart.yaml" "$out/chart-netpol.yaml"
# The ServiceMonitor is a Prometheus-operator kind kubernetes-validate has no schema for:
# check that it renders and names the metrics port.
helm template dspark charts/dspark --set metrics.serviceMonitor.enabled=true \
  --show-only templates/servicemonitor.yaml > "$out/servicemonitor.yaml"
grep -q 'port: metrics' "$out/servicemonitor.yaml"

log "chart CRD == crds/dsparkdeployment.yaml"
diff -u crds/dsparkdeployment.yaml charts/dspark/crds/dsparkdeployment.yaml

log "operator-rendered children of examples/*.yaml | kubernetes-validate --strict"
# run-all.sh hands over the binary it built; alone, this script builds it.
bin=${DSPARK_OPERATOR_BIN:-}
if [[ -z "$bin" ]]; then
  cargo build --quiet -p dspark-operator
  bin="${CARGO_TARGET_DIR:-$root/target}/debug/dspark-operator"
fi
for example in examples/*.yaml; do
  name=$(basename "$example" .yaml)
  "$bin" render "$example" --namespace dspark-e2e > "$out/$name.children.yaml"
  kubernetes-validate --strict --quiet -k "$kube_version" "$out/$name.children.yaml"
done

log "all manifests valid"
