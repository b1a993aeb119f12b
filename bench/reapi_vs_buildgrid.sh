#!/usr/bin/env bash
# gridgate vs BuildGrid 0.4.4, configured the same way on the same machine:
# plaintext loopback, JWT HS256 (audience gridgate) + the same ACL file,
# in-memory CAS with the same byte budget, action cache on instance `main`.
#
#   bench/reapi_vs_buildgrid.sh [SECONDS]     (default 10 s per h2load run)
#
# 1. FindMissingBlobs (10 digests) requests per second at 16 and 64 concurrent
#    streams (4 connections x 4 or 16 streams), h2load, 3 runs per case. h2load
#    only sees HTTP status 200, so a probe with nghttp checks grpc-status 0 and
#    every run's response byte count is compared with (requests x probe size):
#    a RESOURCE_EXHAUSTED or auth failure has no DATA frame and shows up as
#    DATA-MISMATCH.
# 2. ByteStream Write then Read of a 100 MiB blob, 3 times (a new blob each
#    time) with bench/bytestream_load.rs on a freshly started server, and the
#    server's peak RSS (VmHWM) afterwards. 3 x 100 MiB exceeds the budget
#    (BUDGET_MIB, default 256), so the stores must evict.
#
# Env: BGD_VENV (a venv with buildgrid==0.4.4; default the test cache's venv,
# created if missing), BUDGET_MIB, BLOB_BYTES (default 104857600).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
budget_mib="${BUDGET_MIB:-256}"
blob_bytes="${BLOB_BYTES:-104857600}"
cache="${GRIDGATE_TEST_CACHE:-$HOME/.cache/gridgate-tests}"
venv="${BGD_VENV:-$cache/venv}"

command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }
if [[ ! -x "$venv/bin/bgd" ]]; then
  python3 -m venv "$venv" && "$venv/bin/pip" install -q buildgrid==0.4.4
fi
cargo build --release --quiet --bin gridgate --example make_load --example bytestream_load

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
./target/release/examples/make_load "$work" main

# One ACL file for both servers: BuildGrid's format, patterns ending in `$`
# (same meaning under BuildGrid's re.match and gridgate's whole-value match).
cat > "$work/acl.yaml" <<'YAML'
main:
  allow:
    - actor: bench-client$
      subject: bench-user$
      requests: [GetCapabilities, FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs, GetTree,
                 Read, Write, QueryWriteStatus, GetActionResult, UpdateActionResult]
YAML

cat > "$work/gridgate.yaml" <<YAML
server:
  - !channel
    address: "127.0.0.1:0"
    insecure-mode: true
authorization:
  method: jwt
  algorithm: hs256
  secret: hmac.secret
  audience: gridgate
  acl-config: acl.yaml
instances:
  - name: main
    cas: { backend: memory, max-bytes: ${budget_mib}M }
    action-cache: { allow-updates: true }
YAML

bg_port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat > "$work/buildgrid.yml" <<YAML
server:
  - !channel
    address: "127.0.0.1:$bg_port"
    insecure-mode: true
authorization:
  method: jwt
  secret: $work/hmac.secret
  algorithm: hs256
  audience: gridgate
  acl-config: $work/acl.yaml
monitoring:
  enabled: false
storages:
  - !lru-storage &cas-storage
    size: ${budget_mib}M
caches:
  - !lru-action-cache &ac
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: main
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *ac
# Also BuildGrid's maximum_concurrent_rpcs: must exceed the 64 streams.
thread-pool-size: 100
YAML

pid="" port=""
start() { # gridgate|buildgrid
  if [[ "$1" == gridgate ]]; then
    ./target/release/gridgate --log warn,gridgate::server=info serve --config "$work/gridgate.yaml" 2> "$work/gridgate.log" &
    pid=$!
    for _ in $(seq 100); do
      port="$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/gridgate.log" | head -1 | sed 's/.*://')" || true
      [[ -n "${port:-}" ]] && break
      sleep 0.1
    done
  else
    "$venv/bin/bgd" server start "$work/buildgrid.yml" > "$work/buildgrid.log" 2>&1 &
    pid=$! port="$bg_port"
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  fi
  pids+=("$pid")
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$1 did not start"; cat "$work/$1.log"; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }

