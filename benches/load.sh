#!/usr/bin/env bash
# Whole-server load benchmark: dnsfence against dnsmasq --nftset, same upstream, same policy,
# same machine, one run. See benches/README.md for what each workload means and how to read
# the output.
#
#   sudo benches/load.sh                       # build, run everything, print the comparison
#   sudo DNSFENCE_BIN=target/release/dnsfence benches/load.sh   # skip the build
#   sudo SERVERS=dnsfence WORKLOADS="cache-miss" PERF=1 benches/load.sh
#
# Everything runs inside a private network namespace created here (loopback only: no route
# leaves it), and every load is bounded in time (dnsperf -l) and, for fresh names, in count
# (-n 1 over a finite file). The namespace, its nftables tables and every process started here
# are removed on exit, whatever the exit.
#
# Exit status: 0 when the benchmark ran (whatever the numbers), 1 on a setup failure, 2 on a
# usage error.
set -euo pipefail

# ---- settings (environment) -------------------------------------------------------------------
DURATION=${DURATION:-8}                 # seconds of each max-QPS run
P99_RATE=${P99_RATE:-2000}              # fixed rate of the latency runs (queries/s)
P99_DURATION=${P99_DURATION:-5}         # seconds of each latency run
OUTSTANDING=${OUTSTANDING:-200}         # dnsperf -q in max-QPS runs
NAMES=${NAMES:-400000}                  # names in the upstream zone (h0 .. h<NAMES-1>)
HOT=${HOT:-1000}                        # names of the cache-hit set (h0 .. h<HOT-1>)
SERVER_CPU=${SERVER_CPU:-0}             # core of the resolver under test
CLIENT_CPU=${CLIENT_CPU:-1}             # core of dnsperf (and knotd)
QUERY_LOG=${QUERY_LOG:-file}            # dnsfence query log: file (the real cost) or devnull
SERVERS=${SERVERS:-"dnsfence dnsmasq"}
WORKLOADS=${WORKLOADS:-"cache-hit cache-miss denied mixed"}
PERF=${PERF:-0}                         # 1: perf-record dnsfence during its max-QPS runs
KEEP_TMP=${KEEP_TMP:-0}                 # 1: keep the temp dir (dnsperf outputs, logs)
DNSFENCE_BIN=${DNSFENCE_BIN:-}          # prebuilt binary; empty: cargo build --release
DNSFENCE_FIREWALL=${DNSFENCE_FIREWALL:-on}  # off: diagnosis only (what admission costs)

NS="dnsfbench$$"
UPSTREAM_IP=127.0.0.53
DNSFENCE_PORT=5301
DNSMASQ_PORT=5302
FW_TABLE=dnsfbench
DM_TABLE=dnsmasqbench
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '%s\n' "$*"; }
note() { printf '  . %s\n' "$*" >&2; }
die() {
    printf 'load.sh: setup failed: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'load.sh: %s\n' "$*" >&2
    exit 2
}

for v in DURATION P99_RATE P99_DURATION OUTSTANDING NAMES HOT SERVER_CPU CLIENT_CPU; do
    [[ ${!v} =~ ^[0-9]+$ ]] || usage_error "$v must be a whole number (got '${!v}')"
done
((DURATION >= 2 && DURATION <= 15)) || usage_error "DURATION must be 2..15 seconds"
((P99_DURATION >= 2 && P99_DURATION <= 15)) || usage_error "P99_DURATION must be 2..15 seconds"
((NAMES >= 50000)) || usage_error "NAMES must be at least 50000"
((HOT >= 10 && HOT < NAMES / 10)) || usage_error "HOT must be between 10 and NAMES/10"
[[ $QUERY_LOG == file || $QUERY_LOG == devnull ]] || usage_error "QUERY_LOG must be file or devnull"
[[ $DNSFENCE_FIREWALL == on || $DNSFENCE_FIREWALL == off ]] || usage_error "DNSFENCE_FIREWALL must be on or off"
for s in $SERVERS; do [[ $s == dnsfence || $s == dnsmasq ]] || usage_error "unknown server '$s'"; done
for w in $WORKLOADS; do
    [[ $w =~ ^(cache-hit|cache-miss|denied|mixed)$ ]] || usage_error "unknown workload '$w'"
done
[[ $EUID -eq 0 ]] || usage_error "run as root (network namespaces, nftables)"

