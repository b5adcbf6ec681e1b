"""The capture path: replication frames to `changes` COPY lines (docs/store.md).

``cdc.capture.engine`` picks the compiled core (``_core``) or the pure-Python one (``core``);
``cdc.capture.model`` holds what both take and give.
"""
