"""Serving: the gRPC server, the continuous-batching engine and its sampling, validation and metrics."""