# ---- tools --------------------------------------------------------------------------------------
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need knotd knot
need knotc knot
need kdig knot-dnsutils
need dnsperf dnsperf
need dnsmasq dnsmasq-base
need nft nftables
need ip iproute2
need taskset util-linux
need getconf libc-bin
need awk mawk
if ((PERF)); then need perf linux-perf; fi
if ((${#need_pkgs[@]})); then
    note "installing: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    mapfile -t pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null ||
        die "apt-get install ${pkgs[*]} failed"
fi
dnsmasq --version | grep -qw nftset || die "this dnsmasq is built without nftset support"

if [[ -z $DNSFENCE_BIN ]]; then
    if [[ " $SERVERS " == *" dnsfence "* ]]; then
        command -v cargo >/dev/null || die "cargo not found (or set DNSFENCE_BIN)"
        note "cargo build --release (in $REPO)"
        (cd "$REPO" && cargo build --release --locked --quiet) || die "cargo build --release failed"
    fi
    DNSFENCE_BIN=$REPO/target/release/dnsfence
fi
if [[ " $SERVERS " == *" dnsfence "* ]]; then
    [[ -x $DNSFENCE_BIN ]] || die "no dnsfence binary at $DNSFENCE_BIN"
    DNSFENCE_BIN=$(readlink -f "$DNSFENCE_BIN")
fi

CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((NCPU >= 2)) || note "only $NCPU core: resolver and dnsperf share it, the numbers mean little"
((SERVER_CPU < NCPU && CLIENT_CPU < NCPU)) || usage_error "SERVER_CPU/CLIENT_CPU beyond the $NCPU cores"

# ---- temp dir, namespace, cleanup ---------------------------------------------------------------
TMP=$(mktemp -d /tmp/dnsfbench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if ip netns list 2>/dev/null | grep -qw "$NS"; then
        # Anything still inside the namespace was started by this script.
        for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$NS" 2>/dev/null || true
    fi
    if ((KEEP_TMP)); then
        note "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$NS" || die "cannot create network namespace $NS"
ip -n "$NS" link set lo up
nsx() { ip netns exec "$NS" "$@"; }
# Background servers are started with a plain `ip netns exec ... &` (not nsx): ip and taskset exec
# into the server, so $! is the server's own pid (for /proc/<pid>/stat and for SIGTERM).
is_pid_of() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]] || die "pid $1 is not $2 ($(cat "/proc/$1/comm" 2>/dev/null))"; }

# ---- upstream: Knot DNS, authoritative for bench.test ---------------------------------------------
mkdir -p "$TMP/knot/db" "$TMP/q"
awk -v n="$NAMES" 'BEGIN {
    print "$ORIGIN bench.test."
    print "$TTL 3600"
    print "@ SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 3600"
    print "@ NS ns"
    print "ns A 192.0.2.53"
    # One distinct public (non-private, non-special) address per name, so the set counts at the
    # end equal the names admitted. 11.0.0.0/8 is never reached: the namespace has no route.
    for (i = 0; i < n; i++)
        printf "h%d A 11.%d.%d.%d\n", i, int(i / 65536), int(i / 256) % 256, i % 256
}' >"$TMP/knot/bench.test.zone"
cat >"$TMP/knot/knot.conf" <<EOF
server:
    rundir: "$TMP/knot"
    listen: $UPSTREAM_IP@53
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$TMP/knot/db"
log:
  - target: stderr
    any: error
control:
    listen: "$TMP/knot/knot.sock"
mod-stats:
  - id: bench
    request-protocol: on
template:
  - id: default
    storage: "$TMP/knot"
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
    global-module: mod-stats/bench
zone:
  - domain: bench.test.
    file: "bench.test.zone"
EOF
ip netns exec "$NS" taskset -c "$CLIENT_CPU" knotd -c "$TMP/knot/knot.conf" >"$TMP/knot/knotd.log" 2>&1 &
KNOT_PID=$!
PIDS+=("$KNOT_PID")
knotc_() { nsx knotc -c "$TMP/knot/knot.conf" -t 5 "$@"; }
# Queries that reached the upstream so far (every transport).
upstream_queries() {
    knotc_ stats mod-stats.request-protocol 2>/dev/null | awk -F' = ' '{ s += $2 } END { print s + 0 }'
}
last="h$((NAMES - 1)).bench.test"
for _ in $(seq 100); do
    kill -0 "$KNOT_PID" 2>/dev/null || die "knotd exited: $(cat "$TMP/knot/knotd.log")"
    if nsx kdig +short +timeout=1 +retry=0 @"$UPSTREAM_IP" "$last" A 2>/dev/null | grep -q '^11\.'; then
        break
    fi
    sleep 0.2
done
nsx kdig +short +timeout=1 +retry=0 @"$UPSTREAM_IP" "$last" A 2>/dev/null | grep -q '^11\.' ||
    die "knotd did not load the zone within 20 s: $(cat "$TMP/knot/knotd.log")"
is_pid_of "$KNOT_PID" knotd
UPSTREAM_FLAGS=$(nsx kdig +timeout=1 @"$UPSTREAM_IP" h0.bench.test A |
    awk '/^;; Flags:/ { sub(/^;; Flags: */, ""); sub(/;.*/, ""); print; exit }')

# ---- query files ----------------------------------------------------------------------------------
# Names are handed out from one counter so that no miss name is ever asked twice, by either server
# or workload: h0..h<HOT-1> is the hot set, everything above is fresh.
next_name=$HOT
take() { # take COUNT: sets FIRST to the first index of COUNT fresh names
    local count=$1
    ((next_name + count <= NAMES)) || die "zone too small: raise NAMES (need more than $NAMES)"
    FIRST=$next_name
    next_name=$((next_name + count))
}
fresh_file() { # fresh_file FILE COUNT
    take "$2"
    awk -v a="$FIRST" -v n="$2" 'BEGIN { for (i = a; i < a + n; i++) printf "h%d.bench.test A\n", i }' >"$1"
}
mixed_file() { # mixed_file FILE QUERIES: per 10 queries 7 hot, 2 fresh, 1 denied
    take $(($2 / 5 + 2))
    awk -v a="$FIRST" -v n="$2" -v hot="$HOT" 'BEGIN {
        h = 0; m = a; d = 0
        for (i = 0; i < n; i++) {
            k = i % 10
            if (k == 2 || k == 7) printf "h%d.bench.test A\n", m++
            else if (k == 5) { printf "%s\n", denied(d++) }
            else { printf "h%d.bench.test A\n", h; h = (h + 1) % hot }
        }
    }
    function denied(j) {
        j = j % 1000
        if (j % 2) return sprintf("h%d.example.com A", j)
        return sprintf("www%d.bench.test.example.net A", j)
    }' >"$1"
}
awk -v hot="$HOT" 'BEGIN { for (i = 0; i < hot; i++) printf "h%d.bench.test A\n", i }' >"$TMP/q/hot.txt"
# Outside the allowlist: other domains, and names that only look like bench.test.
awk 'BEGIN { for (j = 0; j < 1000; j++)
    if (j % 2) printf "h%d.example.com A\n", j; else printf "www%d.bench.test.example.net A\n", j }' \
    >"$TMP/q/denied.txt"

