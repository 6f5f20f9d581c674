#!/usr/bin/env bash
# The two demonstrations of `cargo xtask demo`, on a real cluster: kind, the agent as a DaemonSet,
# real pods calling each other with curl.
#
# Prerequisites (none of them can run on the machine this was written on):
#   - a running Docker engine on Linux (or Docker Desktop) whose kernel is >= 5.15 with cgroup v2
#     and BTF, and which allows privileged containers (kind's nodes are);
#   - kind >= 0.24 and kubectl >= 1.30 on PATH;
#   - network access: kindest/node, the rust, distroless and debian base images, and the Gateway
#     API release below; about 8 GiB of memory and 15 minutes for the first image build.
#
# Usage: deploy/kind/demo.sh           (from anywhere; exits non-zero if a verdict fails)
#   KEEP_CLUSTER=1   keep the cluster afterwards (kind delete cluster --name gamma-demo)
#   CLUSTER=NAME     cluster name (default gamma-demo); an existing cluster of that name is refused
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-gamma-demo}
GATEWAY_API_VERSION=v1.5.1 # the release the agent's gateway-api crate (0.22) is generated from
AGENT_IMAGE=gamma-node:dev # the tag deploy/kind/kustomization.yaml sets
DEMO_IMAGE=gamma-demo:dev  # the tag deploy/kind/scenario.yaml uses
CALLS=1000 # the split's ±5 points: 5 standard deviations at 1,000 draws (one run in 60 failed at 200)
failures=0
created=0
WORK=$(mktemp -d)

step() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
# verdict 1|0 TEXT: prints PASS or FAIL and counts failures.
verdict() {
  if [[ $1 == 1 ]]; then echo "  PASS $2"; else echo "  FAIL $2"; failures=$((failures + 1)); fi
}
count() { grep -cF -- "$1" <<<"$2" || true; }

