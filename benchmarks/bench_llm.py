"""LLM backend throughput: cachelora.llm_generation.generate_with_llm against a server with a fixed delay.

An OpenAI-compatible chat-completions server runs in its own process (an asyncio loop, a task per
HTTP/1.1 keep-alive connection, as a real local server would) and answers every request after
``--delay`` seconds with five valid candidates. With ``--concurrency`` requests in flight the ideal rate is
concurrency / delay; the backend (SDK, thread pool, cache writes, filters) must reach at least 0.9
of it. A last run, every reply cached, times the cache reads.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
from _common import at_repo_root, cpu_info, finish, median

TARGET = 0.9  # requests/s must reach this share of concurrency / delay
# The headline delay. A reply of five paraphrases as JSON is ~150 tokens; a vLLM server decoding 64
# streams at once gives each some tens of tokens/s, so a real reply takes seconds: 1 s is on the fast
# side of that. Shorter delays (the sweep) test the client itself, which on 2 cores is CPU-bound first.
DELAY = 1.0
TIMING = (
    "requests_per_s = requests the server answered / wall time of one generate_with_llm call on an empty "
    "cache (whole call: prompts, originals, thread pool, SDK, cache writes, filters and records); ideal = "
    "concurrency / delay; ratio = requests_per_s / ideal. cached_requests_per_s: the same call again, "
    "every reply read from the cache. The server runs in another process (its CPU time is server_cpu_s); "
    "process_cpu_s is the backend's alone. Both share the machine's cores."
)

REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "CONTENT"}, "finish_reason": "stop"}],
    }
).replace('"CONTENT"', "CONTENT")


class Server:
    """The fake server in its own process (an asyncio loop, one task per keep-alive connection).

    ``answered`` counts the replies sent, ``peak_in_flight`` the most requests held at once, ``cpu_s``
    the server process's CPU time; ``delay`` may be changed between runs.
    """

    def __init__(self, delay: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._delay = ctx.Value("d", delay, lock=False)
        self._counts = ctx.Array("q", 3, lock=False)  # answered, in flight, peak in flight
        ready = ctx.Queue()
        self.process = ctx.Process(target=serve, args=(self._delay, self._counts, ready), daemon=True)
        self.process.start()
        self.port = ready.get(timeout=60)
        self._psutil = psutil.Process(self.process.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    delay = property(lambda self: self._delay.value, lambda self, value: setattr(self._delay, "value", value))
    answered = property(lambda self: self._counts[0])
    peak_in_flight = property(lambda self: self._counts[2], lambda self, value: self._counts.__setitem__(2, value))

    @property
    def cpu_s(self) -> float:
        times = self._psutil.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


def serve(delay: Any, counts: Any, ready: Any) -> None:
    """The server process: a minimal HTTP/1.1 keep-alive chat-completions endpoint on loopback.

    POST /v1/chat/completions is answered after ``delay.value`` seconds, anything else with 404.
    Headers are parsed by hand and go out with the body in one write (TCP_NODELAY is asyncio's
    default): ~0.2 ms of CPU per request, measured alone with a trivial asyncio client.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if request_line.split()[:2] != [b"POST", b"/v1/chat/completions"]:
                    writer.write(response(404, b'{"error": {"message": "not found"}}'))
                    continue
                counts[1] += 1
                counts[2] = max(counts[2], counts[1])
                await asyncio.sleep(delay.value)
                tag = hashlib.sha256(body).hexdigest()[:12]  # five distinct candidates per request
                if b"negatives" in body:  # the negative prompt asks for {"negatives": [...]}
                    template = "Another question ({k}) on the topic of {tag}: what else might they ask?"
                else:
                    template = "Paraphrase {k} of request {tag}, the way someone else would word it"
                items = [template.format(k=k, tag=tag) for k in range(5)]
                writer.write(response(200, REPLY.replace("CONTENT", json.dumps(json.dumps({"items": items}))).encode()))
                counts[1] -= 1
                counts[0] += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def response(status: int, data: bytes) -> bytes:
    head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data


def run(params: Any, lexicon: Any, server: Server) -> dict[str, Any]:
    """One generate_with_llm call: its wall and CPU time, the requests the server answered, the rows."""
    from cachelora.llm_generation import generate_with_llm

    answered, server.peak_in_flight, server_cpu = server.answered, 0, server.cpu_s
    start, cpu = time.perf_counter(), time.process_time()
    rows = generate_with_llm(params, lexicon)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    sent, server_cpu = server.answered - answered, server.cpu_s - server_cpu
    per_request = (lambda s: 1000 * s / sent) if sent else (lambda s: None)
    return {"wall_s": wall, "process_cpu_s": cpu, "server_cpu_s": server_cpu, "requests_sent": sent,
            "requests_per_s": sent / wall, "client_cpu_ms_per_request": per_request(cpu),
            "server_cpu_ms_per_request": per_request(server_cpu),
            "peak_in_flight_at_server": server.peak_in_flight, "rows": rows}  # fmt: skip


