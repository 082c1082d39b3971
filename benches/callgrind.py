#!/usr/bin/env python3
"""Instructions per query of the whole dnsfence process, under callgrind (user space only).

Runs `dnsfence serve` under `valgrind --tool=callgrind` twice, on loopback, with its query log
written to a file and the firewall off: once answering LOW queries and once HIGH queries of one
kind (all sequential, one at a time), and prints (Ir(HIGH) - Ir(LOW)) / (HIGH - LOW): the
instructions one more query costs, start-up and shutdown cancelled out. Every thread counts
(receive loop, runtime, query log writer). The kernel's share (syscalls) is not counted.

    benches/callgrind.py [--bin target/release/dnsfence] [--kind hit|denied|both] [--low 1000] [--high 6000]
                         [--functions 30] [--inclusive]

`--functions N` also prints the N functions that one more query costs most in (the same
difference per function, from `callgrind_annotate` of both runs; `--inclusive` counts callees
too): where the instructions of a query go.

A local upstream (a thread of this script) answers every A question with 11.0.0.1, TTL 3600; a
hit asks one allowed name again and again, a denial a name outside the allowlist. Only loopback
is used; every loop is bounded.
"""
import argparse, os, random, re, signal, socket, struct, subprocess, sys, tempfile, threading, time


def encode_name(name):
    out = b""
    for label in name.strip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def query(name, qid):
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack(">HH", 1, 1)


def upstream(sock):
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        if len(data) < 12:
            continue
        qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", data[:12])
        end = 12
        while end < len(data) and data[end] != 0:
            end += data[end] + 1
        end += 5
        question = data[12:end]
        header = struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0)
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 3600, 4) + bytes([11, 0, 0, 1])
        sock.sendto(header + question + answer, peer)


def ask(sock, addr, name, count):
    for i in range(count):
        qid = random.randrange(65536)
        sock.sendto(query(name, qid), addr)
        deadline = time.time() + 10
        while True:
            sock.settimeout(max(0.01, deadline - time.time()))
            data, _ = sock.recvfrom(4096)
            if data[:2] == struct.pack(">H", qid):
                break


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_function(path, inclusive):
    """Instructions per function of a callgrind output file (exclusive, or inclusive)."""
    args = ["callgrind_annotate", "--threshold=100", f"--inclusive={'yes' if inclusive else 'no'}", path]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*$", line)
        if m and ":" in m.group(2):
            name = re.sub(r"^\S*?:", "", m.group(2), count=1)
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def instructions(binary, policy, log, kind, count, outdir, keep=None):
    port = free_port()
    out = os.path.join(outdir, f"callgrind.{kind}.{count}")
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve",
         "--policy", policy, "--listen", f"127.0.0.1:{port}", "--log", log],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, RUST_LOG="warn"))
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        addr = ("127.0.0.1", port)
        name = "api.bench.test" if kind == "hit" else "exfil-0123456789abcdef.evil.example"
        deadline = time.time() + 120
        while True:  # until it answers (valgrind starts slowly); also fills the cache
            try:
                ask(client, addr, "api.bench.test", 1)
                break
            except (socket.timeout, ConnectionRefusedError):
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("dnsfence did not answer under valgrind")
        ask(client, addr, name, count)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    with open(out) as f:
        total = sum(int(m.group(1)) for m in re.finditer(r"^summary: (\d+)", f.read(), re.M))
    if keep is not None:
        keep.append(out)
    else:
        os.unlink(out)
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/dnsfence")
    parser.add_argument("--kind", default="both", choices=["hit", "denied", "both"])
    parser.add_argument("--low", type=int, default=1000)
    parser.add_argument("--high", type=int, default=6000)
    parser.add_argument("--functions", type=int, default=0, metavar="N",
                        help="print the N costliest functions per query")
    parser.add_argument("--inclusive", action="store_true",
                        help="with --functions: count what each function calls, too")
    args = parser.parse_args()
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind(("127.0.0.1", 0))
    threading.Thread(target=upstream, args=(up,), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="dnsfcg.") as tmp:
        policy = os.path.join(tmp, "policy.yaml")
        with open(policy, "w") as f:
            f.write(f'listen: ["127.0.0.1:5353"]\nupstreams: ["127.0.0.1:{up.getsockname()[1]}"]\n'
                    'allow: ["**.bench.test"]\nlimits: {client_qps: 0}\nfirewall: {enabled: false}\n')
        log = os.path.join(tmp, "queries.jsonl")
        for kind in (["hit", "denied"] if args.kind == "both" else [args.kind]):
            keep = [] if args.functions else None
            low = instructions(args.bin, policy, log, kind, args.low, tmp, keep)
            high = instructions(args.bin, policy, log, kind, args.high, tmp, keep)
            per = (high - low) / (args.high - args.low)
            print(f"{kind}: {per:,.0f} instructions per query (Ir {low:,} at {args.low}, {high:,} at {args.high})")
            if keep:
                before, after = (per_function(path, args.inclusive) for path in keep)
                diff = {name: (after.get(name, 0) - before.get(name, 0)) / (args.high - args.low)
                        for name in set(before) | set(after)}
                for name, cost in sorted(diff.items(), key=lambda item: -item[1])[:args.functions]:
                    print(f"  {cost:9,.0f}  {name[:150]}")
                for path in keep:
                    os.unlink(path)


if __name__ == "__main__":
    main()
