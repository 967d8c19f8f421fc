"""`release-service consume NAME`: runs one of the consumers in `consumers/`."""

from __future__ import annotations

import argparse
import importlib

from .core.logs import configure_logging
from .core.metrics_server import start_metrics_server
from .core.settings import load_settings


def cmd_consume(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    start_metrics_server(settings, f"consume {args.name}")
    module = importlib.import_module(f"consumers.{args.name}")
    module.main(settings)
    return 0