p99_queries=$((P99_RATE * P99_DURATION * 11 / 10 + 100))
per_server=$(((NAMES - HOT) / 2))
rest=$((per_server - p99_queries - p99_queries / 5 - 10))
miss_max_names=$((rest * 7 / 10))
mixed_max_queries=$(((rest * 3 / 10) * 5 - 20))
for s in $SERVERS; do
    for w in $WORKLOADS; do
        case $w in
        cache-miss)
            fresh_file "$TMP/q/$s.miss-max.txt" "$miss_max_names"
            fresh_file "$TMP/q/$s.miss-p99.txt" "$p99_queries"
            ;;
        mixed)
            mixed_file "$TMP/q/$s.mixed-max.txt" "$mixed_max_queries"
            mixed_file "$TMP/q/$s.mixed-p99.txt" "$p99_queries"
            ;;
        esac
    done
done

# ---- measurement helpers --------------------------------------------------------------------------
declare -A R # results: R[server.workload.metric]

ticks() { # utime+stime of a whole process (all threads), in clock ticks
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
corestat() { # corestat CPU: "busy steal" ticks of one core since boot (busy excludes idle, iowait, steal)
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat
}
ctxsw() { # context switches (voluntary + involuntary) of all threads of a process
    cat "/proc/$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

# run SERVER PID PORT LABEL [dnsperf args...]: one bounded dnsperf run, pinned to CLIENT_CPU,
# with the server's CPU, dnsperf's CPU and knotd's CPU and query count around it.
run_dnsperf() {
    local server=$1 pid=$2 port=$3 label=$4
    shift 4
    local out="$TMP/$server.$label.out" tf="$TMP/$server.$label.time"
    local t0 k0 u0 t1 k1 u1 x0 x1 sb0 ss0 cb0 cs0 sb1 ss1 cb1 cs1
    kill -0 "$pid" 2>/dev/null || die "$server (pid $pid) is not running before $label"
    t0=$(ticks "$pid")
    x0=$(ctxsw "$pid")
    read -r sb0 ss0 <<<"$(corestat "$SERVER_CPU")"
    read -r cb0 cs0 <<<"$(corestat "$CLIENT_CPU")"
    k0=$(ticks "$KNOT_PID")
    u0=$(upstream_queries)
    local TIMEFORMAT='%R %U %S'
    if ! { time nsx taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -t 2 "$@" \
        >"$out" 2>"$out.err"; } 2>"$tf"; then
        die "dnsperf failed ($server $label): $(tail -3 "$out.err")"
    fi
    kill -0 "$pid" 2>/dev/null || die "$server (pid $pid) died during $label"
    t1=$(ticks "$pid")
    x1=$(ctxsw "$pid")
    read -r sb1 ss1 <<<"$(corestat "$SERVER_CPU")"
    read -r cb1 cs1 <<<"$(corestat "$CLIENT_CPU")"
    k1=$(ticks "$KNOT_PID")
    u1=$(upstream_queries)
    # Fields: sent completed lost runtime qps rcodes | server_ticks knot_ticks upstream_q
    #         dnsperf wall, user, sys | server context switches
    #         server core busy, steal | client core busy, steal
    awk -v cores="$((sb1 - sb0)) $((ss1 - ss0)) $((cb1 - cb0)) $((cs1 - cs0))" -v xs=$((x1 - x0)) -v st=$((t1 - t0)) -v kt=$((k1 - k0)) -v uq=$((u1 - u0)) -v tf="$tf" -v hz="$CLK_TCK" '
        /Queries sent:/ { sent = $3 }
        /Queries completed:/ { done = $3 }
        /Queries lost:/ { lost = $3 }
        /Run time \(s\):/ { rt = $4 }
        /Queries per second:/ { qps = $4 }
        /Response codes:/ { sub(/.*Response codes: */, ""); gsub(/ \([0-9.]+%\)/, ""); gsub(/, /, ","); gsub(/ /, "="); rc = $0 }
        END {
            getline tl < tf; split(tl, t, " ")
            printf "%s %s %s %s %s %s %d %d %d %s %s %s %d %s\n", sent + 0, done + 0, lost + 0, rt + 0, qps + 0,
                (rc == "" ? "-" : rc), st, kt, uq, t[1], t[2], t[3], xs, cores
        }' "$out"
}

# p99 (and p50, max) in ms over all queries sent, a lost query counting as slower than any answer.
latency_stats() { # latency_stats OUTFILE SENT
    awk '/^> / { print $NF }' "$1" | sort -g | awk -v sent="$2" '
        { l[NR] = $1 }
        END {
            n = NR
            if (sent < n) sent = n
            split("50 99", ps, " ")
            for (k = 1; k <= 2; k++) {
                idx = int((ps[k] / 100) * sent); if (idx < (ps[k] / 100) * sent) idx++
                if (idx < 1) idx = 1
                v[k] = (idx <= n) ? sprintf("%.3f", l[idx] * 1000) : "lost"
            }
            printf "%s %s %s\n", v[1], v[2], (n ? sprintf("%.3f", l[n] * 1000) : "-")
        }'
}

log_bytes() { [[ $QUERY_LOG == file && -f $TMP/dnsfence-queries.jsonl ]] && stat -c %s "$TMP/dnsfence-queries.jsonl" || echo 0; }
log_lines() { [[ $QUERY_LOG == file && -f $TMP/dnsfence-queries.jsonl ]] && wc -l <"$TMP/dnsfence-queries.jsonl" || echo 0; }
log_reset() { if [[ $QUERY_LOG == file ]]; then grep -h "\"SERVFAIL\"" "$TMP/dnsfence-queries.jsonl" >>"$TMP/servfail.jsonl" 2>/dev/null || true; : >"$TMP/dnsfence-queries.jsonl"; fi; }

# fresh_sent FILE SENT FRESH: fresh (never asked) names among the first SENT lines of FILE
fresh_sent() {
    if (($3)); then
        head -n "$2" "$1" | awk -v hot="$HOT" -F'[h.]' '/^h[0-9]+\.bench\.test / && $2 + 0 >= hot { n++ } END { print n + 0 }'
    else
        echo 0
    fi
}

# measure SERVER PID PORT WORKLOAD MAXFILE P99FILE FRESH(0|1)
measure() {
    local server=$1 pid=$2 port=$3 w=$4 maxfile=$5 p99file=$6 fresh=$7
    local k="$server.$w" once=() line perfpid=""
    ((fresh)) && once=(-n 1)
    log_reset
    if ((PERF)) && [[ $server == dnsfence ]]; then
        perf record -q -F 499 -g -p "$pid" -o "$TMP/perf.$w.data" -- sleep "$DURATION" \
            >/dev/null 2>&1 &
        perfpid=$!
        PIDS+=("$perfpid")
    fi
    line=$(run_dnsperf "$server" "$pid" "$port" "$w.max" -d "$maxfile" -l "$DURATION" -q "$OUTSTANDING" "${once[@]}")
    [[ -n $perfpid ]] && { wait "$perfpid" 2>/dev/null || true; }
    read -r "R[$k.sent]" "R[$k.done]" "R[$k.lost]" "R[$k.runtime]" "R[$k.qps]" "R[$k.rcodes]" \
        "R[$k.ticks]" "R[$k.kticks]" "R[$k.upq]" "R[$k.cwall]" "R[$k.cuser]" "R[$k.csys]" "R[$k.ctx]" \
        "R[$k.sbusy]" "R[$k.ssteal]" "R[$k.cbusy]" "R[$k.csteal]" <<<"$line"
    R[$k.fresh]=$(fresh_sent "$maxfile" "${R[$k.sent]}" "$fresh")
    R[$k.loglines]=$(log_lines)
    R[$k.logbytes]=$(log_bytes)
    log_reset
    line=$(run_dnsperf "$server" "$pid" "$port" "$w.p99" -d "$p99file" -l "$P99_DURATION" -Q "$P99_RATE" -q 1000 -v "${once[@]}")
    read -r "R[$k.p_sent]" "R[$k.p_done]" "R[$k.p_lost]" "R[$k.p_runtime]" "R[$k.p_qps]" "R[$k.p_rcodes]" \
        "R[$k.p_ticks]" "R[$k.p_kticks]" "R[$k.p_upq]" _ _ _ "R[$k.p_ctx]" _ _ _ _ <<<"$line"
    R[$k.p_fresh]=$(fresh_sent "$p99file" "${R[$k.p_sent]}" "$fresh")
    R[$server.fresh]=$((${R[$server.fresh]:-0} + R[$k.fresh] + R[$k.p_fresh]))
    read -r "R[$k.p50]" "R[$k.p99]" "R[$k.pmax]" <<<"$(latency_stats "$TMP/$server.$w.p99.out" "${R[$k.p_sent]}")"
    log_reset
    note "$server $w: ${R[$k.qps]%.*} qps, p99 ${R[$k.p99]} ms at $P99_RATE qps"
}

warm() { # warm SERVER PORT: ask the hot set twice, and check it was answered
    local out="$TMP/$1.warm.out"
    nsx taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$2" -t 2 -d "$TMP/q/hot.txt" -n 2 -q 50 >"$out" 2>&1 ||
        die "dnsperf (warm-up of $1) failed: $(tail -3 "$out")"
    grep -q 'Response codes: *NOERROR [0-9]* (100.00%)' "$out" ||
        die "warm-up of $1: not every hot name answered NOERROR: $(grep 'Response codes' "$out")"
}

wait_answers() { # wait_answers NAME PORT PID LOG
    for _ in $(seq 50); do
        kill -0 "$3" 2>/dev/null || die "$1 exited at start: $(tail -5 "$4")"
        if nsx kdig +short +timeout=1 +retry=0 @127.0.0.1 -p "$2" h0.bench.test A 2>/dev/null | grep -q '^11\.'; then
            return 0
        fi
        sleep 0.2
    done
    die "$1 does not answer h0.bench.test on 127.0.0.1:$2: $(tail -5 "$4")"
}

# check_denied SERVER PORT: a denied name gets NXDOMAIN, and nothing reaches the upstream
check_denied() {
    local before after rcode out="$TMP/$1.denied-check.out"
    before=$(upstream_queries)
    rcode=$(nsx kdig +timeout=2 +retry=0 @127.0.0.1 -p "$2" h1.example.com A | awk '/status:/ { sub(/;.*/, "", $6); print $6; exit }')
    nsx taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$2" -t 2 -d "$TMP/q/denied.txt" -n 1 -q 50 >"$out" 2>&1 ||
        die "dnsperf (denied check of $1) failed"
    after=$(upstream_queries)
    [[ $rcode == NXDOMAIN ]] || die "$1 answered $rcode (not NXDOMAIN) for the denied name h1.example.com"
    grep -q 'Response codes: *NXDOMAIN [0-9]* (100.00%)' "$out" ||
        die "$1: not every denied name got NXDOMAIN: $(grep 'Response codes' "$out")"
    ((after == before)) || die "$1 forwarded $((after - before)) denied queries to the upstream"
    R[$1.denied_check]="1,001 denied names: NXDOMAIN, 0 forwarded to the upstream"
}

set_count() { # set_count TABLE SET: elements in an nft set (every element has a timeout here)
    { nsx nft list set inet "$1" "$2" 2>/dev/null || true; } | awk '{ n += gsub(/expires/, "") } END { print n + 0 }'
}

run_workloads() { # run_workloads SERVER PID PORT
    local s=$1 pid=$2 port=$3 w
    for w in $WORKLOADS; do
        case $w in
        cache-hit)
            warm "$s" "$port"
            measure "$s" "$pid" "$port" "$w" "$TMP/q/hot.txt" "$TMP/q/hot.txt" 0
            ;;
        denied) measure "$s" "$pid" "$port" "$w" "$TMP/q/denied.txt" "$TMP/q/denied.txt" 0 ;;
        cache-miss) measure "$s" "$pid" "$port" "$w" "$TMP/q/$s.miss-max.txt" "$TMP/q/$s.miss-p99.txt" 1 ;;
        mixed)
            warm "$s" "$port"
            measure "$s" "$pid" "$port" "$w" "$TMP/q/$s.mixed-max.txt" "$TMP/q/$s.mixed-p99.txt" 1
            ;;
        esac
    done
}

