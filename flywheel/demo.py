"""``make demo``: the main job on the embedded defaults.

Starts the gRPC server on the embedded SmolLM2-135M-Instruct (converting its GGUF once into the
data directory), sends it a few real requests through the public API as an application would,
and prints the sampled completions and the server's own figures. Later parts of the loop
(feedback, training, hot-swap) join this demo as they land.
"""

from __future__ import annotations

import logging
import sys
import time
import urllib.request

from flywheel.grpc_client import open_channel
from flywheel.redis_server import free_port
from flywheel.settings import Settings
from flywheel.v1 import feedback_pb2 as feedback_pb
from flywheel.v1 import feedback_pb2_grpc as feedback_rpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for writing clear emails.",
    "Write a haiku about the sea.",
]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.cli import build_server

    settings = Settings.load({"grpc_address": "127.0.0.1:0", "metrics_port": free_port()})
    print(f"== starting Redis and the server (data dir {settings.data_dir}; the first run converts the model, ~20 s)")
    started = time.monotonic()
    server, release = build_server(settings)
    server.start(wait_until_ready=True)
    print(f"== serving on 127.0.0.1:{server.port} after {time.monotonic() - started:.1f} s; "
          f"metrics on http://127.0.0.1:{server.metrics_port}/metrics")
    try:
        # the server created this machine's API keys in the data directory; the client reads its key there
        with open_channel(settings, f"127.0.0.1:{server.port}") as channel:
            stub = rpc.InferenceStub(channel)
            calls = [stub.Complete.future(pb.CompleteRequest(
                messages=[pb.ChatMessage(role="user", content=q)], n=3, max_new_tokens=48, temperature=0.8,
                top_p=0.95, seed=i), timeout=300) for i, q in enumerate(QUESTIONS)]
            t0 = time.monotonic()
            responses = [c.result() for c in calls]
            elapsed = time.monotonic() - t0
            for question, response in zip(QUESTIONS, responses):
                print(f"\n### {question}\n(group {response.group_id}, policy v{response.policy_version})")
                for c in response.completions:
                    reason = pb.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()
                    text = " ".join(c.text.split())
                    print(f"  [{c.index}] ({c.token_count} tokens, {reason}, logprob {c.logprob:.1f}) {text}")
            tokens = sum(c.token_count for r in responses for c in r.completions)
            print(f"\n== {len(responses)} concurrent requests x 3 samples: {tokens} tokens in {elapsed:.1f} s "
                  f"({tokens / elapsed:.0f} tok/s, batched together)")
            # a user ranks each group by a simple stated preference: the shortest answer is best
            feedback = feedback_rpc.FeedbackStub(channel)
            for response in responses:
                ranking = sorted(response.completions, key=lambda c: len(c.text))
                ack = feedback.SubmitRanking(feedback_pb.SubmitRankingRequest(
                    group_id=response.group_id, completion_ids=[c.completion_id for c in ranking],
                    idempotency_key=f"demo-{response.group_id}"), timeout=30)  # ranks as the key's name
                print(f"== ranked group {response.group_id[:8]}… (shortest first): stream entry {ack.stream_entry_id}")
            stats = feedback.GetFeedbackStats(feedback_pb.GetFeedbackStatsRequest(), timeout=30)
            print(f"== feedback stream: {stats.rankings_total} rankings ({stats.human_rankings} human, "
                  f"{stats.ai_rankings} AI), stream length {stats.stream_length}")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        wanted = ("flywheel_requests_total{", "flywheel_generated_tokens_total ", "flywheel_serving_policy_version ",
                  "flywheel_rankings_accepted_total{", "flywheel_group_store_duration_seconds_count")
        print("== server metrics:")
        for line in metrics.splitlines():
            if line.startswith(wanted):
                print("  " + line)
    finally:
        server.stop(grace=5)
        release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
