"""The ``openai`` generation backend: triplets from an OpenAI-compatible chat-completions server.

Each original query gets two requests, one for paraphrases (the anchors) and one for same-topic,
different-intent questions (the negatives); the original itself is the positive. Every passing
anchor x negative pairing is a triplet, up to ``triplets_per_query`` in a seeded order. Replies are
cached on disk by a hash of the request, sharded by its first hex digits (``<cache_dir>/ab/cd/<hash>.json``),
so an interrupted (even killed) run resumes and a repeated run sends nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import queue
import random
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from math import lcm
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import openai
from tqdm import tqdm

from cachelora.errors import CacheloraError
from cachelora.lexicon import PLACEHOLDER_RE, Lexicon, render
from cachelora.params import OpenAIParams, Params
from cachelora.records import read_json, read_yaml, remove_stale_temps
from cachelora.triplets import concept_id, make_record, normalise, stable_id

log = logging.getLogger(__name__)
R = TypeVar("R")

PROMPT_DIR = Path("data/prompts")
PROMPT_KEYS = ("system", "paraphrase", "negative")
REPLY_KEYS = {"paraphrase": "paraphrases", "negative": "negatives"}
CANDIDATES = 5  # candidates asked for per request: ``{n}`` in the prompts
MIN_SECRET_CHARS = 8  # a shorter API key ("EMPTY", test keys) is not looked for in replies
NEAR_DUPLICATE = 0.9  # SequenceMatcher ratio at which a negative counts as a copy of the original
QUERY_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PLACEHOLDERS = (
    PLACEHOLDER_RE,
    re.compile(r"\.\.\.|…|\bTODO\b|\bTBD\b"),
    re.compile(r"<[^<>]*(?:paraphrase|negative|question|query|topic|insert|here)[^<>]*>|lorem ipsum", re.IGNORECASE),
)


class UnparseableReply(ValueError):
    """A reply with no JSON list of strings in it (retried like a transient error)."""


@dataclass(frozen=True)
class Original:
    """An original query: the positive of its triplet."""

    query: str
    source_id: str
    topic: str | None = None
    aspect: str | None = None


# --- original queries ---------------------------------------------------------------------------


def load_originals(params: Params, lexicon: Lexicon) -> list[Original]:
    """The domain's original queries: every row of ``queries_file`` if set, else a lexicon sample."""
    gen = params.generate
    if gen.queries_file:
        return originals_from_file(gen.queries_file, lexicon.domain)
    return originals_from_lexicon(lexicon, gen.seed, gen.openai.queries_per_domain)


def originals_from_lexicon(lexicon: Lexicon, seed: int, count: int) -> list[Original]:
    """``count`` seeded (topic, aspect) pairs, each asked with the topic's name in a seeded template."""
    rng = random.Random(f"{seed}:{lexicon.domain}:llm")
    concepts = [(t, a) for t in lexicon.topics for a in lexicon.aspects_of(t)]
    originals = []
    for topic, aspect in rng.sample(concepts, min(count, len(concepts))):
        query = render(rng.choice(lexicon.aspects[aspect].templates), topic.name)
        originals.append(Original(query, concept_id(lexicon.domain, topic.name, aspect), topic.name, aspect))
    return originals


def originals_from_file(path: str | Path, domain: str) -> list[Original]:
    """Queries from a JSON/JSONL/CSV/Parquet file with a ``query`` column.

    An optional ``domain`` column keeps only this domain's rows; optional ``topic`` and ``aspect``
    columns are kept as provenance. Blank queries are skipped, repeated ones kept once.
    """
    import datasets  # heavy import, needed only here

    path = Path(path)
    loader = QUERY_FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise CacheloraError(f"{path}: unsupported queries file type (use one of {sorted(QUERY_FILE_LOADERS)})")
    if not path.is_file():
        raise CacheloraError(f"{path}: queries file not found")
    try:
        table = datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as exc:  # the loaders raise many types; the user needs the file and the reason
        raise CacheloraError(f"{path}: cannot read queries ({exc})".replace("\n", " ")) from None
    if "query" not in table.column_names:
        raise CacheloraError(f"{path}: missing column 'query' (have {table.column_names})")
    originals: dict[str, Original] = {}
    for row in table:
        if "domain" in row and row["domain"] != domain:
            continue
        query = str(row["query"] or "").strip()
        if not query:
            continue
        source_id = stable_id(domain, normalise(query))
        originals.setdefault(source_id, Original(query, source_id, row.get("topic"), row.get("aspect")))
    if not originals:
        raise CacheloraError(f"{path}: no queries for domain '{domain}'")
    return list(originals.values())


