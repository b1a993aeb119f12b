#!/usr/bin/env bash
# Throughput and latency of a unary RPC (FindMissingBlobs, 10 digests) through
# the Gate with a cached HS256 JWT plus an ACL, against the same server with
# authorization `none`, at 16 and 64 concurrent streams, with h2load.
#
#   bench/gate_h2load.sh [SECONDS]      (default 10 s per run, REPS=3 runs each)
#
# CASES picks the servers compared (default "none none+token jwt"):
#   none        authorization none
#   none+token  the same open server, sent the authorization header anyway
#   jwt         HS256 JWT + ACL
#   jwt+metrics the jwt server with every metrics output on: the Prometheus
#               endpoint (scraped once a second during the runs) and BuildGrid's
#               monitoring: section pushing StatsD lines over UDP to a local sink
#   e.g. CASES="jwt jwt+metrics" bench/gate_h2load.sh 10   (the cost of monitoring)
#
# CALLGRIND=N runs each server under valgrind's callgrind instead and counts the
# instructions the server executes for N requests (after a warm-up), per
# request: a figure that does not move with other work on the machine, unlike
# req/s. E.g. CALLGRIND=20000 REPS=1 bench/gate_h2load.sh
#
# GRIDGATE=PATH runs that gridgate binary instead of building this tree's
# (e.g. an older release build, for a before/after comparison).
#
# Prints one line per run and a median summary per case. h2load only sees the
# HTTP status, so a probe with nghttp first checks that the call really returns
# grpc-status 0 in both modes, and every run's response byte count is compared
# with (requests x probe response size).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
reps="${REPS:-3}"
read -r -a cases <<< "${CASES:-none none+token jwt}"
# Client and servers on separate cores (PIN=0 turns this off): h2load on the
# last core, the servers on the others, so that what the client spends (e.g.
# on sending a token) is not taken from the server, as on a real network.
ncpu="$(nproc)"
if [[ "${PIN:-1}" == 1 && "$ncpu" -ge 2 ]]; then
  server_cpus="0-$((ncpu - 2))"; client_cpus="$((ncpu - 1))"
  srv=(taskset -c "$server_cpus"); cli=(taskset -c "$client_cpus")
else
  srv=(); cli=()
fi
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }

bin="${GRIDGATE:-./target/release/gridgate}"
if [[ -n "${GRIDGATE:-}" ]]; then
  cargo build --release --quiet --example make_load
else
  cargo build --release --quiet --bin gridgate --example make_load
