"""The application: the ``flywheel`` command and its subcommands, ``flywheel up``, the server
process wiring (serving joined with feedback), the Celery worker entry, the demo and its simulated
users. It may import every part; nothing imports it (``tests/core/test_layers.py`` checks both)."""
