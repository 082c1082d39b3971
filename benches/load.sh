#!/usr/bin/env bash
# Whole-server load benchmark: dnsfence against dnsmasq --nftset and against Unbound, same
# upstream, same policy, same machine, one run. See benches/README.md for what each workload
# means and how to read the output.
#
#   sudo benches/load.sh                       # build, run everything (3 reps), print the comparison
#   sudo DNSFENCE_BIN=target/release/dnsfence benches/load.sh   # skip the build
#   sudo PIN=none benches/load.sh              # resolvers unpinned: a first scaling figure
#   sudo SERVERS=dnsfence WORKLOADS="cache-miss" REPS=1 PERF=1 benches/load.sh
#
# Everything runs inside a private network namespace created here (loopback only: no route
# leaves it), and every load is bounded in time (dnsperf -l) and, for fresh names, in count
# (-n 1 over a finite file). The namespace, its nftables tables and every process started here
# are removed on exit, whatever the exit.
#
# Every (server, workload) pair is measured REPS times, interleaved (workload by workload:
# A B C, A B C, ...) so that drift on the shared machine hits every server alike, and each
# measurement gets a freshly started server (empty cache, empty nft set).
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
REPS=${REPS:-3}                         # measurements of every (server, workload)
PIN=${PIN:-cores}                       # cores: resolver on SERVER_CPU; none: resolver unpinned
SERVER_CPU=${SERVER_CPU:-0}             # core of the resolver under test (PIN=cores)
CLIENT_CPU=${CLIENT_CPU:-1}             # core of dnsperf (and knotd)
QUERY_LOG=${QUERY_LOG:-file}            # dnsfence query log: file (the real cost) or devnull
SERVERS=${SERVERS:-"dnsfence dnsmasq unbound"}
WORKLOADS=${WORKLOADS:-"cache-hit cache-miss denied mixed"}
PERF=${PERF:-0}                         # 1: perf-record dnsfence during its first max-QPS runs
KEEP_TMP=${KEEP_TMP:-0}                 # 1: keep the temp dir (dnsperf outputs, logs)
DNSFENCE_BIN=${DNSFENCE_BIN:-}          # prebuilt binary; empty: cargo build --release
DNSFENCE_FIREWALL=${DNSFENCE_FIREWALL:-on}  # off: diagnosis only (what admission costs)

NS="dnsfbench$$"
UPSTREAM_IP=127.0.0.53
declare -A PORT=([dnsfence]=5301 [dnsmasq]=5302 [unbound]=5303)
declare -A LABEL=([dnsfence]=dnsfence [dnsmasq]="dnsmasq" [unbound]="Unbound")
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

