"""A loopback OpenAI-compatible chat-completions server in front of any teacher, with faults.

It speaks what :mod:`kdtrain.teacher.openai_api` speaks (and what vLLM answers): the posted
messages are rendered as ChatML plus the assistant header, encoded with the injected
``encode``, and handed to the teacher as a ``generate`` request; the reply carries the
text, per-token top-k log-probs (tokens as ``token_id:N`` when asked, else their decoded
piece) with their UTF-8 bytes, and the usage. Faults are injected per request, from a
schedule or a seeded fraction, and every request's outcome is recorded so that tests can
hold the client's counts against the server's.

Use ``with teacher_server(teacher, encode, decode_token) as server:``: the server always
stops, even when the test fails.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Sequence

from kdcontracts.models.tokens import Message
from kdtrain.teacher.base import Teacher, TeacherRequest, TeacherResponse

FAULT_KINDS = ("429", "500", "503", "timeout", "truncated", "half_json", "no_logprobs")
ROLES = ("system", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20  # as OpenAI: more is a 400


@dataclass(frozen=True)
class Faults:
    """``schedule[n]`` is the fault (or None) of the n-th request after the plan is set; later
    requests fail with probability ``fraction``, the kind drawn from ``kinds``, seeded."""

    schedule: Sequence[str | None] = ()
    fraction: float = 0.0
    kinds: Sequence[str] = FAULT_KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = {k for k in (*self.schedule, *self.kinds) if k is not None and k not in FAULT_KINDS}
        if unknown:
            raise ValueError(f"faults: expected kinds among {FAULT_KINDS}, found {sorted(unknown)}")


@dataclass
class Record:
    """What the server saw: one outcome per request, "ok", a fault kind, or a refusal's status."""

    outcomes: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    @property
    def ok(self) -> int:
        return self.outcomes.count("ok")

    @property
    def faults(self) -> Counter[str]:
        return Counter(o for o in self.outcomes if o in FAULT_KINDS)


class TeacherServer:
    """The server and its fault plan; ``start`` and ``stop`` it, or use :func:`teacher_server`."""

    def __init__(self, teacher: Teacher, encode: Callable[[str], list[int]], decode_token: Callable[[int], str], *,
                 api_key: str = "test-key", faults: Faults = Faults(), retry_after_s: float = 1.0,
                 timeout_delay_s: float = 1.0, token_ids: bool = True, top_logprobs_cap: int | None = None,
                 vllm_stop_token: int | None = None, prompt: Callable[[tuple[Message, ...]], str] | None = None, port: int = 0):
        self.teacher, self.encode, self.decode_token, self.api_key = teacher, encode, decode_token, api_key
        self.prompt = prompt or chatml_prompt  # as the served model's chat template renders the messages
        self.retry_after_s, self.timeout_delay_s = retry_after_s, timeout_delay_s
        self.token_ids, self.top_logprobs_cap = token_ids, top_logprobs_cap  # False/cap: a server that ignores them
        # Set: answer as vLLM does, each token's bytes from decoding it alone (a partial character
        # reads as U+FFFD) and the stop token it ended on reported after the text.
        self.vllm_stop_token = vllm_stop_token
        self.record, self.errors = Record(), []  # errors: unexpected exceptions in handlers
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.set_faults(faults)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._httpd.handle_error = self._handle_error  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()  # wakes handlers that are "timing out"
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def set_faults(self, faults: Faults) -> None:
        """A new plan, from its first scheduled request (the record is kept)."""
        with self._lock:
            self._faults, self._planned, self._rng = faults, 0, random.Random(faults.seed)

    def next_fault(self) -> str | None:
        with self._lock:
            plan, n = self._faults, self._planned
            self._planned += 1
            if n < len(plan.schedule):
                return plan.schedule[n]
            return self._rng.choice(list(plan.kinds)) if self._rng.random() < plan.fraction else None

    def note(self, outcome: str) -> None:
        with self._lock:
            self.record.outcomes.append(outcome)

    def answer(self, payload: dict) -> dict:
        """The chat-completions reply of the teacher to ``payload``."""
        messages = tuple(Message(m["role"], m["content"]) for m in payload["messages"])
        text = self.prompt(messages)
        request = TeacherRequest(f"http-{self.record.requests}", messages, text, tuple(self.encode(text)), "generate",
                                 max_new_tokens=payload.get("max_tokens") or 128, top_k=payload.get("top_logprobs") or 0)
        response = self.teacher.complete(request)
        as_ids = self.token_ids and bool(payload.get("return_tokens_as_token_ids"))
        content = [self._token_entry(response, t, as_ids) for t in range(len(response.token_ids))]
        stopped = len(response.token_ids) < request.max_new_tokens  # else it ran out of max_tokens
        if self.vllm_stop_token is not None and stopped:
            stop = self._entry(self.vllm_stop_token, 0.0, self.decode_token(self.vllm_stop_token), as_ids)
            stop["top_logprobs"] = [stop.copy()] * request.top_k  # synthetic: the teacher does not report this position
            content.append(stop)
        return {
            "id": f"chatcmpl-{self.record.requests}", "object": "chat.completion", "model": payload["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": response.text},
                         "logprobs": {"content": content}, "finish_reason": "stop" if stopped else "length"}],
            "usage": {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens,
                      "total_tokens": response.prompt_tokens + response.completion_tokens},
        }

    def _token_entry(self, response: TeacherResponse, t: int, as_ids: bool) -> dict:
        chosen = int(response.token_ids[t])
        start, end = (int(x) for x in response.offsets[t])
        pairs = [(int(i), float(lp)) for i, lp in zip(response.topk_ids[t], response.topk_logprobs[t])]
        piece = self.decode_token(chosen) if self.vllm_stop_token is not None else response.text[start:end]
        entry = self._entry(chosen, next((lp for i, lp in pairs if i == chosen), -9999.0), piece, as_ids)
        entry["top_logprobs"] = [self._entry(i, lp, self.decode_token(i), as_ids) for i, lp in pairs][: self.top_logprobs_cap]
        return entry

    def _entry(self, token_id: int, logprob: float, piece: str, as_ids: bool) -> dict:
        token = f"token_id:{token_id}" if as_ids else self.decode_token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    def _handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            self.errors.append(repr(exc))