# --- prompts ------------------------------------------------------------------------------------


def load_prompts(version: str, domain: str, prompt_dir: str | Path = PROMPT_DIR) -> dict[str, str]:
    """The ``system``, ``paraphrase`` and ``negative`` prompts of ``<prompt_dir>/<version>/<domain>.yaml``."""
    path = Path(prompt_dir) / version / f"{domain}.yaml"
    missing = f"prompt file not found for domain '{domain}' (version '{version}')"
    raw = read_yaml(path, keys=PROMPT_KEYS, missing=missing)
    for key in PROMPT_KEYS:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise CacheloraError(f"{path}: {key}: missing or not a non-empty string")
    for key in REPLY_KEYS:
        if "{query}" not in raw[key]:
            raise CacheloraError(f"{path}: {key}: must contain {{query}}")
    return {key: raw[key] for key in PROMPT_KEYS}


def build_messages(prompts: dict[str, str], kind: str, query: str, n: int = CANDIDATES) -> list[dict[str, str]]:
    """Chat messages asking for ``n`` candidates of ``kind`` (``paraphrase`` or ``negative``)."""
    user = prompts[kind].replace("{n}", str(n)).replace("{query}", query)
    return [{"role": "system", "content": prompts["system"].strip()}, {"role": "user", "content": user.strip()}]


# --- replies ------------------------------------------------------------------------------------

FENCE = re.compile(r"```[\w-]*\s*\n?(.*?)```", re.DOTALL)


def extract_strings(text: str | None, key: str) -> list[str]:
    """The list of strings in a model reply: ``{key: [...]}`` or a bare list.

    Accepts plain JSON, JSON in a Markdown fence, and JSON with prose around it; a one-key object
    with another key name is accepted too. Non-string items are dropped.
    """
    if not text or not text.strip():
        raise UnparseableReply("empty reply")
    decoder = json.JSONDecoder()
    for chunk in [*FENCE.findall(text), text]:
        for start in (i for i, ch in enumerate(chunk) if ch in "{["):
            try:
                value, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                continue
            except RecursionError:
                raise UnparseableReply("JSON nested too deeply") from None
            if isinstance(value, dict):
                value = value.get(key, next(iter(value.values())) if len(value) == 1 else None)
            if isinstance(value, list) and (not value or any(isinstance(v, str) for v in value)):
                return [v.strip() for v in value if isinstance(v, str)]
    raise UnparseableReply(f"no JSON list of strings under '{key}'")


