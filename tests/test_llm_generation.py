"""The openai backend against a scriptable chat-completions server on loopback."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachelora import llm_generation as llm
from cachelora.errors import CacheloraError
from cachelora.generation import generate_domain
from cachelora.lexicon import Lexicon, load_lexicon
from cachelora.params import OpenAIParams, Params, load_params
from cachelora.records import read_json, read_jsonl
from cachelora.triplets import concept_id, normalise, stable_id

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("medical", "law", "programming", "psychology")
KEY_ENV = "CACHELORA_TEST_LLM_KEY"

LEXICON = {
    "domain": "medical",
    "topics": [{"name": "asthma", "group": "respiratory"}, {"name": "influenza", "aliases": ["flu"]}],
    "aspects": {
        "symptoms": {"templates": ["What are the symptoms of {topic}?", "how do i know if i have {topic}"]},
        "treatment": {"templates": ["How is {topic} treated?", "what is the best medicine for {topic}"]},
        "causes": {"templates": ["What causes {topic}?", "why do people get {topic}"]},
    },
}
# Test prompts the server can read back: "<KIND> n=<n> :: <query>".
PROMPTS = {
    "system": "You write questions. Reply with JSON only.",
    "paraphrase": 'PARAPHRASE n={n} :: {query}\nReply with {"paraphrases": [...]}',
    "negative": 'NEGATIVE n={n} :: {query}\nReply with {"negatives": [...]}',
}


def paraphrase_of(query: str) -> str:
    return f"Could you tell me: {query}"


def negative_of(query: str) -> str:
    return f"A different question than: {query}"


def default_content(kind: str, query: str) -> str:
    if kind == "PARAPHRASE":
        return json.dumps({"paraphrases": [paraphrase_of(query)]})
    return json.dumps({"negatives": [negative_of(query)]})


@dataclass
class Reply:
    """One scripted reply: an HTTP status, a message content (None: the default) or a whole raw body."""

    status: int = 200
    content: str | None = None
    delay: float = 0.0
    raw: bytes | None = None
    trickle: float = 0.0  # seconds between the body's bytes (0: all at once)


class FakeLLM:
    """What the handler does: scripted replies in arrival order, then ``responder``'s.

    ``hold_after``: requests arriving after that many get no reply until ``gate`` is set, and then
    none at all (the client is gone by then). ``fill``: no reply until that many requests are in
    flight (``full`` is set; at most 10 s). ``answered`` logs the bodies answered with a 200 reply;
    ``in_flight`` / ``peak_in_flight`` count requests between arrival and reply.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self.script: list[Reply] = []
        self.responder: Callable[[str, str], str] = default_content
        self.jitter = 0.0
        self.delay = 0.0
        self.hold_after: int | None = None
        self.gate = threading.Event()
        self.fill: int | None = None
        self.full = threading.Event()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.url = ""

    def next_reply(self, body: dict[str, Any], authorization: str | None) -> tuple[Reply | None, float]:
        """The reply to send (None: hold the request, then drop it) and a jitter to wait first."""
        with self.lock:
            self.requests.append(body)
            self.keys.append(authorization)
            if self.hold_after is not None and len(self.requests) > self.hold_after:
                return None, 0.0
            reply = self.script.pop(0) if self.script else Reply()
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            if self.fill is not None and self.in_flight >= self.fill:
                self.full.set()
            return reply, self.rng.uniform(0, self.jitter) + self.delay

    def replied(self, body: dict[str, Any], status: int) -> None:
        with self.lock:
            self.in_flight -= 1
            if status == 200:
                self.answered.append(body)


