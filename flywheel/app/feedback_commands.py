"""``flywheel rank`` and ``flywheel feedback ...``: feedback from a terminal.

Ranking goes through the gRPC API like any other client, so a person at a terminal gets exactly
the validation and status codes an application gets. The maintenance commands talk to Redis.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import grpc

from flywheel.config import ClientConfig, FlywheelConfig, LabellingWorkerConfig, add_config_flags, config_from_args
from flywheel.grpc_client import explain_rpc_error, open_channel
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc


def register(subparsers) -> None:
    rank = subparsers.add_parser("rank", help="rank completions of a served group, best first",
                                 description="Rank 2 to 9 completions of one served group, best first.")
    rank.add_argument("group_id", help="the group_id of a served response (flywheel complete prints it)")
    rank.add_argument("completion_ids", nargs="+", metavar="COMPLETION_ID",
                      help="2 to 9 completion ids of that group, best first")
    rank.add_argument("--annotator", default="",
                      help="who ranked; with auth on, a client key ranks as its own name (leave this empty)")
    rank.add_argument("--comment", default="", help="free text kept with the ranking")
    rank.add_argument("--idempotency-key", default="",
                      help="the same key makes a retried ranking count once; default: a fresh key per command")
    rank.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    add_config_flags(rank, FlywheelConfig, ClientConfig)
    rank.set_defaults(handler=run_rank)

    feedback = subparsers.add_parser("feedback", help="feedback stream statistics and maintenance",
                                     description="Statistics of the rankings stream (over gRPC) and its maintenance "
                                                 "(in the platform's Redis).")
    commands = feedback.add_subparsers(dest="feedback_command", metavar="COMMAND")
    stats = commands.add_parser("stats", help="rankings collected, stream length, pending per consumer group",
                                description="Ask a running server (Feedback.GetFeedbackStats) for the rankings "
                                            "collected, the stream, each consumer group's backlog and the AI-human "
                                            "agreement.")
    stats.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    add_config_flags(stats, FlywheelConfig, ClientConfig)
    stats.set_defaults(handler=run_stats)
    schedule = commands.add_parser("schedule", help="enqueue AI labelling of the groups that are due, once",
                                   description="One pass of what celery beat does every "
                                               "FLYWHEEL_LABELLING_SCHEDULE_SECONDS: enqueue AI labelling of the "
                                               "served groups that are due.")
    add_config_flags(schedule, FlywheelConfig, LabellingWorkerConfig)
    schedule.set_defaults(handler=run_schedule)
    trim = commands.add_parser("trim", help="delete rankings every consumer group has acknowledged",
                               description="Delete the rankings every consumer group has acknowledged from the "
                                           "stream (the platform's Redis; none is started).")
    add_config_flags(trim, FlywheelConfig)
    trim.set_defaults(handler=run_trim)
    export = commands.add_parser(
        "export", help="write the rankings as JSONL for other tools (TRL's pairwise format, or K-way)",
        description="Write the collected rankings as JSON lines: --format pairwise gives TRL's "
                    '{"prompt", "chosen", "rejected"} (RewardTrainer, DPOTrainer); --format kway one ranking a '
                    "line with its source, annotator and policy version. Reads the stream without acknowledging.")
    export.add_argument("output", nargs="?", default="-", help="file to write (default: standard output)")
    export.add_argument("--format", choices=("pairwise", "kway"), default="pairwise", dest="export_format",
                        help="pairwise: {prompt, chosen, rejected} per pair (TRL); kway: one ranking per line")
    export.add_argument("--since", default=None,
                        help="only rankings made at or after this time: unix seconds or ISO 8601 (2026-11-01T12:00)")
    export.add_argument("--source", choices=("human", "ai"), default=None, help="only rankings from this source")
    add_config_flags(export, FlywheelConfig)
    export.set_defaults(handler=run_export)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, feedback_pb2_grpc.FeedbackStub]:
    channel = open_channel(config_from_args(args))
    return channel, feedback_pb2_grpc.FeedbackStub(channel)


def _failed(command: str, args: argparse.Namespace, error: grpc.RpcError) -> int:
    print(f"flywheel {command}: {explain_rpc_error(error, config_from_args(args))}", file=sys.stderr)
    return 1


def run_rank(args: argparse.Namespace) -> int:
    request = feedback_pb2.SubmitRankingRequest(
        group_id=args.group_id, completion_ids=args.completion_ids, annotator_id=args.annotator,
        comment=args.comment, idempotency_key=args.idempotency_key or uuid.uuid4().hex)
    channel, stub = _stub(args)
    with channel:
        try:
            reply = stub.SubmitRanking(request, timeout=args.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            return _failed("rank", args, exc)
    note = " (already recorded)" if reply.duplicate else ""
    print(f"ranking {reply.ranking_id} stored as stream entry {reply.stream_entry_id}{note}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    with channel:
        try:
            stats = stub.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(), timeout=args.timeout,
                                          wait_for_ready=True)
        except grpc.RpcError as exc:
            return _failed("feedback stats", args, exc)
    print(f"rankings: {stats.rankings_total} ({stats.human_rankings} human, {stats.ai_rankings} ai)")
    print(f"stream length: {stats.stream_length}")
    for group in stats.consumer_groups:
        print(f"consumer group {group.name}: {group.pending} pending, {group.lag} not yet delivered")
    if stats.agreement_pairs:
        print(f"AI-human agreement: {stats.ai_human_agreement:.1%} of {stats.agreement_pairs} pairs")
    else:
        print("AI-human agreement: no group ranked by both yet")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from feedback.tasks import labelling_config, schedule_due_groups
    from flywheel.app.state import existing_state

    settings = config_from_args(args)
    with existing_state(settings) as (client, _):
        enqueued = schedule_due_groups(client, labelling_config(settings))["enqueued"]
    print(f"enqueued {enqueued} groups for labelling")
    return 0


def run_trim(args: argparse.Namespace) -> int:
    from flywheel.app.state import existing_state
    from flywheel.rankings_stream import RankingStream

    settings = config_from_args(args)
    with existing_state(settings) as (client, _):
        trimmed = RankingStream(client).trim_acknowledged()
    print(f"trimmed {trimmed} acknowledged rankings")
    return 0


def parse_since(value: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it names its zone)."""
    if value is None:
        return None
    from datetime import datetime, timezone

    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"flywheel feedback export: --since {value!r} is neither unix seconds nor ISO 8601") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def run_export(args: argparse.Namespace) -> int:
    import json

    from feedback.export import ExportCounts, export_records
    from flywheel.app.state import existing_state

    settings = config_from_args(args)
    since = parse_since(args.since)
    counts = ExportCounts()
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    try:
        with existing_state(settings) as (client, _):
            for record in export_records(client, args.export_format, since, args.source, counts):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in counts.skipped.items()) or "none"
    print(f"exported {counts.records} {args.export_format} records from {counts.rankings} rankings "
          f"(skipped: {skipped})", file=sys.stderr)
    return 0