def reply_text(response: dict[str, Any]) -> str | None:
    """The first choice's message content of a chat-completions response body (a list of content
    parts is joined from their ``text``); content that is not text is unparseable."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UnparseableReply("no choices[0].message.content") from None
    if isinstance(content, list):
        parts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if parts:
            return "".join(parts)
    if content is not None and not isinstance(content, str):
        raise UnparseableReply(f"choices[0].message.content is {type(content).__name__}, not text")
    return content


def is_placeholder(text: str, original: str = "") -> bool:
    """Whether a candidate holds template residue (braces, ``<paraphrase>``, TODO, ``...``) the original lacks."""
    return any(m.group().lower() not in original.lower() for p in PLACEHOLDERS for m in p.finditer(text))


def filter_candidates(
    candidates: list[str],
    original: str,
    min_chars: int,
    max_chars: int,
    *,
    avoid: tuple[str, ...] = (),
    near: float | None = None,
) -> tuple[list[str], Counter[str]]:
    """Candidates that pass, in order, and a count of the rest by reason.

    A candidate is dropped when empty, shorter than ``min_chars`` or longer than ``max_chars``,
    placeholder text, a repeat, or equal after ``normalise`` to ``original`` or a text in ``avoid``
    (with ``near``, also when its ``difflib`` ratio to one of them reaches ``near``).
    """
    kept: list[str] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    avoid_norm = [normalise(text) for text in (original, *avoid)]
    near_check = None if near is None else NearCopy(avoid_norm, near)
    for text in candidates:
        norm = normalise(text)
        if not norm:
            reason = "empty"
        elif len(text) < min_chars:
            reason = "too_short"
        elif len(text) > max_chars:
            reason = "too_long"
        elif is_placeholder(text, original):
            reason = "placeholder"
        elif norm in avoid_norm or (near_check is not None and near_check(norm)):
            reason = "same_as_original"
        elif norm in seen:
            reason = "duplicate"
        else:
            kept.append(text)
            seen.add(norm)
            continue
        dropped[reason] += 1
    return kept, dropped


class NearCopy:
    """``NearCopy(texts, near)(text)``: whether ``SequenceMatcher(None, text, t).ratio() >= near`` for some
    ``t`` in ``texts``.

    The same answer as asking difflib pair by pair, cheaper: the ratio is computed only where its
    upper bounds (difflib's ``real_quick_ratio`` and ``quick_ratio``, here from character counts
    made once per text) reach ``near``, and each ``t`` is indexed by difflib once, when first needed.
    """

    def __init__(self, texts: Sequence[str], near: float) -> None:
        self.near = near
        self.texts = [(t, len(t), Counter(t)) for t in texts]
        self.matchers: dict[int, difflib.SequenceMatcher[str]] = {}

    def __call__(self, text: str) -> bool:
        size, counts = len(text), Counter(text)
        for i, (other, other_size, other_counts) in enumerate(self.texts):
            total = size + other_size
            if not total:
                return True  # two empty strings: ratio 1.0
            if 2.0 * min(size, other_size) / total < self.near:
                continue
            keys = counts.keys() & other_counts.keys()  # characters in both; the sum runs in C
            shared = sum(map(min, map(counts.__getitem__, keys), map(other_counts.__getitem__, keys)))
            if 2.0 * shared / total < self.near:
                continue
            matcher = self.matchers.get(i)
            if matcher is None:
                matcher = self.matchers[i] = difflib.SequenceMatcher(None, "", other)
            matcher.set_seq1(text)
            if matcher.ratio() >= self.near:
                return True
        return False


def pairings(anchors: Sequence[str], negatives: Sequence[str], limit: int, key: str) -> list[tuple[str, str]]:
    """Up to ``limit`` distinct (anchor, negative) pairs of ``anchors`` x ``negatives``, in a seeded, spread-out order.

    Both lists are shuffled by ``random.Random(key)``; pair ``t`` is then (anchor ``t mod A``, negative
    ``(t + t // lcm(A, N)) mod N``), which visits every pairing once and uses each anchor and each
    negative as evenly as possible in every prefix: with 5 x 5 candidates and ``limit`` 6, all five
    anchors and all five negatives appear. The same inputs and ``key`` give the same pairs.
    """
    rng = random.Random(f"{key}:pairs")
    anchors, negatives = rng.sample(list(anchors), len(anchors)), rng.sample(list(negatives), len(negatives))
    a, n = len(anchors), len(negatives)
    if not a or not n:
        return []
    period = lcm(a, n)
    return [(anchors[t % a], negatives[(t + t // period) % n]) for t in range(min(limit, a * n))]


# --- the client ---------------------------------------------------------------------------------


def write_cache(path: Path, data: Any) -> None:
    """Write ``data`` as compact JSON to ``path`` atomically: a temp file beside it, then a rename.

    Concurrent writers of one path each rename a whole file into place, and a killed writer leaves no
    partial ``path``. Its temp is named as ``records.atomic_path`` names them (``.<name>.<pid>.<n>.tmp``),
    and removed by ``records.remove_stale_temps`` when the path is written again. Unlike
    ``records.write_json`` (indented, so the pure-Python encoder, and a pattern compiled per call to
    scan the folder), this costs a few syscalls, not ~1 ms of CPU per reply.
    """
    folder, prefix = path.parent, f".{path.name}."
    try:
        with os.scandir(folder) as entries:  # a shard folder holds a few files
            if any(entry.name.startswith(prefix) for entry in entries):
                remove_stale_temps(path)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{prefix}{os.getpid()}.{threading.get_ident()}.tmp"
    content = memoryview(json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # not open(): no buffer, fstat, isatty
        try:
            while content:
                content = content[os.write(fd, content) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ChatClient:
    """Chat completions with a disk cache; the SDK retries failed requests. Safe to share between threads.

    Each thread gets its own SDK client (one connection pool each, sharing one TLS context): with one
    pool shared by 64 threads, the pool's bookkeeping (a scan of every connection, twice per request)
    took ~15 % of the CPU.
    """

    def __init__(self, cfg: OpenAIParams, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[openai.OpenAI] = []
        self._tls: ssl.SSLContext | None = None

    @property
    def client(self) -> openai.OpenAI:
        """This thread's SDK client."""
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self._tls is None:  # what each client would build (trust_env: SSL_CERT_FILE etc.)
                    self._tls = httpx2.create_ssl_context()
            from openai._constants import DEFAULT_CONNECTION_LIMITS

            transport = WholeReplyDeadline(self.cfg.timeout, verify=self._tls, limits=DEFAULT_CONNECTION_LIMITS)
            client = self._local.client = openai.OpenAI(
                base_url=self.cfg.base_url,
                api_key=os.environ.get(self.cfg.api_key_env) or "EMPTY",
                timeout=self.cfg.timeout,
                max_retries=self.cfg.retries,
                http_client=openai.DefaultHttpxClient(transport=transport),
            )
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's client (and its connections)."""
        with self._lock:
            clients, self._clients = self._clients, []
            self._local = threading.local()
        for client in clients:
            client.close()

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.stats[what] += n

    def cache_path(self, request: dict[str, Any]) -> Path:
        """Where a request's reply is cached: ``<cache_dir>/ab/cd/<hash>.json``, ``hash`` the sha256 of the
        whole request (not of the server URL), ``ab`` and ``cd`` its first four hex digits.

        Two levels of 256 folders keep each folder small (~8 files at 500k requests; a flat folder
        made every atomic write's scan for stale temps slow).
        """
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        return Path(self.cfg.cache_dir, digest[:2], digest[2:4], f"{digest}.json")

    def ask(self, messages: list[dict[str, str]], key: str) -> list[str]:
        """The strings under ``key`` in the reply to ``messages``, from the cache or the server.

        The SDK retries timeouts, connection errors and HTTP 408/409/429/5xx ``retries`` times, with
        its exponential backoff (or the server's Retry-After); other HTTP errors fail at once. An
        unparseable reply is asked again up to ``retries`` times with ``seed + attempt``, so that a
        server honouring the seed does not repeat it. ``stats`` counts replies from the cache
        (``cached``), HTTP requests sent (``sent``, retries included) and those of them that gave no
        usable reply (``failed``). The reply is cached atomically (temp file + rename), so concurrent
        writers and a killed run leave either the whole reply or none.
        """
        cfg = self.cfg
        request = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature, "seed": self.seed}
        path = self.cache_path(request)
        if path.is_file():
            try:
                items = extract_strings(reply_text(read_json(path)["response"]), key)
            except (UnparseableReply, KeyError, TypeError):
                log.warning("%s: cached reply unusable, asking again", path)
            else:
                self._count("cached")
                return items
        problem = ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                log.warning("%s: %s; asking again (%d/%d)", self.url, problem, attempt, cfg.retries)
            sent = {**request, "seed": self.seed + attempt}
            try:
                # client.post, not chat.completions.create: the same request, retries and errors, without
                # the SDK's per-request walk of the typed params and model parse (most of its CPU time).
                http = self.client.post("/chat/completions", cast_to=httpx2.Response, body=sent)
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                raise self._failed(exc) from None
            retries = _retries_taken(http.request)
            self._count("sent", 1 + retries)
            self._count("failed", retries)
            try:
                response = http.json()
                items = extract_strings(reply_text(response), key)
            except ValueError as exc:  # UnparseableReply, or a body that is not JSON
                self._count("failed")
                problem = f"unparseable reply ({exc})"
            except RecursionError:
                self._count("failed")
                problem = "unparseable reply (JSON nested too deeply)"
            else:
                self._refuse_secrets(response)
                write_cache(path, {"request": sent, "response": response})
                return items
        raise CacheloraError(f"{self.url}: no usable reply after {cfg.retries + 1} attempts (last: {problem})")

    def _refuse_secrets(self, response: Any) -> None:
        """A reply holding the API key (a server echoing its request headers) is refused before anything
        of it is cached or becomes a triplet: DVC outputs and the cache are pushed to shared storage."""
        secret = os.environ.get(self.cfg.api_key_env) or ""
        if len(secret) >= MIN_SECRET_CHARS and secret in json.dumps(response, ensure_ascii=False):
            raise CacheloraError(
                f"{self.url}: the reply holds the API key (${self.cfg.api_key_env}); refused, nothing written"
            )

    def _failed(self, exc: openai.APIStatusError | openai.APIConnectionError) -> CacheloraError:
        """The error for a request the SDK gave up on: at once (an HTTP error it does not retry) or after retries."""
        attempts = 1 + _retries_taken(exc.request)
        self._count("sent", attempts)
        self._count("failed", attempts)
        if isinstance(exc, openai.APIStatusError):
            if attempts == 1:
                hint = f"; is ${self.cfg.api_key_env} set?" if exc.status_code in (401, 403) else ""
                return CacheloraError(f"{self.url}: HTTP {exc.status_code} ({_short(exc.message)}){hint}")
            problem = f"HTTP {exc.status_code}"
        elif isinstance(exc, openai.APITimeoutError):
            problem = f"timed out after {self.cfg.timeout:g}s"
        else:
            problem = f"connection failed ({_short(str(exc.__cause__ or exc))})"
        return CacheloraError(f"{self.url}: no usable reply after {attempts} attempts (last: {problem})")


class WholeReplyDeadline(httpx2.HTTPTransport):
    """A transport that gives up on a reply whose body is not whole ``seconds`` after the request was
    sent: httpx's timeouts are per read, so a server sending a byte a second never trips them. The
    SDK sees a ReadTimeout, which it retries as any timeout."""

    def __init__(self, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = time.monotonic() + self.seconds
        response = super().handle_request(request)
        response.stream = _DeadlineStream(response.stream, deadline, self.seconds, request)
        return response


class _DeadlineStream(httpx2.SyncByteStream):
    def __init__(self, stream: Any, deadline: float, seconds: float, request: httpx2.Request) -> None:
        self.stream, self.deadline, self.seconds, self.request = stream, deadline, seconds, request

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            if time.monotonic() > self.deadline:
                raise httpx2.ReadTimeout(f"reply not whole within {self.seconds:g}s", request=self.request)
            yield chunk

    def close(self) -> None:
        self.stream.close()


def _retries_taken(request: httpx2.Request) -> int:
    """How many times the SDK retried before ``request``: it numbers its retries in a request header."""
    return int(request.headers.get("x-stainless-retry-count", "0"))


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the backend --------------------------------------------------------------------------------


def run_requests(
    ask: Callable[[int], R], count: int, concurrency: int, desc: str, status: Callable[[], str] | None = None
) -> Iterator[tuple[int, R]]:
    """``(i, ask(i))`` for ``i`` in ``range(count)`` as the calls end, ``concurrency`` of them in flight.

    The calls run on a thread pool, handed to it a window (twice ``concurrency``) at a time so that
    memory stays flat however many there are. A tqdm bar counts them (its rate is requests/s, with an
    ETA), ``status()`` after it. The first exception cancels the calls not started yet and is raised
    once those running have ended; so does closing the generator.
    """
    done: queue.SimpleQueue[tuple[int, Future[R]]] = queue.SimpleQueue()
    with (
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llm") as pool,
        tqdm(total=count, desc=desc, unit="request", smoothing=0.05) as bar,
    ):
        pending: set[Future[R]] = set()
        submitted = 0
        try:
            while pending or submitted < count:
                while submitted < count and len(pending) < 2 * concurrency:
                    future = pool.submit(ask, submitted)
                    future.add_done_callback(partial(_put, done, submitted))
                    pending.add(future)
                    submitted += 1
                index, future = done.get()
                pending.discard(future)
                result = future.result()
                bar.update()
                if status is not None:
                    bar.set_postfix_str(status(), refresh=False)
                yield index, result
        except BaseException:
            for future in pending:
                future.cancel()
            pool.shutdown(cancel_futures=True)
            raise


def _put(done: queue.SimpleQueue[tuple[int, Future[R]]], index: int, future: Future[R]) -> None:
    done.put((index, future))


def generate_with_llm(params: Params, lexicon: Lexicon) -> list[dict[str, Any]]:
    """Up to ``generate.openai.triplets_per_query`` triplets per original query of ``lexicon.domain``,
    in the originals' order.

    positive = the original; anchors = its paraphrases that pass the filters; negatives = its passing
    same-topic, different-intent questions that are not (near) copies of the original or of any passing
    paraphrase. Each anchor x negative pairing is a triplet, taken in ``pairings``' order (seeded by
    ``generate.seed`` and the original's id) up to the cap. Originals lacking either are skipped, and
    a triplet equal to an earlier one (two originals with the same text) is kept once. An original's
    triplets are made as soon as both its replies are in, while other requests are still in flight.
    """
    domain = lexicon.domain
    cfg = params.generate.openai
    seed = params.generate.seed
    lengths = (params.validate_.min_chars, params.validate_.max_chars)
    prompts = load_prompts(cfg.prompt_version, domain)
    originals = load_originals(params, lexicon)
    generator = {"backend": "openai", "model": cfg.model, "prompt_version": cfg.prompt_version}
    dropped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()

    def triplets(original: Original, replies: dict[str, list[str]]) -> list[dict[str, Any]]:
        paraphrases, why = filter_candidates(replies["paraphrase"], original.query, *lengths)
        dropped.update({f"paraphrase {k}": v for k, v in why.items()})
        if not paraphrases:
            skipped["no paraphrase"] += 1
            return []
        negatives, why = filter_candidates(
            replies["negative"], original.query, *lengths, avoid=tuple(paraphrases), near=NEAR_DUPLICATE
        )
        dropped.update({f"negative {k}": v for k, v in why.items()})
        if not negatives:
            skipped["no negative"] += 1
            return []
        pairs = pairings(paraphrases, negatives, cfg.triplets_per_query, f"{seed}:{original.source_id}")
        return [
            make_record(
                domain,
                anchor=anchor,
                positive=original.query,
                negative=negative,
                source_id=original.source_id,
                generator=generator,
                topic=original.topic,
                aspect=original.aspect,
            )
            for anchor, negative in pairs
        ]

    client = ChatClient(cfg, seed)
    kinds = list(REPLY_KEYS)

    def ask(job: int) -> list[str]:
        original, kind = originals[job // len(kinds)], kinds[job % len(kinds)]
        return client.ask(build_messages(prompts, kind, original.query), REPLY_KEYS[kind])

    def status() -> str:
        return f"sent {client.stats['sent']}, cached {client.stats['cached']}"

    count = len(originals) * len(kinds)
    by_original: list[list[dict[str, Any]]] = [[] for _ in originals]
    waiting: dict[int, dict[str, list[str]]] = {}  # originals with one reply in
    log.info("%s: asking %s at %s about %d original queries", domain, cfg.model, cfg.base_url, len(originals))
    start = time.perf_counter()
    try:
        with closing(run_requests(ask, count, cfg.concurrency, f"llm {domain}", status)) as results:
            for job, reply in results:
                i = job // len(kinds)
                replies = waiting.setdefault(i, {})
                replies[kinds[job % len(kinds)]] = reply
                if len(replies) == len(kinds):
                    by_original[i] = triplets(originals[i], waiting.pop(i))
    finally:
        client.close()
        wall = time.perf_counter() - start
        log.info(
            "%s: %d requests in %.1f s: %d cached, %d sent (%.1f/s), %d of them failed (retried or given up)",
            domain,
            count,
            wall,
            client.stats["cached"],
            client.stats["sent"],
            client.stats["sent"] / wall if wall else 0.0,
            client.stats["failed"],
        )

    rows: list[dict[str, Any]] = []
    ids: set[str] = set()
    for row in (row for group in by_original for row in group):
        if row["id"] in ids:
            skipped["repeated triplet"] += 1
            continue
        ids.add(row["id"])
        rows.append(row)
    log.info(
        "%s: %d triplets from %d originals (skipped: %s; candidates dropped: %s)",
        domain,
        len(rows),
        len(originals),
        _counts(skipped),
        _counts(dropped),
    )
    return rows


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"
