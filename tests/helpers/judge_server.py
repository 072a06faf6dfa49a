"""An OpenAI-compatible chat-completions server in its own process, for the LLM-judge tests (standard library only):

    python tests/helpers/judge_server.py [--log FILE] ACTION [ACTION ...]

It listens on 127.0.0.1 (a free port), prints "port N" once it is ready and serves until it is killed. Request i
(counted from 0, whatever its path) is answered by ACTION i; the last action repeats. Actions:

    answer:TEXT   HTTP 200 with a chat completion whose message content is TEXT
    status:CODE   that HTTP status, with an error body
    slow:S        wait S seconds, then answer "[[A]]"
    badline       a reply that is not HTTP at all: one line of text, then the connection is closed
                  (the client sees http.client.BadStatusLine)
    truncated     HTTP 200 whose Content-Length promises 1,000 bytes of which 20 are sent before the connection is
                  closed (the client sees http.client.IncompleteRead)
    close         the connection is closed without any reply (http.client.RemoteDisconnected)

With --log, every request's JSON body is appended to FILE as one line, so a test can check what was sent.
"""
import argparse
import http.server
import json
import socket
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", default="")
    parser.add_argument("actions", nargs="+")
    args = parser.parse_args()
    counter, lock = [0], threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                i = counter[0]
                counter[0] += 1
                if args.log:
                    with open(args.log, "a") as f:
                        f.write(body.decode("utf-8", errors="replace").replace("\n", " ") + "\n")
            action = args.actions[min(i, len(args.actions) - 1)]
            kind, _, value = action.partition(":")
            try:
                if kind == "slow":
                    time.sleep(float(value))
                    kind, value = "answer", "[[A]]"
                if kind == "answer":
                    payload = json.dumps({"id": f"c{i}", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": value},
                         "finish_reason": "stop"}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                elif kind == "status":
                    self.send_error(int(value))
                elif kind == "badline":
                    self.wfile.write(b"this is not an HTTP reply\r\n")
                    self._hang_up()
                elif kind == "truncated":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [{"messa')
                    self._hang_up()
                elif kind == "close":
                    self._hang_up()
                else:
                    raise SystemExit(f"unknown action {action!r}")
            except (BrokenPipeError, ConnectionResetError):  # the client gave up first (its time-out)
                self.close_connection = True

        def _hang_up(self) -> None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

        def log_message(self, *a) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    sys.exit(main())