# ---- dnsfence -------------------------------------------------------------------------------------
run_dnsfence() {
    local log_path
    if [[ $QUERY_LOG == file ]]; then log_path="$TMP/dnsfence-queries.jsonl"; else log_path=/dev/null; fi
    cat >"$TMP/dnsfence.yaml" <<EOF
# Written by benches/load.sh.
listen: ["127.0.0.1:$DNSFENCE_PORT"]
upstreams: ["$UPSTREAM_IP:53"]
upstream_timeout: 2s
deny_with: nxdomain
allow: ["**.bench.test"]
qtypes: [A, AAAA]
log: "$log_path"
ttl: {min: 30s, max: 3600s, grace: 30s}
# Rate limit and exfiltration budget off: they would throttle a single benchmark client.
limits: {client_qps: 0, max_inflight: 4096}
exfiltration: {wildcard_names_per_minute: 0, max_name_length: 200, max_label_length: 63}
firewall:
  enabled: $([[ $DNSFENCE_FIREWALL == on ]] && echo true || echo false)
  table: $FW_TABLE
  hooks: [output]
  set_size: 262144
  on_exit: remove   # so that the dnsmasq phase runs without dnsfence's ruleset
EOF
    "$DNSFENCE_BIN" check --policy "$TMP/dnsfence.yaml" >"$TMP/dnsfence.check" 2>&1 ||
        die "dnsfence check --policy: $(cat "$TMP/dnsfence.check")"
    R[dnsfence.check]=$(head -1 "$TMP/dnsfence.check")
    "$DNSFENCE_BIN" ruleset --policy "$TMP/dnsfence.yaml" >"$TMP/dnsfence.nft" 2>&1 || true

    ip netns exec "$NS" taskset -c "$SERVER_CPU" "$DNSFENCE_BIN" serve --policy "$TMP/dnsfence.yaml" \
        >"$TMP/dnsfence.stdout" 2>"$TMP/dnsfence.stderr" &
    DF_PID=$!
    PIDS+=("$DF_PID")
    wait_answers dnsfence "$DNSFENCE_PORT" "$DF_PID" "$TMP/dnsfence.stderr"
    is_pid_of "$DF_PID" dnsfence
    R[dnsfence.threads]=$(find "/proc/$DF_PID/task" -mindepth 1 -maxdepth 1 | wc -l)
    if nsx nft list table inet "$FW_TABLE" >"$TMP/dnsfence.live.nft" 2>/dev/null; then
        R[dnsfence.fw]="table inet $FW_TABLE installed ($(grep -c 'hook output' "$TMP/dnsfence.live.nft") output chain)"
        # The ruleset drops unmarked DNS to the upstream: show it (this is why dnsmasq cannot run
        # beside it in this namespace, and why the servers run one after the other).
        if nsx kdig +short +timeout=1 +retry=0 @"$UPSTREAM_IP" h1.bench.test A 2>/dev/null | grep -q '^11\.'; then
            R[dnsfence.upstream_block]="unmarked queries to the upstream still pass (expected a drop)"
        else
            R[dnsfence.upstream_block]="unmarked queries to $UPSTREAM_IP:53 are dropped while it runs"
        fi
    elif [[ $DNSFENCE_FIREWALL == off ]]; then
        R[dnsfence.fw]="OFF (DNSFENCE_FIREWALL=off, diagnosis run: no admission, not the product)"
        R[dnsfence.upstream_block]="-"
    else
        R[dnsfence.fw]="NO nftables table: firewall stand-in, admission not measured"
        R[dnsfence.upstream_block]="-"
    fi
    R[dnsfence.h0]=$(nsx kdig +timeout=2 @127.0.0.1 -p "$DNSFENCE_PORT" h0.bench.test A | awk '/status:/ { sub(/;.*/, "", $6); print $6; exit }')
    check_denied dnsfence "$DNSFENCE_PORT"

    run_workloads dnsfence "$DF_PID" "$DNSFENCE_PORT"

    R[dnsfence.set4]=$(set_count "$FW_TABLE" allow4)
    kill -TERM "$DF_PID"
    for _ in $(seq 100); do kill -0 "$DF_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$DF_PID" 2>/dev/null && die "dnsfence did not stop within 10 s of SIGTERM"
    wait "$DF_PID" 2>/dev/null || true
    R[dnsfence.logdrop]=$(grep -c 'records dropped' "$TMP/dnsfence.stderr" || true)
    R[dnsfence.errors]=$(grep -cE ' (ERROR|WARN) ' "$TMP/dnsfence.stderr" || true)
    if nsx nft list table inet "$FW_TABLE" >/dev/null 2>&1; then
        note "dnsfence left table inet $FW_TABLE behind (on_exit: remove); deleting it"
        nsx nft delete table inet "$FW_TABLE"
    fi
}

