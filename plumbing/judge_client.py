"""The LLM judge's HTTP client: one OpenAI-compatible chat-completions endpoint, standard library
only.

Plumbing, not the method: the transport (one POST and its time-out), the retries and their
back-off, the time budget of the whole judging (--llm-budget) and giving up on an endpoint that
stopped answering. The judging protocol (the prompt template, the verdict parsing, the order
randomisation, asking in both orders) stays in evaluate.py, because that is the paper's evaluation
(§ "Experiments": a GPT-4 judge answering [[A]], [[B]] or [[C]] for a tie).

- `chat_completion`   one request with its retries -> (answer, None) or (None, reason); never raises
                      for a network or server problem
- `NETWORK_FAILURES`  the starts of the reasons that mean the endpoint could not be reached
- `JudgeClient`       an endpoint with its settings, a deadline and the count of network failures in
                      a row: `ask(messages)` for every judgment, `preflight(...)` for the one
                      connection check before anything else
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request

from plumbing.common import check


def chat_completion(messages: list[dict], *, url: str, model: str, api_key: str | None,
                    timeout: float, retries: int, backoff: float, max_tokens: int = 512,
                    deadline: float | None = None,
                    retry_network: bool = True) -> tuple[str | None, str | None]:
    """POST one chat-completions request (standard library only) -> (answer text, None) or (None,
    reason).

    The request carries `max_tokens` (the answer's length is bounded) and temperature 0. Retried
    (evaluate.py's choice 3): HTTP 5xx and 429, and (with `retry_network`) time-outs and connection
    errors; before retry i (1, 2, ...) it waits backoff x 2^(i−1) s. Not retried: other HTTP errors
    (the request is wrong), a reply that is not HTTP or is cut short (http.client's BadStatusLine,
    IncompleteRead, ...) and a body that is not a chat completion. `deadline` (time.monotonic())
    bounds the whole call: no wait or time-out runs past it. Never raises for a network or server
    problem: the caller counts the prompt as invalid, with the reason. A reason that starts with
    "connection" or "timed out" is a network failure (`NETWORK_FAILURES`).
    """
    body = json.dumps({"model": model, "messages": messages, "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    reason = "no attempt"
    for attempt in range(retries + 1):
        if attempt > 0:
            wait = backoff * 2 ** (attempt - 1)
            if deadline is not None and time.monotonic() + wait >= deadline:
                return None, f"{reason} (the time budget ran out after {attempt} attempts)"
            time.sleep(wait)
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left <= 0:
            return None, f"{reason} (the time budget ran out after {attempt} attempts)"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=left) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:  # the server answered with an error status
            reason = f"HTTP {e.code}"
            if e.code == 429 or e.code >= 500:
                continue
            return None, reason
        except (urllib.error.URLError, OSError) as e:
            # TimeoutError is an OSError; a connect time-out a URLError
            cause = getattr(e, "reason", e)
            reason = (f"timed out after {left:.3g} s" if isinstance(cause, TimeoutError) else
                      f"connection: {' '.join(str(cause).split()) or type(cause).__name__}")
            if not retry_network:
                return None, reason
            continue
        except http.client.HTTPException as e:
            # not HTTP at all (BadStatusLine), or a body cut short
            return None, ("malformed HTTP reply "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:80]})")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"unreadable response body: {raw[:80]!r}"
        if not isinstance(content, str):
            return None, f"unreadable response body: content is {type(content).__name__}"
        return content, None
    return None, f"{reason} (after {retries + 1} attempts)"


NETWORK_FAILURES = ("connection", "timed out")

GIVE_UP_AFTER = 3  # network failures in a row after which the endpoint is taken to be gone


@dataclasses.dataclass
class JudgeClient:
    """One endpoint with evaluate.py's --llm-* settings, for one whole judging.

    `ask` sends every request through `chat_completion` with these settings. The judging has
    `budget` seconds, counted from when the client is made: `deadline` (time.monotonic()) bounds
    every request, and once it has passed nothing more is sent. `network_failures` counts the
    requests in a row that failed for a network reason (`NETWORK_FAILURES`, each after its
    retries); any other outcome (an answer, an HTTP error, an unreadable body) resets it to 0. After
    `GIVE_UP_AFTER` in a row the endpoint is taken to be gone: the rest would each wait for their
    retries, so nothing more is sent. What is not sent gets a reason starting "not asked:".
    """
    url: str
    model: str
    api_key: str | None = dataclasses.field(repr=False)  # never printed
    timeout: float
    retries: int
    backoff: float
    max_tokens: int
    budget: float  # seconds for the whole judging (--llm-budget)
    deadline: float = dataclasses.field(init=False)
    network_failures: int = dataclasses.field(default=0, init=False)  # in a row
    last_network_failure: str = dataclasses.field(default="", init=False)  # its reason

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget

    def ask(self, messages: list[dict]) -> tuple[str | None, str | None]:
        """One judgment's request -> (answer, None) or (None, why there is none)."""
        if self.network_failures >= GIVE_UP_AFTER:
            return None, f"not asked: the endpoint stopped answering ({self.last_network_failure})"
        if time.monotonic() >= self.deadline:
            return None, f"not asked: the --llm-budget of {self.budget:g} s was spent"
        answer, reason = chat_completion(messages, url=self.url, model=self.model,
                                         api_key=self.api_key, timeout=self.timeout,
                                         retries=self.retries, backoff=self.backoff,
                                         max_tokens=self.max_tokens, deadline=self.deadline)
        if reason and reason.startswith(NETWORK_FAILURES):
            self.network_failures += 1
            self.last_network_failure = reason
        else:
            self.network_failures = 0
        return answer, reason

    def preflight(self, messages: list[dict], *, timeout: float, key_env: str) -> str:
        """One short request before anything else (`timeout` s, max_tokens 16, no retry for a
        network failure) -> its answer. An endpoint that refuses the connection, an unknown host, a
        first request that times out, an HTTP error or a reply that is not a chat completion raise
        common.UserError: one line naming the endpoint, within seconds instead of after every
        request's retries. `key_env` is the variable the API key was read from (named in that line).
        Neither the deadline nor the count of network failures is touched."""
        answer, reason = chat_completion(
            messages, url=self.url, model=self.model, api_key=self.api_key, timeout=timeout,
            retries=self.retries, backoff=self.backoff, max_tokens=16,
            deadline=time.monotonic() + 4 * timeout, retry_network=False)
        check(answer is not None, f"--llm-url {self.url}: the judge endpoint failed its first "
                                  f"request ({reason}); nothing was judged (check the URL, "
                                  "--llm-model and $" + key_env + ")")
        return answer
