"""Serving benchmark: the real gRPC server against Hugging Face ``generate`` on the same prompts.

16 concurrent clients each ask ``Complete`` for n=4 samples of exactly 64 new tokens, through a
real ``flywheel serve`` process. In the same run, on the same model and dtype, the baselines:
(a) one ``generate`` call per request, sequentially; (b) one left-padded static batch of all
requests. The server runs with the group store on (every group written to an embedded Redis, as
in production) and once more with it off, to show what storing costs. Each measurement is repeated and the median reported; the last line is the ratio
server / static batch. Targets on a 2-core CPU: >= 1.5x the static batch, >= 5x sequential.

The single-stream case: one client, n=1, ``--tokens`` tokens through ``StreamComplete`` (decode
tok/s after the first token, and time to first token), against HF ``generate`` of the same prompt
and, with ``--llama-server PATH``, llama.cpp's ``llama-server`` on the embedded model's own GGUF
(the same workload on its HTTP ``/completion`` endpoint: its TTFT is the first streamed token, its
decode rate ``timings.predicted_per_second``; the 16-client case as well, ``--clients`` parallel
slots). The bench also measures this machine's matmul peak in the served dtype and prints the
compute roofline of the model (2 FLOP per parameter per token) and the share of it the batch reaches.
How to build ``llama-server``: README, "Serving speed".

With ``--quantize int8`` (or ``int4``) the server decodes small batches from quantized weights
(``serving.quantize``): the single stream is measured on it and, in the same run, on a server
without quantization; the 16-client case runs on the quantized server.

    python bench/serve.py [--clients 16] [--n 4] [--tokens 64] [--repeats 3] [--dtype auto]
                          [--llama-server PATH] [--skip-batch] [--quantize none|int8|int4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.api_keys import generate_key  # noqa: E402
from flywheel.grpc_client import with_key  # noqa: E402
from flywheel.models import load_model, resolve_dtype  # noqa: E402
from flywheel.redis_server import free_port  # noqa: E402
from flywheel.v1 import inference_pb2 as pb  # noqa: E402
from flywheel.v1 import inference_pb2_grpc as rpc  # noqa: E402
from serving.quantize import QUANTIZE_SCHEMES  # noqa: E402

TOPICS = ["the sea", "a lighthouse", "autumn", "a red fox", "the moon", "a library", "rain in a city", "a violin",
          "mountains", "a train at night", "bread", "the desert", "a garden", "snow", "an old clock", "the river"]


BENCH_KEY = generate_key()


def prompts(count: int) -> list[str]:
    return [f"Write a short poem about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_server(data_dir: str, dtype: str, model: str, store_groups: bool,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, FLYWHEEL_DATA_DIR=data_dir, FLYWHEEL_GRPC_ADDRESS=f"127.0.0.1:{port}",
               FLYWHEEL_METRICS_PORT="0", FLYWHEEL_DTYPE=dtype, FLYWHEEL_MODEL=model,
               FLYWHEEL_STORE_GROUPS=str(store_groups).lower(),
               # a key of its own, and no rate limit: the benchmark measures the engine, not the limiter
               FLYWHEEL_API_KEYS=f"bench:client:{BENCH_KEY}", FLYWHEEL_CLIENT_REQUESTS_PER_SECOND="0")
    env.update(extra_env or {})  # a caller's keys and limits replace these (bench/load.py)
    process = subprocess.Popen([sys.executable, "-m", "flywheel.app.cli", "serve"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return process, port
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def run_clients(port: int, texts: list[str], n: int, tokens: int, stream: bool) -> dict:
    """All clients start together; each sends one request. Returns throughput and latency figures."""
    channel = with_key(grpc.insecure_channel(f"127.0.0.1:{port}"), BENCH_KEY)
    stub = rpc.InferenceStub(channel)
    barrier = threading.Barrier(len(texts) + 1)
    latencies, ttfts, counts, errors = [], [], [], []

    def client(text: str) -> None:
        request = pb.CompleteRequest(messages=[pb.ChatMessage(role="user", content=text)], n=n,
                                     max_new_tokens=tokens, min_new_tokens=tokens)
        barrier.wait()
        started = time.perf_counter()
        try:
            if stream:
                first = None
                for message in stub.StreamComplete(request, timeout=600):
                    if first is None:
                        first = time.perf_counter() - started
                    if message.HasField("final"):
                        response = message.final
                ttfts.append(first)
            else:
                response = stub.Complete(request, timeout=600)
            latencies.append(time.perf_counter() - started)
            counts.append(sum(c.token_count for c in response.completions))
        except grpc.RpcError as exc:
            errors.append(exc.code().name)

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    channel.close()
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    assert all(c == n * tokens for c in counts), f"expected exactly {n * tokens} tokens per request, got {counts}"
    return {"tokens_per_s": sum(counts) / wall, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "ttft_p50": percentile(ttfts, 50) if ttfts else None, "ttft_p99": percentile(ttfts, 99) if ttfts else None}


def single_stream(port: int, text: str, tokens: int) -> dict:
    """One client, n=1: TTFT and the decode rate after the first token."""
    channel = with_key(grpc.insecure_channel(f"127.0.0.1:{port}"), BENCH_KEY)
    request = pb.CompleteRequest(messages=[pb.ChatMessage(role="user", content=text)], n=1,
                                 max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0)
    started = time.perf_counter()
    first = last = None
    count = 0
    for message in rpc.InferenceStub(channel).StreamComplete(request, timeout=600):
        now = time.perf_counter()
        if message.HasField("delta") and message.delta.token_count:
            first = now if first is None else first
            last, count = now, message.delta.token_count
        if message.HasField("final"):
            count = message.final.completions[0].token_count
            last = now
    channel.close()
    decode = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return {"ttft": first - started, "decode_tok_s": decode, "tokens": count}


@torch.inference_mode()
def baseline_single_stream(model, tokenizer, text: str, tokens: int) -> dict:
    """HF generate of one prompt, greedy: TTFT from a 1-token generate, decode rate from the rest."""
    ids = tokenizer(rendered(tokenizer, [text])[0], return_tensors="pt", add_special_tokens=False)
    started = time.perf_counter()
    model.generate(**ids, do_sample=False, max_new_tokens=1, min_new_tokens=1, pad_token_id=tokenizer.pad_token_id)
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    model.generate(**ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                   pad_token_id=tokenizer.pad_token_id)
    total = time.perf_counter() - started
    return {"ttft": ttft, "decode_tok_s": (tokens - 1) / max(total - ttft, 1e-9)}


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """This machine's dense matmul rate in ``dtype`` (the best of ``repeats``), GFLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


