#!/usr/bin/env python3
"""A/B of two kv builds or settings on this machine, with the machine's drift taken out.

    scripts/bench-ab.py [--rounds 8] [--duration 3s] [--mix read=100] [--a-env K=V ...]
                        [--b-env K=V ...] A_BIN_DIR B_BIN_DIR [-- extra kv-bench run args]

Starts two local clusters side by side with scripts/cluster.sh (3 nodes + kv-lb each,
WAL_SYNC=always, temporary roots, free ports): A from A_BIN_DIR, B from B_BIN_DIR (the same folder
twice to compare settings only), each with its --a-env / --b-env variables added to the
environment of every process. Preloads 10,000 keys in each, then runs kv-bench against A and B
alternately (ABBAAB..., each run --duration after a 0.5 s warm-up, 32 connections), so both see
the same minutes of this shared machine; a single run here moves by 10-25 % from one minute to
the next, a pair of adjacent runs much less. Prints every run, the medians and the B/A ratio of
each adjacent pair (ops/s and the servers' CPU per request from /proc, as scripts/bench.sh
counts it). kv-bench comes from A_BIN_DIR. Stops both clusters (by the PIDs in their run
folders) on exit.

Example (docs/PERFORMANCE.md, "Worker threads"):

    scripts/bench-ab.py --a-env WORKER_THREADS=2 --b-env WORKER_THREADS=1 \\
        target/release target/release -- --r quorum
"""
import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")


TAKEN = set()


def free_base(count):
    """A run of `count` free loopback ports below the ephemeral range, not handed out before."""
    for base in range(20000 + os.getpid() % 5000, 32000, 13):
        if TAKEN & set(range(base, base + count)):
            continue
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            TAKEN.update(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    sys.exit("bench-ab: no free run of ports")


class Cluster:
    def __init__(self, name, bin_dir, env):
        self.name, self.bin_dir = name, os.path.abspath(bin_dir)
        self.root = tempfile.mkdtemp(prefix=f"kv-ab-{name}.")
        base = free_base(5)
        self.base, self.lb = base, base + 4
        self.env = dict(os.environ, KV_ROOT=self.root, KV_BIN_DIR=self.bin_dir, WAL_SYNC="always",
                        RUST_LOG="warn")
        self.env.update(env)

    def script(self, *args):
        return subprocess.run(["bash", CLUSTER, *args], env=self.env, capture_output=True,
                              text=True)

    def up(self):
        out = self.script("up", "--no-build", "--base-port", str(self.base), "--lb-port",
                          str(self.lb))
        if out.returncode != 0:
            sys.exit(f"bench-ab: cluster {self.name} did not start:\n{out.stdout}{out.stderr}")

    def pids(self):
        names = ["node1", "node2", "node3", "lb"]
        return [f"{n}={open(os.path.join(self.root, 'run', n + '.pid')).read().strip()}"
                for n in names]

    def down(self):
        run = os.path.join(self.root, "run")
        for f in os.listdir(run) if os.path.isdir(run) else []:
            if f.endswith(".pid"):
                try:
                    os.kill(int(open(os.path.join(run, f)).read().strip()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        shutil.rmtree(self.root, ignore_errors=True)


def kv_bench(bin_dir, url, args):
    return subprocess.run([os.path.join(bin_dir, "kv-bench"), "run", "--url", url, *args],
                          capture_output=True, text=True).stdout


def env_pairs(items):
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"bench-ab: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a_bin")
    p.add_argument("b_bin")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--duration", default="3s")
    p.add_argument("--mix", default="read=100")
    p.add_argument("--a-env", action="append")
    p.add_argument("--b-env", action="append")
    o = p.parse_args(argv)
    clusters = {"A": Cluster("A", o.a_bin, env_pairs(o.a_env)),
                "B": Cluster("B", o.b_bin, env_pairs(o.b_env))}
    bench_bin = clusters["A"].bin_dir
    try:
        for c in clusters.values():
            c.up()
            kv_bench(bench_bin, f"http://127.0.0.1:{c.lb}",
                     ["--preload", "--mix", "read=100", "--requests", "1", "--keys", "10000",
                      "--quiet"])
        results = {"A": [], "B": []}
        for r in range(o.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                c = clusters[name]
                args = ["--mix", o.mix, "--keys", "10000", "--duration", o.duration,
                        "--warmup", "0.5s", *extra]
                for pid in c.pids():
                    args += ["--server-pid", pid]
                out = kv_bench(bench_bin, f"http://127.0.0.1:{c.lb}", args)
                ops = re.search(r"^all\s+\d+\s+([\d.]+)", out, re.M)
                cpu = re.search(r"servers ([\d.]+) µs \(([^)]*)\)", out)
                if not ops or not cpu:
                    sys.exit(f"bench-ab: kv-bench said:\n{out}")
                results[name].append((float(ops.group(1)), float(cpu.group(1))))
                print(f"round {r + 1} {name}: {float(ops.group(1)):9.0f} ops/s  "
                      f"{cpu.group(1):>6} µs/req  ({cpu.group(2)})", flush=True)
        for name, rows in results.items():
            print(f"{name}: median {statistics.median(x[0] for x in rows):,.0f} ops/s, "
                  f"{statistics.median(x[1] for x in rows):.1f} µs/req server CPU")
        pairs = list(zip(results["A"], results["B"]))
        ops = [b[0] / a[0] for a, b in pairs]
        cpu = [b[1] / a[1] for a, b in pairs]
        print("B/A ops/s per pair: " + " ".join(f"{x:.3f}" for x in ops)
              + f"  median {statistics.median(ops):.3f}")
        print("B/A CPU per request per pair: " + " ".join(f"{x:.3f}" for x in cpu)
              + f"  median {statistics.median(cpu):.3f}")
    finally:
        for c in clusters.values():
            c.down()


if __name__ == "__main__":
    main()
