"""Flywheel: serve a policy, collect rankings, retrain, hot-swap.

This small core package holds what every part shares: the contracts (``flywheel.contracts``:
Redis names, record schemas, the artifact format, the held-out split, prompt rendering), typed
settings, model loading, the infrastructure (Redis, the registry, the rankings stream, the group
store, run locks, the Celery app, TLS, API keys) and the generated protobuf stubs
(``flywheel.v1``). The application on top of the parts (the CLI, ``flywheel up``, the
worker entry, the demo) is ``flywheel.app``.
"""

__version__ = "0.1.0"
