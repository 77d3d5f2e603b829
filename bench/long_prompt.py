"""Chunked prefill benchmark: how long a long prompt stalls the streams already running.

``--streams`` clients stream ``--tokens`` tokens each (n=1) through a real ``flywheel serve``;
once every stream has its first tokens, one more client sends a prompt of about
``--prompt-tokens`` tokens (n=1, 16 new tokens). For each stream the bench records the longest gap
between two of its tokens while the long prompt was being prefilled (the stall a user sees), and
the long request's time to first token. The same workload runs, in the same run, on a server
that prefills whole prompts (``FLYWHEEL_PREFILL_CHUNK_TOKENS=0``, the baseline) and on one that
prefills in chunks (``--chunk``, the default setting). Medians over ``--repeats``; the last line
is the stall with chunks / without.

    python bench/long_prompt.py [--streams 4] [--tokens 160] [--prompt-tokens 3500] [--chunk 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import BENCH_KEY, prompts, start_server  # noqa: E402
from flywheel.contracts.prompts import render_prompt  # noqa: E402
from flywheel.grpc_client import with_key  # noqa: E402
from flywheel.models import load_model  # noqa: E402
from flywheel.v1 import inference_pb2 as pb  # noqa: E402
from flywheel.v1 import inference_pb2_grpc as rpc  # noqa: E402

LONG_TEXT = ("Here is a long report about the harbour, its ships, its weather and its people, to be read "
             "carefully before answering. ")


def long_message(tokenizer, tokens: int) -> str:
    """A user message whose rendered prompt is about ``tokens`` tokens."""
    per_copy = len(tokenizer(LONG_TEXT).input_ids)
    return LONG_TEXT * max(1, tokens // per_copy) + "Summarise it in one sentence."


def run_once(port: int, streams: int, tokens: int, long_text: str) -> dict:
    channel = with_key(grpc.insecure_channel(f"127.0.0.1:{port}"), BENCH_KEY)
    stub = rpc.InferenceStub(channel)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    started = threading.Barrier(streams + 1)
    errors: list[str] = []

    def stream(index: int, text: str) -> None:
        request = pb.CompleteRequest(messages=[pb.ChatMessage(role="user", content=text)], n=1,
                                     max_new_tokens=tokens, min_new_tokens=tokens)
        told = False
        try:
            for message in stub.StreamComplete(request, timeout=600):
                if message.HasField("delta") and message.delta.token_count:
                    arrivals[index].append(time.perf_counter())
                    if not told and len(arrivals[index]) >= 4:
                        told = True
                        started.wait()
        except grpc.RpcError as exc:
            errors.append(exc.code().name)
        finally:
            if not told:
                started.abort()

    threads = [threading.Thread(target=stream, args=(i, t)) for i, t in enumerate(prompts(streams))]
    for t in threads:
        t.start()
    started.wait(timeout=600)
    sent = time.perf_counter()
    long_request = pb.CompleteRequest(messages=[pb.ChatMessage(role="user", content=long_text)], n=1,
                                      max_new_tokens=16, min_new_tokens=16)
    first = None
    for message in stub.StreamComplete(long_request, timeout=600):
        if first is None and message.HasField("delta") and message.delta.token_count:
            first = time.perf_counter()
    for t in threads:
        t.join()
    channel.close()
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    # each stream's longest gap between two tokens from the long prompt's arrival to its first token
    stalls = []
    for times in arrivals:
        window = [t for t in times if sent <= t <= first]
        before = [t for t in times if t < sent]
        points = before[-1:] + window + [t for t in times if t > first][:1]
        stalls.append(max(b - a for a, b in zip(points, points[1:])))
    return {"stall": statistics.median(stalls), "long_ttft": first - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--prompt-tokens", type=int, default=3500)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default="", help="model folder; default the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data-dir", default=str(ROOT / ".flywheel"))
    args = parser.parse_args()
    loaded = load_model(args.model, Path(args.data_dir), args.dtype)
    long_text = long_message(loaded.tokenizer, args.prompt_tokens)
    prompt_tokens = len(render_prompt(loaded.tokenizer, long_text)[1])
    print(f"{args.streams} streams x {args.tokens} tokens; a prompt of {prompt_tokens} tokens arrives once they "
          f"stream; {args.repeats} repeats (medians)")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "models").symlink_to(Path(args.data_dir).resolve() / "models")
        for name, chunk in (("whole prompts (baseline)", 0), (f"chunks of {args.chunk}", args.chunk)):
            process, port = start_server(scratch, args.dtype, args.model, store_groups=False,
                                         extra_env={"FLYWHEEL_PREFILL_CHUNK_TOKENS": str(chunk),
                                                    "FLYWHEEL_MAX_PROMPT_TOKENS": str(max(4096, prompt_tokens + 1))})
            try:
                run_once(port, 1, 8, "warm up")
                # each repeat's prompt its own from its first words, so no repeat finds another's in the prefix cache
                runs = [run_once(port, args.streams, args.tokens, f"Report number {i}. {long_text}")
                        for i in range(args.repeats)]
            finally:
                process.terminate()
                process.wait(30)
            results[name] = runs
            print(f"{name:26s} streams' longest gap {statistics.median(r['stall'] for r in runs):6.2f} s   "
                  f"long prompt's TTFT {statistics.median(r['long_ttft'] for r in runs):6.2f} s")
    whole, chunked = results.values()
    stall = statistics.median(r["stall"] for r in chunked) / statistics.median(r["stall"] for r in whole)
    ttft = statistics.median(r["long_ttft"] for r in chunked) / statistics.median(r["long_ttft"] for r in whole)
    print(f"long prompt's TTFT, chunks / whole: {ttft:.2f}x")
    print(f"streams' longest gap, chunks / whole: {stall:.2f}x")


if __name__ == "__main__":
    main()
