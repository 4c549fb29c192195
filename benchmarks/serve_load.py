"""A bounded load test of `edge-run serve`: N clients post captions as fast as the server lets them.

    python benchmarks/serve_load.py BUNDLE [--clients 16 64] [--seconds 30] [--json out.json]
    python benchmarks/serve_load.py --tiny --workdir /tmp/serve-load     # makes a tiny BLIP bundle first
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 ...      # a server already running

It starts `edge-run serve BUNDLE` on a free loopback port (unless --url), then for each client count
runs that many concurrent clients for --seconds. A client that gets 503 waits the Retry-After the
server sends, as a well-behaved client does. It reports requests served, p50/p99 latency of the
served ones, 503 and 504 counts, every other error (there should be none), and the server's
resident memory before and after each run (there should be no growth).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LoadResult:
    clients: int
    seconds: float
    served: int = 0  # 200 answers
    busy_503: int = 0
    timeout_504: int = 0
    other_errors: dict = field(default_factory=dict)  # status or exception name -> count
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None

    @property
    def other_error_count(self) -> int:
        return sum(self.other_errors.values())


def sample_image(size: int = 96) -> bytes:
    """A JPEG of a smooth gradient with a square: cheap to make, not trivially compressible."""
    import cv2
    import numpy as np

    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=2).astype(np.uint8)
    image[size // 4:size // 2, size // 4:size // 2] = (200, 30, 30)
    return cv2.imencode(".jpg", image)[1].tobytes()


async def run_load(url: str, image: bytes, clients: int, seconds: float, *, token: str | None = None,
                   fields: dict | None = None, client_timeout: float = 60.0) -> LoadResult:
    """`clients` concurrent loops posting `image` to URL/v1/caption for `seconds`."""
    import httpx

    result, latencies, others = LoadResult(clients, seconds), [], Counter()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http):
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/caption", files={"image": ("load.jpg", image, "image/jpeg")},
                                           data=fields or {}, headers=headers)
            except httpx.HTTPError as exc:
                others[type(exc).__name__] += 1
                continue
            if response.status_code == 200:
                result.served += 1
                latencies.append((time.perf_counter() - start) * 1000)
            elif response.status_code == 503:
                result.busy_503 += 1
                wait = float(response.headers.get("retry-after", "1"))
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            elif response.status_code == 504:
                result.timeout_504 += 1
            else:
                others[str(response.status_code)] += 1

    async with httpx.AsyncClient(timeout=client_timeout, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    result.other_errors = dict(others)
    if latencies:
        latencies.sort()
        result.p50_ms = round(statistics.median(latencies), 1)
        result.p99_ms = round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
    return result


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "edgerun.cli", "serve", bundle, "--port", str(port), *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, server: subprocess.Popen | None, within: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not answer within {within:.0f} s")


def tiny_bundle(workdir: Path) -> str:
    from edgerun.export.pipeline import export
    from edgerun.models.tiny import save_blip_caption

    bundle = workdir / "tiny-blip-caption"
    if not (bundle / "manifest.json").exists():
        checkpoint = save_blip_caption(workdir / "tiny-blip", init_std=0.5, stop_bias=2.5, seed=3)
        export(f"hf:{checkpoint}", task="caption", output=bundle)
    return str(bundle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", help="caption bundle to serve")
    parser.add_argument("--url", help="load a server already running here instead (memory is not measured)")
    parser.add_argument("--tiny", action="store_true", help="make and serve the tiny BLIP test bundle")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgerun-serve-load"))
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--server-args", default="--workers 2 --queue 8 --timeout 10 --threads 1",
                        help="options passed to edge-run serve")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    if sum(x is not None for x in (args.bundle, args.url)) + args.tiny != 1:
        parser.error("give one of BUNDLE, --tiny or --url")
    server, url = None, args.url
    if url is None:
        bundle = tiny_bundle(args.workdir) if args.tiny else args.bundle
        port = free_port()
        server, url = start_server(bundle, port, args.server_args.split()), f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        image = sample_image()
        asyncio.run(run_load(url, image, 2, 2.0))  # warm-up: sessions, allocator pools
        results = []
        for clients in args.clients:
            before = rss_mb(server.pid) if server else None
            result = asyncio.run(run_load(url, image, clients, args.seconds))
            result.rss_before_mb, result.rss_after_mb = before, (rss_mb(server.pid) if server else None)
            results.append(result)
            print(_line(result), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    if args.json:
        args.json.write_text(json.dumps({"url": url, "server_args": args.server_args, "cpus": os.cpu_count(),
                                         "runs": [asdict(r) for r in results]}, indent=2) + "\n")


def _line(r: LoadResult) -> str:
    memory = (f", RSS {r.rss_before_mb:.0f} -> {r.rss_after_mb:.0f} MB" if r.rss_before_mb is not None else "")
    return (f"{r.clients:3d} clients, {r.seconds:.0f} s: {r.served} served ({r.served / r.seconds:.1f}/s), "
            f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, 503: {r.busy_503}, 504: {r.timeout_504}, "
            f"other errors: {r.other_error_count} {r.other_errors or ''}{memory}")


if __name__ == "__main__":
    main()