# ---- dnsmasq --------------------------------------------------------------------------------------
run_dnsmasq() {
    # The setup people use today: dnsmasq adds answered addresses to a timeout set, and an output
    # chain of the same shape as dnsfence's (loopback, established, the set, default drop).
    nsx nft -f - <<EOF || die "cannot create table inet $DM_TABLE"
table inet $DM_TABLE {
    set allow4 { type ipv4_addr; flags timeout; timeout 1h; size 262144; }
    set allow6 { type ipv6_addr; flags timeout; timeout 1h; size 262144; }
    chain output {
        type filter hook output priority filter; policy drop;
        oif "lo" accept
        ct state established,related accept
        ip daddr @allow4 accept
        ip6 daddr @allow6 accept
    }
}
EOF
    # --address=/#/ answers NXDOMAIN locally for every name; the more specific --server sends
    # bench.test (and only it) to the upstream. --dns-forward-max matches dnsfence's max_inflight.
    ip netns exec "$NS" taskset -c "$SERVER_CPU" dnsmasq --keep-in-foreground --user=root \
        --port="$DNSMASQ_PORT" --listen-address=127.0.0.1 --bind-interfaces \
        --no-resolv --no-hosts --no-poll \
        --server="/bench.test/$UPSTREAM_IP" --address=/#/ \
        --nftset="/bench.test/4#inet#$DM_TABLE#allow4,6#inet#$DM_TABLE#allow6" \
        --cache-size=10000 --dns-forward-max=4096 \
        --log-facility=/dev/null --pid-file="$TMP/dnsmasq.pid" \
        >"$TMP/dnsmasq.stdout" 2>"$TMP/dnsmasq.stderr" &
    DM_PID=$!
    PIDS+=("$DM_PID")
    wait_answers dnsmasq "$DNSMASQ_PORT" "$DM_PID" "$TMP/dnsmasq.stderr"
    is_pid_of "$DM_PID" dnsmasq
    R[dnsmasq.h0]=$(nsx kdig +timeout=2 @127.0.0.1 -p "$DNSMASQ_PORT" h0.bench.test A | awk '/status:/ { sub(/;.*/, "", $6); print $6; exit }')
    check_denied dnsmasq "$DNSMASQ_PORT"

    run_workloads dnsmasq "$DM_PID" "$DNSMASQ_PORT"

    R[dnsmasq.set4]=$(set_count "$DM_TABLE" allow4)
    kill -TERM "$DM_PID"
    wait "$DM_PID" 2>/dev/null || true
    nsx nft delete table inet "$DM_TABLE" 2>/dev/null || true
}

