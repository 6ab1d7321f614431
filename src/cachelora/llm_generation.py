"""The ``openai`` generation backend: triplets from an OpenAI-compatible chat-completions server.

Each original query gets two requests, one for paraphrases (the anchor) and one for same-topic,
different-intent questions (the negative); the original itself is the positive. Replies are cached
on disk by a hash of the request, so an interrupted run resumes and a repeated run sends nothing.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from cachelora.errors import CacheloraError
from cachelora.lexicon import PLACEHOLDER_RE, Lexicon, render
from cachelora.params import OpenAIParams, Params
from cachelora.records import read_json, read_yaml, write_json
from cachelora.triplets import concept_id, make_record, normalise, stable_id

log = logging.getLogger(__name__)

PROMPT_DIR = Path("data/prompts")
PROMPT_KEYS = ("system", "paraphrase", "negative")
REPLY_KEYS = {"paraphrase": "paraphrases", "negative": "negatives"}
CANDIDATES = 5  # candidates asked for per request: ``{n}`` in the prompts
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
            if isinstance(value, dict):
                value = value.get(key, next(iter(value.values())) if len(value) == 1 else None)
            if isinstance(value, list) and (not value or any(isinstance(v, str) for v in value)):
                return [v.strip() for v in value if isinstance(v, str)]
    raise UnparseableReply(f"no JSON list of strings under '{key}'")


def reply_text(response: dict[str, Any]) -> str | None:
    """The first choice's message content of a chat-completions response body."""
    try:
        return response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UnparseableReply("no choices[0].message.content") from None


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
        elif norm in avoid_norm or (
            near is not None and any(difflib.SequenceMatcher(None, norm, a).ratio() >= near for a in avoid_norm)
        ):
            reason = "same_as_original"
        elif norm in seen:
            reason = "duplicate"
        else:
            kept.append(text)
            seen.add(norm)
            continue
        dropped[reason] += 1
    return kept, dropped


# --- the client ---------------------------------------------------------------------------------


class ChatClient:
    """Chat completions with a disk cache; the SDK retries failed requests. Safe to share between threads."""

    def __init__(self, cfg: OpenAIParams, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        self.client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            timeout=cfg.timeout,
            max_retries=cfg.retries,
        )
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.stats[what] += n

    def cache_path(self, request: dict[str, Any]) -> Path:
        """Where a request's reply is cached: a hash of the whole request (not of the server URL)."""
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        return Path(self.cfg.cache_dir) / f"{digest}.json"

    def ask(self, messages: list[dict[str, str]], key: str) -> list[str]:
        """The strings under ``key`` in the reply to ``messages``, from the cache or the server.

        The SDK retries timeouts, connection errors and HTTP 408/409/429/5xx ``retries`` times, with
        its exponential backoff (or the server's Retry-After); other HTTP errors fail at once. An
        unparseable reply is asked again up to ``retries`` times with ``seed + attempt``, so that a
        server honouring the seed does not repeat it.
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
                raw = self.client.chat.completions.with_raw_response.create(**sent)
                self._count("sent", 1 + raw.retries_taken)
                completion = raw.parse()
                if not isinstance(completion, ChatCompletion):  # the SDK passes non-object bodies through
                    raise UnparseableReply("response body is not a chat completion")
                response = completion.model_dump(mode="json", exclude_unset=True)
                items = extract_strings(reply_text(response), key)
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                raise self._failed(exc) from None
            except (UnparseableReply, json.JSONDecodeError) as exc:
                problem = f"unparseable reply ({exc})"
            else:
                write_json(path, {"request": sent, "response": response})
                return items
        raise CacheloraError(f"{self.url}: no usable reply after {cfg.retries + 1} attempts (last: {problem})")

    def _failed(self, exc: openai.APIStatusError | openai.APIConnectionError) -> CacheloraError:
        """The error for a request the SDK gave up on: at once (an HTTP error it does not retry) or after retries."""
        # The SDK numbers its retries in a request header; the last request's number tells how many it sent.
        attempts = 1 + int(exc.request.headers.get("x-stainless-retry-count", "0"))
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


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the backend --------------------------------------------------------------------------------


def generate_with_llm(params: Params, lexicon: Lexicon) -> list[dict[str, Any]]:
    """One triplet per original query of ``lexicon.domain``, in the originals' order.

    anchor = the first paraphrase that passes the filters, positive = the original, negative = the
    first passing same-topic, different-intent question. Originals lacking either are skipped.
    """
    domain = lexicon.domain
    cfg = params.generate.openai
    lengths = (params.validate_.min_chars, params.validate_.max_chars)
    prompts = load_prompts(cfg.prompt_version, domain)
    originals = load_originals(params, lexicon)
    client = ChatClient(cfg, params.generate.seed)
    jobs = [(i, kind) for i in range(len(originals)) for kind in REPLY_KEYS]
    replies: dict[tuple[int, str], list[str]] = {}
    log.info("%s: asking %s at %s about %d original queries", domain, cfg.model, cfg.base_url, len(originals))
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = {
            pool.submit(client.ask, build_messages(prompts, kind, originals[i].query), REPLY_KEYS[kind]): (i, kind)
            for i, kind in jobs
        }
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"llm {domain}", unit="request"):
                replies[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise

    generator = {"backend": "openai", "model": cfg.model, "prompt_version": cfg.prompt_version}
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for i, original in enumerate(originals):
        paraphrases, why = filter_candidates(replies[i, "paraphrase"], original.query, *lengths)
        dropped.update({f"paraphrase {k}": v for k, v in why.items()})
        if not paraphrases:
            skipped["no paraphrase"] += 1
            continue
        anchor = paraphrases[0]
        negatives, why = filter_candidates(
            replies[i, "negative"], original.query, *lengths, avoid=(anchor,), near=NEAR_DUPLICATE
        )
        dropped.update({f"negative {k}": v for k, v in why.items()})
        if not negatives:
            skipped["no negative"] += 1
            continue
        rows.append(
            make_record(
                domain,
                anchor=anchor,
                positive=original.query,
                negative=negatives[0],
                source_id=original.source_id,
                generator=generator,
                topic=original.topic,
                aspect=original.aspect,
            )
        )
    log.info(
        "%s: %d triplets from %d originals (skipped: %s; candidates dropped: %s; requests sent %d, cached %d)",
        domain,
        len(rows),
        len(originals),
        _counts(skipped),
        _counts(dropped),
        client.stats["sent"],
        client.stats["cached"],
    )
    return rows


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"
