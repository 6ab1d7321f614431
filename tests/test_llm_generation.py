"""The openai backend against a scriptable chat-completions server on loopback."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
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
from cachelora.params import Params
from cachelora.records import read_jsonl
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


class FakeLLM:
    """What the handler does: scripted replies in arrival order, then ``responder``'s."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self.script: list[Reply] = []
        self.responder: Callable[[str, str], str] = default_content
        self.jitter = 0.0
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.url = ""

    def next_reply(self, body: dict[str, Any], authorization: str | None) -> tuple[Reply, float]:
        with self.lock:
            self.requests.append(body)
            self.keys.append(authorization)
            reply = self.script.pop(0) if self.script else Reply()
            return reply, self.rng.uniform(0, self.jitter)


def make_handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": {"message": "not found"}})
            reply, jitter = fake.next_reply(body, self.headers.get("Authorization"))
            time.sleep(reply.delay + jitter)
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
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeLLM]:
    fake = FakeLLM()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
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


@pytest.mark.parametrize("raw", [b"<html>Bad gateway</html>", b"{not json", b'{"id": "x", "choices": []}'])
def test_bad_body_is_retried(server: FakeLLM, lexicon: Lexicon, raw: bytes) -> None:
    server.script = [Reply(raw=raw)]
    rows = llm.generate_with_llm(make_params(server, queries_per_domain=1), lexicon)
    assert len(rows) == 1 and len(server.requests) == 3


def test_http_500_is_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(status=500), Reply(status=429)]
    rows = llm.generate_with_llm(make_params(server), lexicon)
    assert len(rows) == 4 and len(server.requests) == 10


def test_timeout_is_retried(server: FakeLLM, lexicon: Lexicon) -> None:
    server.script = [Reply(delay=1.0)]
    rows = llm.generate_with_llm(make_params(server, timeout=0.5, queries_per_domain=1), lexicon)
    assert len(rows) == 1 and len(server.requests) == 3


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
    assert len(server.requests) == 8 and len(list((tmp_path / "data/llm_cache").glob("*.json"))) == 8
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