class LlamaServer:
    """llama.cpp's ``llama-server`` on a GGUF, for the same workloads over its HTTP API."""

    def __init__(self, binary: str, gguf: Path, slots: int, threads: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(slots),
             "-c", str(2048 * slots), "-t", str(threads), "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{binary} exited during start-up")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready")
            time.sleep(0.5)

    def complete(self, prompt: str, tokens: int, n: int = 1, stream: bool = False) -> dict:
        body = {"prompt": prompt, "n_predict": tokens, "ignore_eos": True, "temperature": 0.8, "stream": stream,
                "n_probs": 0, "cache_prompt": False}
        if n > 1:
            body["n_cmpl"] = n
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as reply:
            if not stream:
                out = json.loads(reply.read())
                results = out if isinstance(out, list) else [out]
                return {"tokens": sum(r.get("tokens_predicted", 0) for r in results)}
            first, timings = None, {}
            for line in reply:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("content"):
                    first = time.perf_counter() - started
                timings = event.get("timings", timings)
        return {"ttft": first, "decode_tok_s": timings.get("predicted_per_second", float("nan"))}

    def batch(self, texts: list[str], tokens: int, n: int) -> float:
        """All clients at once, each n completions of ``tokens``: tokens per second."""
        counts: list[int] = []
        threads = [threading.Thread(target=lambda t=t: counts.append(self.complete(t, tokens, n)["tokens"]))
                   for t in texts]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - started)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def rendered(tokenizer, texts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


@torch.inference_mode()
def baseline_sequential(model, tokenizer, texts: list[str], n: int, tokens: int) -> float:
    started = time.perf_counter()
    total = 0
    for text in rendered(tokenizer, texts):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, do_sample=True, num_return_sequences=n, max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id)
        total += (out.shape[1] - ids.input_ids.shape[1]) * out.shape[0]
    return total / (time.perf_counter() - started)