def make_handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": {"message": "not found"}})
            reply, wait = fake.next_reply(body, self.headers.get("Authorization"))
            if reply is None:
                fake.gate.wait(60)
                self.close_connection = True
                return None
            if fake.fill is not None:
                fake.full.wait(10)
            time.sleep(reply.delay + wait)
            try:
                self.answer(body, reply)
            finally:
                fake.replied(body, 200 if reply.raw is not None else reply.status)

        def answer(self, body: dict[str, Any], reply: Reply) -> None:
            self.trickle = reply.trickle
            if reply.raw is not None:
                return self.send(200, reply.raw)
            if reply.status != 200:
                return self.send(reply.status, {"error": {"message": f"scripted {reply.status}", "type": "test"}})
            kind, query = body["messages"][-1]["content"].split("\n")[0].split(" :: ", 1)
            content = reply.content if reply.content is not None else fake.responder(kind.split()[0], query)
            self.send(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                },
            )

        def send(self, status: int, payload: dict[str, Any] | bytes) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:  # the SDK honours it instead of its own backoff (0.5 s, doubling)
                    self.send_header("Retry-After-Ms", "10")
                self.end_headers()
                if getattr(self, "trickle", 0.0):
                    for i in range(len(data)):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(self.trickle)
                else:
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default (5) drops connections when 64 open at once


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    fake = FakeLLM()
    httpd = Server(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    fake.gate.set()
    fake.full.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def lexicon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lexicon:
    """A tiny lexicon and test prompts under tmp_path, which becomes the working directory."""
    (tmp_path / "data/seed").mkdir(parents=True)
    (tmp_path / "data/seed/medical.yaml").write_text(yaml.safe_dump(LEXICON), encoding="utf-8")
    (tmp_path / "data/prompts/v1").mkdir(parents=True)
    (tmp_path / "data/prompts/v1/medical.yaml").write_text(yaml.safe_dump(PROMPTS), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    return load_lexicon("medical", tmp_path / "data/seed")


def sent_times(server: FakeLLM, request: dict[str, Any]) -> int:
    """How often the server saw ``request``'s messages."""
    return sum(r["messages"] == request["messages"] for r in server.requests)


def make_params(server: FakeLLM, queries_file: str | None = None, **openai: Any) -> Params:
    return Params.model_validate(
        {
            "domains": ["medical"],
            "train_models": ["medical", "multi"],
            "generate": {
                "backend": "openai",
                "seed": 7,
                "queries_file": queries_file,
                "openai": {
                    "base_url": server.url,
                    "model": "test-model",
                    "api_key_env": KEY_ENV,
                    "concurrency": 1,
                    "timeout": 5,
                    "retries": 2,
                    "queries_per_domain": 4,
                    **openai,
                },
            },
            "validate": {"min_chars": 8, "max_chars": 200},
        }
    )


def many_candidates(paraphrases: int, negatives: int) -> Callable[[str, str], str]:
    """A responder with ``paraphrases`` paraphrases and ``negatives`` negatives, all passing the filters."""

    def responder(kind: str, query: str) -> str:
        if kind == "PARAPHRASE":
            return json.dumps({"paraphrases": [f"Paraphrase {k}: {query}" for k in range(paraphrases)]})
        return json.dumps({"negatives": [f"Other question {k} than: {query}" for k in range(negatives)]})

    return responder


def write_lexicon(tmp_path: Path, topics: int) -> Lexicon:
    """The test lexicon with ``topics`` topics (3 aspects each), over the ``lexicon`` fixture's file."""
    names = ["asthma", "influenza", "migraine", "eczema", "gout", "anemia", "bronchitis", "tinnitus", "psoriasis"]
    names += ["vertigo", "shingles", "sinusitis", "insomnia", "measles", "scabies", "tetanus"]
    raw = {**LEXICON, "topics": [{"name": name} for name in names[:topics]]}
    (tmp_path / "data/seed/medical.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_lexicon("medical", tmp_path / "data/seed")


def user_prompt(body: dict[str, Any]) -> str:
    """A request's identity on the server side: its user message (kind and original query)."""
    return body["messages"][-1]["content"]


# --- end to end ---------------------------------------------------------------------------------


def test_triplets_from_lexicon(server: FakeLLM, lexicon: Lexicon) -> None:
    rows = llm.generate_with_llm(make_params(server), lexicon)
    assert len(rows) == 4 and len(server.requests) == 8
    names = {t.name for t in lexicon.topics}
    for row in rows:
        assert row["anchor"] == paraphrase_of(row["positive"])
        assert row["negative"] == negative_of(row["positive"])
        assert row["topic"] in names and row["aspect"] in lexicon.aspects
        assert row["positive"] in {t.replace("{topic}", row["topic"]) for t in lexicon.aspects[row["aspect"]].templates}
        assert row["source_id"] == concept_id("medical", row["topic"], row["aspect"])
        assert row["generator"] == {"backend": "openai", "model": "test-model", "prompt_version": "v1"}
    assert len({r["source_id"] for r in rows}) == 4
    first = server.requests[0]
    assert first["model"] == "test-model" and first["seed"] == 7 and first["temperature"] == 0.7
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["messages"][1]["content"].startswith("PARAPHRASE n=5 :: ")
    assert set(server.keys) == {"Bearer EMPTY"}


def test_api_key_from_env(server: FakeLLM, lexicon: Lexicon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    llm.generate_with_llm(make_params(server, queries_per_domain=1), lexicon)
    assert set(server.keys) == {"Bearer sk-test"}


def test_generate_domain_uses_openai_backend(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    count = generate_domain(make_params(server), "medical", tmp_path / "out.jsonl", tmp_path / "data/seed")
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert count == len(rows) == 4 and all(r["generator"]["backend"] == "openai" for r in rows)


def test_queries_from_jsonl(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    lines = [
        {"query": "Is it safe to take ibuprofen with asthma?", "domain": "medical", "topic": "asthma"},
        {"query": "Can my landlord keep my deposit?", "domain": "law", "topic": "deposits"},
        {"query": "is it safe to take ibuprofen with asthma", "domain": "medical", "topic": "asthma"},
        {"query": "  ", "domain": "medical", "topic": None},
        {"query": "How long does the flu last?", "domain": "medical", "topic": None},
    ]
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    rows = llm.generate_with_llm(make_params(server, queries_file=str(path)), lexicon)
    assert [r["positive"] for r in rows] == [lines[0]["query"], lines[4]["query"]]
    assert [r["topic"] for r in rows] == ["asthma", None]
    assert rows[0]["source_id"] == stable_id("medical", normalise(lines[0]["query"]))
    assert len(server.requests) == 4


def test_queries_from_csv(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    path = tmp_path / "queries.csv"
    path.write_text(
        "query,domain\nWhat helps a sore throat?,medical\nWhat is a tort?,law\nWhy do I wake up tired?,medical\n",
        encoding="utf-8",
    )
    rows = llm.generate_with_llm(make_params(server, queries_file=str(path)), lexicon)
    assert [r["positive"] for r in rows] == ["What helps a sore throat?", "Why do I wake up tired?"]


def test_queries_file_without_query_column(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("question,domain\nWhat helps a sore throat?,medical\n", encoding="utf-8")
    with pytest.raises(CacheloraError, match=r"bad\.csv: missing column 'query'"):
        llm.generate_with_llm(make_params(server, queries_file=str(path)), lexicon)
    assert server.requests == []


# --- replies and retries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"paraphrases": ["a b", "c d"]}',
        'Sure! Here they are:\n```json\n{"paraphrases": ["a b", "c d"]}\n```\nHope this helps.',
        '```\n["a b", "c d"]\n```',
        'Here you go: {"paraphrases": ["a b", "c d"]} Let me know if you need more.',
        'Okay. ["a b", "c d"]',
        '{"questions": ["a b", "c d"]}',
        '{"paraphrases": ["a b", 3, null, {"x": 1}, " c d "]}',
    ],
)
def test_extract_strings(text: str) -> None:
    assert llm.extract_strings(text, "paraphrases") == ["a b", "c d"]


@pytest.mark.parametrize(
    "text", [None, "", "I cannot help with that.", '{"paraphrases": "a b"}', '{"a": [1], "b": [2]}', "[1, 2]"]
)
def test_extract_strings_rejects(text: str | None) -> None:
    with pytest.raises(llm.UnparseableReply):
        llm.extract_strings(text, "paraphrases")


def test_malformed_reply_is_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(content="Sure, here are some paraphrases: {oops")]
    rows = llm.generate_with_llm(make_params(server), lexicon)
    assert len(rows) == 4 and len(server.requests) == 9
    assert server.requests[0]["messages"] == server.requests[1]["messages"]
    assert [server.requests[0]["seed"], server.requests[1]["seed"]] == [7, 8]


@pytest.mark.parametrize(
    "raw",
    [
        b"<html>Bad gateway</html>",
        b"{not json",
        b'{"id": "x", "choices": []}',
        b'{"choices": [{"message": {"content": 42}}]}',
        b'{"choices": [{"message": {"content": {"paraphrases": ["a b"]}}}]}',
        b'{"choices": [{"message": {"content": "' + b"[" * 50_000 + b'"}}]}',
        b'{"choices": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
    ids=["html", "not-json", "no-choices", "number", "object", "deep-content", "deep-body"],
)
def test_bad_body_is_retried(server: FakeLLM, lexicon: Lexicon, raw: bytes) -> None:
    server.script = [Reply(raw=raw)]
    rows = llm.generate_with_llm(make_params(server, queries_per_domain=1), lexicon)
    assert len(rows) == 1 and len(server.requests) == 3


def test_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": '{"paraphrases": '}, {"type": "text", "text": '["a b"]}'}]
    text = llm.reply_text({"choices": [{"message": {"content": parts}}]})
    assert llm.extract_strings(text, "paraphrases") == ["a b"]


def test_a_reply_holding_the_api_key_is_refused_and_nothing_written(
    server: FakeLLM, lexicon: Lexicon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-live-0123456789")
    server.script = [Reply(content=json.dumps({"paraphrases": ["Authorization: Bearer sk-live-0123456789"]}))]
    params = make_params(server, queries_per_domain=1)
    with pytest.raises(CacheloraError, match=r"the reply holds the API key \(\$.*\); refused, nothing written"):
        llm.generate_with_llm(params, lexicon)
    cached = [p.read_text() for p in Path(params.generate.openai.cache_dir).rglob("*.json")]
    assert not any("sk-live-0123456789" in text for text in cached)


def test_http_500_is_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(status=500), Reply(status=429)]
    rows = llm.generate_with_llm(make_params(server), lexicon)
    assert len(rows) == 4 and len(server.requests) == 10


def test_timeout_is_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(delay=1.0)]
    rows = llm.generate_with_llm(make_params(server, timeout=0.5, queries_per_domain=1), lexicon)
    assert len(rows) == 1 and len(server.requests) == 3


def test_a_reply_trickling_in_times_out_as_a_whole(server: FakeLLM, lexicon: Lexicon) -> None:
    """A byte every 50 ms never trips a per-read timeout of 0.5 s; the whole reply's deadline does."""
    server.script = [Reply(trickle=0.05)]
    started = time.monotonic()
    rows = llm.generate_with_llm(make_params(server, timeout=0.5, queries_per_domain=1), lexicon)
    assert len(rows) == 1 and len(server.requests) == 3 and time.monotonic() - started < 5


def test_retries_exhausted(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(status=503)] * 3
    with pytest.raises(CacheloraError, match=r"/chat/completions: no usable reply after 3 attempts \(last: HTTP 503\)"):
        llm.generate_with_llm(make_params(server, retries=2), lexicon)
    assert sent_times(server, server.requests[0]) == 3


def test_unauthorised_is_not_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(status=401)]
    with pytest.raises(CacheloraError) as err:
        llm.generate_with_llm(make_params(server), lexicon)
    assert f"{server.url}/chat/completions: HTTP 401" in str(err.value) and KEY_ENV in str(err.value)
    assert sent_times(server, server.requests[0]) == 1


# --- filters ------------------------------------------------------------------------------------


def test_filter_candidates_reasons() -> None:
    original = "What are the symptoms of asthma?"
    candidates = [
        "",
        "asthma?",
        "x" * 201,
        "WHAT are the symptoms of asthma",
        "{paraphrase}",
        "<paraphrase>",
        "Lorem ipsum dolor sit amet?",
        "TODO: write a question",
        "What are the symptoms of ...?",
        "How do I know if I have asthma?",
        "how do i know if i have asthma",
    ]
    kept, dropped = llm.filter_candidates(candidates, original, 8, 200)
    assert kept == ["How do I know if I have asthma?"]
    assert dropped == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "same_as_original": 1,
        "placeholder": 5,
        "duplicate": 1,
    }


def test_filter_near_identical_negative() -> None:
    original = "What are the symptoms of asthma?"
    candidates = ["What are the symptom of asthma?", "Can kids outgrow asthma?", "how do i know if i have asthma"]
    kept, dropped = llm.filter_candidates(
        candidates, original, 8, 200, avoid=("How do I know if I have asthma?",), near=0.9
    )
    assert kept == ["Can kids outgrow asthma?"] and dropped == {"same_as_original": 2}
    # Without ``near`` only exact (normalised) copies go.
    assert llm.filter_candidates(candidates[:1], original, 8, 200)[0] == candidates[:1]


def test_near_copy_is_difflib_ratio() -> None:
    rng = random.Random(0)
    words = ["what", "is", "the", "of", "asthma", "symptoms", "treated", "how", "can", "i", "flu", "why", "do"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))

    for _ in range(500):
        texts = [sentence() for _ in range(rng.randint(1, 6))]
        near = rng.choice([0.5, 0.8, 0.9, 1.0])
        check = llm.NearCopy(texts, near)
        for _ in range(4):
            text = sentence() if rng.random() < 0.6 else rng.choice(texts).replace("a", "e", 1)
            assert check(text) == any(difflib.SequenceMatcher(None, text, t).ratio() >= near for t in texts)


def test_placeholder_in_original_is_allowed() -> None:
    original = "What does {} mean in a Python format string?"
    assert not llm.is_placeholder("What do the {} braces do in Python's str.format?", original)
    assert llm.is_placeholder("What does {} mean in {language}?", original)


def test_filters_in_generation(server: FakeLLM, lexicon: Lexicon) -> None:
    def responder(kind: str, query: str) -> str:
        if kind == "PARAPHRASE":
            bad = [query, query.upper() + "!", "{paraphrase}", "<paraphrase>", "short"]
            return json.dumps({"paraphrases": [*bad, paraphrase_of(query), paraphrase_of(query)]})
        if "influenza" in query:  # no usable negative: the original is skipped
            return json.dumps({"negatives": [query, paraphrase_of(query), "TODO"]})
        return json.dumps({"negatives": [query + "!", query.replace("a", "e", 1), "...", negative_of(query)]})

    server.responder = responder
    params = make_params(server, queries_per_domain=6)
    rows = llm.generate_with_llm(params, lexicon)
    originals = llm.load_originals(params, lexicon)
    assert [r["positive"] for r in rows] == [o.query for o in originals if o.topic == "asthma"]
    for row in rows:
        assert row["anchor"] == paraphrase_of(row["positive"]) and row["negative"] == negative_of(row["positive"])


# --- cache and concurrency ----------------------------------------------------------------------


def test_cache_makes_second_run_free(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    params = make_params(server)
    first = llm.generate_with_llm(params, lexicon)
    assert len(server.requests) == 8 and len(list((tmp_path / "data/llm_cache").glob("*/*/*.json"))) == 8
    second = llm.generate_with_llm(params, lexicon)
    assert second == first and len(server.requests) == 8
    # Another server URL is the same request: still cached.
    other = make_params(server, base_url=server.url.replace("127.0.0.1", "localhost"))
    assert llm.generate_with_llm(other, lexicon) == first and len(server.requests) == 8


def test_interrupted_run_resumes(server: FakeLLM, lexicon: Lexicon) -> None:
    params = make_params(server)
    server.script = [Reply()] * 3 + [Reply(status=400)]
    with pytest.raises(CacheloraError, match="HTTP 400"):
        llm.generate_with_llm(params, lexicon)
    # The worker may have started one more request before the failure stopped the pool.
    assert len(server.requests) in (4, 5)
    rows = llm.generate_with_llm(params, lexicon)
    assert len(rows) == 4 and len(server.requests) == 9  # every request but the failed one sent once


def test_concurrency_keeps_order(server: FakeLLM, lexicon: Lexicon) -> None:
    server.jitter = 0.02
    serial = llm.generate_with_llm(make_params(server, queries_per_domain=6, cache_dir="cache1"), lexicon)
    parallel = llm.generate_with_llm(
        make_params(server, queries_per_domain=6, concurrency=4, cache_dir="cache4"), lexicon
    )
    assert parallel == serial and len(serial) == 6 and len(server.requests) == 24


def test_cache_is_sharded(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    params = make_params(server)
    rows = llm.generate_with_llm(params, lexicon)
    cache = tmp_path / "data/llm_cache"
    files = sorted(path for path in cache.rglob("*") if path.is_file())
    assert len(files) == 8
    client = llm.ChatClient(params.generate.openai, 7)
    for path in files:
        digest = path.stem
        assert path.relative_to(cache).parts == (digest[:2], digest[2:4], f"{digest}.json")
        request = read_json(path)["request"]
        key = json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")
        assert hashlib.sha256(key).hexdigest() == digest
        assert client.cache_path(request) == Path("data/llm_cache", digest[:2], digest[2:4], f"{digest}.json")
    # A reply cached by the old flat layout (<cache_dir>/<hash>.json) is not read: asked again.
    files[0].rename(cache / files[0].name)
    assert llm.generate_with_llm(params, lexicon) == rows and len(server.requests) == 9
    assert files[0].is_file() and (cache / files[0].name).is_file()


def test_write_cache_concurrent_writers_and_stale_temps(tmp_path: Path) -> None:
    path = tmp_path / "ab" / "cd" / "abcd.json"
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.999999999.1.tmp").write_text("half a reply")  # a killed writer's (no such pid)
    (path.parent / ".other.json.999999999.1.tmp").write_text("another path's")
    payloads = [{"writer": i, "text": "x" * 20000} for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda data: llm.write_cache(path, data), payloads))
    assert read_json(path) in payloads
    assert sorted(p.name for p in path.parent.iterdir()) == [".other.json.999999999.1.tmp", path.name]
    llm.write_cache(tmp_path / "new" / "ef" / "ef01.json", [1])  # creates its shard folders
    assert read_json(tmp_path / "new" / "ef" / "ef01.json") == [1]


def test_64_requests_in_flight_by_default(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    assert OpenAIParams().concurrency == 64 and load_params(REPO / "params.yaml").generate.openai.concurrency == 64
    lexicon = write_lexicon(tmp_path, 16)  # 48 originals, 96 requests
    server.fill = 64  # no reply before 64 requests are in flight (or 10 s)
    params = make_params(server, queries_per_domain=48, concurrency=OpenAIParams().concurrency, timeout=30)
    rows = llm.generate_with_llm(params, lexicon)
    assert len(rows) == 48 and len(server.requests) == 96
    assert server.full.is_set() and server.peak_in_flight == 64


def test_progress_bar_and_counts(
    server: FakeLLM, lexicon: Lexicon, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    server.script = [Reply(status=500)]
    with caplog.at_level(logging.INFO, logger="cachelora.llm_generation"):
        llm.generate_with_llm(make_params(server), lexicon)
        llm.generate_with_llm(make_params(server), lexicon)
    ends = [r.getMessage() for r in caplog.records if " requests in " in r.getMessage()]
    assert re.fullmatch(r"medical: 8 requests in [\d.]+ s: 0 cached, 9 sent \([\d.]+/s\), 1 of them failed .*", ends[0])
    assert re.fullmatch(r"medical: 8 requests in [\d.]+ s: 8 cached, 0 sent \(0\.0/s\), 0 of them failed .*", ends[1])
    err = capsys.readouterr().err
    assert "llm medical: 100%" in err and "request/s" in err and "sent 9, cached 0" in err


# --- triplets per query -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchors", "negatives", "limit"),
    [(5, 5, 6), (3, 2, 6), (2, 5, 6), (4, 6, 24), (6, 4, 7), (3, 3, 9), (5, 5, 100), (1, 1, 6), (5, 5, 1)],
)
def test_pairings(anchors: int, negatives: int, limit: int) -> None:
    a = [f"anchor {i}" for i in range(anchors)]
    n = [f"negative {j}" for j in range(negatives)]
    pairs = llm.pairings(a, n, limit, "7:source")
    assert len(pairs) == min(limit, anchors * negatives) == len(set(pairs))
    assert set(pairs) <= set(itertools.product(a, n))
    for k in range(1, len(pairs) + 1):  # every prefix uses the anchors, and the negatives, evenly
        for side, texts in ((0, a), (1, n)):
            uses = Counter(pair[side] for pair in pairs[:k])
            assert max(uses[t] for t in texts) - min(uses[t] for t in texts) <= 1
    assert llm.pairings(a, n, limit, "7:source") == pairs
    assert llm.pairings(a, n, limit + 5, "7:source")[: len(pairs)] == pairs  # a larger cap only appends


def test_pairings_are_seeded() -> None:
    a, n = [f"anchor {i}" for i in range(5)], [f"negative {j}" for j in range(5)]
    assert llm.pairings(a, n, 6, "7:one") != llm.pairings(a, n, 6, "7:two")
    assert llm.pairings(a, n, 6, "7:one") != llm.pairings(a, n, 6, "8:one")
    assert llm.pairings(a, [], 6, "7:one") == llm.pairings([], n, 6, "7:one") == []


def test_triplets_per_query(server: FakeLLM, lexicon: Lexicon) -> None:
    server.responder = many_candidates(3, 2)
    params = make_params(server)  # triplets_per_query: 6 by default
    assert params.generate.openai.triplets_per_query == 6
    rows = llm.generate_with_llm(params, lexicon)
    originals = llm.load_originals(params, lexicon)
    assert len(server.requests) == 8 and len(rows) == 4 * 6 == len({r["id"] for r in rows})
    assert [r["positive"] for r in rows] == [o.query for o in originals for _ in range(6)]
    for original in originals:
        mine = [r for r in rows if r["source_id"] == original.source_id]
        paraphrases = [f"Paraphrase {k}: {original.query}" for k in range(3)]
        negatives = [f"Other question {k} than: {original.query}" for k in range(2)]
        assert {(r["anchor"], r["negative"]) for r in mine} == set(itertools.product(paraphrases, negatives))
        assert all(r["topic"] == original.topic and r["aspect"] == original.aspect for r in mine)
    # The same replies (cached, or asked again) give the same rows; a cap keeps each original's first pairings.
    assert llm.generate_with_llm(params, lexicon) == rows and len(server.requests) == 8
    assert llm.generate_with_llm(make_params(server, cache_dir="again"), lexicon) == rows
    capped = llm.generate_with_llm(make_params(server, triplets_per_query=4), lexicon)
    assert capped == [r for i in range(4) for r in rows[6 * i : 6 * i + 4]]
    for i in range(4):  # spread: every paraphrase and both negatives among the first 4
        assert len({r["anchor"] for r in capped[4 * i : 4 * i + 4]}) == 3
        assert len({r["negative"] for r in capped[4 * i : 4 * i + 4]}) == 2
    assert llm.generate_with_llm(make_params(server, triplets_per_query=50), lexicon) == rows
    assert len(llm.generate_with_llm(make_params(server, triplets_per_query=1), lexicon)) == 4
    assert len(server.requests) == 16


def test_negative_like_any_paraphrase_is_dropped(server: FakeLLM, lexicon: Lexicon) -> None:
    def responder(kind: str, query: str) -> str:
        if kind == "PARAPHRASE":
            return json.dumps({"paraphrases": [paraphrase_of(query), f"Please tell me: {query}"]})
        return json.dumps({"negatives": [f"Please tell me: {query}", f"Please, tell me {query}", negative_of(query)]})

    server.responder = responder
    rows = llm.generate_with_llm(make_params(server, queries_per_domain=1), lexicon)
    assert len(rows) == 2 and {r["negative"] for r in rows} == {negative_of(rows[0]["positive"])}


# --- restart after SIGKILL ----------------------------------------------------------------------

RUN = """
import json, sys
from cachelora.lexicon import load_lexicon
from cachelora.llm_generation import generate_with_llm
from cachelora.params import Params
from cachelora.records import write_jsonl
params = Params.model_validate(json.loads(sys.argv[1]))
write_jsonl(sys.argv[2], generate_with_llm(params, load_lexicon("medical", "data/seed")))
"""


def test_restart_after_sigkill_sends_only_missing_requests(server: FakeLLM, lexicon: Lexicon, tmp_path: Path) -> None:
    lexicon = write_lexicon(tmp_path, 10)  # 30 originals, 60 requests
    server.responder = many_candidates(3, 2)
    settings = {"queries_per_domain": 30, "concurrency": 8, "timeout": 60}
    reference = llm.generate_with_llm(make_params(server, cache_dir="reference", **settings), lexicon)
    everything = {user_prompt(body) for body in server.requests}
    assert len(everything) == len(server.requests) == 60 and len(reference) == 180
    server.requests.clear()
    server.answered.clear()

    params = make_params(server, cache_dir="cache", **settings).model_dump(mode="json", by_alias=True)
    command = [sys.executable, "-c", RUN, json.dumps(params), "out.jsonl"]
    cache = tmp_path / "cache"
    server.hold_after = 20  # answer 20 requests, then hold the rest (never answered)
    first = subprocess.Popen(command, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.glob("*/*/*.json"))) < 20:  # every answered reply cached
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL and not (tmp_path / "out.jsonl").exists()
    cached = {user_prompt(read_json(path)["request"]) for path in cache.glob("*/*/*.json")}
    assert len(cached) == 20 and cached == {user_prompt(body) for body in server.answered}
    sent_first = len(server.requests)
    assert 20 <= sent_first <= 28  # the 20 answered, and up to 8 held in flight when killed

    server.hold_after = None
    server.gate.set()  # the held requests end unanswered
    subprocess.run(command, cwd=tmp_path, check=True, timeout=300)
    resent = [user_prompt(body) for body in server.requests[sent_first:]]
    assert len(resent) == len(set(resent)) == 40 and set(resent) == everything - cached
    answered = Counter(user_prompt(body) for body in server.answered)
    assert set(answered) == everything and set(answered.values()) == {1}  # each request answered once in all
    assert read_jsonl(tmp_path / "out.jsonl") == reference
    assert not list(cache.rglob("*.tmp"))


# --- originals and prompts ----------------------------------------------------------------------


def test_lexicon_originals_are_seeded(lexicon: Lexicon) -> None:
    first = llm.originals_from_lexicon(lexicon, 7, 4)
    assert first == llm.originals_from_lexicon(lexicon, 7, 4) != llm.originals_from_lexicon(lexicon, 8, 4)
    assert len(llm.originals_from_lexicon(lexicon, 7, 100)) == 6


@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_prompts(domain: str) -> None:
    prompts = llm.load_prompts("v1", domain, REPO / "data/prompts")
    user = llm.build_messages(prompts, "negative", "What is X?", 3)[1]["content"]
    assert '"What is X?"' in user and "{n}" not in user and '"negatives"' in user
    assert '"paraphrases"' in prompts["paraphrase"]


def test_prompt_errors(tmp_path: Path) -> None:
    with pytest.raises(CacheloraError, match=r"v1/medical\.yaml: prompt file not found"):
        llm.load_prompts("v1", "medical", tmp_path)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1/medical.yaml").write_text(yaml.safe_dump({"system": "s", "paraphrase": "{query}"}))
    with pytest.raises(CacheloraError, match=r"v1/medical\.yaml: negative: missing"):
        llm.load_prompts("v1", "medical", tmp_path)
    (tmp_path / "v1/medical.yaml").write_text(yaml.safe_dump({"system": "s", "paraphrase": "p", "negative": "n"}))
    with pytest.raises(CacheloraError, match=r"v1/medical\.yaml: paraphrase: must contain \{query\}"):
        llm.load_prompts("v1", "medical", tmp_path)
