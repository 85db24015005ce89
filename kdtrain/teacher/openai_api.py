"""An API teacher: any OpenAI-compatible ``/chat/completions`` server (vLLM, hosted APIs).

Only ``generate`` requests: a chat API answers a prompt, it cannot score text it did not
write (the local backend does that). The server is asked for top-k log-probs with tokens
as exact ids (vLLM's ``return_tokens_as_token_ids``: each token reads ``token_id:<int>``);
a server that answers with token strings needs the teacher vocabulary to map them back.

Failures an API has in practice are retried with capped, jittered exponential backoff:
429 (honouring ``Retry-After``), 5xx, timeouts and broken connections, truncated or
non-JSON bodies, a reply without log-probs. A request the server refuses as such (400,
401, 403, 404...) fails at once: asking again would fail the same way. Every attempt goes
through the rate limiter and is booked on the budget; the API key goes into the
``Authorization`` header and nowhere else (not logs, errors, ``repr`` or results).
"""

from __future__ import annotations

import bisect
import http.client
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from kdtrain.teacher.base import TeacherError, TeacherRequest, TeacherResponse
from kdtrain.teacher.budget import Budget, Usage
from kdtrain.teacher.ratelimit import RateLimiter, RateLimits

log = logging.getLogger("kdtrain.teacher")

TOKEN_ID_PREFIX = "token_id:"
REPLACEMENT = "\ufffd".encode("utf-8")
RETRIED_STATUSES = frozenset({408, 409, 429})  # and every 5xx


@dataclass(frozen=True)
class RetryPolicy:
    """Retry ``max_retries`` times after the first attempt; delays double from ``base_delay_s``
    up to ``max_delay_s``, each shortened by up to ``jitter`` (a fraction) at random so that
    clients that failed together do not retry together. ``seed`` makes the jitter repeatable."""

    max_retries: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s or not 0 <= self.jitter <= 1:
            raise TeacherError(f"retry policy: expected max_retries >= 0, 0 <= base_delay_s <= max_delay_s and "
                               f"jitter in [0, 1], found {self}")

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (0 = the first retry)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** retry) * (1.0 - self.jitter * rng.random())


class _Secret:
    """Holds the API key so that no ``repr``, traceback local or f-string can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not (internal to the retry loop)."""

    def __init__(self, cause: str, reached: bool = True, retry_after: float | None = None):
        super().__init__(cause)
        self.cause, self.reached, self.retry_after = cause, reached, retry_after