def measure(server: Server, requests: int, concurrency: int, send: Any) -> dict[str, Any]:
    """``send(requests, concurrency)``, timed: its rate, its ratio to the ideal, client and server CPU per request."""
    answered, server_cpu = server.answered, server.cpu_s
    start, cpu = time.perf_counter(), time.process_time()
    send(requests, concurrency)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    sent, server_cpu = server.answered - answered, server.cpu_s - server_cpu
    return {"requests_sent": sent, "wall_s": wall, "requests_per_s": sent / wall,
            "ratio": sent / wall / (concurrency / server.delay), "client_cpu_ms_per_request": 1000 * cpu / sent,
            "server_cpu_ms_per_request": 1000 * server_cpu / sent}  # fmt: skip


def references(server: Server, requests: int, concurrency: int) -> dict[str, Any]:
    """What the server alone and the SDK alone reach (not the backend: no cache, filters or records).

    ``server_alone``: a trivial asyncio client, raw HTTP on ``concurrency`` keep-alive connections.
    ``sdk_alone``: ``concurrency`` threads, each with its own ``openai.OpenAI`` client, calling
    ``client.post`` as the backend does and parsing the JSON body, nothing else.
    """
    import httpx2
    import openai

    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "x" * 400}]}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n"

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(count):
            writer.write(head.encode() + body)
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()

    async def raw(count: int, width: int) -> None:
        await asyncio.gather(*(connection(count // width) for _ in range(width)))

    local = threading.local()
    tls = httpx2.create_ssl_context()

    def post(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0,
                                                  http_client=openai.DefaultHttpxClient(verify=tls))  # fmt: skip
        client.post("/chat/completions", cast_to=httpx2.Response, body={"n": i, "messages": ["x" * 400]}).json()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, range(concurrency)))  # the clients built and connected, untimed
        sdk = measure(server, requests, concurrency, lambda n, width: list(pool.map(post, range(n))))
    return {"server_alone": measure(server, requests, concurrency, lambda n, width: asyncio.run(raw(n, width))),
            "sdk_alone": sdk}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, help="requests to send, two per original (default 640)")
    parser.add_argument("--concurrency", type=int, help="generate.openai.concurrency (default 64)")
    parser.add_argument("--delay", type=float, help="server delay per request, seconds (default 1.0)")
    parser.add_argument("--rounds", type=int, help="runs on an empty cache (default 3; the median is the headline)")
    parser.add_argument("--slow-delay", type=float, help="one more run at this delay (default none)")
    parser.add_argument("--sweep", help="one run at each of these delays, comma-separated (default 0.2,0.3,0.5)")
    parser.add_argument("--domain", default="medical", help="lexicon the originals come from")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="64 requests, concurrency 16, 1 round (a smoke test)")
    opts = parser.parse_args()
    at_repo_root()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # a line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import openai

    from cachelora.lexicon import load_lexicon
    from cachelora.params import Params, load_params

    requests = opts.requests or (64 if opts.quick else 640)
    concurrency = opts.concurrency or (16 if opts.quick else 64)
    delay = opts.delay if opts.delay is not None else DELAY
    rounds = opts.rounds or (1 if opts.quick else 3)
    slow_delay = opts.slow_delay or 0.0
    sweep_text = opts.sweep if opts.sweep is not None else ("" if opts.quick else "0.2,0.3,0.5")
    sweep_delays = [float(d) for d in sweep_text.split(",") if d.strip()]
    lexicon = load_lexicon(opts.domain)
    server = Server(delay)
    raw = load_params().model_dump(by_alias=True)
    raw["generate"].update(backend="openai", queries_file=None)
    settings = {"base_url": server.url, "model": "bench-model", "concurrency": concurrency, "retries": 0,
                "queries_per_domain": requests // 2}  # fmt: skip
    runs, slow, sweep = [], None, []

    def one_run(at: float, cache_dir: str) -> dict[str, Any]:  # one run at another delay, on an empty cache
        server.delay = at
        raw["generate"]["openai"].update(cache_dir=cache_dir)
        result = run(Params.model_validate(raw), lexicon, server)
        result.pop("rows")
        result.update(delay_s=at, ratio=result["requests_per_s"] / (concurrency / at))
        return result

    try:
        with tempfile.TemporaryDirectory(prefix="bench_llm.") as tmp:
            for r in range(rounds):  # each on an empty cache
                raw["generate"]["openai"].update(settings, cache_dir=f"{tmp}/cache{r}")
                runs.append(run(Params.model_validate(raw), lexicon, server))
            cached = run(Params.model_validate(raw), lexicon, server)  # the last round's cache, full
            reference = references(server, requests, concurrency) if not opts.quick else None
            sweep = [one_run(at, f"{tmp}/cache_sweep{i}") for i, at in enumerate(sweep_delays)]
            if slow_delay:  # the same at a slower, more LLM-like latency
                slow = one_run(slow_delay, f"{tmp}/cache_slow")
    finally:
        server.close()
    rows = runs[0].pop("rows")
    if any(r.pop("rows") != rows for r in runs[1:]) or cached.pop("rows") != rows or cached["requests_sent"]:
        raise SystemExit("the runs gave different rows, or the cached run sent requests")
    ideal = concurrency / delay
    rate = median([r["requests_per_s"] for r in runs])
    ratio = rate / ideal
    cached_rate = requests / cached["wall_s"]
    # Where the time goes (median round). Little's law: rate = concurrency / (delay + added), so the
    # target allows concurrency / (TARGET * ideal) - delay of added latency per request. The client's
    # Python work holds one GIL (one core at most); the share of a core it needs at the target rate
    # says how close to saturating it, and queueing behind it, the target would run.
    middle = sorted(runs, key=lambda r: r["requests_per_s"])[len(runs) // 2]
    client_ms, server_ms = middle["client_cpu_ms_per_request"], middle["server_cpu_ms_per_request"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    added_ms = 1000 * (concurrency / rate - delay)
    budget_ms = 1000 * (concurrency / (TARGET * ideal) - delay)
    client_core_at_target = TARGET * ideal * client_ms / 1000
    extra = [*sweep, *([slow] if slow else [])]
    reaching = sorted(r["delay_s"] for r in extra if r["ratio"] >= TARGET)
    info = {
        "requests": requests, "originals": requests // 2, "triplets": len(rows), "concurrency": concurrency,
        "delay_s": delay, "requests_per_s": rate, "ideal_requests_per_s": ideal, "ratio": ratio,
        "target_ratio": TARGET, "meets_target": ratio >= TARGET, "runs": runs, "cached_run": cached,
        "cached_requests_per_s": cached_rate, "slow_run": slow, "sweep_runs": sweep, "rounds": rounds,
        "references": reference,
        "client_cpu_ms_per_request": client_ms, "server_cpu_ms_per_request": server_ms, "cores": cores,
        "added_latency_ms": added_ms, "added_latency_budget_ms": budget_ms,
        "client_core_share_at_target": client_core_at_target,
        "lowest_delay_meeting_target_s": reaching[0] if reaching else None,
        "timing": TIMING, "domain": opts.domain, "quick": opts.quick, "openai": openai.__version__,
        "cpu": cpu_info(),
    }  # fmt: skip
    finish("llm", opts.out, info, [
        ("requests/s (empty cache, median)", f"{rate:.1f}"),
        (f"ratio to ideal concurrency/delay (target ≥ {TARGET})", f"{ratio:.3f}"),
        ("cached requests/s", f"{cached_rate:.0f}"),
        *[(f"reference: {name.replace('_', ' ')}", f"{r['requests_per_s']:.0f} requests/s ({r['ratio']:.3f}), "
           f"client / server CPU {r['client_cpu_ms_per_request']:.2f} / {r['server_cpu_ms_per_request']:.2f} ms")
          for name, r in (reference or {}).items()],
        ("client / server CPU per request (median round)", f"{client_ms:.2f} / {server_ms:.2f} ms"),
        ("added latency per request (target: ≤)", f"{added_ms:.0f} ms ({budget_ms:.0f} ms)"),
        ("one core's share the client needs at the target rate", f"{client_core_at_target:.2f}"),
        *[(f"ratio at delay {r['delay_s']:g} s (one run)", f"{r['ratio']:.3f}") for r in extra],
        ("setup", f"{requests} requests, concurrency {concurrency}, delay {delay:g} s, "
                  f"peak {max(r['peak_in_flight_at_server'] for r in runs)} in flight at the server"),
    ])  # fmt: skip
    if ratio < TARGET:
        print(f"  below target: {ratio:.3f} < {TARGET}")


if __name__ == "__main__":
    main()
