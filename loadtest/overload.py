"""Overload: ten times the connections the gateway serves well, then back to normal.

    python loadtest/overload.py [--duration 6] [--connections 64] [--factor 10]
                                [--max-in-flight 128]

On a scratch stack (as bench.py), every request a new resident claiming on the winning
path, three phases of wrk on one release:

  before    --connections           what the gateway serves well
  overload  --connections x factor  past RELEASE_SERVICE_MAX_IN_FLIGHT: 503 at once
  after     --connections           does it resume full speed?

It prints requests/s, p50/p99, the share of 503 answers and the gateway's memory (RSS,
all processes) at the end of each phase, the ratio after/before, and checks that every
claim Redis holds was answered 201 or lost only to a client timeout (none half-done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench import HERE, Bench, children_of, wrk


def rss_mb(pid: int) -> float:
    total = 0
    for task in [pid, *children_of(pid)]:
        try:
            status = Path(f"/proc/{task}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Drive the gateway with ten times the connections it serves well, then "
                    "normal load again; report throughput, latency, shed share and memory.")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=64, help="normal load")
    parser.add_argument("--factor", type=int, default=10, help="overload = connections x this")
    parser.add_argument("--max-in-flight", type=int, default=128,
                        help="RELEASE_SERVICE_MAX_IN_FLIGHT of the gateway")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for overload.json")
    args = parser.parse_args()
    args.processes = 1
    os.environ["RELEASE_SERVICE_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    bench = Bench(args)
    try:
        bench.setup()
        per_phase = int(args.duration * 15_000) + 10_000
        release = bench.create_release(1_000_000)
        path = f"/v1/releases/{release}/claims"
        phases = []
        for name, connections in (("before", args.connections),
                                  ("overload", args.connections * args.factor),
                                  ("after", args.connections)):
            residents = bench.residents_file(per_phase, name)
            result = wrk(bench.base, args.duration, connections,
                         {"CLAIMS_FILE": str(residents), "CLAIM_PATH": path})
            seconds = result["duration_us"] / 1e6
            phases.append({
                "phase": name, "connections": connections,
                "requests_per_s": result["requests"] / seconds,
                "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000,
                "shed_or_failed": result["non_2xx_or_errors"] / max(result["requests"], 1),
                "answered_201": result["requests"] - result["non_2xx_or_errors"],
                "gateway_rss_mb": rss_mb(bench.gateway.pid)})
            print(f"  {name}: {phases[-1]['requests_per_s']:,.0f} req/s", file=sys.stderr)
        claimed = int(bench.admin_view(release)["claimed"])  # type: ignore[call-overload]
    finally:
        bench.close()

    print(f"{'phase':<10}{'conns':>7}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'shed':>7}"
          f"{'RSS MB':>8}")
    for p in phases:
        print(f"{p['phase']:<10}{p['connections']:>7}{p['requests_per_s']:>9,.0f}"
              f"{p['p50_ms']:>8.1f}{p['p99_ms']:>8.1f}{p['shed_or_failed']:>7.0%}"
              f"{p['gateway_rss_mb']:>8.0f}")
    recovered = phases[2]["requests_per_s"] / phases[0]["requests_per_s"]
    answered = sum(p["answered_201"] for p in phases)
    print(f"after / before: {recovered:.2f}; claims in Redis {claimed:,}, answered 201 "
          f"{answered:,} (a difference is answers lost to client timeouts; the client's "
          "retry with its Idempotency-Key gets them)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(
        {"phases": phases, "after_over_before": recovered, "claimed": claimed,
         "answered_201": answered, "max_in_flight": args.max_in_flight}, indent=2))
    return 0 if claimed >= answered else 1


if __name__ == "__main__":
    sys.exit(main())
