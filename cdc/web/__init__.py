"""``cdc serve``: the HTTP API (``/api/v1/``), the web pages, ``/metrics``, ``/healthz``, ``/readyz``.

Build the ASGI app with :func:`create_app`; :mod:`cdc.web.serve` runs it with uvicorn.
"""

from __future__ import annotations

from cdc.web.api import create_app

__all__ = ["create_app"]
