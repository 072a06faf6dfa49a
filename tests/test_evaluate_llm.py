"""The llm judge's HTTP client (plumbing/judge_client.py) against a stub OpenAI-compatible server on
127.0.0.1 (standard library, port 0): request shape, retry after a 500, time-outs, garbage bodies,
and a whole evaluate.py run judged by the stub; the client's count of network failures in a row and
its budget against a stub transport."""
import http.server
import json
import socket
import threading
import time

import pytest
import torch

import evaluate
from plumbing import data, judge_client
from conftest import run_command


class Stub:
    """A chat-completions server that plays a script: each request takes the next action (the last
    one repeats). Actions: ("answer", text) -> 200 with a chat completion; ("status", code);
    ("sleep", seconds) -> answers only after that delay; ("garbage", bytes) -> 200 with that body.
    Every request is recorded."""

    def __init__(self, *script):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": json.loads(body)})
                action = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                try:
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("answer", "[[A]]")
                    if action[0] == "status":
                        self.send_error(action[1])
                        return
                    payload = action[1] if action[0] == "garbage" else json.dumps(
                        {"choices": [{"message": {"role": "assistant",
                                                  "content": action[1]}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                # the client gave up (time-out test)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(*script):
        servers.append(Stub(*script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def ask(url, **kw):
    options = dict(url=url, model="judge-model", api_key="sk-test", timeout=5.0, retries=2,
                   backoff=0.01)
    options.update(kw)
    return judge_client.chat_completion(
        evaluate.judge_messages("\n\nHuman: hi\n\nAssistant:", " hello", " bye"), **options)


def test_request_shape(stub):
    s = stub(("answer", "Reply B is kinder. [[B]]"))
    assert ask(s.url) == ("Reply B is kinder. [[B]]", None)
    (r,) = s.requests
    assert r["method"] == "POST" and r["path"] == "/v1/chat/completions"
    assert r["headers"]["Authorization"] == "Bearer sk-test"
    assert r["headers"]["Content-Type"] == "application/json"
    assert r["body"]["model"] == "judge-model"
    assert [m["role"] for m in r["body"]["messages"]] == ["system", "user"]
    assert ("hello" in r["body"]["messages"][1]["content"]
            and "bye" in r["body"]["messages"][1]["content"])
    # no key: no Authorization header at all
    ask(s.url, api_key=None)
    assert "Authorization" not in s.requests[-1]["headers"]


def test_500_then_success_is_retried(stub):
    s = stub(("status", 500), ("answer", "[[C]]"))
    assert ask(s.url) == ("[[C]]", None)
    assert len(s.requests) == 2


def test_persistent_500_gives_up_after_bounded_retries(stub):
    s = stub(("status", 503))
    t0 = time.time()
    answer, reason = ask(s.url, retries=2, backoff=0.01)
    assert answer is None and reason == "HTTP 503 (after 3 attempts)"
    assert len(s.requests) == 3
    assert time.time() - t0 < 2  # back-off 0.01 + 0.02 s


def test_client_error_is_not_retried(stub):
    s = stub(("status", 401))
    assert ask(s.url) == (None, "HTTP 401")
    assert len(s.requests) == 1


def test_timeout_is_invalid_with_reason(stub):
    s = stub(("sleep", 1.0))
    t0 = time.time()
    answer, reason = ask(s.url, timeout=0.2, retries=1)
    assert answer is None and "timed out" in reason and "2 attempts" in reason
    # two 0.2 s time-outs and a 0.01 s back-off, not the server's 1 s per request
    assert time.time() - t0 < 1.5


def test_garbage_body_is_invalid(stub):
    s = stub(("garbage", b"<html>oops</html>"))
    answer, reason = ask(s.url)
    assert answer is None and reason.startswith("unreadable response body")
    assert len(s.requests) == 1  # a wrong body is not retried
    s = stub(("garbage", b'{"choices": []}'))
    assert ask(s.url)[1].startswith("unreadable response body")


def test_connection_refused_is_invalid():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer, reason = ask(f"http://127.0.0.1:{port}/v1/chat/completions", retries=1)
    assert answer is None and reason.startswith("connection") and "2 attempts" in reason


def client(**kw) -> judge_client.JudgeClient:
    options = dict(url="http://judge.invalid/v1/chat/completions", model="m", api_key=None,
                   timeout=5.0, retries=0, backoff=0.01, max_tokens=64, budget=60.0)
    options.update(kw)
    return judge_client.JudgeClient(**options)


@pytest.mark.parametrize("between", [("[[A]]", None), (None, "HTTP 500 (after 1 attempts)"),
                                     (None, "unreadable response body: b'zz'")])
def test_the_client_stops_after_3_network_failures_in_a_row(monkeypatch, between):
    # A stub transport plays: 2 network failures, 1 outcome that is not a network failure (an
    # answer, an HTTP error, a garbage body), then 3 network failures. The count in a row after
    # each request: 1, 2, then 0 (reset by request 3), then 1, 2, 3. So requests 1-6 are sent and
    # request 7 is not: its reason names the last failure. (Without the reset, the count would be
    # 3 after request 4 and request 5 would not be sent; without the stop, request 7 would be.)
    script = [(None, "connection: [Errno 111] Connection refused (after 1 attempts)"),
              (None, "timed out after 5 s (after 1 attempts)"), between,
              (None, "connection: one"), (None, "connection: two"), (None, "timed out: three")]
    sent = []

    def transport(messages, **kw):
        sent.append(kw)
        return script[len(sent) - 1]

    monkeypatch.setattr(judge_client, "chat_completion", transport)
    c = client()
    got = [c.ask([{"role": "user", "content": f"q{i}"}]) for i in range(7)]
    assert len(sent) == 6
    assert got[:6] == script
    assert [c.network_failures, c.last_network_failure] == [3, "timed out: three"]
    assert got[6] == (None, "not asked: the endpoint stopped answering (timed out: three)")
    # every request carries the client's settings and its one deadline
    assert all(kw["deadline"] == c.deadline and kw["max_tokens"] == 64 for kw in sent)


def test_the_client_sends_nothing_once_its_budget_is_spent(monkeypatch):
    sent = []
    monkeypatch.setattr(judge_client, "chat_completion", lambda m, **kw: sent.append(m))
    assert client(budget=0.0).ask([]) == (None, "not asked: the --llm-budget of 0 s was spent")
    assert sent == []


def test_judge_llm_through_the_stub(stub):
    # prompt 1: a clean [[A]]; prompt 2: a 500, then garbage text (no verdict) -> invalid, the run
    # goes on
    s = stub(("answer", "[[A]]"), ("status", 500), ("answer", "no idea"))

    def via_stub(messages):
        return judge_client.chat_completion(messages, url=s.url, model="m", api_key=None, timeout=5,
                                            retries=1, backoff=0.01)

    j = evaluate.judge_llm(["q1", "q2"], ["a1", "a2"], ["b1", "b2"], via_stub, both_orders=False,
                           seed=0)
    assert j[0]["outcome"] == ("win" if j[0]["a_first"] else "lose")
    assert j[1]["outcome"] == "invalid" and "verdict" in j[1]["reason"]


def test_evaluate_run_with_llm_judge(stub, world, tmp_path, monkeypatch):
    # The whole script in-process, both orders, against a judge that always answers [[A]] (pure
    # position bias): every prompt gets one vote each way -> all ties; 2 requests per prompt, the
    # key read from the named variable.
    s = stub(("answer", "[[A]]"))
    monkeypatch.setenv("STUB_JUDGE_KEY", "sk-from-env")
    out = tmp_path / "eval_llm"
    results = evaluate.main(["--policy-a", world.base_model, "--policy-b", world.base_model,
                             "--judge", "llm", "--llm-url", s.url, "--llm-model", "stub",
                             "--llm-api-key-env", "STUB_JUDGE_KEY", "--both-orders",
                             "--prompts", world.eval_prompts, "--max-prompts", "3",
                             "--max-new-tokens", "4", "--llm-retries", "0", "--out", str(out)])
    w = results["win_tie_lose"]
    assert (w["win"], w["tie"], w["lose"], w["invalid"], w["orders_disagree"]) == (0, 3, 0, 0, 3)
    # the connection check (JudgeClient.preflight), then 2 orders x 3 prompts
    assert len(s.requests) == 1 + 6
    assert "connection check" in s.requests[0]["body"]["messages"][0]["content"]
    assert all(r["headers"]["Authorization"] == "Bearer sk-from-env" for r in s.requests)
    assert all(r["body"]["max_tokens"] == 512 for r in s.requests[1:])  # --llm-max-tokens' default
    saved = json.loads((out / "results.json").read_text())
    assert saved["win_tie_lose"]["tie_pct"] == 100.0
    # the key never lands in the outputs
    assert "sk-from-env" not in (out / "results.json").read_text()


def test_two_processes_ask_the_judge_once_per_prompt(stub, world, rm_checkpoint, tmp_path):
    # torchrun, 2 processes (FSDP2, gloo): generation and RM scoring are spread over the ranks, but
    # only rank 0 talks to the endpoint (1 connection check + 2 orders x 3 prompts = 7 requests, not
    # 14) and broadcasts the verdicts. The RM's accuracy numbers match one process scoring the same
    # pairs (fp32, same sums in other batches: relative 1e-5).
    import reward

    s = stub(("answer", "[[A]]"))
    out = tmp_path / "eval_2proc"
    rc, stdout, stderr = run_command([
        "evaluate.py", "--policy-a", world.base_model, "--policy-b", world.base_model,
        "--judge", "llm", "--llm-url", s.url, "--both-orders", "--llm-retries", "0",
        "--prompts", world.eval_prompts, "--max-prompts", "3", "--max-new-tokens", "4",
        "--rms", f"rm={rm_checkpoint}", "--pairs-test", world.pairs_test, "--ood-pairs-test", "",
        "--out", str(out)], nproc=2, timeout=150)
    assert rc == 0, stderr
    results = json.loads((out / "results.json").read_text())
    w = results["win_tie_lose"]
    assert (w["tie"], w["invalid"], w["orders_disagree"]) == (3, 0, 3)
    assert len(s.requests) == 7

    args = evaluate.Args(seed=0)
    model, tokenizer = evaluate.load_rm(rm_checkpoint, args, 1, torch.device("cpu"))
    one = reward.evaluate(model, tokenizer, data.read_jsonl(world.pairs_test), max_len=args.max_len,
                          world=1, rank=0, batch_size=args.batch_size)
    two = results["reward_models"]["rm"]["test"]
    assert two["acc"] == one["acc"]
    assert two["margin"] == pytest.approx(one["margin"], rel=1e-5, abs=1e-7)
