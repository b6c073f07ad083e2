"""Async HTTP clients alone against a keep-alive endpoint answering after 20 ms: which to use.

The measurement behind the ``http:`` handler's client (README, Dependencies). Each client
POSTs a chunk-sized JSON body with the handler's headers (``Content-Type``,
``Idempotency-Key``, ``Authorization``) and reads the answer, from ``--concurrency`` tasks
sharing one client whose pool is sized for them (no per-host cap below the concurrency), to
bench/http_endpoint.py in its own process. Per client and concurrency: one warm-up round
(``concurrency`` requests: the connections are opened), then ``max(--requests,
10 x concurrency)`` timed requests; ``--reps`` runs, the median reported. Ideal: concurrency /
20 ms (500/s at 10, 5,000/s at 100, 25,000/s at 500), which a Python endpoint on a 2-core
machine cannot reach at 500: the rows compare clients under the same endpoint.

The candidates are installed from PyPI into their own venv (bench/http_clients.txt, by
default /tmp/chunkd-bench-http-venv), never into the project's:

    python bench/http_clients.py                      # about 3 minutes on 2 cores
    python bench/http_clients.py --concurrency 100 --reps 1 --clients aiohttp httpx

Prints a table, then one JSON line (also written to bench/results/http_clients.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import http_endpoint

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
VENV = Path(os.environ.get("CHUNKD_BENCH_HTTP_VENV", "/tmp/chunkd-bench-http-venv"))
BODY = json.dumps(
    {
        "id": str(uuid.uuid4()),
        "job_id": str(uuid.uuid4()),
        "kind": "sync",
        "seq": 7,
        "attempt": 1,
        "payload": {"mailbox": "someone@example.com", "page": 12, "cursor": "x" * 40},
        "job_payload": {"tenant": "t-123"},
    }
).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer not-a-real-token"}

Post = Callable[[str], Awaitable[int]]  # idempotency key -> status, body read
Opened = tuple[Post, Callable[[], Awaitable[None]]]  # (post, close)


async def open_httpx(url: str, n: int, keepalive: int | None = 20) -> Opened:
    """httpx as the handler used it until now (keep-alive pool of 20), or with ``keepalive``."""
    import httpx

    client = httpx.AsyncClient(
        headers=HEADERS,
        timeout=httpx.Timeout(300.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive),
    )

    async def post(key: str) -> int:
        response = await client.post(url, content=BODY, headers={"Idempotency-Key": key})
        return response.status_code

    return post, client.aclose


async def open_aiohttp(url: str, n: int) -> Opened:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=n, limit_per_host=0),
        headers=HEADERS,
        timeout=aiohttp.ClientTimeout(total=300.0),
    )

    async def post(key: str) -> int:
        async with session.post(url, data=BODY, headers={"Idempotency-Key": key}) as response:
            await response.read()
            return response.status

    return post, session.close


async def open_httpx_aiohttp(url: str, n: int) -> Opened:
    """httpx's API over aiohttp's connection pool (the httpx-aiohttp package)."""
    import httpx
    from httpx_aiohttp import AiohttpTransport

    client = httpx.AsyncClient(
        headers=HEADERS,
        timeout=httpx.Timeout(300.0),
        transport=AiohttpTransport(limits=httpx.Limits(max_connections=n)),
    )

    async def post(key: str) -> int:
        response = await client.post(url, content=BODY, headers={"Idempotency-Key": key})
        return response.status_code

    return post, client.aclose


async def open_aiosonic(url: str, n: int) -> Opened:
    import aiosonic
    from aiosonic.connectors import TCPConnector
    from aiosonic.pools import PoolConfig

    client = aiosonic.HTTPClient(
        connector=TCPConnector(pool_configs={":default": PoolConfig(size=n)})
    )

    async def post(key: str) -> int:
        response = await client.post(url, data=BODY, headers={**HEADERS, "Idempotency-Key": key})
        await response.content()
        return response.status_code

    async def close() -> None:
        await client.connector.cleanup()

    return post, close


async def open_niquests(url: str, n: int) -> Opened:
    import niquests

    session = niquests.AsyncSession(pool_connections=1, pool_maxsize=n)
    session.headers.update(HEADERS)

    async def post(key: str) -> int:
        response = await session.post(url, data=BODY, headers={"Idempotency-Key": key})
        return int(response.status_code or 0)

    return post, session.close


async def open_pyreqwest(url: str, n: int) -> Opened:
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().max_connections(n).default_headers(HEADERS).build()

    async def post(key: str) -> int:
        request = client.post(url).header("Idempotency-Key", key).body_bytes(BODY).build()
        response = await request.send()
        await response.bytes()
        return response.status

    return post, client.close


CLIENTS: dict[str, tuple[str, Callable[[str, int], Awaitable[Opened]]]] = {
    "httpx": ("httpx", open_httpx),
    "httpx-keepalive-all": ("httpx", lambda url, n: open_httpx(url, n, keepalive=None)),
    "aiohttp": ("aiohttp", open_aiohttp),
    "httpx-aiohttp": ("httpx-aiohttp", open_httpx_aiohttp),
    "aiosonic": ("aiosonic", open_aiosonic),
    "niquests": ("niquests", open_niquests),
    "pyreqwest": ("pyreqwest", open_pyreqwest),
}
NOTES = {
    "httpx": "max_keepalive_connections=20 (the handler until now)",
    "httpx-keepalive-all": "max_keepalive_connections=None",
}


async def measure(name: str, url: str, concurrency: int, requests: int) -> float:
    """Requests per second of one client at one concurrency (after a warm-up round)."""
    post, close = await CLIENTS[name][1](url, concurrency)
    try:
        for status in await asyncio.gather(*(post(f"w{i}") for i in range(concurrency))):
            if status != 200:
                raise RuntimeError(f"HTTP {status} in the warm-up")
        left = requests

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                status = await post(f"k{left}")
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)
    finally:
        await close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    endpoint, url = http_endpoint.start(args.delay_ms)
    table: dict[str, dict[str, Any]] = {}
    try:
        for name in args.clients:
            table[name] = {"version": version(CLIENTS[name][0]), "note": NOTES.get(name, "")}
            for concurrency in args.concurrency:
                count = max(args.requests, 10 * concurrency)
                runs = []
                for _ in range(args.reps):
                    try:
                        runs.append(round(await measure(name, url, concurrency, count), 1))
                    except Exception as exc:  # a client that breaks is a result too
                        runs.append(f"error: {type(exc).__name__}: {exc}"[:120])
                numbers = [r for r in runs if isinstance(r, float)]
                median = round(statistics.median(numbers), 1) if numbers else None
                table[name][str(concurrency)] = {"requests": count, "runs": runs, "median": median}
                print(f"  {name:<20} c={concurrency:<4} {runs}", file=sys.stderr, flush=True)
    finally:
        endpoint.terminate()
        endpoint.wait(10)
    return {
        "settings": {
            "delay_ms": args.delay_ms,
            "reps": args.reps,
            "body_bytes": len(BODY),
            "event_loop": "uvloop",
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "clients": table,
    }


def print_table(report: dict[str, Any], concurrencies: list[int], delay_ms: float) -> None:
    heads = [f"c={c} (ideal {c / delay_ms * 1000:,.0f})" for c in concurrencies]
    print(f"\nrequests/s, median of {report['settings']['reps']}, endpoint answering after "
          f"{delay_ms:g} ms\n")  # fmt: skip
    print(f"{'client':<32}" + "".join(f"{h:>24}" for h in heads))
    for name, row in report["clients"].items():
        cells = []
        for c in concurrencies:
            median = row[str(c)]["median"]
            cells.append(f"{median:>24,.0f}" if median is not None else f"{'error':>24}")
        print(f"{name + ' ' + row['version']:<32}" + "".join(cells))
    for name, row in report["clients"].items():
        if row["note"]:
            print(f"  {name}: {row['note']}")


def ensure_venv() -> None:
    """Re-run this script inside the candidates' venv (created and filled on first use)."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix) == VENV:
        return
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    requirements = str(BENCH / "http_clients.txt")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", requirements], check=True)
    os.execv(str(python), [str(python), *sys.argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", choices=list(CLIENTS), default=list(CLIENTS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[10, 100, 500])
    parser.add_argument("--requests", type=int, default=1000, help="at least 10 x concurrency")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    ensure_venv()
    import uvloop

    report = uvloop.run(run(args))
    print_table(report, args.concurrency, args.delay_ms)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_clients.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
