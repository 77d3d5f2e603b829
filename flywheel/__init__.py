"""Flywheel: serve a policy, collect rankings, retrain, hot-swap.

This small core package holds what every part shares: typed settings, model loading, the
CLI, and the generated protobuf stubs (``flywheel.v1``).
"""

__version__ = "0.1.0"
