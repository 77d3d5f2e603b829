"""Load test: many concurrent clients against one server, completing and ranking what they got.

Each of ``--clients`` clients loops for ``--seconds``: ``Complete`` (n samples of a few tokens), then
``SubmitRanking`` of the group it got (the samples in reverse order, a fresh idempotency key). A
refusal (RESOURCE_EXHAUSTED) is counted and the client backs off for the server's ``retry-after-ms``
(or half a second), then sends a refused ranking again (a refused Complete is not repeated: the
client moves on to its next prompt); every other error is a failure. Refusals are counted by cause: the key's rate
limit, or a busy server (the engine's full queue). The server is ``grpc.aio``: a waiting request
holds no thread, so requests are refused as busy only beyond the queue bound (``--max-queued-requests``
waiting plus the requests the batch runs, ``--max-batch-sequences`` / n); with no more clients than
that bound, a busy refusal is a failure. The queue wait is read from the server's own histogram
(``flywheel_request_queue_time_seconds``, scraped before and after). At the end the number
of rankings acknowledged must equal the number of new entries in the rankings stream, and the
server's memory must not have grown without bound (its RSS is sampled throughout; VmHWM is the
kernel's peak).

By default it starts its own ``flywheel serve`` (embedded model and its own embedded Redis, in a
scratch data directory) with auth on: every client gets a client API key of its own (the server is
given only their SHA-256), so the per-key rate limit (``--client-requests-per-second``, default the
server's) meters each client as it would meter separate users, and each client ranks as its key's
name. ``--address`` and ``--redis-url`` point it at a running one instead; the clients then share the
key of ``FLYWHEEL_API_KEY`` (else the client key of ``--data-dir``), and that key's rate limit.

    python bench/load.py [--clients 200] [--seconds 60] [--n 2] [--tokens 8] [--model PATH]
                         [--client-requests-per-second R] [--client-request-burst B]
                         [--address HOST:PORT --redis-url redis://...] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import percentile, prompts, start_server  # noqa: E402
from flywheel.api_keys import ROLE_CLIENT, client_key, generate_key, hash_key  # noqa: E402
from flywheel.contracts.keys import RANKINGS_STREAM  # noqa: E402
from flywheel.grpc_client import bearer, retry_after_seconds  # noqa: E402
from flywheel.redis_server import embedded_redis_password, free_port, open_redis, with_password  # noqa: E402
from flywheel.config import FlywheelConfig  # noqa: E402
from flywheel.v1 import feedback_pb2 as fb  # noqa: E402
from flywheel.v1 import feedback_pb2_grpc as fb_rpc  # noqa: E402
from flywheel.v1 import inference_pb2 as pb  # noqa: E402
from flywheel.v1 import inference_pb2_grpc as rpc  # noqa: E402

CLIENTS_PER_CHANNEL = 25  # several HTTP/2 connections, as separate client processes would open
RATE_LIMIT_REFUSAL = "rate limit of key"  # how the server's per-key limiter words its refusals


@dataclass(frozen=True)
class ClientKey:
    """The key a client sends and the annotator it ranks as ('' = the key's own name)."""

    key: str
    annotator: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(self.key),)


def own_keys(clients: int) -> tuple[list[ClientKey], str]:
    """One fresh client key per client, and the FLYWHEEL_API_KEYS entries (hashes only) that admit them."""
    keys = [ClientKey(generate_key(), f"load-{i}") for i in range(clients)]
    spec = ",".join(f"{k.annotator}:{ROLE_CLIENT}:sha256:{hash_key(k.key)}" for k in keys)
    return keys, spec


