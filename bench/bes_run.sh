#!/usr/bin/env bash
# BES ingestion and query benchmark of gridgate, one backend at a time, with the
# Rust load client (bench/bes_load.rs). Loopback only; every run is bounded.
#
#   bench/bes_run.sh [memory|file|postgres|buildgrid ...]   (default: memory file postgres)
#
# `buildgrid` runs the same client against BuildGrid 0.4.4 started by the shared
# harness (BGB_HARNESS, default ../shared/bench/buildgrid; its start_server.sh
# with BGB_SHIM=1, since stock 0.4.4 BES fails every call; it needs the venv
# that harness's run.sh installs, /tmp/bgvenv) on 127.0.0.1:50051.
#
# Env: PORT (default 50061), PG_URL (default postgres://postgres@127.0.0.1:5432/test;
# a schema bes_bench is dropped and recreated), OUT (default bench/out), REPS
# (default 3) runs of each ingestion figure, MEM_BUDGET (default 256M, the
# default build-events.max-bytes) for the memory store.
# Prints one line per measurement plus the server's peak RSS (VmHWM).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-50061}"
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
OUT="${OUT:-bench/out}"
REPS="${REPS:-3}"
BGB_HARNESS="${BGB_HARNESS:-../shared/bench/buildgrid}"
mkdir -p "$OUT"
cargo build --release --quiet --bin gridgate --example bes_load
GG=target/release/gridgate
LOAD=target/release/examples/bes_load
SERVER="grpc://127.0.0.1:$PORT"

measure() {  # SERVER PID [--streaming]
  local server="$1" pid="$2" streaming="${3:-}"
  for _ in $(seq 1 "$REPS"); do timeout 300 "$LOAD" --server "$server" ingest --streams 1 --events 20000; done
  for _ in $(seq 1 "$REPS"); do timeout 300 "$LOAD" --server "$server" ingest --streams 64 --events 2000; done
  timeout 600 "$LOAD" --server "$server" query --streams 10000 --queries 200 $streaming
  echo "server peak RSS: $(grep VmHWM /proc/$pid/status | awk '{print $2, $3}')"
}

run_buildgrid() {
  local run=/tmp/bgbench-bes pid
  pid="$(BGB_RUN=$run BGB_SHIM=1 "$BGB_HARNESS/start_server.sh" noauth)"
  echo "== buildgrid 0.4.4 (bgd_bes_shim.py, memory build events)"
  measure grpc://127.0.0.1:50051 "$pid"
  BGB_RUN=$run "$BGB_HARNESS/start_server.sh" stop
}

run_backend() {
  local backend="$1" store
  if [[ "$backend" == buildgrid ]]; then run_buildgrid; return; fi
  case "$backend" in
    memory) store="store: memory
  max-bytes: ${MEM_BUDGET:-256M}" ;;
    file) rm -f "$OUT/bench.redb"; store="store: { file: $PWD/$OUT/bench.redb }" ;;
    postgres)
      psql "$PG_URL" -qc "DROP SCHEMA IF EXISTS bes_bench CASCADE; CREATE SCHEMA bes_bench;" >/dev/null
      store="store: { postgres: \"$PG_URL?options=-c%20search_path%3Dbes_bench\" }" ;;
    *) echo "unknown backend $backend" >&2; return 1 ;;
  esac
  cat > "$OUT/bench-$backend.yaml" <<EOF
server:
  - !channel
    address: "127.0.0.1:$PORT"
    insecure-mode: true
authorization:
  method: none
build-events:
  $store
EOF
  "$GG" serve --config "$OUT/bench-$backend.yaml" > "$OUT/server-$backend.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' RETURN
  for _ in $(seq 1 100); do grep -q "listening on" "$OUT/server-$backend.log" && break; sleep 0.1; done
  echo "== gridgate $backend"
  measure "$SERVER" "$pid" --streaming
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for b in "${@:-memory file postgres}"; do
  for one in $b; do run_backend "$one"; done
done