@torch.inference_mode()
def baseline_static_batch(model, tokenizer, texts: list[str], n: int, tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer(rendered(tokenizer, texts), return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.perf_counter()
    out = model.generate(**batch, do_sample=True, num_return_sequences=n, max_new_tokens=tokens,
                         min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id)
    total = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default="", help="model folder; default the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    parser.add_argument("--llama-server", default="", help="a llama-server binary: compare on the embedded GGUF")
    parser.add_argument("--skip-batch", action="store_true", help="only the single-stream case")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_SCHEMES,
                        help="the server's FLYWHEEL_QUANTIZE (the single stream is also measured without)")
    args = parser.parse_args()
    quantize_env = {"FLYWHEEL_QUANTIZE": args.quantize}
    texts = prompts(args.clients)
    dtype = resolve_dtype(args.dtype)
    print(f"model {args.model or 'SmolLM2-135M-Instruct'}  dtype {dtype}  threads {torch.get_num_threads()}  "
          f"{args.clients} clients x n={args.n} x {args.tokens} tokens, {args.repeats} repeats (medians)")

    loaded = load_model(args.model, Path(args.data_dir), args.dtype)  # also converts the GGUF once
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:  # its own embedded Redis, so the bench leaves no data behind
        models = Path(scratch) / "models"
        models.symlink_to(Path(args.data_dir).resolve() / "models")
        unquantized = None
        if args.quantize != "none":  # the same single stream without quantization, in this run
            process, port = start_server(scratch, args.dtype, args.model, store_groups=True)
            try:
                run_clients(port, texts[:2], args.n, 8, stream=False)
                unquantized = [single_stream(port, texts[0], args.tokens) for _ in range(args.repeats)]
            finally:
                process.terminate()
                process.wait(30)
        process, port = start_server(scratch, args.dtype, args.model, store_groups=True, extra_env=quantize_env)
        try:
            run_clients(port, texts[:2], args.n, 8, stream=False)  # warm-up
            single = [single_stream(port, texts[0], args.tokens) for _ in range(args.repeats)]
            if not args.skip_batch:
                unary = [run_clients(port, texts, args.n, args.tokens, stream=False) for _ in range(args.repeats)]
                streamed = [run_clients(port, texts, args.n, args.tokens, stream=True) for _ in range(args.repeats)]
        finally:
            process.terminate()
            process.wait(30)
        if not args.skip_batch:
            process, port = start_server(scratch, args.dtype, args.model, store_groups=False, extra_env=quantize_env)
            try:
                run_clients(port, texts[:2], args.n, 8, stream=False)
                unstored = [run_clients(port, texts, args.n, args.tokens, stream=False) for _ in range(args.repeats)]
            finally:
                process.terminate()
                process.wait(30)

    llama = None
    if args.llama_server:
        from flywheel.models import embedded_gguf_path

        server = LlamaServer(args.llama_server, embedded_gguf_path(), slots=args.clients * args.n,
                             threads=torch.get_num_threads())
        try:
            prompt = rendered(loaded.tokenizer, texts[:1])[0]
            server.complete(prompt, 8)  # warm-up
            llama = {"single": [server.complete(prompt, args.tokens, stream=True) for _ in range(args.repeats)]}
            if not args.skip_batch:
                batch_texts = rendered(loaded.tokenizer, texts)
                llama["batch"] = [server.batch(batch_texts, args.tokens, args.n) for _ in range(args.repeats)]
        finally:
            server.stop()

    hf_single = [baseline_single_stream(loaded.model, loaded.tokenizer, texts[0], args.tokens)
                 for _ in range(args.repeats)]
    peak = matmul_peak_gflops(dtype)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    roofline = peak * 1e9 / (2 * parameters)
    print(f"matmul peak ({dtype}, 1024^3)  {peak:8.1f} GFLOP/s;  compute roofline of {parameters / 1e6:.0f}M "
          f"parameters: {roofline:8.1f} tok/s")

    print(f"single stream (n=1, {args.tokens} tokens): server decode {med(single, 'decode_tok_s'):6.1f} tok/s  "
          f"TTFT {1000 * med(single, 'ttft'):.0f} ms")
    if unquantized:
        print(f"  server without quantization (quantize none) decode {med(unquantized, 'decode_tok_s'):6.1f} tok/s  "
              f"TTFT {1000 * med(unquantized, 'ttft'):.0f} ms")
    print(f"  baseline HF generate                      decode {med(hf_single, 'decode_tok_s'):6.1f} tok/s  "
          f"TTFT {1000 * med(hf_single, 'ttft'):.0f} ms")
    if llama:
        print(f"  llama-server (same GGUF)                  decode {med(llama['single'], 'decode_tok_s'):6.1f} "
              f"tok/s  TTFT {1000 * med(llama['single'], 'ttft'):.0f} ms")
    if unquantized:
        print(f"single stream, quantize {args.quantize} / none decode: "
              f"{med(single, 'decode_tok_s') / med(unquantized, 'decode_tok_s'):.2f}x")
    if args.skip_batch:
        if llama:
            print(f"single stream, server / llama-server decode: "
                  f"{med(single, 'decode_tok_s') / med(llama['single'], 'decode_tok_s'):.2f}x")
        print(f"single stream, server / HF generate decode: "
              f"{med(single, 'decode_tok_s') / med(hf_single, 'decode_tok_s'):.2f}x")
        return

    baseline_static_batch(loaded.model, loaded.tokenizer, texts[:2], args.n, 4)  # warm-up
    static = [baseline_static_batch(loaded.model, loaded.tokenizer, texts, args.n, args.tokens)
              for _ in range(args.repeats)]
    sequential = [baseline_sequential(loaded.model, loaded.tokenizer, texts, args.n, args.tokens)
                  for _ in range(max(1, args.repeats - 1))]

    server_tps = med(unary, "tokens_per_s")
    static_tps, sequential_tps = statistics.median(static), statistics.median(sequential)
    print(f"server (Complete)        {server_tps:8.1f} tok/s   latency p50 {med(unary, 'p50'):.2f} s  "
          f"p99 {med(unary, 'p99'):.2f} s   ({100 * server_tps / roofline:.0f}% of the roofline)")
    print(f"server (StreamComplete)  {med(streamed, 'tokens_per_s'):8.1f} tok/s   latency p50 "
          f"{med(streamed, 'p50'):.2f} s  p99 {med(streamed, 'p99'):.2f} s  TTFT p50 {med(streamed, 'ttft_p50'):.2f} s"
          f"  p99 {med(streamed, 'ttft_p99'):.2f} s")
    print(f"server without storing groups in Redis  {med(unstored, 'tokens_per_s'):8.1f} tok/s   latency p50 "
          f"{med(unstored, 'p50'):.2f} s   (storing costs {100 * (1 - server_tps / med(unstored, 'tokens_per_s')):+.1f}% "
          f"throughput)")
    print(f"baseline (a) generate per request, sequential  {sequential_tps:8.1f} tok/s")
    print(f"baseline (b) generate, one static batch        {static_tps:8.1f} tok/s")
    if llama:
        print(f"baseline (c) llama-server, {args.clients} clients x n_cmpl={args.n}  "
              f"{statistics.median(llama['batch']):8.1f} tok/s")
        print(f"single stream, server / llama-server decode: "
              f"{med(single, 'decode_tok_s') / med(llama['single'], 'decode_tok_s'):.2f}x")
        print(f"server / llama-server: {server_tps / statistics.median(llama['batch']):.2f}x")
    print(f"single stream, server / HF generate decode: "
          f"{med(single, 'decode_tok_s') / med(hf_single, 'decode_tok_s'):.2f}x")
    print(f"server / sequential: {server_tps / sequential_tps:.2f}x")
    print(f"server / static batch: {server_tps / static_tps:.2f}x")


if __name__ == "__main__":
    main()
