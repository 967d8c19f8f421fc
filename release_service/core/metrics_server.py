"""Prometheus endpoint for processes without an HTTP server of their own."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from .settings import Settings

log = logging.getLogger(__name__)


def start_metrics_server(settings: Settings, role: str) -> None:
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.http_host)
        log.info("%s metrics on http://%s:%d/metrics", role, settings.http_host,
                 settings.metrics_port)
