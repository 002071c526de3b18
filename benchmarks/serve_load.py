"""HTTP load test: starts ``python -m serving`` on loopback, sends fixed-rate load, reports per rate.

    .venv/bin/python -m benchmarks.serve_load                          # 50..1600 req/s, 10 s each
    .venv/bin/python -m benchmarks.serve_load --rates 100 200 --duration 5 --workers 2

Open loop: request ``i`` of a step is due at ``start + i / rate`` whatever earlier requests are doing,
and its latency counts from when it was due, so a server falling behind shows up as latency instead of
silently lowering the rate. In-flight requests are capped (``--max-in-flight``); a request that finds
the cap full, times out or gets a non-200 is an error. A rate is sustained when at least 95% of the
requests were answered in time with no errors and p99 stays under ``--slo-ms``; the run stops after the
first rate that is not. The bundle is the one ``benchmarks.serve_latency`` builds (built here if missing). The
load generator runs on the same machine as the server and competes with it for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_latency import sample_histories
from recsys.bundle import read_bundle


@dataclass
class Step:
    rate: float
    sent: int
    latencies: list[float]  # seconds from due time to response, successful requests only
    errors: int
    elapsed: float

    @property
    def achieved(self) -> float:
        return len(self.latencies) / self.elapsed

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` in milliseconds."""
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")

    def sustained(self, slo_ms: float) -> bool:
        return self.achieved >= 0.95 * self.rate and self.errors == 0 and self.percentile(99) < slo_ms


async def run_step(
    client: httpx.AsyncClient, bodies: list[dict], rate: float, duration: float, max_in_flight: int
) -> Step:
    """Send ``rate * duration`` requests on schedule and wait for all of them."""
    count = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    in_flight = 0

    async def one(body: dict, due: float) -> None:
        nonlocal errors, in_flight
        try:
            response = await client.post("/recommend", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1
        except httpx.HTTPError:
            errors += 1
        finally:
            in_flight -= 1

    tasks = []
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= max_in_flight:
            errors += 1  # the server is this far behind: shed instead of queueing without bound
            continue
        in_flight += 1
        tasks.append(asyncio.create_task(one(bodies[i % len(bodies)], due)))
    await asyncio.gather(*tasks)
    return Step(rate, count, latencies, errors, time.perf_counter() - start)


def wait_ready(base_url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


async def run(args: argparse.Namespace, bodies: list[dict], base_url: str) -> list[Step]:
    steps = []
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.max_in_flight)
    async with httpx.AsyncClient(base_url=base_url, timeout=args.timeout, limits=limits) as client:
        for body in bodies[:50]:  # warm-up
            await client.post("/recommend", json=body)
        for rate in args.rates:
            step = await run_step(client, bodies, rate, args.duration, args.max_in_flight)
            steps.append(step)
            ok = step.sustained(args.slo_ms)
            print(
                f"rate {rate:6.0f}/s  achieved {step.achieved:7.1f}/s  p50 {step.percentile(50):8.2f} ms  "
                f"p99 {step.percentile(99):8.2f} ms  errors {step.errors:5d}/{step.sent}  "
                f"{'ok' if ok else 'SATURATED'}",
                flush=True,
            )
            if not ok:
                break
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("artifacts/bench/serve_sasrec_30k"))
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per request")
    parser.add_argument("--search-threads", type=int, default=1, help="FAISS OpenMP threads per request")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, seconds")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--slo-ms", type=float, default=100.0, help="p99 a sustained rate must stay under")
    args = parser.parse_args()

    if not args.bundle.exists():
        build = [sys.executable, "-m", "benchmarks.serve_latency", "--build-only", "--bundle"]
        subprocess.run([*build, str(args.bundle)], check=True)
    product_ids = read_bundle(args.bundle, verify=False).product_ids
    bodies = [{"history": h, "k": args.k} for h in sample_histories(product_ids, 5000, seed=1)]

    base_url = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "serving", "--bundle", str(args.bundle), "--host", "127.0.0.1"]
    command += ["--port", str(args.port), "--workers", str(args.workers), "--threads", str(args.threads)]
    command += ["--search-threads", str(args.search_threads)]
    server = subprocess.Popen([*command, "--log-level", "warning"], start_new_session=True)
    try:
        wait_ready(base_url, server, timeout=120)
        print(f"server: {' '.join(command)}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        steps = asyncio.run(run(args, bodies, base_url))
        sustained = [s.rate for s in steps if s.sustained(args.slo_ms)]
        best = max(sustained, default=0)
        print(f"highest sustained rate: {best:.0f}/s (p99 < {args.slo_ms:.0f} ms, no errors)")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and any worker processes
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    main()
