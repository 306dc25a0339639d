"""Several endpoints: instraug against a bare openai-client loop, both over the same local servers.

    python benchmarks/scale.py [--requests 10000] [--endpoints 4] [--concurrency 16] [--delay-ms 500]

A server process listens on `--endpoints` ports of 127.0.0.1; each answers a chat completion after
`--delay-ms` (and /v1/models at once). With `--concurrency` requests in flight per endpoint the
ideal rate is endpoints x concurrency / delay (4 x 16 / 0.5 s = 128 requests/s). Reported, for
instraug (llm.base_url listing the endpoints, llm.max_concurrency per endpoint, cache on as in real
runs) and for a bare asyncio loop over one openai client per endpoint (round-robin, a semaphore of
`--concurrency` each, `chat.completions.create`): the rate as a fraction of the ideal, instraug's
rate over the bare loop's, requests per endpoint, and the client process's CPU seconds per 1,000
requests (time.process_time, every thread of the process). Goal: instraug >= 0.85 of the ideal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from throughput import _BODY  # the same answer as the single-endpoint benchmark

from instraug.config import LLMConfig
from instraug.llm import ChatRequest, open_llm

_MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model"}]}).encode()


def _response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _serve(port_file: Path, endpoints: int, delay: float) -> None:
    """HTTP/1.1 keep-alive on `endpoints` ports: POST answers after `delay`, GET (/models) at once."""
    chat, models = _response(_BODY), _response(_MODELS)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length = next((int(x[15:]) for x in lines if x[:15].lower() == b"content-length:"), 0)
                if length:
                    await reader.readexactly(length)
                if lines[0].startswith(b"GET "):
                    writer.write(models)
                    continue
                await asyncio.sleep(delay)
                writer.write(chat)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024) for _ in range(endpoints)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(" ".join(map(str, ports)))
    tmp.rename(port_file)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def start_servers(folder: Path, endpoints: int, delay: float) -> tuple[subprocess.Popen[bytes], list[str]]:
    """The servers in a process of their own, so they do not share the client's interpreter."""
    port_file = folder / "ports"
    command = [sys.executable, __file__, "--serve", str(port_file)]
    command += ["--endpoints", str(endpoints), "--delay-ms", str(delay * 1000)]
    process = subprocess.Popen(command)
    while not port_file.exists():
        if process.poll() is not None:
            raise SystemExit("the benchmark servers did not start")
        time.sleep(0.02)
    return process, [f"http://127.0.0.1:{port}/v1" for port in port_file.read_text().split()]


def requests(count: int, prefix: str) -> list[ChatRequest]:
    return [
        ChatRequest(
            messages=(("system", "Rephrase the instruction."), ("user", f"{prefix} instruction number {i}")),
            temperature=0.7,
            top_p=1.0,
            max_tokens=64,
            tag=i,
        )
        for i in range(count)
    ]


def run_instraug(urls: list[str], concurrency: int, batch: list[ChatRequest], cache: Path) -> dict[str, Any]:
    """Wall and CPU seconds to answer the batch through open_llm, and the session's stats."""
    config = LLMConfig(
        backend="openai",
        base_url=urls,
        model="bench",
        api_key_env="INSTRAUG_BENCH_NO_KEY",
        max_concurrency=concurrency,
    )
    with open_llm(config, cache_path=cache, quiet=True) as llm:
        wall, cpu = time.perf_counter(), time.process_time()
        answered = sum(1 for c in llm.run(batch) if c.error is None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = llm.stats.as_dict()
    assert answered == len(batch), f"only {answered} of {len(batch)} answered"
    return {"wall": wall, "cpu": cpu, "per_endpoint": [c["requests"] for c in stats["endpoints"].values()]}


def run_bare(urls: list[str], concurrency: int, batch: list[ChatRequest]) -> dict[str, Any]:
    """The same requests through one openai client per endpoint, round-robin, `concurrency` each."""
    import openai

    async def main() -> dict[str, Any]:
        clients = [openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0) for url in urls]
        gates = [asyncio.Semaphore(concurrency) for _ in urls]
        counts = [0] * len(urls)

        async def one(i: int, request: ChatRequest) -> None:
            e = i % len(urls)
            async with gates[e]:
                await clients[e].chat.completions.create(
                    model="bench",
                    messages=[{"role": r, "content": c} for r, c in request.messages],  # type: ignore[misc]
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=request.max_tokens,
                    seed=0,
                )
                counts[e] += 1

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(i, r) for i, r in enumerate(batch)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        for client in clients:
            await client.close()
        return {"wall": wall, "cpu": cpu, "per_endpoint": counts}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per endpoint")
    parser.add_argument("--delay-ms", type=float, default=500.0, help="each answer's delay")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    if args.serve:
        asyncio.run(_serve(args.serve, args.endpoints, delay))
        return
    os.environ.pop("OPENAI_BASE_URL", None)
    ideal = args.endpoints * args.concurrency / delay
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="instraug-scale-") as tmp:
        folder = Path(tmp)
        server, urls = start_servers(folder, args.endpoints, delay)
        try:
            warm = requests(4 * args.endpoints * args.concurrency, "warm-up")
            run_instraug(urls, args.concurrency, warm, folder / "warm.sqlite")
            run_bare(urls, args.concurrency, warm)
            results["bare openai loop"] = run_bare(urls, args.concurrency, requests(args.requests, "bare"))
            batch = requests(args.requests, "instraug")
            results["instraug"] = run_instraug(urls, args.concurrency, batch, folder / "run.sqlite")
        finally:
            server.kill()
            server.wait()
    print(
        f"{args.requests} requests, {args.endpoints} endpoints answering after {args.delay_ms:g} ms, "
        f"concurrency {args.concurrency} per endpoint: ideal {ideal:g} requests/s"
    )
    rows = [("client", "seconds", "requests/s", "of ideal", "CPU s / 1,000 req", "per endpoint")]
    for name, r in results.items():
        rate = args.requests / r["wall"]
        rows.append(
            (
                name,
                f"{r['wall']:.1f}",
                f"{rate:.1f}",
                f"{rate / ideal:.3f}",
                f"{r['cpu'] / args.requests * 1000:.2f}",
                " ".join(map(str, r["per_endpoint"])),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    ours, bare = results["instraug"]["wall"], results["bare openai loop"]["wall"]
    print(f"instraug / bare loop rate: {bare / ours:.3f}   (goal: instraug >= 0.85 of the ideal)")


if __name__ == "__main__":
    main()
