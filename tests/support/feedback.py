"""Helpers of the feedback tests (a module name no other test folder uses)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from prometheus_client import CollectorRegistry

from feedback.service import FeedbackServicer, add_feedback_service
from flywheel.contracts.groups import GroupResult, SampleResult
from flywheel.redis_server import free_port
from flywheel.v1 import feedback_pb2_grpc
from serving.sampling import SamplingParams

PROMPT = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"


def group_result(group_id: str, texts: list[str], created_at: float | None = None,
                 policy_version: int = 3) -> GroupResult:
    """A GroupResult as the serving engine produces it."""
    created_at = time.time() if created_at is None else created_at
    samples = [SampleResult(i, f"{group_id}-{i}", text, "stop", [100 + i, 200 + i, 2], [-0.5, -1.25, -0.125])
               for i, text in enumerate(texts)]
    return GroupResult(group_id, policy_version, PROMPT, [1, 2, 3, 4],
                       SamplingParams(n=len(texts), max_new_tokens=16, temperature=0.7, seed=11),
                       samples, created_at, created_at + 0.1, created_at + 0.5)


class FeedbackServer:
    def __init__(self, redis_client, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.servicer = FeedbackServicer(redis_client, group_ttl_seconds=3600, registry=registry)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_feedback_service(self.server, self.servicer)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server.add_insecure_port(self.address)
        self.server.start()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = feedback_pb2_grpc.FeedbackStub(self.channel)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)


def build_biased_judge_dir(tiny_model_dir, path, scale: float = 25.0):
    """A copy of the tiny random model with its weights scaled up until it has a strong taste,
    including a strong preference for one answer position (as small real LMs have)."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(scale)
    model.save_pretrained(path)
    return path
