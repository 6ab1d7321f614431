"""LLM backend throughput: cachelora.llm_generation.generate_with_llm against a server with a fixed delay.

An OpenAI-compatible chat-completions server runs in this process (socketserver.ThreadingTCPServer,
a thread per HTTP/1.1 keep-alive connection) and answers every request after ``--delay`` seconds
with five valid candidates. With ``--concurrency`` requests in flight the ideal rate is
concurrency / delay; the backend (SDK, thread pool, cache writes, filters) must reach at least 0.9
of it. A last run, every reply cached, times the cache reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import socketserver
import tempfile
import threading
import time
from typing import Any

from _common import at_repo_root, cpu_info, finish, median

TARGET = 0.9  # requests/s must reach this share of concurrency / delay
TIMING = (
    "requests_per_s = requests the server answered / wall time of one generate_with_llm call on an empty "
    "cache (whole call: prompts, originals, thread pool, SDK, cache writes, filters and records); ideal = "
    "concurrency / delay; ratio = requests_per_s / ideal. cached_requests_per_s: the same call again, "
    "every reply read from the cache. The server shares the process (and its GIL) with the backend."
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


class Server(socketserver.ThreadingTCPServer):
    """One thread per connection; ``answered`` counts the replies sent, ``peak_in_flight`` the most held at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the default (5) drops SYNs when 64 connections open at once

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.delay = delay
        self.lock = threading.Lock()
        self.answered = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(socketserver.StreamRequestHandler):
    """A minimal HTTP/1.1 keep-alive chat-completions endpoint: POST /v1/chat/completions, else 404.

    Not http.server.BaseHTTPRequestHandler: its header parsing (the email package) costs ~0.8 ms of
    CPU per request, which here would be taken from the backend under test (a real server runs in
    another process). Headers and body go out in one write.
    """

    server: Server
    disable_nagle_algorithm = True

    def handle(self) -> None:
        while request_line := self.rfile.readline(65537):
            length = 0
            while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = self.rfile.read(length)
            if request_line.split()[:2] != [b"POST", b"/v1/chat/completions"]:
                self.reply(404, b'{"error": {"message": "not found"}}')
                continue
            server = self.server
            with server.lock:
                server.in_flight += 1
                server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
            time.sleep(server.delay)
            tag = hashlib.sha256(body).hexdigest()[:12]  # five distinct candidates per request
            if b"negatives" in body:  # the negative prompt asks for {"negatives": [...]}
                items = [f"Another question ({k}) on the topic of {tag}: what else might they ask?" for k in range(5)]
            else:
                items = [f"Paraphrase {k} of request {tag}, the way someone else would word it" for k in range(5)]
            self.reply(200, REPLY.replace("CONTENT", json.dumps(json.dumps({"items": items}))).encode())
            with server.lock:
                server.in_flight -= 1
                server.answered += 1

    def reply(self, status: int, data: bytes) -> None:
        head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\nContent-Type: application/json\r\n"
        self.wfile.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)


def run(params: Any, lexicon: Any, server: Server) -> dict[str, Any]:
    """One generate_with_llm call: its wall and CPU time, the requests the server answered, the rows."""
    from cachelora.llm_generation import generate_with_llm

    answered, server.peak_in_flight = server.answered, 0
    start, cpu = time.perf_counter(), time.process_time()
    rows = generate_with_llm(params, lexicon)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    sent = server.answered - answered
    return {"wall_s": wall, "process_cpu_s": cpu, "requests_sent": sent, "requests_per_s": sent / wall,
            "peak_in_flight_at_server": server.peak_in_flight, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, help="requests to send, two per original (default 640)")
    parser.add_argument("--concurrency", type=int, help="generate.openai.concurrency (default 64)")
    parser.add_argument("--delay", type=float, help="server delay per request, seconds (default 0.2)")
    parser.add_argument("--rounds", type=int, help="runs on an empty cache (default 3; the median is the headline)")
    parser.add_argument("--slow-delay", type=float, help="one more run at this delay (default 1.0 s; 0: none)")
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
    delay = opts.delay if opts.delay is not None else 0.2
    rounds = opts.rounds or (1 if opts.quick else 3)
    slow_delay = opts.slow_delay if opts.slow_delay is not None else (0.0 if opts.quick else 1.0)
    lexicon = load_lexicon(opts.domain)
    server = Server(delay)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    raw = load_params().model_dump(by_alias=True)
    raw["generate"].update(backend="openai", queries_file=None)
    settings = {"base_url": server.url, "model": "bench-model", "concurrency": concurrency, "retries": 0,
                "queries_per_domain": requests // 2}  # fmt: skip
    runs, slow = [], None
    try:
        with tempfile.TemporaryDirectory(prefix="bench_llm.") as tmp:
            for r in range(rounds):  # each on an empty cache
                raw["generate"]["openai"].update(settings, cache_dir=f"{tmp}/cache{r}")
                runs.append(run(Params.model_validate(raw), lexicon, server))
            cached = run(Params.model_validate(raw), lexicon, server)  # the last round's cache, full
            if slow_delay:  # the same at a slower, more LLM-like latency
                server.delay = slow_delay
                raw["generate"]["openai"].update(cache_dir=f"{tmp}/cache_slow")
                slow = run(Params.model_validate(raw), lexicon, server)
                slow.pop("rows")
                slow.update(delay_s=slow_delay, ratio=slow["requests_per_s"] / (concurrency / slow_delay))
    finally:
        server.shutdown()
        server.server_close()
    rows = runs[0].pop("rows")
    if any(r.pop("rows") != rows for r in runs[1:]) or cached.pop("rows") != rows or cached["requests_sent"]:
        raise SystemExit("the runs gave different rows, or the cached run sent requests")
    ideal = concurrency / delay
    rate = median([r["requests_per_s"] for r in runs])
    ratio = rate / ideal
    cached_rate = requests / cached["wall_s"]
    info = {
        "requests": requests, "originals": requests // 2, "triplets": len(rows), "concurrency": concurrency,
        "delay_s": delay, "requests_per_s": rate, "ideal_requests_per_s": ideal, "ratio": ratio,
        "target_ratio": TARGET, "meets_target": ratio >= TARGET, "runs": runs, "cached_run": cached,
        "cached_requests_per_s": cached_rate, "slow_run": slow, "rounds": rounds,
        "timing": TIMING, "domain": opts.domain, "quick": opts.quick, "openai": openai.__version__,
        "cpu": cpu_info(),
    }  # fmt: skip
    finish("llm", opts.out, info, [
        ("requests/s (empty cache, median)", f"{rate:.1f}"),
        (f"ratio to ideal concurrency/delay (target ≥ {TARGET})", f"{ratio:.3f}"),
        ("cached requests/s", f"{cached_rate:.0f}"),
        *([(f"ratio at delay {slow_delay:g} s (one run)", f"{slow['ratio']:.3f}")] if slow else []),
        ("setup", f"{requests} requests, concurrency {concurrency}, delay {delay:g} s, "
                  f"peak {max(r['peak_in_flight_at_server'] for r in runs)} in flight at the server"),
    ])  # fmt: skip
    if ratio < TARGET:
        print(f"  below target: {ratio:.3f} < {TARGET}")


if __name__ == "__main__":
    main()