# ---- run ------------------------------------------------------------------------------------------
STARTED=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SERVERS; do
    note "running $s"
    "run_$s"
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - STARTED))

# ---- report ---------------------------------------------------------------------------------------
f() { awk -v x="$1" -v d="${2:-0}" 'BEGIN { if (x == "" || x == "-") print "-"; else printf "%.*f\n", d, x }'; }
cpu_us() { # ticks done
    awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.1f\n", t * 1e6 / hz / n; else print "-" }'
}
pct() { # ticks seconds
    awk -v t="$1" -v s="$2" -v hz="$CLK_TCK" 'BEGIN { if (s > 0) printf "%.0f\n", 100 * t / hz / s; else print "-" }'
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2fx\n", a / b; else print "-" }'
}
row() { printf '  %-34s %14s %14s %12s\n' "$@"; }

both=0
[[ " $SERVERS " == *" dnsfence "* && " $SERVERS " == *" dnsmasq "* ]] && both=1
hdr_a=dnsfence
hdr_b=dnsmasq

say ""
say "=== dnsfence vs dnsmasq --nftset: whole-server load ==="
say "machine: $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)"
say "load average before/after: $LOAD_BEFORE / $LOAD_AFTER  (2 shared cores: other work skews every number)"
say "versions: dnsfence $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?') ($( [[ " $SERVERS " == *" dnsfence "* ]] && "$DNSFENCE_BIN" --version | awk '{print $2}')), $(dnsmasq --version | head -1 | awk '{print $1, $3}'), knotd $(knotd --version | awk '{print $NF}'), $(dnsperf -h 2>&1 | awk '/^Version/ { print "dnsperf", $2 }')"
say "namespace $NS (loopback only); upstream: knotd on $UPSTREAM_IP:53, authoritative for bench.test ($NAMES names, TTL 3600), flags to RD queries: '$UPSTREAM_FLAGS' (no RA)"
say "pinning: resolver on core $SERVER_CPU; dnsperf and knotd on core $CLIENT_CPU"
say "max-QPS runs: dnsperf -q $OUTSTANDING -l $DURATION (fresh-name files: -n 1, may end earlier); latency runs: -Q $P99_RATE -l $P99_DURATION -v"
if [[ " $SERVERS " == *" dnsfence "* ]]; then
    say "dnsfence 127.0.0.1:$DNSFENCE_PORT: ${R[dnsfence.check]}"
    say "  allow **.bench.test, qtypes A AAAA; client_qps 0 (off); max_inflight 4096"
    say "  exfiltration budget OFF (wildcard_names_per_minute: 0) so it does not throttle the benchmark"
    say "  query log: $([[ $QUERY_LOG == file ]] && echo 'ON, to a file (the real cost)' || echo 'to /dev/null (formatted and written, not stored)')"
    say "  firewall: ${R[dnsfence.fw]}; hooks [output], set_size 262144"
    say "  ${R[dnsfence.upstream_block]}"
    say "  h0.bench.test: ${R[dnsfence.h0]} (hickory accepts the AA answer without RA); ${R[dnsfence.denied_check]}"
    say "  threads: ${R[dnsfence.threads]} (tokio sees the one core it is pinned to)"
