"""Throughput of the LLM layer against a local OpenAI-compatible server that answers after a fixed delay.

    python benchmarks/throughput.py [--embedded]

(a) 500 ms answers, concurrency 64: achieved / ideal requests per second (goal >= 0.85)
(b) 5 ms answers, concurrency 64: instraug / a bare asyncio loop over the same openai client (goal >= 0.8)
(c) a fully cached re-run: requests per second (goal >= 20,000)
(d) `instraug --help` start-up time (goal <= 0.25 s)
--embedded also measures the embedded llama.cpp model on short rephrase requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from instraug.config import LLMConfig
from instraug.llm import ChatRequest, open_llm

CONCURRENCY = 64
_BODY = json.dumps(
    {
        "id": "bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Describe what the picture shows."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36},
    }
).encode()
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_BODY)).encode()
    + b"\r\n\r\n"
    + _BODY
)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive: wait the delay named in the path (/d<ms>/v1/...), answer a fixed body."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1]
            length = next((int(x[15:]) for x in lines if x[:15].lower() == b"content-length:"), 0)
            if length:
                await reader.readexactly(length)
            delay_ms = int(path.split(b"/")[1][1:]) if path.startswith(b"/d") else 0
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            writer.write(_RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
        pass
    finally:
        writer.close()


async def _serve(port_file: Path) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    port_file.write_text(str(port))
    async with server:
        await server.serve_forever()


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The fixed-delay server in its own process, so it does not share the client's interpreter."""
    port_file = folder / "port"
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    while not port_file.exists() or not port_file.read_text():
        if process.poll() is not None:
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.02)
    return process, int(port_file.read_text())


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


def run_instraug(base_url: str, batch: list[ChatRequest], cache: Path) -> tuple[float, dict[str, Any]]:
    """Seconds to answer the batch through open_llm (cache on, as in real runs), and the run's stats."""
    config = LLMConfig(
        backend="openai",
        base_url=base_url,
        model="bench",
        api_key_env="INSTRAUG_BENCH_NO_KEY",
        max_concurrency=CONCURRENCY,
    )
    with open_llm(config, cache_path=cache, quiet=True) as llm:
        start = time.perf_counter()
        answered = sum(1 for c in llm.run(batch) if c.error is None)
        seconds = time.perf_counter() - start
        stats = llm.stats.as_dict()
    assert answered == len(batch), f"only {answered} of {len(batch)} answered"
    return seconds, stats


def run_bare(base_url: str, batch: list[ChatRequest]) -> float:
    """Seconds for the same requests through a plain asyncio loop over the same openai client."""
    import openai

    async def main() -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(request: ChatRequest) -> None:
            async with gate:
                await client.chat.completions.create(
                    model="bench",
                    messages=[{"role": r, "content": c} for r, c in request.messages],  # type: ignore[misc]
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=request.max_tokens,
                    seed=0,
                )

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in batch))
        seconds = time.perf_counter() - start
        await client.close()
        return seconds

    return asyncio.run(main())


def help_startup(repeats: int = 7) -> float:
    """Median wall time of `instraug --help`."""
    exe = Path(sys.executable).with_name("instraug")
    command = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "instraug", "--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def embedded_rate(count: int = 20) -> tuple[float, float, dict[str, Any]]:
    """(start-up seconds, requests per second) of the embedded model on short rephrase requests."""
    batch = [
        ChatRequest(
            messages=(
                ("system", "You rewrite task instructions without changing their meaning."),
                ("user", f"Rephrase: 'Answer the question about the image in a few words.' (variant {i})"),
            ),
            temperature=0.7,
            top_p=0.95,
            max_tokens=64,
        )
        for i in range(count)
    ]
    start = time.perf_counter()
    with open_llm(LLMConfig(backend="local"), cache_path=None, quiet=True) as llm:
        ready = time.perf_counter()
        list(llm.run(batch))
        done = time.perf_counter()
        stats = llm.stats.as_dict()
    return ready - start, count / (done - ready), stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests in (a) and (c)")
    parser.add_argument("--fast-requests", type=int, default=3000, help="requests in (b)")
    parser.add_argument("--embedded", action="store_true", help="also measure the embedded model")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    os.environ.pop("OPENAI_BASE_URL", None)
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="instraug-bench-") as tmp:
        folder = Path(tmp)
        server, port = start_server(folder)
        try:
            slow, fast = f"http://127.0.0.1:{port}/d500/v1", f"http://127.0.0.1:{port}/d5/v1"
            run_instraug(fast, requests(200, "warm-up"), folder / "warm.sqlite")
            run_bare(fast, requests(200, "warm-up"))

            batch = requests(args.requests, "slow")
            seconds, _ = run_instraug(slow, batch, folder / "a.sqlite")
            ideal = CONCURRENCY / 0.5
            achieved = len(batch) / seconds
            rows.append(
                (
                    f"(a) 500 ms, concurrency {CONCURRENCY}, {len(batch)} requests",
                    f"{achieved:.1f} req/s of ideal {ideal:.0f}",
                    f"{achieved / ideal:.3f}",
                    ">= 0.85",
                )
            )

            fast_batch = requests(args.fast_requests, "fast")
            ours = min(run_instraug(fast, fast_batch, folder / f"b{i}.sqlite")[0] for i in range(2))
            bare = min(run_bare(fast, fast_batch) for _ in range(2))
            rows.append(
                (
                    f"(b) 5 ms, concurrency {CONCURRENCY}, {len(fast_batch)} requests",
                    f"instraug {len(fast_batch) / ours:.0f} req/s, "
                    f"bare loop {len(fast_batch) / bare:.0f} req/s",
                    f"{bare / ours:.3f}",
                    ">= 0.8",
                )
            )

            cached = [run_instraug(slow, batch, folder / "a.sqlite") for _ in range(3)]
            best = min(seconds for seconds, _ in cached)
            assert all(stats["requests_sent"] == 0 for _, stats in cached)
            rows.append(
                (
                    f"(c) cached re-run, {len(batch)} requests",
                    f"{len(batch) / best:,.0f} req/s, 0 sent",
                    f"{len(batch) / best:,.0f}",
                    ">= 20,000",
                )
            )
        finally:
            server.kill()
            server.wait()
    startup = help_startup()
    rows.append(("(d) instraug --help", f"median of 7: {startup:.3f} s", f"{startup:.3f}", "<= 0.25"))
    if args.embedded:
        ready, rate, stats = embedded_rate()
        tokens = f"{stats['completion_tokens']} tokens out"
        rows.append(
            (
                "(e) embedded SmolLM2-135M, 20 x max_tokens 64",
                f"start-up {ready:.1f} s, {tokens}",
                f"{rate:.2f} req/s",
                "measured",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in [("case", "measured", "figure", "goal"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
