"""Feedback: completion-group records, preference rankings in a Redis stream, the RLAIF labeler."""
