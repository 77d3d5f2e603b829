"""The contracts every Flywheel process agrees on: pure names and schemas, no I/O clients.

- ``keys``: every Redis key, key prefix, stream, channel and consumer-group name;
- ``groups``: the served-group record (what the server stores, feedback ranks, training reads);
- ``rankings``: a ranking entry as it travels on the rankings stream;
- ``artifacts``: the version folder layout, the artifact file names and their verification;
- ``heldout``: the held-out split by a hash; ``prompts``: how a chat prompt is rendered;
- ``redis_text``: Redis replies as text.

Only the standard library and other contracts modules are imported here (no redis client, no
torch), so that every layer above can import these and none of them can drift apart.
"""
