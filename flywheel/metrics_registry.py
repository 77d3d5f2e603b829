"""The Prometheus registry of one process's ``/metrics``.

Every process (server, labelling worker, training worker) owns one registry instead of
prometheus_client's global one, so tests can host several servers in one process. A bare
``CollectorRegistry`` has none of the standard collectors, though, and an operator expects
``process_*`` (CPU seconds, resident memory, open file descriptors, start time) and ``python_*``
(GC, interpreter version) beside the application's own metrics: this registry has them.

The ``*_created`` series prometheus_client adds beside every counter and histogram (the Unix
time the series was created) double the exposition and nothing here reads them; they are off for
the whole process.
"""

from __future__ import annotations

from prometheus_client import (GCCollector, PlatformCollector, ProcessCollector, CollectorRegistry,
                               disable_created_metrics)


def process_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors, for one process's ``/metrics``."""
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