class _Handler(BaseHTTPRequestHandler):
    server_version = "kdtrain-teacher-test"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: pytest output is no place for an access log."""

    def do_POST(self) -> None:
        owner: TeacherServer = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            return self._refuse(owner, 404, f"no route {self.path}")
        authorization = self.headers.get("Authorization")
        if authorization != f"Bearer {owner.api_key}":
            # Echoes what it got, as careless servers do: the client must not pass it on.
            return self._refuse(owner, 401, f"invalid API key in Authorization header {authorization!r}")
        try:
            payload = json.loads(body)
            problem = _problem(payload)
        except ValueError:
            problem = "body is not JSON"
        if problem:
            return self._refuse(owner, 400, problem)
        fault = owner.next_fault()
        owner.note(fault or "ok")
        if fault in ("429", "500", "503"):
            extra = {"Retry-After": f"{owner.retry_after_s:g}"} if fault == "429" else {}
            return self._send_json(int(fault), _error(int(fault), f"injected fault {fault}"), extra)
        if fault == "timeout":
            owner.stopping.wait(owner.timeout_delay_s)
            self.close_connection = True
            return None
        reply = owner.answer(payload)
        if fault == "no_logprobs":
            reply["choices"][0]["logprobs"] = None
        data = json.dumps(reply).encode("utf-8")
        if fault == "truncated":  # promises the whole body, sends half, hangs up
            return self._send_bytes(200, data[: len(data) // 2], length=len(data))
        if fault == "half_json":  # a complete HTTP body that is half a JSON document
            return self._send_bytes(200, data[: len(data) // 2])
        return self._send_bytes(200, data)

    def _refuse(self, owner: TeacherServer, status: int, message: str) -> None:
        owner.note(str(status))
        self._send_json(status, _error(status, message))

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), headers=headers)

    def _send_bytes(self, status: int, data: bytes, length: int | None = None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


def _problem(payload: object) -> str | None:
    """Why a request is malformed (a 400), as a server would say it; None if it is fine."""
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return "expected a JSON object with a model"
    messages = payload.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        return f"expected messages as [{{role in {ROLES}, content: str}}]"
    top = payload.get("top_logprobs", 0)
    if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        return f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], found {top!r}"
    return None


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "code": status}}


def chatml_prompt(messages) -> str:
    """ChatML with the assistant header appended: the format of the models these tests serve by default."""
    turns = "".join(f"<|im_start|>user\n<tool_response>\n{m.content}\n</tool_response><|im_end|>\n" if m.role == "tool"
                    else f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


@contextmanager
def teacher_server(teacher: Teacher, encode: Callable[[str], list[int]], decode_token: Callable[[int], str],
                   **options) -> Iterator[TeacherServer]:
    """A started :class:`TeacherServer` (keyword ``options`` as its constructor's), stopped on exit."""
    server = TeacherServer(teacher, encode, decode_token, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a local transformers model folder as an OpenAI-compatible API teacher, until interrupted.

    ``python tests/teacher_server.py --teacher DIR [--port N] [--name MODEL]``: the key clients
    must send is read from the variable named by ``--api-key-env`` (default TEACHER_API_KEY), so it
    never appears on a command line; the first line printed is the base URL."""
    import argparse
    import os
    import time
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--teacher", required=True, help="a transformers model folder (weights and tokenizer)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key-env", default="TEACHER_API_KEY")
    args = parser.parse_args(argv)
    from kdtrain.data.chat import ChatFormat
    from kdtrain.teacher import source
    from kdtrain.teacher.local import LocalTeacher
    from kdtrain.tokenizers.load import Tokenizer
    from kdtrain.train.config import TeacherSource

    folder = TeacherSource(format="transformers", path=str(Path(args.teacher).resolve()))
    tokenizer = Tokenizer("teacher", Path(folder.path), "transformers")
    teacher = LocalTeacher(source.load_model(folder), tokenizer, Path(folder.path).name, "served")
    key = os.environ.get(args.api_key_env)
    if not key:
        parser.error(f"expected the key in ${args.api_key_env}, found it unset")
    server = TeacherServer(teacher, lambda text: tokenizer.encode(text).ids, lambda i: tokenizer.decode([i]), api_key=key,
                           prompt=ChatFormat.of(tokenizer).prompt, port=args.port)
    server.start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