fi
work="$(mktemp -d)"
# KEEP=DIR keeps the callgrind profiles there (for callgrind_annotate).
cleanup() {
  for p in $(jobs -p); do kill "$p" 2>/dev/null; done
  if [[ -n "${KEEP:-}" ]]; then mkdir -p "$KEEP"; cp "$work"/callgrind.* "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
./target/release/examples/make_load "$work" main
cg="${CALLGRIND:-}"
if [[ -n "$cg" ]]; then
  command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
  srv=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.%p")
  cli=()
fi

cat > "$work/acl.yaml" <<'YAML'
main:
  allow:
    - actor: bench-client
      subject: bench-user
      requests: [GetCapabilities, FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs, Read, Write, GetActionResult]
YAML
common='instances:
  - name: main
    cas: { backend: memory, max-bytes: 256M }
'
printf 'server:\n  - !channel\n    address: "127.0.0.1:0"\n    insecure-mode: true\nauthorization:\n  method: none\n%s' "$common" > "$work/none.yaml"
printf 'server:\n  - !channel\n    address: "127.0.0.1:0"\n    insecure-mode: true\nauthorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\n%s' "$common" > "$work/jwt.yaml"
# A UDP sink for the StatsD lines (a real StatsD server reads them the same way).
python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
n = 0
while True:
    n += len(s.recv(65536))
' "$work/statsd.port" &
for _ in $(seq 50); do [[ -s "$work/statsd.port" ]] && break; sleep 0.1; done
{ cat "$work/jwt.yaml"
  printf 'metrics:\n  address: "127.0.0.1:0"\nmonitoring:\n  enabled: true\n  endpoint-type: udp\n  endpoint-location: "127.0.0.1:%s"\n  metric-prefix: gridgate\n  tag-format: dogstatsd\n  period-seconds: 5\n' "$(cat "$work/statsd.port")"
} > "$work/jwt+metrics.yaml"

path=build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs
token="$(cat "$work/token")"

declare -A port pids
start() { # mode
  "${srv[@]}" "$bin" --log warn,gridgate::server=info,gridgate::metrics=info serve --config "$work/$1.yaml" 2> "$work/$1.log" &
  pids[$1]=$!
  for _ in $(seq 600); do
    port[$1]="$(grep -o 'listening on 127.0.0.1:[0-9]*' "$work/$1.log" | head -1 | sed 's/.*://')" || true
    [[ -n "${port[$1]:-}" ]] && return 0
    sleep 0.1
  done
  echo "server did not start"; cat "$work/$1.log"; exit 1
}

run_case() { # mode streams rep
  local mode="$1" streams="$2" rep="$3" hdr=(-H 'content-type: application/grpc' -H 'te: trailers')
  # none+token: the open server, sent the same authorization header: what the
  # header itself costs client and server, apart from the Gate's checks.
  [[ "$mode" != none ]] && hdr+=(-H "authorization: Bearer $token")
  local url="http://127.0.0.1:${port[${mode%+token}]}/$path"
  nghttp -v "${hdr[@]}" -H ':method: POST' -d "$work/fmb.bin" "$url" > "$work/probe" 2>&1 || true
  local gstatus rlen
  gstatus="$(grep -a -o 'grpc-status: [0-9]*' "$work/probe" | head -1 | awk '{print $2}')"
  rlen="$(grep -a -o 'recv DATA frame <length=[0-9]*' "$work/probe" | head -1 | sed 's/.*=//')"
  if [[ "$gstatus" != 0 ]]; then echo "probe failed in mode $mode:"; cat "$work/probe"; exit 1; fi
  local conns=4 per=$((streams / 4))
  if [[ -n "$cg" ]]; then
    run_callgrind "$mode" "$streams" "$rep" "${pids[${mode%+token}]}" "$url" -c "$conns" -m "$per" "${hdr[@]}"
    return
  fi
  {
    # Warm up (connections, token cache) in a run of its own: h2load counts the
    # bytes of --warm-up-time responses but not the requests.
    "${cli[@]}" h2load -D 2 -c "$conns" -m "$per" -t 1 "${hdr[@]}" -d "$work/fmb.bin" "$url" > /dev/null 2>&1
    local pid="${pids[${mode%+token}]}" cpu0 cpu1 usr0 usr1
    rm -f "$work/lat"
    read -r usr0 cpu0 < <(awk '{print $14, $14 + $15}' "/proc/$pid/stat")
    "${cli[@]}" h2load -D "$secs" -c "$conns" -m "$per" -t 1 "${hdr[@]}" -d "$work/fmb.bin" \
      --log-file="$work/lat" "$url" > "$work/out" 2>&1
    read -r usr1 cpu1 < <(awk '{print $14, $14 + $15}' "/proc/$pid/stat")
    local rps done data pct
    rps="$(grep -o '[0-9.]* req/s' "$work/out" | head -1 | awk '{print $1}')"
    done="$(grep -o '[0-9]* succeeded' "$work/out" | awk '{print $1}')"
    data="$(grep -o '([0-9]*) data' "$work/out" | tr -d '()' | awk '{print $1}')"
    pct="$(awk -F'\t' '{print $3}' "$work/lat" | sort -n | awk '{a[NR]=$1} END{printf "p50=%.3fms p99=%.3fms", a[int(NR*0.50)]/1000, a[int(NR*0.99)]/1000}')"
    # Every finished request carried one response message (a refused call has
    # none); a duration run may end with up to one response per stream in flight.
    local verdict="grpc-ok"
    if (( data < done * rlen || data > (done + streams) * rlen )); then
      verdict="DATA-MISMATCH(data=$data expected=$((done * rlen)))"
    fi
    # The server's own CPU time per request (user + system): unlike req/s, it
    # hardly moves when other work on the machine takes cycles.
    # User time alone is the server's own code (the Gate, HTTP/2, the handler);
    # system time is mostly the kernel's loopback TCP path.
    local cpu_us usr_us
    cpu_us="$(awk -v d="$((cpu1 - cpu0))" -v t="$(getconf CLK_TCK)" -v n="$done" 'BEGIN{printf "%.2f", d / t * 1e6 / n}')"
    usr_us="$(awk -v d="$((usr1 - usr0))" -v t="$(getconf CLK_TCK)" -v n="$done" 'BEGIN{printf "%.2f", d / t * 1e6 / n}')"
    echo "$mode streams=$streams run=$rep: $rps req/s $pct requests=$done server-cpu=${cpu_us}us/req user=${usr_us}us/req $verdict" | tee -a "$work/results"
  }
}

# Instructions the server executes per request, counted by callgrind: the
# counters are zeroed after a warm-up, the N requests sent, and the counters
# dumped (each dump holds the events since the previous one).
run_callgrind() { # mode streams rep pid url h2load-options...
  local mode="$1" streams="$2" rep="$3" pid="$4" url="$5"; shift 5
  h2load -n 2000 -t 1 "$@" -d "$work/fmb.bin" "$url" > /dev/null 2>&1
  callgrind_control -z "$pid" > /dev/null 2>&1
  h2load -n "$cg" -t 1 "$@" -d "$work/fmb.bin" "$url" > "$work/out" 2>&1
  local done ir
  shopt -s nullglob
  local dumps=("$work"/callgrind."$pid".*) before after
  before="${#dumps[@]}"
  callgrind_control -d "$pid" > /dev/null 2>&1
  for _ in $(seq 100); do
    dumps=("$work"/callgrind."$pid".*)
    after="${#dumps[@]}"
    (( after > before )) && break
    sleep 0.1
  done
  ir="$(grep -h '^totals:' "$(ls -t "$work"/callgrind."$pid".* | head -1)" | awk '{print $2}')"
  done="$(grep -o '[0-9]* succeeded' "$work/out" | awk '{print $1}')"
  if [[ "$done" != "$cg" ]]; then echo "only $done of $cg requests succeeded in mode $mode"; cat "$work/out"; exit 1; fi
  echo "$mode streams=$streams run=$rep: $(awk -v i="$ir" -v n="$done" 'BEGIN{printf "%.0f", i / n}') instructions/req requests=$done" | tee -a "$work/results"
}

# The servers run side by side and the runs alternate, so that background
# load on the machine affects every mode alike.
for mode in "${cases[@]}"; do
  server="${mode%+token}"
  [[ -n "${port[$server]:-}" ]] || start "$server"
done
if [[ -n "${port[jwt+metrics]:-}" ]]; then
  maddr="$(grep -o 'Prometheus endpoint on http://[0-9.:]*' "$work/jwt+metrics.log" | sed 's|.*http://||')"
  # Scraped once a second, as a Prometheus server would (more often than usual).
  while sleep 1; do curl -s "http://$maddr/metrics" > "$work/scrape" || true; done &
fi
for streams in 16 64; do
  for rep in $(seq "$reps"); do
    for mode in "${cases[@]}"; do
      run_case "$mode" "$streams" "$rep"
    done
  done
done

if [[ -n "$cg" ]]; then echo "== medians (instructions per request)"; else echo "== medians (req/s)"; fi
mid="$(( (reps + 1) / 2 ))"
median() { grep "^$1 streams=$2 " "$work/results" | awk '{print $4}' | sort -n | sed -n "${mid}p"; }
cpu_median() { grep "^$1 streams=$2 " "$work/results" | grep -o "${3:-server-cpu}=[0-9.]*" | sed 's/.*=//' | sort -n | sed -n "${mid}p"; }
base="${cases[0]}"
for streams in 16 64; do
  b="$(median "$base" "$streams")"
  line="streams=$streams $base=$(printf %.0f "$b")"
  for mode in "${cases[@]:1}"; do
    m="$(median "$mode" "$streams")"
    line+="$(awk -v m="$mode" -v b="$b" -v v="$m" 'BEGIN{printf " %s=%.0f (%+.1f%% vs first)", m, v, (v-b)/b*100}')"
  done
  echo "$line"
done
# Paired: each run against the first case's run of the same round (minutes
# apart at most), so that slow drifts of the machine cancel out.
echo "== paired medians (per-round difference from $base)"
for streams in 16 64; do
  line="streams=$streams"
  for mode in "${cases[@]:1}"; do
    d="$(for rep in $(seq "$reps"); do
      b="$(grep "^$base streams=$streams run=$rep:" "$work/results" | awk '{print $4}')"
      v="$(grep "^$mode streams=$streams run=$rep:" "$work/results" | awk '{print $4}')"
      awk -v b="$b" -v v="$v" 'BEGIN{printf "%.2f\n", (v-b)/b*100}'
    done | sort -g | sed -n "${mid}p")"
    line+=" $mode=${d}%"
  done
  echo "$line"
done
[[ -n "$cg" ]] && exit 0
for what in server-cpu user; do
  echo "== medians ($what microseconds per request)"
  for streams in 16 64; do
    b="$(cpu_median "$base" "$streams" "$what")"
    line="streams=$streams $base=$b"
    for mode in "${cases[@]:1}"; do
      m="$(cpu_median "$mode" "$streams" "$what")"
      line+="$(awk -v m="$mode" -v b="$b" -v v="$m" 'BEGIN{printf " %s=%s (%+.1f%% vs first)", m, v, (v-b)/b*100}')"
    done
    echo "$line"
  done
done
if [[ -n "${port[jwt+metrics]:-}" ]]; then
  echo "== last scrape: $(grep -c '^gridgate_' "$work/scrape") samples; e.g."
  grep '^gridgate_rpc_requests_total' "$work/scrape" | head -3
fi
