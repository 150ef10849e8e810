#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind, for Switchyard and the two bare
Pingora references (crates/switchyard-bench-refs): on a host too busy for CPU times to compare
two builds, instruction counts still do.

    python3 tests/bench/callgrind.py --binary target/release/switchyard \\
        --pingora-proxy target/release/bare-pingora-proxy \\
        --pingora-core target/release/bare-pingora-core [--top 25]

Each system runs under `valgrind --tool=callgrind` with one worker thread (Switchyard with the
`keepalive-1t` config of bench.py) in front of one nginx backend; one keep-alive client sends
exactly R requests one after the other, then the system is stopped (SIGTERM) and callgrind
writes its counts. Two runs per system, R = 1 000 and 4 000: the difference divided by 3 000 is
instructions per request, start-up and shutdown cancelled out (user space only: the kernel is
not counted). With --top N it also lists, per request, the functions whose inclusive cost in
Switchyard most exceeds the bare pingora-proxy's (callgrind_annotate --inclusive=yes, the same
difference of two runs): what our phases make the process do.

The counts depend on timing too: on a busy host more reads find nothing yet and
tasks are polled and woken more often, so the same Switchyard binary gave 103 000, 132 000 and
102 000 in three runs within 15 minutes here (bare pingora-proxy 82 970 and 82 987). Compare
systems within one run (they run one after the other), and repeat.

Needs what bench.py needs (make bench-deps) and valgrind (make bench-callgrind installs it).
Traffic stays on 127.0.0.1; every process it starts is stopped by its own PID (bench.py's
Proc).
"""
import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402 - the harness's processes, configs and HTTP client

RUNS = (1000, 4000)
# The task Pingora spawns per accepted connection: its inclusive cost is the request path
# without the process's background threads (timers, health checks, stats), whose share grows
# with wall time rather than with requests.
CONNECTION_TASK = ("pingora_core::services::listening::Service<A>::run_endpoint::{{closure}}"
                   "::{{closure}}")


def command(system, tools, work, sc, layout):
    """The system's command line, one worker thread, on its bench port."""
    if system == "switchyard":
        conf = bench.write(os.path.join(work, "switchyard-callgrind.yaml"),
                           bench.switchyard_conf(work, sc, layout))
        return [tools.binary, "run", "--config", conf]
    return bench.ref_cmd(tools, sc, layout, system)


def counted_run(system, cmd, work, sc, layout, requests):
    """Runs `cmd` under callgrind for `requests` keep-alive requests; (total instructions,
    path of the callgrind output)."""
    out = os.path.join(work, f"callgrind-{system}-{requests}.out")
    env = dict(os.environ, RUST_LOG="warn")
    proc = bench.Proc(f"{system}-callgrind-{requests}",
                      ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + cmd,
                      work, env=env)
    port = layout.lb_port[system]
    try:
        bench.wait_ready(proc, port, sc.path, limit=180.0)
        conn = bench.HttpConn(port, timeout=60.0)
        try:
            for _ in range(requests):
                status, _, _ = conn.get(sc.path)
                if status != 200:
                    raise bench.BenchError(f"{system}: status {status}")
        finally:
            conn.close()
    finally:
        proc.stop(timeout=120)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]), out
    raise bench.BenchError(f"no totals in {out}")


ANNOTATED = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*$")


def inclusive(path):
    """{function: inclusive instructions} from callgrind_annotate --inclusive=yes."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    costs = {}
    for line in text.splitlines():
        m = ANNOTATED.match(line)
        if m and ":" in m.group(2) and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(":", 1)[1].rsplit(" [", 1)[0]
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def per_request(paths):
    """{function: inclusive instructions per request}, the difference of the two runs."""
    (r1, p1), (r2, p2) = paths
    a, b = inclusive(p1), inclusive(p2)
    return {k: (b[k] - a.get(k, 0)) / (r2 - r1) for k in b}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default=os.path.join(bench.REPO, "target/release/switchyard"))
    p.add_argument("--pingora-proxy", default=None, metavar="PATH")
    p.add_argument("--pingora-core", default=None, metavar="PATH")
    p.add_argument("--base-port", type=int, default=21000)
    p.add_argument("--top", type=int, default=0,
                   help="list the N functions that cost Switchyard most over bare pingora-proxy")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_annotate"):
        if not shutil.which(tool):
            print(f"callgrind: {tool} missing (apt-get install valgrind)", file=sys.stderr)
            return 2
    args.refs = {"pingora-proxy": args.pingora_proxy, "pingora-core": args.pingora_core}
    args.systems = ["switchyard"] + [s for s in bench.REFS if args.refs[s]]
    try:
        tools = bench.Tools(os.path.abspath(args.binary), None)
        bench.check_refs(tools, args)
    except bench.BenchError as e:
        print(f"callgrind: {e}", file=sys.stderr)
        return 2
    atexit.register(bench.stop_all)
    work = tempfile.mkdtemp(prefix="switchyard-callgrind-")
    os.chmod(work, 0o755)
    os.makedirs(os.path.join(work, "static"))
    sc = next(s for s in bench.SCENARIOS if s.name == "keepalive-1t")
    layout = bench.Layout(args.base_port)
    results = {}
    try:
        bench.ports_free(layout.all_ports())
        backend = bench.start_backend(tools, work, sc, layout)
        try:
            for system in args.systems:
                cmd = command(system, tools, work, sc, layout)
                runs = [(n,) + counted_run(system, cmd, work, sc, layout, n) for n in RUNS]
                (r1, i1, _), (r2, i2, _) = runs
                paths = [(r, path) for r, _, path in runs]
                task = per_request(paths).get(CONNECTION_TASK)
                results[system] = {"per_request": (i2 - i1) / (r2 - r1), "paths": paths}
                print(f"{bench.LABEL[system]:<20} {results[system]['per_request']:>9,.0f} "
                      f"instructions per request ({i1:,} after {r1}, {i2:,} after {r2}); "
                      f"in the connection task {task or 0:,.0f}", flush=True)
        finally:
            backend.stop()
    except bench.BenchError as e:
        print(f"callgrind: STOPPED: {e}\nwork dir: {work}", file=sys.stderr)
        return 2
    base = results.get("pingora-proxy")
    if base:
        for system in args.systems:
            r = results[system]["per_request"] / base["per_request"]
            print(f"{bench.LABEL[system]:<20} x{r:.2f} of bare pingora-proxy")
    if args.top and base:
        ours, theirs = per_request(results["switchyard"]["paths"]), per_request(base["paths"])
        excess = sorted(((v - theirs.get(k, 0.0), v, k) for k, v in ours.items()), reverse=True)
        print(f"\nfunctions costing Switchyard most over bare pingora-proxy (inclusive "
              f"instructions per request: Switchyard, its excess)")
        for extra, v, name in excess[:args.top]:
            print(f"{v:>10,.0f} {extra:>+10,.0f}  {name}")
    print(f"callgrind outputs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