class OpenAIChatTeacher:
    """:class:`~kdtrain.teacher.base.Teacher` over an OpenAI-compatible chat-completions API."""

    def __init__(self, base_url: str, model: str, version: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 limits: RateLimits = RateLimits(), retry: RetryPolicy = RetryPolicy(), budget: Budget | None = None,
                 timeout_s: float = 60.0, vocab: Mapping[str, int] | None = None, name: str | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise TeacherError(f"API teacher: at base_url: expected an http(s) URL such as http://host:8000/v1, found {base_url!r}")
        key = os.environ.get(api_key_env, "") if api_key_env else None
        if api_key_env and not key:
            raise TeacherError(f"API teacher: expected the API key in environment variable {api_key_env}, found it unset or empty")
        self.base_url, self.model, self.version, self.name = base_url.rstrip("/"), model, version, name or model
        self.retry, self.budget, self.timeout_s, self.vocab = retry, budget or Budget(), timeout_s, vocab
        self._key = _Secret(key) if key else None
        self._connection = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._path = url.hostname, url.port, url.path.rstrip("/") + "/chat/completions"
        self._limiter = RateLimiter(limits, clock, sleep)
        self._sleep, self._rng = sleep, random.Random(retry.seed)

    def __repr__(self) -> str:
        return f"OpenAIChatTeacher(base_url={self.base_url!r}, model={self.model!r}, version={self.version!r})"

    def complete(self, request: TeacherRequest) -> TeacherResponse:
        if request.mode != "generate":
            raise TeacherError(
                f"request {request.sample_id}: expected mode 'generate' for an API teacher, found {request.mode!r}: "
                "chat-completions APIs cannot score given text, only the local backend can"
            )
        estimate = len(request.ids) + request.max_new_tokens
        body = json.dumps(self._payload(request)).encode("utf-8")
        attempts = self.retry.max_retries + 1
        for attempt in range(1, attempts + 1):
            self.budget.reserve(estimate)
            self._limiter.acquire(estimate)
            try:
                return self._attempt(request, body, estimate)
            except _Retryable as failure:
                last = failure
            if attempt == attempts:
                break
            delay = last.retry_after if last.retry_after is not None else self.retry.delay_s(attempt - 1, self._rng)
            log.warning("teacher %s: request %s: %s (attempt %d of %d); retrying in %.3f s",
                        self.name, request.sample_id, last.cause, attempt, attempts, delay)
            self._sleep(delay)
        log.error("teacher %s: request %s: giving up after %d attempts; last failure: %s",
                  self.name, request.sample_id, attempts, last.cause)
        raise TeacherError(f"request {request.sample_id}: expected a usable reply from {self.base_url} within "
                           f"{attempts} attempts, found on the last: {last.cause}")

    def _payload(self, request: TeacherRequest) -> dict:
        """Greedy, with top-k log-probs and (on vLLM) exact token ids; tool turns keep role "tool"."""
        return {"model": self.model, "messages": [{"role": m.role, "content": m.content} for m in request.messages],
                "max_tokens": request.max_new_tokens, "temperature": 0, "logprobs": True,
                "top_logprobs": request.top_k, "return_tokens_as_token_ids": True}

    def _attempt(self, request: TeacherRequest, body: bytes, estimate: int) -> TeacherResponse:
        """One HTTP round trip, booked on the budget whatever its outcome once it reached the server."""
        try:
            status, retry_after, raw = self._post(body)
        except _Retryable as failure:
            if failure.reached:
                self.budget.charge(failed=True)
            raise
        usage = None
        try:
            self._check_status(status, retry_after, raw)
            data = self._json(raw)
            usage = _usage(data)
            response = self._parse(request, data, usage)
        except (_Retryable, TeacherError):
            self.budget.charge(usage or Usage(), failed=True)
            if usage is not None:
                self._limiter.settle(estimate, usage.total)
            raise
        spent = Usage(response.prompt_tokens, response.completion_tokens)
        self.budget.charge(spent)
        self._limiter.settle(estimate, spent.total)
        return response

    def _post(self, body: bytes) -> tuple[int, float | None, bytes]:
        """Status, ``Retry-After`` seconds and body; transport failures as :class:`_Retryable`."""
        conn = self._connection(self._host, self._port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = "Bearer " + self._key.reveal()
        try:
            try:
                conn.request("POST", self._path, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"could not send the request ({self._describe(exc)})", reached=False) from None
            try:
                reply = conn.getresponse()
                return reply.status, _seconds(reply.getheader("Retry-After")), reply.read()
            except TimeoutError:
                raise _Retryable(f"no reply within timeout_s={self.timeout_s:g}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(f"connection broke while reading the reply ({self._describe(exc)})") from None
        finally:
            conn.close()

    def _check_status(self, status: int, retry_after: float | None, raw: bytes) -> None:
        if 200 <= status < 300:
            return
        cause = f"HTTP {status}: {self._server_message(raw)}"
        if status in RETRIED_STATUSES or status >= 500:
            raise _Retryable(cause, retry_after=retry_after)
        raise TeacherError(f"{self.base_url}/chat/completions: expected HTTP 200, found {cause} (not retried: "
                           "the same request would be refused again)")

    @staticmethod
    def _json(raw: bytes) -> dict:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _Retryable(f"HTTP 200 with a body that is not a JSON object ({len(raw)} bytes, truncated?)")
        return data

    def _parse(self, request: TeacherRequest, data: dict, usage: Usage | None) -> TeacherResponse:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            logprobs = choice.get("logprobs")
            content = logprobs.get("content") if isinstance(logprobs, dict) else None
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable("HTTP 200 without choices[0].message.content") from None
        if not isinstance(content, list):
            raise _Retryable("HTTP 200 without choices[0].logprobs.content")
        k = request.top_k
        ids, pieces, k_ids, k_lps = [], [], [], []
        for position, entry in enumerate(content):
            try:
                token, alternatives = entry["token"], entry["top_logprobs"]
                if len(alternatives) < k:
                    raise TeacherError(
                        f"request {request.sample_id}: at logprobs.content[{position}].top_logprobs: expected "
                        f"top_k={k} alternatives, found {len(alternatives)}: the server ignores top_logprobs"
                    )
                best = sorted(alternatives, key=lambda a: -float(a["logprob"]))[:k]
                ids.append(self._token_id(token))
                pieces.append(self._token_bytes(entry))
                k_ids.append([self._token_id(a["token"]) for a in best])
                k_lps.append([float(a["logprob"]) for a in best])
            except (KeyError, TypeError, ValueError):
                raise _Retryable(f"HTTP 200 with a malformed logprobs.content[{position}]") from None
        if choice.get("finish_reason") == "stop" and ids and not _spells(text, pieces) and _spells(text, pieces[:-1]):
            # vLLM reports the stop token it ended on without printing it; the local teacher drops it too.
            ids, pieces, k_ids, k_lps = ids[:-1], pieces[:-1], k_ids[:-1], k_lps[:-1]
        try:
            offsets = token_char_spans(text, pieces, ids)
        except TeacherError as exc:
            raise TeacherError(f"request {request.sample_id}: {exc}") from None
        return TeacherResponse(
            text=text,
            token_ids=np.asarray(ids, np.int32),
            offsets=offsets,
            topk_ids=np.asarray(k_ids, np.int32).reshape(len(ids), k),
            topk_logprobs=np.asarray(k_lps, np.float32).reshape(len(ids), k),
            prompt_tokens=usage.prompt_tokens if usage else len(request.ids),
            completion_tokens=usage.completion_tokens if usage else len(ids),
        )

    def _token_id(self, token: str) -> int:
        if token.startswith(TOKEN_ID_PREFIX):
            return int(token[len(TOKEN_ID_PREFIX):])
        if self.vocab is not None and token in self.vocab:
            return int(self.vocab[token])
        raise TeacherError(
            f"{self.base_url}: expected tokens as '{TOKEN_ID_PREFIX}<int>' (vLLM's return_tokens_as_token_ids) "
            f"or a vocab that maps token strings, found {token!r}" + (" (not in the vocab)" if self.vocab is not None else "")
        )

    @staticmethod
    def _token_bytes(entry: dict) -> bytes:
        """The token's UTF-8 bytes; a server that omits them is trusted to send the text as the token."""
        raw = entry.get("bytes")
        if raw is not None:
            return bytes(raw)
        if entry["token"].startswith(TOKEN_ID_PREFIX):
            raise TeacherError(f"expected the bytes of token {entry['token']!r}, found none: its text span is unknown")
        return entry["token"].encode("utf-8")

    def _server_message(self, raw: bytes) -> str:
        try:
            error = json.loads(raw).get("error")
            message = error.get("message") if isinstance(error, dict) else error
        except (ValueError, AttributeError):
            message = None
        return self._redact(str(message) if message else raw[:200].decode("utf-8", "replace") or "(empty body)")

    def _describe(self, exc: BaseException) -> str:
        name, text = type(exc).__name__, str(exc)
        return self._redact(text if text.startswith(name) else f"{name}: {text}" if text else name)

    def _redact(self, text: str) -> str:
        """Whatever the server or a library says goes through here: it never carries the key."""
        return text.replace(self._key.reveal(), "<secret>") if self._key is not None else text


def token_char_spans(text: str, pieces: Sequence[bytes], ids: Sequence[int] = ()) -> np.ndarray:
    """Character spans in ``text`` of tokens whose UTF-8 bytes are ``pieces``, int32 [T, 2].

    A token may end inside a multi-byte character. The character then belongs to the token
    in which it *starts* (its span ends after that character); a token that only continues
    it starts after it, so a token lying wholly inside one character gets an empty span.
    Spans are contiguous, never decrease, and cover ``text`` exactly.

    Servers that decode each token alone (vLLM) send a partial character as U+FFFD, so such a
    piece fits wherever the text's bytes decode to it, with replacement. Of the splits that
    spell the whole text, the one taken gives a token id (``ids``) the length it had before,
    else 2 bytes to a piece that starts a character and 1 to one that continues it (byte-level
    BPE merges a lead byte with its first continuation byte, rarely continuations together).
    """
    encoded = text.encode("utf-8")
    ends = _byte_ends(encoded, pieces, ids)
    if ends is None:
        raise TeacherError(f"teacher reply: expected the tokens' bytes to spell the content ({len(encoded)} bytes), "
                           f"found {len(pieces)} tokens of {sum(map(len, pieces))} bytes that do not")
    starts, position = [], 0  # byte offset at which each character starts
    for char in text:
        starts.append(position)
        position += len(char.encode("utf-8"))
    bounds = [0] + [bisect.bisect_left(starts, end) for end in ends]  # characters starting before each end
    return np.asarray(list(zip(bounds[:-1], bounds[1:])), np.int32).reshape(-1, 2)


def _byte_ends(encoded: bytes, pieces: Sequence[bytes], ids: Sequence[int] = ()) -> list[int] | None:
    """Where each piece ends in ``encoded`` on one split that spells all of it, or None."""
    edges, reached = [], {0}  # per piece: the (start, end) it may span from a reachable start
    for piece in pieces:
        edges.append([(start, end) for start in reached for end in _fits(encoded, start, piece)])
        reached = {end for _, end in edges[-1]}
    alive = {len(encoded)}
    for i in reversed(range(len(pieces))):  # keep the edges from which the end can still be reached
        edges[i] = [(start, end) for start, end in edges[i] if end in alive]
        alive = {start for start, _ in edges[i]}
    if 0 not in alive:
        return None
    ends, position, lengths = [], 0, {}
    for i, piece in enumerate(pieces):
        key = ids[i] if i < len(ids) else piece
        usual = 1 if encoded[position:position + 1] and encoded[position] & 0xC0 == 0x80 else 2
        choice = min((end for start, end in edges[i] if start == position),
                     key=lambda end: (end - position != lengths.get(key, usual), end))
        lengths.setdefault(key, choice - position)
        ends.append(position := choice)
    return ends


def _spells(text: str, pieces: Sequence[bytes]) -> bool:
    return _byte_ends(text.encode("utf-8"), pieces) is not None


def _fits(encoded: bytes, start: int, piece: bytes) -> list[int]:
    """Ends at which ``piece`` can be the token starting at byte ``start``."""
    if encoded.startswith(piece, start):
        return [start + len(piece)]
    if REPLACEMENT not in piece:
        return []
    # A U+FFFD (3 bytes) stands for at most 3 raw bytes, so the token is at most len(piece) long.
    return [end for end in range(start + 1, min(len(encoded), start + len(piece)) + 1)
            if encoded[start:end].decode("utf-8", "replace").encode("utf-8") == piece]


def _usage(data: dict) -> Usage | None:
    usage = data.get("usage")
    try:
        return Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
    except (KeyError, TypeError, ValueError):
        return None


def _seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds; an HTTP-date form is ignored (backoff applies instead)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