while (($#)); do
    case $1 in
    --pin)
        (($# >= 2)) || usage_error "--pin needs cores or none"
        PIN=$2
        shift 2
        ;;
    --pin=*)
        PIN=${1#--pin=}
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) usage_error "unknown argument '$1' (settings are environment variables: see benches/README.md)" ;;
    esac
done

for v in DURATION P99_RATE P99_DURATION OUTSTANDING NAMES HOT REPS SERVER_CPU CLIENT_CPU; do
    [[ ${!v} =~ ^[0-9]+$ ]] || usage_error "$v must be a whole number (got '${!v}')"
done
((DURATION >= 2 && DURATION <= 15)) || usage_error "DURATION must be 2..15 seconds"
((P99_DURATION >= 2 && P99_DURATION <= 15)) || usage_error "P99_DURATION must be 2..15 seconds"
((P99_RATE >= 100 && P99_RATE <= 20000)) || usage_error "P99_RATE must be 100..20000 queries/s"
((REPS >= 1 && REPS <= 9)) || usage_error "REPS must be 1..9"
((NAMES >= 50000 && NAMES <= 4000000)) || usage_error "NAMES must be 50000..4000000"
((HOT >= 10 && HOT < NAMES / 10)) || usage_error "HOT must be between 10 and NAMES/10"
[[ $PIN == cores || $PIN == none ]] || usage_error "PIN must be cores or none"
[[ $QUERY_LOG == file || $QUERY_LOG == devnull ]] || usage_error "QUERY_LOG must be file or devnull"
[[ $DNSFENCE_FIREWALL == on || $DNSFENCE_FIREWALL == off ]] || usage_error "DNSFENCE_FIREWALL must be on or off"
[[ -n ${SERVERS// /} ]] || usage_error "SERVERS is empty"
for s in $SERVERS; do [[ -n ${PORT[$s]:-} ]] || usage_error "unknown server '$s' (dnsfence, dnsmasq, unbound)"; done
for w in $WORKLOADS; do
    [[ $w =~ ^(cache-hit|cache-miss|denied|mixed)$ ]] || usage_error "unknown workload '$w'"
done
[[ -n ${WORKLOADS// /} ]] || usage_error "WORKLOADS is empty"
[[ $EUID -eq 0 ]] || usage_error "run as root (network namespaces, nftables)"
has() { [[ " $SERVERS " == *" $1 "* ]]; }
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- tools --------------------------------------------------------------------------------------
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need knotd knot
need knotc knot
need kdig knot-dnsutils
need dnsperf dnsperf
if has dnsmasq; then need dnsmasq dnsmasq-base; fi
if has unbound; then need unbound unbound; fi
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
    # Debian's unbound (and knot) packages start a system service on install where they can:
    # forbid that for the install (the usual policy-rc.d), unless the machine already has a policy.
    policy_rc=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy_rc=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\n# benches/load.sh: no service starts while it installs packages\nexit 101\n' >"$policy_rc"
        chmod 755 "$policy_rc"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    install_ok=1
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null || install_ok=0
    if [[ -n $policy_rc ]]; then
        rm -f "$policy_rc"
        trap - EXIT
    fi
    ((install_ok)) || die "apt-get install ${pkgs[*]} failed"
fi
if has dnsmasq; then dnsmasq --version | grep -qw nftset || die "this dnsmasq is built without nftset support"; fi

if [[ -z $DNSFENCE_BIN ]]; then
    if has dnsfence; then
        command -v cargo >/dev/null || die "cargo not found (or set DNSFENCE_BIN)"
        note "cargo build --release (in $REPO)"
        (cd "$REPO" && cargo build --release --locked --quiet) || die "cargo build --release failed"
    fi
    DNSFENCE_BIN=$REPO/target/release/dnsfence
fi
if has dnsfence; then
    [[ -x $DNSFENCE_BIN ]] || die "no dnsfence binary at $DNSFENCE_BIN"
    DNSFENCE_BIN=$(readlink -f "$DNSFENCE_BIN")
fi

CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((NCPU >= 2)) || note "only $NCPU core: resolver and dnsperf share it, the numbers mean little"
((SERVER_CPU < NCPU && CLIENT_CPU < NCPU)) || usage_error "SERVER_CPU/CLIENT_CPU beyond the $NCPU cores"
((SERVER_CPU != CLIENT_CPU)) || usage_error "SERVER_CPU and CLIENT_CPU must differ"
# The resolver's pinning: one core, or none (every core the machine has; dnsperf and knotd stay
# on CLIENT_CPU either way, so the load generator is the same in both modes).
if [[ $PIN == cores ]]; then
    SRV_PIN=(taskset -c "$SERVER_CPU")
    UNBOUND_THREADS=1
else
    SRV_PIN=()
    UNBOUND_THREADS=$NCPU
fi
# The nft sets hold one element per distinct name a server admitted: room for the whole zone.
SET_SIZE=65536
while ((SET_SIZE < NAMES + 16)); do SET_SIZE=$((SET_SIZE * 2)); done

# ---- temp dir, namespace, cleanup ---------------------------------------------------------------
TMP=$(mktemp -d /tmp/dnsfbench.XXXXXX)
PIDS=() # processes started here and not yet reaped (a reaped pid may belong to someone else later)
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
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
# stop_pid NAME PID: SIGTERM, at most 10 s to exit, reaped and forgotten.
stop_pid() {
    kill -TERM "$2" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$2" 2>/dev/null && die "$1 (pid $2) did not stop within 10 s of SIGTERM"
    wait "$2" 2>/dev/null || true
    forget_pid "$2"
}

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
for _ in $(seq 150); do
    kill -0 "$KNOT_PID" 2>/dev/null || die "knotd exited: $(cat "$TMP/knot/knotd.log")"
    if nsx kdig +short +timeout=1 +retry=0 @"$UPSTREAM_IP" "$last" A 2>/dev/null | grep -q '^11\.'; then
        break
    fi
    sleep 0.2
done
nsx kdig +short +timeout=1 +retry=0 @"$UPSTREAM_IP" "$last" A 2>/dev/null | grep -q '^11\.' ||
    die "knotd did not load the zone within 30 s: $(cat "$TMP/knot/knotd.log")"
is_pid_of "$KNOT_PID" knotd
UPSTREAM_FLAGS=$(nsx kdig +timeout=1 @"$UPSTREAM_IP" h0.bench.test A |
    awk '/^;; Flags:/ { sub(/^;; Flags: */, ""); sub(/;.*/, ""); print; exit }')

# ---- query files ----------------------------------------------------------------------------------
# Every measurement starts a fresh server (empty cache, empty set) and the upstream keeps no state,
# so every server and every repetition gets the same files. A "fresh" name only has to be new to
# the server instance asking it: h0..h<HOT-1> is the hot set; the max-QPS runs draw fresh names
# from h<HOT> upwards, the latency runs from the top P99_FRESH names of the zone, so that the two
# runs of one instance never share a name.
p99_queries=$((P99_RATE * P99_DURATION * 11 / 10 + 100))
P99_FRESH=$p99_queries
MAX_FRESH=$((NAMES - HOT - P99_FRESH))
((MAX_FRESH >= NAMES / 2)) || usage_error "NAMES too small for P99_RATE x P99_DURATION (need NAMES >= $((2 * (HOT + P99_FRESH))))"
range_file() { # range_file FILE FIRST COUNT
    awk -v a="$2" -v n="$3" 'BEGIN { for (i = a; i < a + n; i++) printf "h%d.bench.test A\n", i }' >"$1"
}
mixed_file() { # mixed_file FILE QUERIES FIRST_FRESH: per 10 queries 7 hot, 2 fresh, 1 denied
    awk -v a="$3" -v n="$2" -v hot="$HOT" 'BEGIN {
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
range_file "$TMP/q/hot.txt" 0 "$HOT"
# Outside the allowlist: other domains, and names that only look like bench.test.
awk 'BEGIN { for (j = 0; j < 1000; j++)
    if (j % 2) printf "h%d.example.com A\n", j; else printf "www%d.bench.test.example.net A\n", j }' \
    >"$TMP/q/denied.txt"
if [[ " $WORKLOADS " == *" cache-miss "* ]]; then
    range_file "$TMP/q/miss-max.txt" "$HOT" "$MAX_FRESH"
    range_file "$TMP/q/miss-p99.txt" $((NAMES - P99_FRESH)) "$P99_FRESH"
fi
if [[ " $WORKLOADS " == *" mixed "* ]]; then
    # Enough for 100,000 qps over DURATION, and never more fresh names than the range holds.
    mixed_max=$((MAX_FRESH * 5 - 10))
    ((mixed_max <= 100000 * DURATION)) || mixed_max=$((100000 * DURATION))
    mixed_file "$TMP/q/mixed-max.txt" "$mixed_max" "$HOT"
    mixed_file "$TMP/q/mixed-p99.txt" "$p99_queries" $((NAMES - P99_FRESH))
fi

# ---- measurement helpers --------------------------------------------------------------------------
declare -A R # results: R[server.workload.rep.metric], and R[server.fact] for one-off facts

ticks() { # utime+stime of a whole process (all threads), in clock ticks
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
corestat() { # corestat CPU: "busy steal" ticks of one core since boot (busy excludes idle, iowait, steal)
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat
}
ctxsw() { # context switches (voluntary + involuntary) of all threads of a process
    cat "/proc/$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

# run_dnsperf SERVER PID PORT LABEL [dnsperf args...]: one bounded dnsperf run, pinned to
# CLIENT_CPU, with the server's CPU, dnsperf's CPU and knotd's CPU and query count around it.
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
    awk -v cores="$((sb1 - sb0)) $((ss1 - ss0)) $((cb1 - cb0)) $((cs1 - cs0))" -v xs=$((x1 - x0)) -v st=$((t1 - t0)) -v kt=$((k1 - k0)) -v uq=$((u1 - u0)) -v tf="$tf" '
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

# p50, p99, p99.9 and max in ms over all queries sent, a lost query counting as slower than any
# answer ("lost" when the percentile falls among the lost ones).
latency_stats() { # latency_stats OUTFILE SENT
    awk '/^> / { print $NF }' "$1" | sort -g | awk -v sent="$2" '
        { l[NR] = $1 }
        END {
            n = NR
            if (sent < n) sent = n
            split("50 99 99.9", ps, " ")
            for (k = 1; k <= 3; k++) {
                idx = int((ps[k] / 100) * sent); if (idx < (ps[k] / 100) * sent) idx++
                if (idx < 1) idx = 1
                v[k] = (idx <= n) ? sprintf("%.3f", l[idx] * 1000) : "lost"
            }
            printf "%s %s %s %s\n", v[1], v[2], v[3], (n ? sprintf("%.3f", l[n] * 1000) : "-")
        }'
}

QLOG="$TMP/dnsfence-queries.jsonl"
log_bytes() { if [[ $QUERY_LOG == file && -f $QLOG ]]; then stat -c %s "$QLOG"; else echo 0; fi; }
log_lines() { if [[ $QUERY_LOG == file && -f $QLOG ]]; then wc -l <"$QLOG"; else echo 0; fi; }
log_reset() { if [[ $QUERY_LOG == file && -f $QLOG ]]; then grep -h '"SERVFAIL"' "$QLOG" >>"$TMP/servfail.jsonl" 2>/dev/null || true; : >"$QLOG"; fi; }

# fresh_sent FILE SENT FRESH: fresh (never asked) names among the first SENT lines of FILE
fresh_sent() {
    if (($3)); then
        head -n "$2" "$1" | awk -v hot="$HOT" -F'[h.]' '/^h[0-9]+\.bench\.test / && $2 + 0 >= hot { n++ } END { print n + 0 }'
    else
        echo 0
    fi
}

# derive KEY: per-measurement figures from the raw counters (CPU per query, core shares, bound).
derive() {
    local k=$1
    read -r "R[$k.cpu]" "R[$k.cpup]" "R[$k.ctxq]" "R[$k.pctxq]" "R[$k.srv]" "R[$k.cli]" "R[$k.knot]" \
        "R[$k.osrv]" "R[$k.ocli]" "R[$k.upq_q]" "R[$k.p_upq_q]" "R[$k.bound]" <<<"$(
        awk -v hz="$CLK_TCK" -v pin="$PIN" -v t="${R[$k.ticks]}" -v n="${R[$k.done]}" -v pt="${R[$k.p_ticks]}" \
            -v pn="${R[$k.p_done]}" -v x="${R[$k.ctx]}" -v px="${R[$k.p_ctx]}" -v w="${R[$k.cwall]}" \
            -v u="${R[$k.cuser]}" -v sy="${R[$k.csys]}" -v kt="${R[$k.kticks]}" -v sb="${R[$k.sbusy]}" \
            -v ss="${R[$k.ssteal]}" -v cb="${R[$k.cbusy]}" -v cs="${R[$k.csteal]}" -v uq="${R[$k.upq]}" \
            -v puq="${R[$k.p_upq]}" 'BEGIN {
            cpu = n > 0 ? sprintf("%.2f", t * 1e6 / hz / n) : "-"
            cpup = pn > 0 ? sprintf("%.2f", pt * 1e6 / hz / pn) : "-"
            ctxq = n > 0 ? sprintf("%.2f", x / n) : "-"
            pctxq = pn > 0 ? sprintf("%.2f", px / pn) : "-"
            if (w <= 0) w = 1e-9
            srv = 100 * t / hz / w                      # resolver CPU, % of one core
            cli = 100 * (u + sy) / w                    # dnsperf
            knot = 100 * kt / hz / w
            # Other processes on our cores: busy time not spent by the resolver (its core) or by
            # dnsperf + knotd (theirs), plus the hypervisor steal. Unpinned, the resolver runs on
            # both cores: then one figure for the two together.
            if (pin == "cores") {
                osrv = (sb - t + ss) / hz / w * 100
                ocli = ((cb + cs - kt) / hz - u - sy) / w * 100
            } else {
                osrv = ((sb + ss + cb + cs - t - kt) / hz - u - sy) / w * 100
                ocli = -1
            }
            if (osrv < 0) osrv = 0
            if (pin == "cores" && ocli < 0) ocli = 0
            # Pinned: which core was full, the resolver one or the load generator one. Unpinned, the
            # resolver shares the client core: "machine" when both cores were busy (by anyone).
            client_full = (cli + knot >= 90)
            if (pin == "cores") {
                server_full = (srv >= 90)
                bound = server_full && client_full ? "both" : server_full ? "server" : client_full ? "client" : "neither"
            } else {
                bound = client_full ? "client" : ((sb + cb) / hz / w * 100 >= 180) ? "machine" : "neither"
            }
            upq_q = n > 0 ? sprintf("%.2f", uq / n) : "-"
            pupq_q = pn > 0 ? sprintf("%.2f", puq / pn) : "-"
            printf "%s %s %s %s %.0f %.0f %.0f %.0f %.0f %s %s %s\n", cpu, cpup, ctxq, pctxq, srv, cli, knot, osrv, ocli, upq_q, pupq_q, bound
        }'
    )"
}

# measure SERVER PID PORT WORKLOAD REP MAXFILE P99FILE FRESH(0|1)
measure() {
    local server=$1 pid=$2 port=$3 w=$4 rep=$5 maxfile=$6 p99file=$7 fresh=$8
    local k="$server.$w.$rep" once=() line perfpid=""
    if ((fresh)); then once=(-n 1); fi
    log_reset
    if ((PERF)) && [[ $server == dnsfence && $rep == 1 ]]; then
        perf record -q -F 499 -g -p "$pid" -o "$TMP/perf.$w.data" -- sleep "$DURATION" \
            >/dev/null 2>&1 &
        perfpid=$!
        PIDS+=("$perfpid")
    fi
    line=$(run_dnsperf "$server" "$pid" "$port" "$w.$rep.max" -d "$maxfile" -l "$DURATION" -q "$OUTSTANDING" "${once[@]}")
    if [[ -n $perfpid ]]; then
        wait "$perfpid" 2>/dev/null || true
        forget_pid "$perfpid"
    fi
    read -r "R[$k.sent]" "R[$k.done]" "R[$k.lost]" "R[$k.runtime]" "R[$k.qps]" "R[$k.rcodes]" \
        "R[$k.ticks]" "R[$k.kticks]" "R[$k.upq]" "R[$k.cwall]" "R[$k.cuser]" "R[$k.csys]" "R[$k.ctx]" \
        "R[$k.sbusy]" "R[$k.ssteal]" "R[$k.cbusy]" "R[$k.csteal]" <<<"$line"
    R[$k.fresh]=$(fresh_sent "$maxfile" "${R[$k.sent]}" "$fresh")
    R[$k.loglines]=$(log_lines)
    R[$k.logbytes]=$(log_bytes)
    log_reset
    line=$(run_dnsperf "$server" "$pid" "$port" "$w.$rep.p99" -d "$p99file" -l "$P99_DURATION" -Q "$P99_RATE" -q 1000 -v "${once[@]}")
    read -r "R[$k.p_sent]" "R[$k.p_done]" "R[$k.p_lost]" "R[$k.p_runtime]" "R[$k.p_qps]" "R[$k.p_rcodes]" \
        "R[$k.p_ticks]" "R[$k.p_kticks]" "R[$k.p_upq]" _ _ _ "R[$k.p_ctx]" _ _ _ _ <<<"$line"
    R[$k.p_fresh]=$(fresh_sent "$p99file" "${R[$k.p_sent]}" "$fresh")
    read -r "R[$k.p50]" "R[$k.p99]" "R[$k.p999]" "R[$k.pmax]" <<<"$(latency_stats "$TMP/$server.$w.$rep.p99.out" "${R[$k.p_sent]}")"
    log_reset
    derive "$k"
    note "$server $w rep $rep: ${R[$k.qps]%.*} qps, ${R[$k.cpu]} us/query, p99 ${R[$k.p99]} ms, p99.9 ${R[$k.p999]} ms at $P99_RATE qps"
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

# check_denied SERVER PORT: a denied name gets NXDOMAIN, and nothing reaches the upstream.
# Run on every start of every server, before it is measured.
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
    R[$1.denied_check]="1,001 denied names: NXDOMAIN, 0 forwarded to the upstream (checked at each of its starts)"
}

set_count() { # set_count TABLE SET: elements in an nft set (every element has a timeout here)
    { nsx nft list set inet "$1" "$2" 2>/dev/null || true; } | awk '{ n += gsub(/expires/, "") } END { print n + 0 }'
}

first_status() { # first_status PORT NAME: the rcode a server gives NAME
    nsx kdig +timeout=2 @127.0.0.1 -p "$1" "$2" A | awk '/status:/ { sub(/;.*/, "", $6); print $6; exit }'
}

# ---- dnsfence -------------------------------------------------------------------------------------
write_dnsfence_policy() {
    local log_path
    if [[ $QUERY_LOG == file ]]; then log_path=$QLOG; else log_path=/dev/null; fi
    cat >"$TMP/dnsfence.yaml" <<EOF
# Written by benches/load.sh.
listen: ["127.0.0.1:${PORT[dnsfence]}"]
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
  set_size: $SET_SIZE
  on_exit: remove   # so that the peers run without dnsfence's ruleset
EOF
    "$DNSFENCE_BIN" check --policy "$TMP/dnsfence.yaml" >"$TMP/dnsfence.check" 2>&1 ||
        die "dnsfence check --policy: $(cat "$TMP/dnsfence.check")"
    R[dnsfence.check]=$(head -1 "$TMP/dnsfence.check")
    "$DNSFENCE_BIN" ruleset --policy "$TMP/dnsfence.yaml" >"$TMP/dnsfence.nft" 2>&1 || true
}

start_dnsfence() { # start_dnsfence TAG: sets SRV_PID
    local err="$TMP/dnsfence.$1.stderr"
    ip netns exec "$NS" "${SRV_PIN[@]}" "$DNSFENCE_BIN" serve --policy "$TMP/dnsfence.yaml" \
        >"$TMP/dnsfence.$1.stdout" 2>"$err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_answers dnsfence "${PORT[dnsfence]}" "$SRV_PID" "$err"
    is_pid_of "$SRV_PID" dnsfence
    if [[ -z ${R[dnsfence.fw]:-} ]]; then # facts shown once, from the first start
        R[dnsfence.threads]=$(find "/proc/$SRV_PID/task" -mindepth 1 -maxdepth 1 | wc -l)
        if nsx nft list table inet "$FW_TABLE" >"$TMP/dnsfence.live.nft" 2>/dev/null; then
            R[dnsfence.fw]="table inet $FW_TABLE installed ($(grep -c 'hook output' "$TMP/dnsfence.live.nft") output chain)"
            # The ruleset drops unmarked DNS to the upstream: show it (this is why the peers cannot
            # run beside it in this namespace, and why the servers run one after the other).
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
        R[dnsfence.h0]=$(first_status "${PORT[dnsfence]}" h0.bench.test)
    fi
    check_denied dnsfence "${PORT[dnsfence]}"
}

stop_dnsfence() { # stop_dnsfence TAG: returns the set's element count in SET4
    local err="$TMP/dnsfence.$1.stderr"
    SET4=$(set_count "$FW_TABLE" allow4)
    stop_pid dnsfence "$SRV_PID"
    R[dnsfence.logdrop]=$((${R[dnsfence.logdrop]:-0} + $(grep -c 'records dropped' "$err" || true)))
    R[dnsfence.errors]=$((${R[dnsfence.errors]:-0} + $(grep -cE ' (ERROR|WARN) ' "$err" || true)))
    grep -hE ' (ERROR|WARN) ' "$err" >>"$TMP/dnsfence.warnings" || true
    if nsx nft list table inet "$FW_TABLE" >/dev/null 2>&1; then
        note "dnsfence left table inet $FW_TABLE behind (on_exit: remove); deleting it"
        nsx nft delete table inet "$FW_TABLE"
    fi
}

# ---- dnsmasq --------------------------------------------------------------------------------------
start_dnsmasq() {
    # The setup people use today: dnsmasq adds answered addresses to a timeout set, and an output
    # chain of the same shape as dnsfence's (loopback, established, the set, default drop).
    nsx nft -f - <<EOF || die "cannot create table inet $DM_TABLE"
table inet $DM_TABLE {
    set allow4 { type ipv4_addr; flags timeout; timeout 1h; size $SET_SIZE; }
    set allow6 { type ipv6_addr; flags timeout; timeout 1h; size $SET_SIZE; }
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
    # bench.test (and only it) to the upstream. --dns-forward-max matches dnsfence's max_inflight,
    # --cache-size dnsfence's 16,384 answers.
    local err="$TMP/dnsmasq.$1.stderr"
    ip netns exec "$NS" "${SRV_PIN[@]}" dnsmasq --keep-in-foreground --user=root \
        --port="${PORT[dnsmasq]}" --listen-address=127.0.0.1 --bind-interfaces \
        --no-resolv --no-hosts --no-poll \
        --server="/bench.test/$UPSTREAM_IP" --address=/#/ \
        --nftset="/bench.test/4#inet#$DM_TABLE#allow4,6#inet#$DM_TABLE#allow6" \
        --cache-size=16384 --dns-forward-max=4096 \
        --log-facility=/dev/null --pid-file="$TMP/dnsmasq.pid" \
        >"$TMP/dnsmasq.$1.stdout" 2>"$err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_answers dnsmasq "${PORT[dnsmasq]}" "$SRV_PID" "$err"
    is_pid_of "$SRV_PID" dnsmasq
    [[ -n ${R[dnsmasq.h0]:-} ]] || R[dnsmasq.h0]=$(first_status "${PORT[dnsmasq]}" h0.bench.test)
    check_denied dnsmasq "${PORT[dnsmasq]}"
}

stop_dnsmasq() {
    SET4=$(set_count "$DM_TABLE" allow4)
    stop_pid dnsmasq "$SRV_PID"
    nsx nft delete table inet "$DM_TABLE" 2>/dev/null || true
}

# ---- Unbound --------------------------------------------------------------------------------------
write_unbound_conf() {
    # Unbound as a plain forwarding cache, no firewall: every name is NXDOMAIN locally except
    # bench.test, which is resolved normally (transparent) through the forward zone. Nothing that
    # would add upstream traffic the others do not make: no validator module (so no DNSKEY/DS
    # fetches and no DO bit), no qname minimisation, no prefetch. The cache is Unbound's default
    # 4 MB + 4 MB, which holds about 16,200 of these answers: dnsfence keeps 16,384.
    cat >"$TMP/unbound.conf" <<EOF
# Written by benches/load.sh.
server:
    interface: 127.0.0.1@${PORT[unbound]}
    port: ${PORT[unbound]}
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$TMP"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    log-queries: no
    num-threads: $UNBOUND_THREADS
    num-queries-per-thread: 4096
    outgoing-range: 8192
    msg-cache-size: 4m
    rrset-cache-size: 4m
    module-config: "iterator"
    qname-minimisation: no
    prefetch: no
    do-not-query-localhost: no
    local-zone: "." always_nxdomain
    local-zone: "bench.test." transparent
forward-zone:
    name: "bench.test."
    forward-addr: $UPSTREAM_IP@53
EOF
    unbound-checkconf "$TMP/unbound.conf" >"$TMP/unbound.check" 2>&1 ||
        die "unbound-checkconf: $(cat "$TMP/unbound.check")"
}

start_unbound() {
    local err="$TMP/unbound.$1.stderr"
    ip netns exec "$NS" "${SRV_PIN[@]}" unbound -d -c "$TMP/unbound.conf" \
        >"$TMP/unbound.$1.stdout" 2>"$err" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_answers unbound "${PORT[unbound]}" "$SRV_PID" "$err"
    is_pid_of "$SRV_PID" unbound
    if [[ -z ${R[unbound.h0]:-} ]]; then
        R[unbound.h0]=$(first_status "${PORT[unbound]}" h0.bench.test)
        R[unbound.threads]=$(find "/proc/$SRV_PID/task" -mindepth 1 -maxdepth 1 | wc -l)
    fi
    check_denied unbound "${PORT[unbound]}"
}

stop_unbound() {
    SET4=-
    stop_pid unbound "$SRV_PID"
}

# ---- one measurement: a fresh server, one workload -------------------------------------------------
instance() { # instance SERVER WORKLOAD REP
    local s=$1 w=$2 rep=$3 k="$1.$2.$3" port=${PORT[$1]} asked=1
    "start_$s" "$w.$rep"
    case $w in
    cache-hit)
        warm "$s" "$port"
        asked=$HOT
        measure "$s" "$SRV_PID" "$port" "$w" "$rep" "$TMP/q/hot.txt" "$TMP/q/hot.txt" 0
        ;;
    denied) measure "$s" "$SRV_PID" "$port" "$w" "$rep" "$TMP/q/denied.txt" "$TMP/q/denied.txt" 0 ;;
    cache-miss) measure "$s" "$SRV_PID" "$port" "$w" "$rep" "$TMP/q/miss-max.txt" "$TMP/q/miss-p99.txt" 1 ;;
    mixed)
        warm "$s" "$port"
        asked=$HOT
        measure "$s" "$SRV_PID" "$port" "$w" "$rep" "$TMP/q/mixed-max.txt" "$TMP/q/mixed-p99.txt" 1
        ;;
    esac
    "stop_$s" "$w.$rep"
    # Every bench.test name has its own address, so a set holds one element per distinct allowed
    # name the server answered: h0 (the readiness probe) or the hot set, plus every fresh name.
    R[$k.set4]=$SET4
    R[$k.asked]=$((asked + ${R[$k.fresh]} + ${R[$k.p_fresh]}))
}

# ---- run ------------------------------------------------------------------------------------------
if has dnsfence; then write_dnsfence_policy; fi
if has unbound; then write_unbound_conf; fi
n_servers=$(wc -w <<<"$SERVERS")
n_work=$(wc -w <<<"$WORKLOADS")
n_inst=$((n_servers * n_work * REPS))
note "$n_inst measurements ($n_work workloads x $REPS reps x $n_servers servers), about $((n_inst * (DURATION + P99_DURATION + 5) / 60 + 1)) min"
STARTED=$(date +%s)
START_UTC=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for w in $WORKLOADS; do
    for ((rep = 1; rep <= REPS; rep++)); do
        for s in $SERVERS; do
            instance "$s" "$w" "$rep"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - STARTED))

# ---- report ---------------------------------------------------------------------------------------
# stat3: "median min max" of the values on stdin (one a line); "lost" ranks above any number,
# "-" is skipped.
stat3() {
    awk 'BEGIN { n = 0; BIG = 1e300 }
        $1 != "-" && $1 != "" { v[++n] = ($1 == "lost") ? BIG : $1 + 0 }
        END {
        if (!n) { print "- - -"; exit }
        for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
        if (n % 2) med = v[(n + 1) / 2]
        else med = (v[n / 2] >= BIG || v[n / 2 + 1] >= BIG) ? BIG : (v[n / 2] + v[n / 2 + 1]) / 2
        printf "%s %s %s\n", (med >= BIG ? "lost" : med), (v[1] >= BIG ? "lost" : v[1]), (v[n] >= BIG ? "lost" : v[n])
    }'
}
vals() { # vals SERVER WORKLOAD METRIC: the metric of every rep
    local r list=()
    for ((r = 1; r <= REPS; r++)); do list+=("${R[$1.$2.$r.$3]:--}"); done
    printf '%s\n' "${list[@]}"
}
# fmt KIND X: qps (thousands separators), us and s (1 decimal), d2 (2), ms (3), pct, raw
fmt() {
    awk -v k="$1" -v x="$2" 'function commas(n,   s) { s = sprintf("%.0f", n); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); return s }
        BEGIN {
            if (x == "-" || x == "" || x == "lost") { print (x == "" ? "-" : x); exit }
            if (k == "qps") print commas(x); else if (k == "us") printf "%.1f\n", x
            else if (k == "ms") printf "%.3f\n", x; else if (k == "pct") printf "%.0f\n", x
            else if (k == "s") printf "%.1f\n", x; else if (k == "d2") printf "%.2f\n", x; else print x
        }'
}
# spread KIND SERVER WORKLOAD METRIC [DASH]: "median (min-max)", or the one value when REPS=1
spread() {
    local med lo hi dash=${5:--}
    read -r med lo hi <<<"$(vals "$2" "$3" "$4" | stat3)"
    if ((REPS == 1)) || [[ $med == - ]]; then
        fmt "$1" "$med"
    else
        printf '%s (%s%s%s)\n' "$(fmt "$1" "$med")" "$(fmt "$1" "$lo")" "$dash" "$(fmt "$1" "$hi")"
    fi
}
median() { local m; read -r m _ <<<"$(vals "$1" "$2" "$3" | stat3)"; printf '%s\n' "$m"; }
ratio() { # ratio A B: A/B as "1.23x" (numbers only)
    awk -v a="$1" -v b="$2" -v x="${3:-x}" 'BEGIN { if (a ~ /^[0-9.e+-]+$/ && b ~ /^[0-9.e+-]+$/ && b > 0) printf "%.2f%s\n", a / b, x; else print "-" }'
}
count_reps() { # count_reps SERVER WORKLOAD METRIC VALUE: in how many reps METRIC == VALUE
    local r n=0
    for ((r = 1; r <= REPS; r++)); do [[ ${R[$1.$2.$r.$3]:-} == "$4" ]] && n=$((n + 1)); done
    echo "$n"
}

SRV_LIST=()
for s in $SERVERS; do SRV_LIST+=("$s"); done
PEERS=()
for s in dnsmasq unbound; do if has dnsfence && has "$s"; then PEERS+=("$s"); fi; done
rowf() { # rowf LABEL RATIO_METRIC|- FUNC ARGS...: FUNC's cell for every server, then the ratios
    local label=$1 rm=$2 cells=() rs=()
    shift 2
    mapfile -t cells < <(per_server "$@")
    if [[ $rm != - ]]; then mapfile -t rs < <(ratios "$rm"); fi
    row "$label" "${cells[@]}" "${rs[@]}"
}
row() { # row LABEL VALUE-per-server... RATIO-per-peer...
    local label=$1
    shift
    printf '  %-36s' "$label"
    local v
    for v in "$@"; do printf ' %22s' "$v"; done
    printf '\n'
}

unbound_version=$(unbound -V 2>/dev/null | awk 'NR == 1 { print $2 }')
dnsmasq_version=$(dnsmasq --version 2>/dev/null | awk 'NR == 1 { print $3 }')
knot_version=$(knotd --version | awk '{ print $NF }')
dnsperf_version=$(dnsperf -h 2>&1 | awk '/^Version/ { print $2 }')
cpu_model=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
df_commit=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')
df_version=-
if has dnsfence; then df_version=$("$DNSFENCE_BIN" --version | awk '{ print $2 }'); fi
CMDLINE="sudo REPS=$REPS PIN=$PIN DURATION=$DURATION P99_RATE=$P99_RATE P99_DURATION=$P99_DURATION OUTSTANDING=$OUTSTANDING NAMES=$NAMES HOT=$HOT SERVER_CPU=$SERVER_CPU CLIENT_CPU=$CLIENT_CPU QUERY_LOG=$QUERY_LOG DNSFENCE_FIREWALL=$DNSFENCE_FIREWALL SERVERS=\"$SERVERS\" WORKLOADS=\"$WORKLOADS\" benches/load.sh"
if [[ $PIN == cores ]]; then
    PIN_TEXT="each resolver pinned to core $SERVER_CPU (dnsfence's tokio starts one worker, Unbound 1 thread); dnsperf and knotd on core $CLIENT_CPU"
else
    PIN_TEXT="PIN=none: resolvers NOT pinned (dnsfence's tokio starts $NCPU workers, Unbound $UNBOUND_THREADS threads, dnsmasq has one); dnsperf and knotd still on core $CLIENT_CPU. A first scaling figure: the resolver may use every core but shares core $CLIENT_CPU with the load generator, so where dnsperf's core is full (cache hits) it cannot show more QPS, only the CPU a query costs when its work is spread over threads"
fi

say ""
say "=== whole-server load: ${SRV_LIST[*]} ==="
say "command: $CMDLINE"
say "when: $START_UTC; whole run ${ELAPSED}s"
say "machine: $NCPU cores ($cpu_model), kernel $(uname -r)"
say "load average before/after: $LOAD_BEFORE / $LOAD_AFTER  (shared cores: other work skews every number)"
say "versions: dnsfence $df_version (commit $df_commit), dnsmasq $dnsmasq_version, Unbound $unbound_version, knotd $knot_version, dnsperf $dnsperf_version"
say "namespace $NS (loopback only); upstream: knotd on $UPSTREAM_IP:53, authoritative for bench.test ($NAMES names, TTL 3600), flags to RD queries: '$UPSTREAM_FLAGS' (no RA)"
say "pinning: $PIN_TEXT"
say "method: every (server, workload) measured $REPS time(s), interleaved workload by workload (${SRV_LIST[*]}, ${SRV_LIST[*]}, ...), each time on a freshly started server (empty cache and set); figures are median (min-max) over the reps"
say "max-QPS runs: dnsperf -q $OUTSTANDING -l $DURATION (fresh-name files: -n 1, may end earlier); latency runs: -Q $P99_RATE -l $P99_DURATION -v"
if has dnsfence; then
    say "dnsfence 127.0.0.1:${PORT[dnsfence]}: ${R[dnsfence.check]}"
    say "  allow **.bench.test, qtypes A AAAA; client_qps 0 (off); max_inflight 4096; cache 16,384 answers"
    say "  exfiltration budget OFF (wildcard_names_per_minute: 0) so it does not throttle the benchmark"
    say "  query log: $([[ $QUERY_LOG == file ]] && echo 'ON, to a file (the real cost)' || echo 'to /dev/null (formatted and written, not stored)')"
    say "  firewall: ${R[dnsfence.fw]}; hooks [output], set_size $SET_SIZE"
    say "  ${R[dnsfence.upstream_block]}"
    say "  h0.bench.test: ${R[dnsfence.h0]} (hickory accepts the AA answer without RA); ${R[dnsfence.denied_check]}"
    say "  threads: ${R[dnsfence.threads]}"
fi
if has dnsmasq; then
    say "dnsmasq 127.0.0.1:${PORT[dnsmasq]}: --server=/bench.test/$UPSTREAM_IP --address=/#/ --nftset=/bench.test/4#inet#$DM_TABLE#allow4 --cache-size=16384 --dns-forward-max=4096, no query log"
    say "  output chain of the same shape (lo, established, @allow4/@allow6, drop); h0.bench.test: ${R[dnsmasq.h0]}; ${R[dnsmasq.denied_check]}"
fi
if has unbound; then
    say "Unbound 127.0.0.1:${PORT[unbound]}: NO firewall; local-zone \".\" always_nxdomain, bench.test transparent + forward-zone to $UPSTREAM_IP; module-config iterator (no DNSSEC), qname-minimisation no, prefetch no; num-threads $UNBOUND_THREADS, num-queries-per-thread 4096; cache 4m + 4m (about 16,200 answers); no query log"
    say "  h0.bench.test: ${R[unbound.h0]}; ${R[unbound.denied_check]}; threads: ${R[unbound.threads]}"
fi
say "the servers run one after the other (dnsfence's ruleset drops unmarked queries to the upstream, so a peer beside it could not forward)"

declare -A DESC=(
    [cache-hit]="$HOT names asked over and over, cache warmed first"
    [cache-miss]="names never asked before: every query goes upstream (and admits a new address)"
    [denied]="names outside the allowlist: NXDOMAIN locally, nothing forwarded"
    [mixed]="70% hot names, 20% fresh names, 10% denied"
)
declare -A TITLE=([cache-hit]="cache hit" [cache-miss]="cache miss" [denied]="denied" [mixed]="mixed")

hdr=()
for s in "${SRV_LIST[@]}"; do hdr+=("${LABEL[$s]}"); done
for p in "${PEERS[@]}"; do hdr+=("dnsfence/${LABEL[$p]}"); done

# ratios METRIC: dnsfence's median over each peer's
ratios() {
    local p
    for p in "${PEERS[@]}"; do ratio "$(median dnsfence "$w" "$1")" "$(median "$p" "$w" "$1")"; done
}
per_server() { # per_server FUNC ARGS...: FUNC s ARGS for every server
    local fn=$1 s
    shift
    for s in "${SRV_LIST[@]}"; do "$fn" "$s" "$@"; done
}
sp() { spread "$2" "$1" "$w" "$3"; }
md() { fmt "$2" "$(median "$1" "$w" "$3")"; }
pair() { printf '%s / %s\n' "$(fmt "$2" "$(median "$1" "$w" "$3")")" "$(fmt "$2" "$(median "$1" "$w" "$4")")"; }
minrate() { local lo; read -r _ lo _ <<<"$(vals "$1" "$w" p_qps | stat3)"; fmt qps "$lo"; }
sumv() { vals "$1" "$w" "$2" | awk '{ s += $1 } END { print s + 0 }'; }
lost() { printf '%s / %s\n' "$(sumv "$1" lost)" "$(sumv "$1" p_lost)"; }
other() {
    if [[ $PIN == cores ]]; then
        printf '%s%% / %s%%\n' "$(vals "$1" "$w" osrv | stat3 | awk '{ print $3 }')" "$(vals "$1" "$w" ocli | stat3 | awk '{ print $3 }')"
    else
        printf '%s%% (2 cores)\n' "$(vals "$1" "$w" osrv | stat3 | awk '{ print $3 }')"
    fi
}
bound() {
    local b txt=""
    for b in server client both machine neither; do
        local n
        n=$(count_reps "$1" "$w" bound "$b")
        ((n)) && txt+="${txt:+, }$b $n/$REPS"
    done
    printf '%s\n' "${txt:--}"
}
rcodes() { # summed over the reps
    vals "$1" "$w" rcodes | tr ',' '\n' | awk -F= '$2 != "" { s[$1] += $2 } END { for (k in s) printf "%s%s=%d", (n++ ? "," : ""), k, s[k]; print "" }'
}
qlog() {
    if [[ $1 == dnsfence && $QUERY_LOG == file ]]; then
        local r b=0 l=0 d=0
        for ((r = 1; r <= REPS; r++)); do
            b=$((b + ${R[$1.$w.$r.logbytes]:-0})); l=$((l + ${R[$1.$w.$r.loglines]:-0})); d=$((d + ${R[$1.$w.$r.done]:-0}))
        done
        awk -v b="$b" -v l="$l" -v d="$d" 'BEGIN { printf "%.2f lines, %.0f B/query\n", (d ? l / d : 0), (d ? b / d : 0) }'
    else
        echo "-"
    fi
}
admission() { # set elements against distinct allowed names asked, per rep
    local r first="" bad=0
    if [[ $1 == unbound ]]; then echo "- (no firewall)"; return; fi
    if [[ $1 == dnsfence && $DNSFENCE_FIREWALL == off ]]; then echo "- (firewall off)"; return; fi
    for ((r = 1; r <= REPS; r++)); do
        local e=${R[$1.$w.$r.set4]:-0} a=${R[$1.$w.$r.asked]:-0} l=$((${R[$1.$w.$r.lost]:-0} + ${R[$1.$w.$r.p_lost]:-0}))
        # A lost query may still have been admitted, or not: between asked-lost and asked is right.
        ((e <= a && e >= a - l)) || bad=$((bad + 1))
        [[ $r == 1 ]] && first="$e/$a"
    done
    ((bad)) && { echo "MISMATCH in $bad/$REPS ($first)"; return; }
    echo "ok $REPS/$REPS ($first)"
}

declare -A FLAGS=()
disturbed_at=15 # % of a core taken by other work that flags a run as disturbed (both cores: 30)
[[ $PIN == cores ]] || disturbed_at=30
for w in $WORKLOADS; do
    say ""
    say "--- $w: ${DESC[$w]} ---"
    row "" "${hdr[@]}"
    rowf "max QPS" qps sp qps qps
    rowf "CPU us/query at max QPS" cpu sp us cpu
    rowf "p99 ms at $P99_RATE qps" p99 sp ms p99
    rowf "p99.9 ms at $P99_RATE qps" p999 sp ms p999
    rowf "  p50 ms at $P99_RATE qps" - md ms p50
    rowf "  CPU us/query at $P99_RATE qps" cpup md us cpup
    rowf "  context switches/query (max / lat)" - pair d2 ctxq pctxq
    rowf "  lowest rate reached in latency runs" - minrate
    rowf "  resolver CPU % of a core (max run)" - md pct srv
    rowf "  dnsperf / knotd CPU % (max run)" - pair pct cli knot
    rowf "  other work on the cores (worst rep)" - other
    rowf "  bound by (reps)" - bound
    rowf "  max run length s (median)" - md s runtime
    rowf "  upstream queries/query (max / lat)" - pair d2 upq_q p_upq_q
    rowf "  lost, all reps (max / lat)" - lost
    rowf "  set elements / names asked (rep 1)" - admission
    if has dnsfence && [[ $QUERY_LOG == file ]]; then row "  dnsfence query log (max runs)" "$(qlog dnsfence)"; fi
    for s in "${SRV_LIST[@]}"; do say "  rcodes ${LABEL[$s]} (max runs, all reps): $(rcodes "$s")"; done
    for s in "${SRV_LIST[@]}"; do
        for ((r = 1; r <= REPS; r++)); do
            k="$s.$w.$r"
            case ${R[$k.rcodes]} in *SERVFAIL*) say "  ! $s rep $r answered SERVFAIL under load (admission or upstream failure): see its log" ;; esac
            if ((${R[$k.osrv]} >= disturbed_at || ${R[$k.ocli]} >= 15)); then
                say "  ! $s rep $r: other work took ${R[$k.osrv]}%$([[ $PIN == cores ]] && echo " of the resolver's core and ${R[$k.ocli]}% of dnsperf's" || echo " of the two cores"): disturbed"
                FLAGS[$w.disturbed]=1
            fi
            if [[ ${R[$k.bound]} == client || ${R[$k.bound]} == both ]]; then FLAGS[$s.$w.client]=$((${FLAGS[$s.$w.client]:-0} + 1)); fi
            if [[ ${R[$k.bound]} == neither && $w != cache-miss ]]; then
                say "  ! $s rep $r: neither core was full (resolver ${R[$k.srv]}%): waits, not CPU, limit it"
            fi
            if awk -v a="${R[$k.p_qps]}" -v r="$P99_RATE" 'BEGIN { exit !(a < 0.95 * r) }'; then
                say "  ! $s rep $r did not sustain $P99_RATE qps in the latency run (${R[$k.p_qps]%.*}): its p99 includes queueing"
            fi
        done
        if ((${FLAGS[$s.$w.client]:-0} * 2 > REPS)); then
            say "  ! ${LABEL[$s]}: dnsperf's core was full in ${FLAGS[$s.$w.client]}/$REPS reps: its QPS is a lower bound there (compare CPU us/query)"
        fi
    done
    # The issue's targets (issue 9), against the peers' medians; the script never fails on them.
    if has dnsfence && ((${#PEERS[@]})); then
        verdict() { # verdict A OP B: met / MISSED / n/a
            if awk -v a="$1" -v b="$3" 'BEGIN { exit !(a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) }'; then
                if awk -v a="$1" -v b="$3" "BEGIN { exit !(a $2 b) }"; then echo met; else echo MISSED; fi
            else
                echo n/a
            fi
        }
        best() { # best METRIC: the lower median among the peers
            local p m b=""
            for p in "${PEERS[@]}"; do
                m=$(median "$p" "$w" "$1")
                [[ $m =~ ^[0-9.]+$ ]] || continue
                if [[ -z $b ]] || awk -v m="$m" -v b="$b" 'BEGIN { exit !(m < b) }'; then b=$m; fi
            done
            echo "${b:--}"
        }
        t=()
        if [[ $w == cache-miss ]]; then
            if has unbound; then
                uq=$(awk -v x="$(median unbound "$w" qps)" 'BEGIN { print x * 1.5 }')
                t+=("QPS >= 1.5x Unbound's: $(verdict "$(median dnsfence "$w" qps)" '>=' "$uq")")
            fi
        else
            if has dnsmasq; then
                dm=$(awk -v x="$(median dnsmasq "$w" cpu)" 'BEGIN { print x * 0.7 }')
                t+=("CPU/query <= 0.7x dnsmasq's: $(verdict "$(median dnsfence "$w" cpu)" '<=' "$dm")")
            fi
            if has unbound; then
                t+=("CPU/query < Unbound's: $(verdict "$(median dnsfence "$w" cpu)" '<' "$(median unbound "$w" cpu)")")
            fi
        fi
        t+=("p99 <= better peer's: $(verdict "$(median dnsfence "$w" p99)" '<=' "$(best p99)")")
        b999=$(best p999)
        [[ $b999 == - ]] || b999=$(awk -v x="$b999" 'BEGIN { print 2 * x }')
        t+=("p99.9 <= 2x better peer's: $(verdict "$(median dnsfence "$w" p999)" '<=' "$b999")")
        say "  target (issue 9, medians): $(printf '%s; ' "${t[@]}" | sed 's/; $//')"
    fi
done

if has dnsfence; then
    ((${R[dnsfence.logdrop]:-0} > 0)) && say "  ! dnsfence dropped query-log records under load (see its stderr)"
    ((${R[dnsfence.errors]:-0} > 0)) && say "  ! dnsfence logged ${R[dnsfence.errors]} warnings/errors: $(head -2 "$TMP/dnsfence.warnings" | cut -c1-200)"
fi
if ((PERF)) && has dnsfence; then
    for w in $WORKLOADS; do
        [[ -f $TMP/perf.$w.data ]] || continue
        say ""
        say "--- perf: dnsfence during $w max run, rep 1 (self time, top 25; perf skews that run's numbers) ---"
        perf report -i "$TMP/perf.$w.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
            grep -E '^ +[0-9]' | head -25 | cut -c1-150
    done
fi

# ---- every round, for whoever doubts a median -------------------------------------------------------
say ""
say "--- every round, in the order run (max QPS, CPU us/query, p99 / p99.9 / p50 ms at $P99_RATE qps, bound by, other work %) ---"
for w in $WORKLOADS; do
    for ((r = 1; r <= REPS; r++)); do
        for s in "${SRV_LIST[@]}"; do
            k="$s.$w.$r"
            printf '  %-10s %-8s round %d: %9s qps %8s us/q   p99 %9s  p99.9 %9s  p50 %7s ms   %-8s other %s%%%s\n' \
                "$w" "$s" "$r" "$(fmt qps "${R[$k.qps]}")" "$(fmt us "${R[$k.cpu]}")" "${R[$k.p99]}" "${R[$k.p999]}" "${R[$k.p50]}" \
                "${R[$k.bound]}" "${R[$k.osrv]}" "$([[ $PIN == cores ]] && echo " / ${R[$k.ocli]}%")"
        done
    done
done

# ---- the table for README.md -----------------------------------------------------------------------
say ""
if ((REPS == 1)); then say "--- for README.md (one run each: use REPS=3 or more for figures to publish) ---"; else say "--- for README.md (median (min–max) of $REPS runs each) ---"; fi
say ""
say "Measured $(date -u '+%B %Y') on $NCPU cores ($cpu_model), Linux $(uname -r): dnsfence $df_version (commit $df_commit), dnsmasq $dnsmasq_version, Unbound $unbound_version, Knot $knot_version (upstream), dnsperf $dnsperf_version."
say "Command: \`$CMDLINE\`"
say ""
md_hdr="| workload | |"
md_sep="|---|---|"
for s in "${SRV_LIST[@]}"; do
    case $s in
    dnsfence) md_hdr+=" dnsfence |" ;;
    dnsmasq) md_hdr+=" dnsmasq + nftset |" ;;
    unbound) md_hdr+=" Unbound (no firewall) |" ;;
    esac
    md_sep+="---|"
done
for p in "${PEERS[@]}"; do md_hdr+=" dnsfence / ${LABEL[$p]} |"; md_sep+="---|"; done
say "$md_hdr"
say "$md_sep"
foot_client=0
foot_disturbed=0
for w in $WORKLOADS; do
    first="${TITLE[$w]}"
    [[ -n ${FLAGS[$w.disturbed]:-} ]] && { first+=" ²"; foot_disturbed=1; }
    for m in "max QPS:qps:qps" "CPU µs/query:us:cpu" "p99 ms at $(fmt qps "$P99_RATE") qps:ms:p99" "p99.9 ms at $(fmt qps "$P99_RATE") qps:ms:p999"; do
        IFS=: read -r mname kind metric <<<"$m"
        line="| $first | $mname |"
        for s in "${SRV_LIST[@]}"; do
            cell=$(spread "$kind" "$s" "$w" "$metric" "–")
            if [[ $metric == qps ]] && ((${FLAGS[$s.$w.client]:-0} * 2 > REPS)); then cell+=" ¹"; foot_client=1; fi
            line+=" $cell |"
        done
        for p in "${PEERS[@]}"; do line+=" $(ratio "$(median dnsfence "$w" "$metric")" "$(median "$p" "$w" "$metric")" "×") |"; done
        say "$line"
        first=""
    done
done
say ""
((foot_client)) && say "¹ dnsperf's core was full in most runs: this QPS is a lower bound; compare CPU per query."
((foot_disturbed)) && say "² other work on the shared cores disturbed at least one run of this workload (see the flags above)."
[[ $PIN == none ]] && say "$PIN_TEXT."
say ""
say "whole run: ${ELAPSED}s"