path=build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs
token="$(cat "$work/token")"
hdr=(-H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $token")

run_fmb() { # server streams
  local server="$1" streams="$2" url="http://127.0.0.1:$port/$path"
  nghttp -v "${hdr[@]}" -H ':method: POST' -d "$work/fmb.bin" "$url" > "$work/probe" 2>&1 || true
  local gstatus rlen
  gstatus="$(grep -a -o 'grpc-status: [0-9]*' "$work/probe" | head -1 | awk '{print $2}')" || true
  rlen="$(grep -a -o 'recv DATA frame <length=[0-9]*' "$work/probe" | head -1 | sed 's/.*=//')" || true
  if [[ "$gstatus" != 0 ]]; then echo "probe failed for $server:"; cat "$work/probe"; exit 1; fi
  # Warm-up run (not counted): h2load's byte counts would include --warm-up-time.
  h2load -D 2 -c 4 -m $((streams / 4)) -t 1 "${hdr[@]}" -d "$work/fmb.bin" "$url" > /dev/null 2>&1
  for rep in 1 2 3; do
    h2load -D "$secs" -c 4 -m $((streams / 4)) -t 1 "${hdr[@]}" -d "$work/fmb.bin" \
      --log-file="$work/lat" "$url" > "$work/out" 2>&1
    local rps done data pct verdict=grpc-ok
    rps="$(grep -o '[0-9.]* req/s' "$work/out" | head -1 | awk '{print $1}')"
    done="$(grep -o '[0-9]* succeeded' "$work/out" | awk '{print $1}')"
    data="$(grep -o '([0-9]*) data' "$work/out" | tr -d '()' | awk '{print $1}')"
    pct="$(awk -F'\t' '{print $3}' "$work/lat" | sort -n | awk '{a[NR]=$1} END{printf "p50=%.2fms p99=%.2fms", a[int(NR*0.50)]/1000, a[int(NR*0.99)]/1000}')"
    # Responses still in flight when -D ends add whole responses to the byte
    # count without counting as done: allow at most one per stream.
    local extra=$((data - done * rlen))
    if (( extra < 0 || extra % rlen != 0 || extra / rlen > streams )); then
      verdict="DATA-MISMATCH(data=$data expected=$((done * rlen)))"
    fi
    echo "fmb $server streams=$streams run=$rep: $rps req/s $pct requests=$done $verdict" | tee -a "$work/results"
  done
}

vmhwm() { awk '/^VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }
vmrss() { awk '/^VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

for server in gridgate buildgrid; do
  start "$server"
  for streams in 16 64; do run_fmb "$server" "$streams"; done
  stop
done

for server in gridgate buildgrid; do
  start "$server"
  echo "bytestream $server: RSS at start $(vmrss "$pid") MiB"
  ./target/release/examples/bytestream_load "http://127.0.0.1:$port" main --token "$work/token" \
    --size "$blob_bytes" --reps 3 --label "bytestream $server" | tee -a "$work/results"
  echo "bytestream $server: peak RSS (VmHWM) $(vmhwm "$pid") MiB, RSS now $(vmrss "$pid") MiB, CAS budget $budget_mib MiB" | tee -a "$work/results"
  stop
done

echo "== medians of 3"
for streams in 16 64; do
  g="$(grep "^fmb gridgate streams=$streams " "$work/results" | awk '{print $5}' | sort -n | sed -n 2p)"
  b="$(grep "^fmb buildgrid streams=$streams " "$work/results" | awk '{print $5}' | sort -n | sed -n 2p)"
  awk -v s="$streams" -v g="$g" -v b="$b" 'BEGIN{printf "FindMissingBlobs streams=%s: gridgate %.0f req/s, BuildGrid %.0f req/s, ratio %.1fx\n", s, g, b, g/b}'
done
grep -h "median\|peak RSS" "$work/results"
grep -q "DATA-MISMATCH" "$work/results" && echo "WARNING: some runs had failed calls (DATA-MISMATCH above)"
exit 0
