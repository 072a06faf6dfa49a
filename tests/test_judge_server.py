"""The LLM judge against a real server process (tests/helpers/judge_server.py: its own process,
speaking the OpenAI chat-completions protocol over TCP), not only the in-process stub of
test_evaluate_llm.py.

What must hold: a valid, a malformed (not HTTP), a truncated, a slow or a refused reply is a verdict
or an invalid judgment with its reason, never a traceback; an endpoint that cannot be reached stops
the run within seconds with one line naming it; the time budget bounds the whole judging, and so
does an endpoint that stops answering; every judgment is on disk as soon as it is made (Ctrl-C
loses none); a run whose judgments are mostly invalid fails (exit 2) instead of reporting a table of
zeros; every request carries max_tokens.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import evaluate
from plumbing import judge_client
from plumbing.common import UserError
from conftest import REPO, run_command, subprocess_env

SERVER = os.path.join(REPO, "tests", "helpers", "judge_server.py")


@contextlib.contextmanager
def judge_server(*actions: str, log: str = ""):
    """Start the server process with its script of actions; yield its URL; kill it afterwards."""
    cmd = [sys.executable, SERVER, *(["--log", log] if log else []), *actions]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        port = int(p.stdout.readline().split()[1])  # "port N" once it listens
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        p.kill()
        p.wait()


def closed_port_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def ask(url: str, **kw) -> tuple:
    options = dict(url=url, model="m", api_key=None, timeout=1.0, retries=0, backoff=0.01)
    options.update(kw)
    return judge_client.chat_completion([{"role": "user", "content": "hi"}], **options)


def test_every_kind_of_reply_is_an_answer_or_a_reason():
    actions = ("answer:Reply A is right. [[A]]", "badline", "truncated", "close", "status:503",
               "slow:3")
    with judge_server(*actions) as url:
        assert ask(url) == ("Reply A is right. [[A]]", None)
        answer, reason = ask(url)
        assert answer is None and reason.startswith("malformed HTTP reply (BadStatusLine"), reason
        answer, reason = ask(url)
        assert answer is None and reason.startswith("malformed HTTP reply (IncompleteRead"), reason
        # closed without a reply: a connection failure (retried when retries > 0)
        answer, reason = ask(url)
        assert (answer is None and reason.startswith("connection")
                and reason.endswith("(after 1 attempts)")), reason
        assert ask(url) == (None, "HTTP 503 (after 1 attempts)")
        t0 = time.monotonic()
        answer, reason = ask(url)  # the server answers after 3 s; the client waits 1 s
        assert answer is None and reason == "timed out after 1 s (after 1 attempts)"
        assert time.monotonic() - t0 < 2.5


def evaluate_flags(world, url: str, out, n: int, *extra: str) -> list[str]:
    return ["evaluate.py", "--policy-a", world.base_model, "--policy-b", world.base_model,
            "--judge", "llm", "--llm-url", url, "--llm-retries", "0",
            "--prompts", world.eval_prompts, "--max-prompts", str(n), "--max-new-tokens", "4",
            "--out", str(out), *extra]


def judgments(out) -> list[dict]:
    return [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]


def test_a_run_against_the_server_keeps_going_and_records_why(world, tmp_path):
    # request 0 is the connection check (JudgeClient.preflight); then one request per prompt
    # (one order)
    log = str(tmp_path / "requests.jsonl")
    actions = ("answer:[[C]]", "answer:[[A]]", "badline", "answer:Reply B says more. [[B]]",
               "truncated", "answer:Equally good. [[C]]", "slow:5")
    out = tmp_path / "eval"
    with judge_server(*actions, log=log) as url:
        rc, stdout, stderr = run_command(evaluate_flags(world, url, out, 6, "--llm-timeout", "1",
                                                        "--llm-max-tokens", "64"))
    # 3 of 6 invalid is not more than --max-invalid 0.5: the run succeeds
    assert rc == 0 and "Traceback" not in stderr, stderr
    j = judgments(out)
    assert len(j) == 6
    # the verdict's position -> the policy shown there (a_first: A was shown as reply A)
    assert j[0]["outcome"] == ("win" if j[0]["a_first"] else "lose")
    assert j[2]["outcome"] == ("lose" if j[2]["a_first"] else "win")
    assert j[4]["outcome"] == "tie"
    assert j[1]["outcome"] == j[3]["outcome"] == j[5]["outcome"] == "invalid"
    assert j[1]["reason"].startswith("malformed HTTP reply (BadStatusLine")
    assert j[3]["reason"].startswith("malformed HTTP reply (IncompleteRead")
    assert j[5]["reason"] == "timed out after 1 s (after 1 attempts)"
    w = json.loads((out / "results.json").read_text())["win_tie_lose"]
    assert (w["invalid"], w["win"] + w["lose"], w["tie"]) == (3, 2, 1)
    # what was sent: 7 requests, each with a bounded max_tokens (16 for the connection check, else
    # the flag's 64)
    bodies = [json.loads(line) for line in open(log)]
    assert [b["max_tokens"] for b in bodies] == [16] + [64] * 6


def test_an_unreachable_endpoint_stops_the_run_within_seconds(world, tmp_path):
    out = tmp_path / "never"
    url = closed_port_url()
    t0 = time.monotonic()
    rc, stdout, stderr = run_command(evaluate_flags(world, url, out, 8, "--both-orders"))
    elapsed = time.monotonic() - t0
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: --llm-url {url}: the judge endpoint failed its first "
                               "request (connection")
    # the process start and imports; the refused connection itself takes milliseconds
    assert elapsed < 30
    assert not out.exists()


def test_a_name_not_resolved_or_a_first_request_timed_out_is_one_error(tmp_path):
    args = evaluate.Args(llm_url="http://no-such-host.invalid/v1/chat/completions",
                         llm_preflight_timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"no-such-host.invalid/v1/chat/completions: the judge "
                                        r"endpoint failed its first request \(connection"):
        evaluate.check_endpoint(args)
    with judge_server("slow:30") as url:
        args = evaluate.Args(llm_url=url, llm_preflight_timeout=1.0)
        with pytest.raises(UserError, match=r"failed its first request \(timed out after 1 s\)"):
            evaluate.check_endpoint(args)
    assert time.monotonic() - t0 < 10


def test_most_judgments_invalid_fail_the_run_after_writing_them(world, tmp_path):
    # a weak judge that writes [C] instead of [[C]]: no verdict is readable, the run must not report
    # 0 / 0 / 0 %
    out = tmp_path / "eval"
    with judge_server("answer:[[C]]", "answer:They are equally good, so [C].") as url:
        rc, stdout, stderr = run_command(evaluate_flags(world, url, out, 4))
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0] == (f"error: {out}: 4 of 4 judgments are invalid (more than --max-invalid "
                        "0.5): 4 x no single [[A]]/[[B]]/[[C]] verdict in the answer; the win / "
                        "tie / lose table is not a result (see judgments.jsonl)")
    # kept, for a look
    assert [x["answer"] for x in judgments(out)] == ["They are equally good, so [C]."] * 4
    w = json.loads((out / "results.json").read_text())["win_tie_lose"]
    assert (w["invalid"], w["win_pct"], w["tie_pct"], w["lose_pct"]) == (4, None, None, None)
    assert "Not a result" in (out / "report.md").read_text()


def _judge_args(out, **kw) -> evaluate.Args:
    args = evaluate.Args(judge="llm", out=str(out), **kw)
    os.makedirs(out, exist_ok=True)
    return args


def test_the_time_budget_bounds_the_judging(tmp_path):
    # every answer takes 1 s; a budget of 2.5 s: requests 1-2 answer (t = 1, 2), request 3 may run
    # only the 0.5 s left and times out, the others are not sent
    prompts = [f"q{i}" for i in range(6)]
    with judge_server("slow:1") as url:
        args = _judge_args(tmp_path / "out", llm_url=url, llm_timeout=10.0, llm_retries=0,
                           llm_budget=2.5)
        t0 = time.monotonic()
        j = evaluate.judge(args, prompts, prompts, prompts, 1, 0, torch.device("cpu"))
        elapsed = time.monotonic() - t0
    assert elapsed < 4.5
    assert [x["outcome"] != "invalid" for x in j[:2]] == [True, True]
    assert all(x["reason"] == "not asked: the --llm-budget of 2.5 s was spent" for x in j[3:])
    assert len(judgments(tmp_path / "out")) == 6  # one line per prompt, written as they came


def test_an_endpoint_that_stops_answering_is_not_asked_again_and_again(tmp_path):
    # after 3 requests in a row fail for a network reason (each after its retries) the rest are
    # not sent
    prompts = [f"q{i}" for i in range(8)]
    args = _judge_args(tmp_path / "out", llm_url=closed_port_url(), llm_retries=2, llm_backoff=0.01)
    j = evaluate.judge(args, prompts, prompts, prompts, 1, 0, torch.device("cpu"))
    assert all(x["reason"].startswith("connection") and x["reason"].endswith("(after 3 attempts)")
               for x in j[:3])
    assert all(x["reason"].startswith("not asked: the endpoint stopped answering (connection")
               for x in j[3:])


def test_ctrl_c_keeps_every_judgment_made_so_far(world, tmp_path):
    out = tmp_path / "eval"
    with judge_server("answer:[[C]]", "slow:0.5") as url:
        p = subprocess.Popen([sys.executable, *evaluate_flags(world, url, out, 16)], cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        path, deadline = out / "judgments.jsonl", time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists()
                                               or len(path.read_text().splitlines()) < 2):
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGINT; the judgments made so far are "
                                               f"in {path}")
    made = judgments(out)
    assert 2 <= len(made) < 16
    assert all(x["outcome"] == ("win" if x["a_first"] else "lose") for x in made)
