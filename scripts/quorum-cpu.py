#!/usr/bin/env python3
"""Server CPU per quorum GET, by process, for one kv-node binary (docs/PERFORMANCE.md, "Quorum
reads"): starts 3 kv-nodes of KV_NODE_BIN (N=3, WAL_SYNC=always, temp data folders, free ports)
and kv-lb, preloads 10,000 keys, then per scenario runs kv-bench (32 connections, 1.5 s warm-up,
DUR s measured, default 5) and reads user+system CPU from /proc/PID/stat over the middle of the
measured phase; prints CPU us per request of each process, and the nodes' thread sleeps
(voluntary context switches) per request. Scenarios: lb-quorum (GET r=quorum via kv-lb, the
default with node-quorum), lb-one, node-quorum, node-one (straight to node1);
writes (docs/PERFORMANCE.md, "Replication lanes"): lb-post (POST w=quorum via kv-lb, closed
loop), lb-post-750 (the same, open loop at 750 requests/s), node-post (POST w=quorum straight
to node1), mix (via kv-lb: 95 % GET r=quorum, 5 % POST w=quorum, keys zipf:0.99).
kv-lb and kv-bench come from KV_BIN_DIR (default: target/release of this checkout), so two
kv-node builds can be compared back to back with the same LB and client:

    scripts/quorum-cpu.py /tmp/kv-node-before before
    scripts/quorum-cpu.py target/release/kv-node after

Stops what it started (by PID) and deletes its data folders on exit."""
import json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

node_bin, label = sys.argv[1], sys.argv[2]
scen = sys.argv[3:] or ["lb-quorum", "node-quorum"]
REL = os.environ.get("KV_BIN_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release")
TCK = os.sysconf("SC_CLK_TCK")
DUR, WARM = float(os.environ.get("DUR", "5")), 1.5
extra_env = dict(kv.split("=", 1) for kv in os.environ.get("NODE_ENV", "").split() if kv)


def free_ports(n):
    ss = [socket.socket() for _ in range(n)]
    for s in ss:
        s.bind(("127.0.0.1", 0))
    ps = [s.getsockname()[1] for s in ss]
    for s in ss:
        s.close()
    return ps


def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def switches(pid):
    """Voluntary context switches (a thread going to sleep) of all threads of `pid`."""
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in open(f"/proc/{pid}/task/{t}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    n += int(line.split()[1])
        except OSError:
            pass
    return n


def healthy(url, deadline=30):
    end = time.time() + deadline
    while time.time() < end:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} not healthy")


procs = []
dirs = []
out = tempfile.mkdtemp(prefix="qbench-")
try:
    p = free_ports(4)
    cluster = ",".join(f"http://127.0.0.1:{x}" for x in p[:3])
    nodes = []
    for i in range(3):
        dirs.append(tempfile.mkdtemp(prefix="qb-data-"))
        env = dict(os.environ, NODE_NAME=f"node{i+1}", PORT=str(p[i]),
                   CURRENT_NODE_URL=f"http://127.0.0.1:{p[i]}", CLUSTER_NODES=cluster,
                   REPLICATION_FACTOR="3", DATA_DIR=dirs[-1],
                   WAL_SYNC="always", RUST_LOG="warn", **extra_env)
        pr = subprocess.Popen([node_bin], env=env, stdout=open(f"{out}/node{i+1}.log", "w"),
                              stderr=subprocess.STDOUT)
        procs.append(pr)
        nodes.append(pr)
    for i in range(3):
        healthy(f"http://127.0.0.1:{p[i]}")
    env = dict(os.environ, DATABASE_NODES=cluster, LB_PORT=str(p[3]), REPLICATION_FACTOR="3",
               RUST_LOG="warn")
    lb = subprocess.Popen([f"{REL}/kv-lb"], env=env, stdout=open(f"{out}/lb.log", "w"),
                          stderr=subprocess.STDOUT)
    procs.append(lb)
    lb_url = f"http://127.0.0.1:{p[3]}"
    healthy(lb_url)
    time.sleep(2)
    subprocess.run([f"{REL}/kv-bench", "run", "--url", lb_url, "--conns", "32", "--keys", "10000",
                    "--mix", "write=1", "--w", "quorum", "--preload", "--requests", "1",
                    "--warmup", "0s", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    for s in scen:
        url = f"http://127.0.0.1:{p[0]}" if s.startswith("node") else lb_url
        if s == "mix":
            load = ["--mix", "read=95,write=5", "--dist", "zipf:0.99", "--r", "quorum",
                    "--w", "quorum"]
        elif s.split("-")[1] == "post":
            load = ["--mix", "write=1", "--w", "quorum"]
            if s.count("-") == 2:
                load += ["--rate", s.split("-")[2]]
        else:
            load = ["--mix", "read=100", "--r", s.split("-")[1]]
        js = f"{out}/{s}.json"
        b = subprocess.Popen([f"{REL}/kv-bench", "run", "--url", url, "--conns", "32",
                              "--duration", f"{DUR}s", "--warmup", f"{WARM}s", "--keys", "10000",
                              *load, "--quiet", "--json", js],
                             stdout=subprocess.DEVNULL)
        time.sleep(WARM + 0.5)
        pids = [n.pid for n in nodes] + [lb.pid, b.pid]
        t0 = [ticks(x) for x in pids]
        c0 = [switches(x) for x in pids[:4]]
        w0 = time.time()
        time.sleep(DUR - 1.5)
        t1 = [ticks(x) for x in pids]
        c1 = [switches(x) for x in pids[:4]]
        w1 = time.time()
        b.wait()
        res = json.load(open(js))
        ops = next(o for o in res["ops"] if o["op"] == "all")
        tput = res.get("throughput") or ops.get("throughput")
        n = tput * (w1 - w0)
        us = [(b_ - a) / TCK * 1e6 / n for a, b_ in zip(t0, t1)]
        cs = sum(b_ - a for a, b_ in zip(c0[:3], c1[:3])) / n
        errs = res.get("errors", ops.get("errors"))
        print(f"{label:10} {s:12} {tput:8.0f}/s  node1 {us[0]:5.1f} node2 {us[1]:5.1f} "
              f"node3 {us[2]:5.1f} lb {us[3]:5.1f}  servers {sum(us[:4]):6.1f}  nodes {sum(us[:3]):6.1f}"
              f"  bench {us[4]:5.1f}  node-sleeps/req {cs:4.1f}  p50 {ops['latency_us']['p50']/1000:.2f}ms errors {errs}",
              flush=True)
finally:
    for pr in procs:
        pr.send_signal(signal.SIGTERM)
    for pr in procs:
        try:
            pr.wait(10)
        except subprocess.TimeoutExpired:
            pr.kill()
    for d in dirs + [out]:
        shutil.rmtree(d, ignore_errors=True)