fi
if [[ " $SERVERS " == *" dnsmasq "* ]]; then
    say "dnsmasq 127.0.0.1:$DNSMASQ_PORT: --server=/bench.test/$UPSTREAM_IP --address=/#/ --nftset=/bench.test/4#inet#$DM_TABLE#allow4 --cache-size=10000 --dns-forward-max=4096, no query log"
    say "  output chain of the same shape (lo, established, @allow4/@allow6, drop); h0.bench.test: ${R[dnsmasq.h0]}; ${R[dnsmasq.denied_check]}"
fi
say "the servers run one after the other (dnsfence's ruleset would drop dnsmasq's upstream queries)"

declare -A DESC=(
    [cache-hit]="$HOT names asked over and over, cache warmed first"
    [cache-miss]="names never asked before: every query goes upstream and admits a new address"
    [denied]="names outside the allowlist: NXDOMAIN locally, nothing forwarded"
    [mixed]="70% hot names, 20% fresh names, 10% denied"
)
for w in $WORKLOADS; do
    say ""
    say "--- $w: ${DESC[$w]} ---"
    row "" "$hdr_a" "$hdr_b" "ratio"
    declare -A V=()
    for s in dnsfence dnsmasq; do
        k="$s.$w"
        if [[ -z ${R[$k.qps]:-} ]]; then
            for m in qps cpu cpup p99 p50 pqps srv cli knot up lost rt bound rc prc log ctx pctx other; do V[$s.$m]="-"; done
            continue
        fi
        V[$s.qps]=$(f "${R[$k.qps]}")
        V[$s.cpu]=$(cpu_us "${R[$k.ticks]}" "${R[$k.done]}")
        V[$s.cpup]=$(cpu_us "${R[$k.p_ticks]}" "${R[$k.p_done]}")
        V[$s.ctx]=$(awk -v x="${R[$k.ctx]}" -v n="${R[$k.done]}" 'BEGIN { if (n) printf "%.2f", x / n; else print "-" }')
        V[$s.pctx]=$(awk -v x="${R[$k.p_ctx]}" -v n="${R[$k.p_done]}" 'BEGIN { if (n) printf "%.2f", x / n; else print "-" }')
        V[$s.p99]=${R[$k.p99]}
        V[$s.p50]=${R[$k.p50]}
        V[$s.pqps]=$(f "${R[$k.p_qps]}")
        V[$s.srv]=$(pct "${R[$k.ticks]}" "${R[$k.cwall]}")
        V[$s.cli]=$(awk -v u="${R[$k.cuser]}" -v s="${R[$k.csys]}" -v w="${R[$k.cwall]}" 'BEGIN { printf "%.0f\n", 100 * (u + s) / w }')
        V[$s.knot]=$(pct "${R[$k.kticks]}" "${R[$k.cwall]}")
        # Other processes on our two cores: core busy time not spent by the resolver (server
        # core) or by dnsperf + knotd (client core), plus the hypervisor's steal time.
        V[$s.osrv]=$(awk -v b="${R[$k.sbusy]}" -v st="${R[$k.ssteal]}" -v r="${R[$k.ticks]}" -v w="${R[$k.cwall]}" -v hz="$CLK_TCK" \
            'BEGIN { o = (b - r + st) / hz / w * 100; if (o < 0) o = 0; printf "%.0f\n", o }')
        V[$s.ocli]=$(awk -v b="${R[$k.cbusy]}" -v st="${R[$k.csteal]}" -v u="${R[$k.cuser]}" -v sy="${R[$k.csys]}" -v kt="${R[$k.kticks]}" -v w="${R[$k.cwall]}" -v hz="$CLK_TCK" \
            'BEGIN { o = ((b + st - kt) / hz - u - sy) / w * 100; if (o < 0) o = 0; printf "%.0f\n", o }')
        V[$s.other]="${V[$s.osrv]}% / ${V[$s.ocli]}%"
        V[$s.up]="${R[$k.upq]} / ${R[$k.p_upq]}"
        V[$s.lost]="${R[$k.lost]} / ${R[$k.p_lost]}"
        V[$s.rt]=$(f "${R[$k.runtime]}" 1)
        V[$s.rc]=${R[$k.rcodes]}
        V[$s.prc]=${R[$k.p_rcodes]}
        if [[ $s == dnsfence && $QUERY_LOG == file ]]; then
            V[$s.log]="${R[$k.loglines]} lines, $(awk -v b="${R[$k.logbytes]}" -v n="${R[$k.done]}" 'BEGIN { if (n) printf "%.0f", b / n; else print 0 }') B/query"
        else
            V[$s.log]="-"
        fi
        if ((V[$s.srv] >= 90 && V[$s.cli] + V[$s.knot] >= 90)); then
            V[$s.bound]="BOTH cores full"
        elif ((V[$s.srv] >= 90)); then
            V[$s.bound]="server"
        elif ((V[$s.cli] + V[$s.knot] >= 90)); then
            V[$s.bound]="CLIENT (dnsperf core full)"
        else
            V[$s.bound]="neither core full"
        fi
    done
    row "max QPS" "${V[dnsfence.qps]}" "${V[dnsmasq.qps]}" "$(ratio "${V[dnsfence.qps]}" "${V[dnsmasq.qps]}")"
    row "CPU us/query at max QPS" "${V[dnsfence.cpu]}" "${V[dnsmasq.cpu]}" "$(ratio "${V[dnsfence.cpu]}" "${V[dnsmasq.cpu]}")"
    row "p99 ms at $P99_RATE qps" "${V[dnsfence.p99]}" "${V[dnsmasq.p99]}" "$(ratio "${V[dnsfence.p99]}" "${V[dnsmasq.p99]}")"
    row "  p50 ms at $P99_RATE qps" "${V[dnsfence.p50]}" "${V[dnsmasq.p50]}" ""
    row "  CPU us/query at $P99_RATE qps" "${V[dnsfence.cpup]}" "${V[dnsmasq.cpup]}" "$(ratio "${V[dnsfence.cpup]}" "${V[dnsmasq.cpup]}")"
    row "  context switches/query (max / lat)" "${V[dnsfence.ctx]} / ${V[dnsfence.pctx]}" "${V[dnsmasq.ctx]} / ${V[dnsmasq.pctx]}" ""
    row "  rate reached in latency run" "${V[dnsfence.pqps]:--}" "${V[dnsmasq.pqps]:--}" ""
    row "  resolver core busy (max run)" "${V[dnsfence.srv]}%" "${V[dnsmasq.srv]}%" ""
    row "  dnsperf / knotd CPU (max run)" "${V[dnsfence.cli]}% / ${V[dnsfence.knot]}%" "${V[dnsmasq.cli]}% / ${V[dnsmasq.knot]}%" ""
    row "  other work on the two cores" "${V[dnsfence.other]}" "${V[dnsmasq.other]}" ""
    row "  bound by" "${V[dnsfence.bound]}" "${V[dnsmasq.bound]}" ""
    row "  max run length s" "${V[dnsfence.rt]}" "${V[dnsmasq.rt]}" ""
    row "  upstream queries (max / lat)" "${V[dnsfence.up]}" "${V[dnsmasq.up]}" ""
    row "  lost (max / lat)" "${V[dnsfence.lost]}" "${V[dnsmasq.lost]}" ""
    [[ ${V[dnsfence.log]} != "-" ]] && row "  dnsfence query log (max run)" "${V[dnsfence.log]}" "" ""
    say "  rcodes: dnsfence ${V[dnsfence.rc]} | dnsmasq ${V[dnsmasq.rc]}"
    for s in dnsfence dnsmasq; do
        case ${V[$s.rc]} in *SERVFAIL*) say "  ! $s answered SERVFAIL under load (admission or upstream failure): see its log" ;; esac
        if [[ ${V[$s.osrv]:--} != - ]] && ((V[$s.osrv] >= 15 || V[$s.ocli] >= 15)); then
            say "  ! $s: other work took ${V[$s.osrv]}% of the resolver's core and ${V[$s.ocli]}% of dnsperf's: this run is disturbed, run again"
        fi
        case ${V[$s.bound]} in CLIENT* | BOTH*) say "  ! $s: dnsperf's core was full (dnsperf ${V[$s.cli]}% + knotd ${V[$s.knot]}%): its QPS may be a lower bound (compare CPU us/query instead)" ;; esac
        case ${V[$s.bound]} in neither*) say "  ! $s: neither core was full (resolver ${V[$s.srv]}%): waits, not CPU, limit it (upstream round trips, firewall acknowledgements, -q $OUTSTANDING)" ;; esac
        if [[ ${V[$s.pqps]:--} != "-" ]] && awk -v a="${V[$s.pqps]}" -v r="$P99_RATE" 'BEGIN { exit !(a < 0.95 * r) }'; then
            say "  ! $s did not sustain $P99_RATE qps in the latency run (${V[$s.pqps]}): its p99 includes queueing"
        fi
    done
    if ((both)); then
        verdict() { # verdict RATIO OP LIMIT
            [[ $1 == - ]] && { echo "n/a"; return; }
            if awk -v r="${1%x}" -v l="$3" "BEGIN { exit !(r $2 l) }"; then echo "met"; else echo "MISSED"; fi
        }
        q=$(ratio "${V[dnsfence.qps]}" "${V[dnsmasq.qps]}")
        c=$(ratio "${V[dnsfence.cpu]}" "${V[dnsmasq.cpu]}")
        p=$(ratio "${V[dnsfence.p99]}" "${V[dnsmasq.p99]}")
        if [[ $w == cache-miss ]]; then
            say "  target: QPS >= 4x dnsmasq's: $(verdict "$q" '>=' 4) ($q); p99 <= dnsmasq's: $(verdict "$p" '<=' 1) ($p)"
        else
            say "  target: CPU/query <= dnsmasq's: $(verdict "$c" '<=' 1) ($c); p99 <= dnsmasq's: $(verdict "$p" '<=' 1) ($p)"
        fi
    fi
