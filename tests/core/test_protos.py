"""The committed stubs in flywheel/v1 must be exactly what protoc makes of protos/."""

from pathlib import Path

from flywheel.protos import ROOT, generate


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        assert committed.exists(), f"{relative} is not committed; run `make protos`"
        assert committed.read_text() == path.read_text(), f"{relative} is stale; run `make protos`"
    committed_stubs = sorted(p.name for p in (ROOT / "flywheel" / "v1").glob("*_pb2*.py*"))
    assert committed_stubs == sorted(p.name for p in fresh), "a stub without a .proto is committed"


def test_services_are_declared():
    from flywheel.v1 import admin_pb2, feedback_pb2, inference_pb2

    assert set(inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name) == {"Complete", "StreamComplete"}
    assert "SubmitRanking" in feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].methods_by_name
    assert {"ListPolicies", "GetStatus", "Promote", "Rollback"} <= set(
        admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name)