@dataclass
class Tally:
    completes: int = 0
    rankings: int = 0
    refused: int = 0
    refused_rate_limited: int = 0  # the key's rate limit (per client key)
    refused_busy: int = 0  # the server's concurrent-RPC limit or the engine's full queue
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    complete_latencies: list[float] = field(default_factory=list)
    ranking_latencies: list[float] = field(default_factory=list)
    acked_entries: set[str] = field(default_factory=set)

    def refusal_or_error(self, exc: grpc.aio.AioRpcError) -> float:
        """Count the failure; returns how long to back off."""
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.refused += 1
            if (exc.details() or "").startswith(RATE_LIMIT_REFUSAL):
                self.refused_rate_limited += 1
            else:
                self.refused_busy += 1
            return retry_after_seconds(exc, default=0.5) * random.uniform(0.5, 1.5)
        self.errors[exc.code().name] = self.errors.get(exc.code().name, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{exc.code().name}: {exc.details()}")
        return 0.5


class RssSampler:
    """The server process's resident memory, sampled from /proc every half second (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def status_kib(self, key: str) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, TypeError):
            return None
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            rss = self.status_kib("VmRSS")
            if rss is not None:
                self.samples.append(rss)

    def start(self) -> "RssSampler":
        if self.pid is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


QUEUE_HISTOGRAM = "flywheel_request_queue_time_seconds"


def scrape_queue_buckets(metrics_port: int | None) -> dict[float, float]:
    """The server's queue-wait histogram now: cumulative count per upper bound (all versions summed)."""
    if not metrics_port:
        return {}
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != QUEUE_HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name == QUEUE_HISTOGRAM + "_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile (0..1) of what the histogram saw between two scrapes, interpolated in its bucket
    (as PromQL's histogram_quantile); the largest finite bound when it falls in +Inf."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / max(count - below, 1e-12))
        lower, below = bound, count
    return lower


REFUSED = object()  # what timed() returns for a RESOURCE_EXHAUSTED refusal (the request may be sent again)


async def timed(call, latencies: list[float], tally: Tally):
    """Await one RPC: its response (latency recorded), or REFUSED / None after counting a refusal /
    an error and backing off."""
    started = time.perf_counter()
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        await asyncio.sleep(tally.refusal_or_error(exc))
        return REFUSED if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
    latencies.append(time.perf_counter() - started)
    return response


async def client(index: int, channel: grpc.aio.Channel, key: ClientKey, deadline: float, n: int, tokens: int,
                 tally: Tally) -> None:
    inference, feedback = rpc.InferenceStub(channel), fb_rpc.FeedbackStub(channel)
    texts = prompts(64)
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        request = pb.CompleteRequest(messages=[pb.ChatMessage(role="user", content=texts[(index + turn) % len(texts)])],
                                     n=n, max_new_tokens=tokens)
        response = await timed(inference.Complete(request, timeout=120, metadata=key.metadata),
                               tally.complete_latencies, tally)
        if response is None or response is REFUSED:
            continue
        tally.completes += 1
        ranking = fb.SubmitRankingRequest(group_id=response.group_id, annotator_id=key.annotator,
                                          completion_ids=[c.completion_id for c in reversed(response.completions)],
                                          idempotency_key=uuid.uuid4().hex)
        # a refused ranking is sent again after the back-off, as a person's client would (same
        # idempotency key: it cannot be recorded twice); the group is lost only at the deadline
        ack = REFUSED
        while ack is REFUSED and time.monotonic() < deadline:
            ack = await timed(feedback.SubmitRanking(ranking, timeout=60, metadata=key.metadata),
                              tally.ranking_latencies, tally)
        if ack is not None and ack is not REFUSED:
            tally.rankings += 1
            tally.acked_entries.add(ack.stream_entry_id)


async def drive(address: str, keys: list[ClientKey], seconds: float, n: int, tokens: int) -> tuple[Tally, float]:
    tally = Tally()
    clients = len(keys)
    channels = [grpc.aio.insecure_channel(address) for _ in range((clients + CLIENTS_PER_CHANNEL - 1)
                                                                   // CLIENTS_PER_CHANNEL)]
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(client(i, channels[i // CLIENTS_PER_CHANNEL], keys[i], deadline, n, tokens, tally)
                           for i in range(clients)))
    wall = time.monotonic() - started
    for channel in channels:
        await channel.close()
    return tally, wall


def warm_up(address: str, key: ClientKey) -> None:
    with grpc.insecure_channel(address) as channel:
        rpc.InferenceStub(channel).Complete(pb.CompleteRequest(prompt="warm up", n=2, max_new_tokens=2),
                                            metadata=key.metadata, timeout=300)


def shared_key(args: argparse.Namespace) -> ClientKey:
    """A running server's key for every client: FLYWHEEL_API_KEY, else the local client key of --data-dir."""
    key = client_key(FlywheelConfig.load({"data_dir": args.data_dir}))
    if not key:
        raise SystemExit("a running server needs an API key: set FLYWHEEL_API_KEY (a client key, e.g. from "
                         "`flywheel keys create --name NAME --role client`)")
    return ClientKey(key, "")  # ranks as the key's name


def run(args: argparse.Namespace) -> dict:
    scratch = None
    process = None
    metrics_port = args.metrics_port
    if args.address:
        address, redis_url, pid = args.address, args.redis_url, args.server_pid
        keys = [shared_key(args)] * args.clients
    else:
        scratch = tempfile.TemporaryDirectory()
        data_dir = Path(args.data_dir).resolve()
        if not args.model:  # the embedded model, converted once under the data directory
            from flywheel.models import load_model

            load_model("", data_dir, args.dtype)
            (Path(scratch.name) / "models").symlink_to(data_dir / "models")
        keys, keys_spec = own_keys(args.clients)
        metrics_port = free_port()
        limits = {"FLYWHEEL_GRPC_WORKERS": str(args.grpc_workers),
                  "FLYWHEEL_METRICS_PORT": str(metrics_port),
                  "FLYWHEEL_MAX_QUEUED_REQUESTS": str(args.max_queued_requests),
                  "FLYWHEEL_MAX_BATCH_SEQUENCES": str(args.max_batch_sequences),
                  "FLYWHEEL_TORCH_THREADS": str(args.torch_threads),
                  "FLYWHEEL_API_KEYS": keys_spec,
                  "FLYWHEEL_CLIENT_REQUESTS_PER_SECOND": str(args.client_requests_per_second),
                  "FLYWHEEL_CLIENT_REQUEST_BURST": str(args.client_request_burst)}
        process, port = start_server(scratch.name, args.dtype, args.model, store_groups=True, extra_env=limits)
        address, pid = f"127.0.0.1:{port}", process.pid
        # the server's embedded Redis: its URL file holds no password, the data dir's secrets do
        redis_url = with_password((Path(scratch.name) / "redis" / "redis.url").read_text().strip(),
                                  embedded_redis_password(Path(scratch.name)))
    store = open_redis(redis_url, args.data_dir)[0] if redis_url else None
    try:
        warm_up(address, keys[0])
        stream_before = store.xlen(RANKINGS_STREAM) if store else 0
        sampler = RssSampler(pid).start()
        rss_start = sampler.status_kib("VmRSS") if pid else None
        queue_before = scrape_queue_buckets(metrics_port)
        tally, wall = asyncio.run(drive(address, keys, args.seconds, args.n, args.tokens))
        sampler.stop()
        queue_after = scrape_queue_buckets(metrics_port)
        peak = max(sampler.samples + [sampler.status_kib("VmHWM") or 0]) if pid else None
        stream_entries = store.xlen(RANKINGS_STREAM) - stream_before if store else None
    finally:
        if store is not None:
            store.close()
        if process is not None:
            process.terminate()
            process.wait(60)
        if scratch is not None:
            scratch.cleanup()
    requests = tally.completes + tally.rankings + tally.refused + sum(tally.errors.values())
    mib = lambda kib: round(kib / 1024, 1) if kib else None  # noqa: E731
    wait = lambda q: histogram_quantile(queue_before, queue_after, q)  # noqa: E731
    rounded = lambda v: None if v is None else round(v, 3)  # noqa: E731
    bound = args.max_queued_requests + args.max_batch_sequences // max(1, args.n)
    return {
        "queue_bound": bound, "below_queue_bound": args.clients <= bound,
        "completes_per_second": round(tally.completes / wall, 2),
        "queue_wait_p50_s": rounded(wait(0.5)), "queue_wait_p99_s": rounded(wait(0.99)),
        "clients": args.clients, "seconds": round(wall, 1), "n": args.n, "tokens": args.tokens,
        "requests": requests, "requests_per_second": round(requests / wall, 1),
        "answered_per_second": round((tally.completes + tally.rankings) / wall, 1),
        "completes": tally.completes, "rankings": tally.rankings, "refused": tally.refused,
        "refused_rate_limited": tally.refused_rate_limited, "refused_busy": tally.refused_busy,
        "keys": "one per client" if not args.address else "one shared",
        "other_errors": sum(tally.errors.values()), "errors_by_code": tally.errors,
        "error_examples": tally.error_examples,
        "complete_p50_s": round(percentile(tally.complete_latencies, 50), 3) if tally.complete_latencies else None,
        "complete_p99_s": round(percentile(tally.complete_latencies, 99), 3) if tally.complete_latencies else None,
        "ranking_p50_s": round(percentile(tally.ranking_latencies, 50), 3) if tally.ranking_latencies else None,
        "ranking_p99_s": round(percentile(tally.ranking_latencies, 99), 3) if tally.ranking_latencies else None,
        "server_rss_start_mib": mib(rss_start), "server_rss_peak_mib": mib(peak),
        "rankings_acknowledged": len(tally.acked_entries), "stream_entries_added": stream_entries,
    }


def print_table(report: dict) -> None:
    rows = [
        ("clients x seconds", f"{report['clients']} x {report['seconds']} s (n={report['n']}, {report['tokens']} tokens)"),
        ("requests (all)", f"{report['requests']}  ({report['requests_per_second']}/s)"),
        ("answered", f"{report['completes']} Complete + {report['rankings']} SubmitRanking "
                     f"({report['answered_per_second']}/s)"),
        ("Complete latency", f"p50 {report['complete_p50_s']} s  p99 {report['complete_p99_s']} s  "
                             f"({report['completes_per_second']} completions/s)"),
        ("queue wait (server)", f"p50 {report['queue_wait_p50_s']} s  p99 {report['queue_wait_p99_s']} s"),
        ("SubmitRanking latency", f"p50 {report['ranking_p50_s']} s  p99 {report['ranking_p99_s']} s"),
        ("refused (RESOURCE_EXHAUSTED)", f"{report['refused']}  ({report['refused_rate_limited']} by the key's "
                                         f"rate limit, {report['refused_busy']} busy; keys: {report['keys']}; "
                                         f"queue bound {report['queue_bound']} requests)"),
        ("other errors (must be 0)", f"{report['other_errors']} {report['errors_by_code'] or ''}"),
        ("server RSS", f"{report['server_rss_start_mib']} MiB at start, peak {report['server_rss_peak_mib']} MiB"),
        ("rankings acked / in stream", f"{report['rankings_acknowledged']} / {report['stream_entries_added']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for example in report["error_examples"]:
        print("  error:", example)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--n", type=int, default=2, help="samples per Complete")
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens per Complete")
    parser.add_argument("--address", default="", help="a running server; default: start one")
    parser.add_argument("--redis-url", default="", help="the running server's Redis (to count the stream)")
    parser.add_argument("--server-pid", type=int, default=None, help="the running server's pid (to sample its RSS)")
    parser.add_argument("--model", default="", help="model folder; default the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"), help="where the embedded model is converted")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="the running server's metrics port (to read its queue wait)")
    parser.add_argument("--grpc-workers", type=int, default=64,
                        help="the started server's threads for Feedback and Admin (Inference waits need none)")
    parser.add_argument("--max-queued-requests", type=int, default=256, help="the started server's engine queue")
    parser.add_argument("--max-batch-sequences", type=int, default=64, help="the started server's batch rows")
    defaults = FlywheelConfig.load(environ={})
    parser.add_argument("--client-requests-per-second", type=float,
                        default=defaults.security.client_requests_per_second,
                        help="the started server's rate limit per client key (each client has its own); 0 = none")
    parser.add_argument("--client-request-burst", type=int, default=defaults.security.client_request_burst,
                        help="the started server's burst per client key")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="the started server's torch threads (0 = all cores; 1 on a machine shared with other jobs)")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    consistent = report["stream_entries_added"] in (None, report["rankings_acknowledged"])
    if report["other_errors"] or not consistent:
        print("FAILED: errors other than RESOURCE_EXHAUSTED, or acknowledged rankings missing from the stream")
        return 1
    if report["below_queue_bound"] and report["refused_busy"] and not args.address:
        print(f"FAILED: {report['refused_busy']} requests refused as busy with {report['clients']} clients, within "
              f"the queue bound of {report['queue_bound']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
