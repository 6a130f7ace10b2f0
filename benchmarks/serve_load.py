"""Load on fastdiff.serve: N concurrent clients for a bounded time against a local server.

    python benchmarks/serve_load.py --clients 8 --seconds 30 --json out.json

Runs, one after another, each on loopback only:
  pipeline     no server: Pipeline.run_batch of --clients images, and the same images one call
               each (the ceiling the server's batching aims at, and the floor without it)
  solo         python -m fastdiff.serve with batching off (--max-batch-images 1)
  batched      python -m fastdiff.serve with batching on (--max-batch-images --clients)
  ray x1/x2    the same app on Ray Serve, 1 and 2 replicas sharing the machine's cores
Each client sends requests back to back (a new seed each) until --seconds pass or
--max-requests are answered; throughput counts images answered over the time from the first
request to the last answer; latency percentiles are over the answered requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 600) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/images", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


def wait_ready(port: int, limit_s: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no server ready on port {port} after {limit_s} s")


def load(port: int, clients: int, seconds: float, max_requests: int, request: dict) -> dict:
    """`clients` threads posting back to back; latencies of answered requests, status counts."""
    post(port, dict(request, seed=0))  # warm: the first call per shape pays one-time costs
    latencies, statuses, lock = [], {}, threading.Lock()
    seeds = iter(range(1, 10**9))
    t0 = time.monotonic()
    last = [t0]

    def client():
        while time.monotonic() - t0 < seconds:
            with lock:
                if len(latencies) >= max_requests:
                    return
                seed = next(seeds)
            start = time.monotonic()
            status = post(port, dict(request, seed=seed))
            end = time.monotonic()
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(end - start)
                    last[0] = max(last[0], end)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = last[0] - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"answered": len(latencies), "statuses": statuses, "seconds": elapsed, "mean_batch": mean_batch(port),
            "images_per_s": len(latencies) / elapsed, "p50_s": q[49], "p95_s": q[94], "p99_s": q[98]}  # fmt: skip


def mean_batch(port: int) -> float:
    """Images per denoising loop so far, from /metrics (with Ray: the replica that answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("fastdiff_batch_images_sum", "fastdiff_batch_images_count"))}  # fmt: skip
    return values["fastdiff_batch_images_sum"] / max(values["fastdiff_batch_images_count"], 1)


def run_server(args, batch_images: int) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "fastdiff.serve", "--port", str(port), "--backend", args.backend,
           "--max-batch-images", str(batch_images), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256"]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        return load(port, args.clients, args.seconds, args.max_requests, request_of(args))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_ray(args, replicas: int) -> dict:
    import ray
    from ray import serve

    from fastdiff.serve import ray_app
    from fastdiff.serve.app import Settings

    cores = os.cpu_count() or 1
    port = free_port()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(model=args.model, backend=args.backend, max_batch_images=args.clients,
                            max_wait_ms=args.ray_max_wait_ms, max_queue=256)  # fmt: skip
        app = ray_app.deployment(settings, num_replicas=replicas, ray_actor_options={"num_cpus": cores / replicas},
                                 max_ongoing_requests=2 * args.clients).bind()  # fmt: skip
        serve.run(app, name="fastdiff", route_prefix="/")
        wait_ready(port)
        return load(port, args.clients, args.seconds, args.max_requests, request_of(args))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_pipeline(args) -> dict:
    """The pipeline alone: --clients images as one run_batch, and one call each (medians of 3)."""
    from fastdiff.pipeline import Job, Pipeline

    pipe = Pipeline.from_pretrained(args.model, backend=args.backend)
    req = request_of(args)
    jobs = [Job(req["prompt"], None, seed, 7.5, 1) for seed in range(args.clients)]
    pipe.run_batch(jobs, steps=args.steps)  # warm
    batched, solo = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        pipe.run_batch(jobs, steps=args.steps)
        batched.append((time.perf_counter() - t0) / args.clients)
        t0 = time.perf_counter()
        for job in jobs:
            pipe.generate(job.prompt, seed=job.seed, steps=args.steps, output_type="np")
        solo.append((time.perf_counter() - t0) / args.clients)
    return {"batched_s_per_image": statistics.median(batched), "solo_s_per_image": statistics.median(solo),
            "batched_images_per_s": 1 / statistics.median(batched), "solo_images_per_s": 1 / statistics.median(solo)}  # fmt: skip


def request_of(args) -> dict:
    return {"prompt": "a red circle on a blue background", "steps": args.steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--backend", default="torch")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0, help="per configuration")
    p.add_argument("--max-requests", type=int, default=2000, help="per configuration")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="the uvicorn server's gather window")
    p.add_argument("--ray-max-wait-ms", type=float, default=50.0,
                   help="the Ray replicas' window (Ray's proxy hop spreads arrivals: fastdiff/serve/ray_serve.yaml)")
    p.add_argument("--runs", default="pipeline,solo,batched,ray1,ray2", help="which configurations, comma-separated")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from fastdiff import testing

    runs = args.runs.split(",")
    res = {"cpu": testing.cpu_name(), "cores": os.cpu_count(), "clients": args.clients, "seconds": args.seconds,
           "steps": args.steps, "model": args.model or "tiny-shapes", "backend": args.backend, "runs": {}}  # fmt: skip
    makers = {"pipeline": lambda: run_pipeline(args), "solo": lambda: run_server(args, 1),
              "batched": lambda: run_server(args, args.clients), "ray1": lambda: run_ray(args, 1),
              "ray2": lambda: run_ray(args, 2)}  # fmt: skip
    for name in runs:
        res["runs"][name] = makers[name]()
        print(f"{name}: {res['runs'][name]}", file=sys.stderr)
    print(f"CPU {res['cpu']}, {res['cores']} cores; {args.clients} clients, {args.steps} steps, {res['model']} ({args.backend})")
    print(f"{'run':10} {'images/s':>9} {'vs solo':>8} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'p95/p50':>8} {'batch':>6}  answered")
    base = res["runs"].get("solo", {}).get("images_per_s")
    if "pipeline" in res["runs"]:
        r = res["runs"]["pipeline"]
        for label, key in (("pipe solo", "solo_images_per_s"), ("pipe batch", "batched_images_per_s")):
            vs = f"{r[key] / base:7.2f}x" if base else ""
            print(f"{label:10} {r[key]:9.2f} {vs:>8}")
    for name, r in res["runs"].items():
        if name == "pipeline":
            continue
        vs = f"{r['images_per_s'] / base:7.2f}x" if base else ""
        print(f"{name:10} {r['images_per_s']:9.2f} {vs:>8} {r['p50_s']:7.3f} {r['p95_s']:7.3f} {r['p99_s']:7.3f} "
              f"{r['p95_s'] / r['p50_s']:8.2f} {r['mean_batch']:6.2f}  {r['answered']} {r['statuses']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
