#!/usr/bin/env bash
# Soak: about 10 minutes of mixed load on one gridgate (TLS, ES256 tokens from
# a JWKS URL, a policy directory, a memory CAS and BES store) while the JWKS
# server is restarted, the policy file rewritten and the TLS certificate
# reloaded. Reports what the well-behaved clients saw go wrong (target: 0),
# requests served, and the server's RSS after the warm-up and at the end
# (target: within 10 %).
#
#   bench/soak.sh [SECONDS]        (default 600)
#
# Chaos, on a schedule: every 60 s the JWKS server is stopped for 10 s around
# gridgate's refetch (fetches fail; the cached keys keep working); every 30 s the policy file is rewritten (an
# unrelated team entry comes and goes); every 45 s the certificate files are
# rewritten and SIGHUP sent. The load client is bench/soak.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
warmup=60
(( secs > warmup + 30 )) || { echo "give at least $((warmup + 30)) seconds"; exit 1; }
cargo build --release --quiet --bin gridgate --example soak
GG=./target/release/gridgate
SOAK=./target/release/examples/soak
work="$(mktemp -d)"
cleanup() { for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done; [[ -n "${jwks_pid:-}" ]] && kill "$jwks_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

"$GG" dev certs --out "$work/certs" > /dev/null
"$SOAK" setup "$work/keys"
# A free port for the JWKS server, kept across its restarts.
jport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
start_jwks() {
  python3 -m http.server "$jport" --bind 127.0.0.1 --directory "$work/keys" > /dev/null 2>&1 &
  jwks_pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$jport/jwks.json" > /dev/null && return 0; sleep 0.1; done
  echo "JWKS server did not start"; exit 1
}
start_jwks

mkdir -p "$work/policies"
policy_a='soak:
  allow:
    - actor: soak-client
      requests: [FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, PublishBuildToolEventStream]
'
policy_b="${policy_a}other-team:
  allow:
    - actor: someone-else
"
printf '%s' "$policy_a" > "$work/policies/soak.yaml"
cat > "$work/gridgate.yaml" <<YAML
server:
  - !channel
    address: "127.0.0.1:0"
    insecure-mode: false
    credentials:
      tls-server-key: $work/certs/server.key
      tls-server-cert: $work/certs/server.crt
authorization:
  method: jwt
  algorithm: es256
  jwks-url: "http://127.0.0.1:$jport/jwks.json"
  jwks-fetch-minutes: 1
  audience: gridgate
  acl-config: $work/policies
instances:
  - name: soak
    cas: { backend: memory, max-bytes: 64M }
build-events:
  store: memory
  max-bytes: 64M
YAML
"$GG" --log warn,gridgate::server=info,gridgate::gate::reload=info serve --config "$work/gridgate.yaml" 2> "$work/gridgate.log" &
gg_pid=$!
port=""
for _ in $(seq 100); do
  port="$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/gridgate.log" | head -1 | sed 's/.*://')" || true
  [[ -n "$port" ]] && break
  sleep 0.1
done
[[ -n "$port" ]] || { echo "gridgate did not start"; cat "$work/gridgate.log"; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$gg_pid/status"; }

"$SOAK" run --addr "127.0.0.1:$port" --ca "$work/certs/ca.crt" \
  --token-file "$work/keys/token" --forged-token-file "$work/keys/forged-token" \
  --seconds "$secs" > "$work/soak.out" 2> "$work/soak.err" &
soak_pid=$!

t=0; rss_start=""; jwks_down_until=-1; policy_flip=0
while kill -0 "$soak_pid" 2>/dev/null; do
  sleep 1; t=$((t + 1))
  (( t == warmup )) && rss_start="$(rss)" && echo "t=${t}s RSS after warm-up: ${rss_start} KiB"
  # Down from 5 s before each whole minute to 5 s after: gridgate refetches
  # every minute from its start (just before t=0), so fetches fail.
  if (( t % 60 == 55 )); then
    kill "$jwks_pid" 2>/dev/null || true; wait "$jwks_pid" 2>/dev/null || true
    jwks_down_until=$((t + 10)); echo "t=${t}s JWKS server stopped"
  fi
  if (( t == jwks_down_until )); then start_jwks; echo "t=${t}s JWKS server back"; fi
  if (( t % 30 == 0 )); then
    policy_flip=$((1 - policy_flip))
    if (( policy_flip )); then printf '%s' "$policy_b" > "$work/policies/soak.yaml.tmp"; else printf '%s' "$policy_a" > "$work/policies/soak.yaml.tmp"; fi
    mv "$work/policies/soak.yaml.tmp" "$work/policies/soak.yaml"
  fi
  if (( t % 45 == 0 )); then
    for f in server.crt server.key; do cp "$work/certs/$f" "$work/certs/$f.tmp"; mv "$work/certs/$f.tmp" "$work/certs/$f"; done
    kill -HUP "$gg_pid"
  fi
  (( t % 60 == 0 )) && tail -1 "$work/soak.out"
done
set +e; wait "$soak_pid"; soak_rc=$?; set -e
rss_end="$(rss)"
echo "== soak client"
cat "$work/soak.out" | tail -3
if [[ -s "$work/soak.err" ]]; then echo "== client errors (first 20)"; head -20 "$work/soak.err"; fi
echo "== server"
echo "policy reloads: $(grep -c 'policy reloaded' "$work/gridgate.log" || true), TLS reloads: $(grep -c 'TLS certificate reloaded' "$work/gridgate.log" || true), JWKS fetch failures logged: $(grep -c 'key set fetch failed' "$work/gridgate.log" || true)"
awk -v a="$rss_start" -v b="$rss_end" 'BEGIN{printf "RSS after warm-up %d KiB, at the end %d KiB (%+.1f%%)\n", a, b, (b-a)/a*100}'
kill -0 "$gg_pid" 2>/dev/null && echo "gridgate still running" || { echo "gridgate DIED"; tail -20 "$work/gridgate.log"; exit 1; }
exit "$soak_rc"
