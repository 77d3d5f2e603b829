"""Feedback's routes on the OpenAI-compatible HTTP server: rankings, the next group to rank, and
the ranking page. They join serving's HTTP front end (``serving.http_api``) with feedback's
``RankingIntake``, which is why they live in the application layer and not in either part.

``POST /v1/rankings`` takes ``{"group_id", "completion_ids" (best first), "annotator_id",
"comment", "idempotency_key"}`` (or the ``Idempotency-Key`` header) and answers
``{"ranking_id", "stream_entry_id", "duplicate"}``: the same rules and refusals as
``Feedback.SubmitRanking``, as HTTP statuses (400 naming the field, 403, 404, 409 for a second
ranking by the same annotator, 503 while Redis is down). ``GET /v1/rankings/next`` returns the
newest served group the caller has not ranked (``{"group": null}`` when none). ``GET /rank`` is
the page people rank on; it asks for the annotator's key and calls the two routes.
"""

from __future__ import annotations

from importlib import resources

from feedback.intake import RankingIntake, RankingSubmission, Rejection, next_group_to_rank
from flywheel.api_keys import current_caller
from serving.http_api import HttpError, HttpRequest, HttpRoute, JsonResponse, static_route

RANKING_PAGE = resources.files("feedback") / "static" / "rank.html"  # package data


def _strings(data: dict, name: str) -> str:
    value = data.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HttpError(400, f"{name}: must be a string", param=name)
    return value


def submission_of(request: HttpRequest) -> RankingSubmission:
    data = request.json()
    ids = data.get("completion_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HttpError(400, "completion_ids: must be a list of completion ids, best first", param="completion_ids")
    return RankingSubmission(
        group_id=_strings(data, "group_id"), completion_ids=tuple(ids), annotator_id=_strings(data, "annotator_id"),
        comment=_strings(data, "comment"),
        idempotency_key=_strings(data, "idempotency_key") or request.headers.get("Idempotency-Key") or "")


class FeedbackRoutes:
    def __init__(self, intake: RankingIntake) -> None:
        self.intake = intake

    def routes(self) -> list[HttpRoute]:
        return [HttpRoute("POST", "/v1/rankings", self.submit), HttpRoute("GET", "/v1/rankings/next", self.next_group),
                static_route("/rank", RANKING_PAGE)]

    def submit(self, request: HttpRequest) -> JsonResponse:
        try:
            result = self.intake.submit(submission_of(request))
        except Rejection as rejection:
            raise HttpError.of_status(rejection.status, rejection.message, rejection.field, rejection.reason) from None
        return JsonResponse({"object": "ranking", "ranking_id": result.ranking_id,
                             "stream_entry_id": result.entry_id, "duplicate": result.duplicate})

    def next_group(self, request: HttpRequest) -> JsonResponse:
        caller = current_caller()
        asked = request.query_value("annotator_id")
        if caller is not None and not (caller.is_admin and asked):
            annotator = caller.name  # a client key sees what its own name has not ranked
        else:
            annotator = asked
        group = next_group_to_rank(self.intake.groups, annotator)
        if group is None:
            return JsonResponse({"group": None, "annotator_id": annotator})
        return JsonResponse({"annotator_id": annotator, "group": {
            "group_id": group.group_id, "policy_version": group.policy_version, "prompt": group.prompt,
            "created_at": group.created_at,
            "completions": [{"completion_id": c.completion_id, "index": c.index, "text": c.text}
                            for c in group.completions]}})
