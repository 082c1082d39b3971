#!/usr/bin/env python3
"""Instructions per query of the whole dnsfence process, under callgrind (user space only).

Runs `dnsfence serve` under `valgrind --tool=callgrind` twice, on loopback, with its query log
written to a file and the firewall off: once answering LOW queries and once HIGH queries of one
kind (all sequential, one at a time), and prints (Ir(HIGH) - Ir(LOW)) / (HIGH - LOW): the
instructions one more query costs, start-up and shutdown cancelled out. Every thread counts
(receive loop, runtime, query log writer). The kernel's share (syscalls) is not counted.

    benches/callgrind.py [--bin target/release/dnsfence] [--kind hit|denied|both] [--low 1000] [--high 6000]

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


def instructions(binary, policy, log, kind, count, outdir):
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
    os.unlink(out)
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/dnsfence")
    parser.add_argument("--kind", default="both", choices=["hit", "denied", "both"])
    parser.add_argument("--low", type=int, default=1000)
    parser.add_argument("--high", type=int, default=6000)
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
            low = instructions(args.bin, policy, log, kind, args.low, tmp)
            high = instructions(args.bin, policy, log, kind, args.high, tmp)
            per = (high - low) / (args.high - args.low)
            print(f"{kind}: {per:,.0f} instructions per query (Ir {low:,} at {args.low}, {high:,} at {args.high})")


if __name__ == "__main__":
    main()