done

say ""
say "--- nftables sets at the end (proves admission) ---"
hot_asked=1 # h0, the readiness probe
[[ " $WORKLOADS " == *" cache-hit "* || " $WORKLOADS " == *" mixed "* ]] && hot_asked=$HOT
for s in $SERVERS; do
    tbl=$FW_TABLE
    [[ $s == dnsmasq ]] && tbl=$DM_TABLE
    # Every bench.test name has its own address, so a set should hold one element per distinct
    # allowed name the server answered: the hot set, plus every fresh name sent.
    say "$(printf '  %-9s inet %s allow4: %s elements (distinct allowed names asked: %s)' "$s" "$tbl" "${R[$s.set4]}" "$((hot_asked + ${R[$s.fresh]:-0}))")"
done
if [[ " $SERVERS " == *" dnsfence "* ]]; then
    ((${R[dnsfence.logdrop]} > 0)) && say "  ! dnsfence dropped query-log records under load (see its stderr)"
    ((${R[dnsfence.errors]} > 0)) && say "  ! dnsfence logged ${R[dnsfence.errors]} warnings/errors: $(grep -E ' (ERROR|WARN) ' "$TMP/dnsfence.stderr" | head -2 | cut -c1-200)"
fi
if ((PERF)) && [[ " $SERVERS " == *" dnsfence "* ]]; then
    for w in $WORKLOADS; do
        [[ -f $TMP/perf.$w.data ]] || continue
        say ""
        say "--- perf: dnsfence during $w max run (self time, top 25; perf skews that run's numbers) ---"
        perf report -i "$TMP/perf.$w.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
            grep -E '^ +[0-9]' | head -25 | cut -c1-150
    done
fi
say ""
say "whole run: ${ELAPSED}s"