cleanup() {
  local status=$?
  rm -rf "$WORK"
  if [[ $status != 0 && $created == 1 ]]; then
    echo "--- the agents' last log lines:"
    kubectl -n gamma-system logs daemonset/gamma-node --all-containers --tail=40 2>/dev/null || true
  fi
  if [[ $created == 1 && ${KEEP_CLUSTER:-0} != 1 ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    echo "deleted the kind cluster $CLUSTER"
  fi
}
trap cleanup EXIT

# COUNT calls from the client pod of NAMESPACE to http://catalog.products/items: one line each, the
# echo backend's JSON answer (it names the pod and lists the headers it received), or FAILED.
calls() {
  # shellcheck disable=SC2016 # $1 and $(seq) belong to the pod's shell
  kubectl -n "$1" exec deploy/client -- sh -c \
    'for _ in $(seq "$1"); do curl -sSf --max-time 5 http://catalog.products/items || echo FAILED; echo; done' \
    sh "$2" | { grep -v '^$' || true; }
}

# Waits until the agents report the route Accepted in its status (written by the elected agent).
wait_accepted() {
  local ns=$1 route=$2
  for _ in $(seq 60); do
    if kubectl -n "$ns" get httproute "$route" \
      -o jsonpath='{.status.parents[*].conditions[?(@.type=="Accepted")].status}' | grep -q True; then
      kubectl -n "$ns" get httproute "$route" -o jsonpath='{range .status.parents[*]}  status by {.controllerName} for {.parentRef.kind} {.parentRef.name}: {range .conditions[*]}{.type}={.status} {end}{"\n"}{end}'
      # Every node's agent applies the same watch event by itself; give the others a moment.
      sleep 2
      return 0
    fi
    sleep 1
  done
  die "httproute $ns/$route not Accepted after 60 s"
}

apply_route() {
  echo "  applying $1:"
  grep -v '^#' "$1" | sed 's/^/    | /'
  kubectl apply -f "$1" >/dev/null
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH (see the prerequisites at the top)"
done
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  die "a kind cluster named $CLUSTER exists already: delete it or set CLUSTER"
fi

step "create the kind cluster $CLUSTER"
created=1
kind create cluster --name "$CLUSTER" --config deploy/kind/cluster.yaml --wait 180s

step "install the Gateway API $GATEWAY_API_VERSION CRDs (standard channel)"
kubectl apply --server-side -f \
  "https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API_VERSION/standard-install.yaml"
kubectl wait --for condition=Established --timeout=60s \
  crd/httproutes.gateway.networking.k8s.io crd/grpcroutes.gateway.networking.k8s.io

step "build the images and load them into the nodes"
docker build -t "$AGENT_IMAGE" .
docker build --target demo -t "$DEMO_IMAGE" .
kind load docker-image --name "$CLUSTER" "$AGENT_IMAGE" "$DEMO_IMAGE"

step "deploy the agent (kubectl apply -k deploy/kind)"
# kind's kubelet puts pods under kubelet.slice (cgroupRoot /kubelet): check the overlay's value.
cgroup_dir=$(kubectl kustomize deploy/kind | sed -n 's/^  CGROUP_DIR: //p')
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" test -d "$cgroup_dir" ||
    die "$node has no $cgroup_dir: set CGROUP_DIR in deploy/kind/kustomization.yaml to its pods' cgroup"
done
kubectl apply -k deploy/kind
kubectl -n gamma-system rollout status daemonset/gamma-node --timeout=180s

step "the seed scenario: products (catalog, catalog-v1, catalog-v2, a client) and ui-backend (a client)"
kubectl apply -f deploy/kind/scenario.yaml
for ns in products ui-backend; do
  kubectl -n "$ns" wait --for condition=Available --timeout=120s deployment --all
done
kubectl get pods -n products -o wide
kubectl get pods -n ui-backend -o wide

step "before any route: calls go to catalog's endpoints untouched (kube-proxy routing)"
out=$(calls ui-backend 20)
ok=$(count '"pod":"catalog-v' "$out")
flagged=$(count '["x-dev-feature","enabled"]' "$out")
verdict "$((ok == 20 && flagged == 0))" "ui-backend: $ok/20 calls answered, $flagged modified (expected 20, 0)"

step "1: a consumer route in ui-backend adds x-dev-feature: enabled to its calls to catalog.products"
apply_route demo/step1-consumer-route.yaml
wait_accepted ui-backend catalog-dev-feature
for ns in ui-backend products; do
  out=$(calls "$ns" 20)
  ok=$(count '"pod":"catalog-v' "$out")
  flagged=$(count '["x-dev-feature","enabled"]' "$out")
  expected=0
  [[ $ns == ui-backend ]] && expected=20
  echo "  from $ns: $flagged/$ok calls arrived with x-dev-feature: enabled" \
    "(e.g. $(head -n 1 <<<"$out" | grep -o '"pod":"[^"]*"' || true))"
  verdict "$((ok == 20 && flagged == expected))" \
    "$ns: $flagged of $ok answered calls carry the header, expected $expected of 20"
done

step "2: a producer route splits catalog 90/10 between catalog-v1 and catalog-v2"
apply_route demo/step2-producer-split.yaml
wait_accepted products catalog-split
for ns in products ui-backend; do
  out=$(calls "$ns" "$CALLS")
  v1=$(count '"pod":"catalog-v1-' "$out")
  v2=$(count '"pod":"catalog-v2-' "$out")
  flagged=$(count '["x-dev-feature","enabled"]' "$out")
  echo "  from $ns: catalog-v1 $v1  catalog-v2 $v2  (of $CALLS; x-dev-feature on $flagged)"
  if [[ $ns == products ]]; then
    verdict "$((v1 * 100 >= 85 * CALLS && v1 * 100 <= 95 * CALLS && v2 > 0 && v1 + v2 == CALLS && flagged == 0))" \
      "products follows the producer split: $((v1 * 100 / CALLS))% to catalog-v1 (90% ± 5 expected), no x-dev-feature"
  else
    verdict "$((v1 + v2 == CALLS && flagged == CALLS))" \
      "ui-backend keeps its consumer route (which replaces producer routes): $flagged of $CALLS calls carry x-dev-feature"
  fi
done

step "3: a hitless upgrade: the agents are replaced node by node while ui-backend keeps calling"
# The DaemonSet's update starts each new agent beside the old one, which hands its sockets and
# eBPF programs over (maxSurge 1, --takeover-socket): no call may fail or miss the mesh.
UPGRADE_SECONDS=90
# shellcheck disable=SC2016 # $1 and $(date) belong to the pod's shell
kubectl -n ui-backend exec deploy/client -- sh -c \
  'end=$(($(date +%s) + $1)); while [ "$(date +%s)" -lt "$end" ]; do curl -sSf --max-time 5 http://catalog.products/items || echo FAILED; echo; done' \
  sh "$UPGRADE_SECONDS" >"$WORK/upgrade-calls.txt" 2>&1 &
caller=$!
sleep 5
kubectl -n gamma-system rollout restart daemonset/gamma-node
kubectl -n gamma-system rollout status daemonset/gamma-node --timeout=120s
wait "$caller" || true
out=$(grep -v '^$' "$WORK/upgrade-calls.txt" || true)
total=$(grep -c . <<<"$out" || true)
failed=$(count FAILED "$out")
flagged=$(count '["x-dev-feature","enabled"]' "$out")
echo "  during the upgrade: $total calls, $failed failed, $((total - failed - flagged)) without the consumer route"
verdict "$((total > 0 && failed == 0 && flagged == total))" \
  "every call during the rolling upgrade answered and routed by the mesh"

echo
if ((failures > 0)); then
  die "$failures verdict(s) failed"
fi
echo "Demo: every verdict passed."
