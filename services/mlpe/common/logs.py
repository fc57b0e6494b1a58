"""One structlog setup for every service: JSON lines to stderr (or console text).

Secrets never reach a log: fields whose names look secret are masked, and so is
any registered secret value wherever it appears in a message.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

_SECRET_KEY = re.compile(r"token|password|passwd|secret|webhook|authorization|api_?key|"
                         r"credential|private", re.I)
_secret_values: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact value in every later log line (e.g. a token read from disk)."""
    if value and len(value) >= 6:
        _secret_values.add(value)


def looks_secret(name: str) -> bool:
    """Whether a field or variable named `name` likely holds a secret (WANDB_API_KEY, …)."""
    return bool(_SECRET_KEY.search(name))


def redact(text: str, extra: tuple[str, ...] | list[str] = ()) -> str:
    """`text` with every registered secret value, and each of `extra`, masked."""
    for value in (*_secret_values, *(v for v in extra if v and len(v) >= 6)):
        text = text.replace(value, "***")
    return text


def _redact_processor(_logger, _method, event_dict: dict) -> dict:
    for key, value in list(event_dict.items()):
        if looks_secret(key) and value is not None:
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def configure(service: str, level: str = "info", fmt: str = "json") -> structlog.BoundLogger:
    """Configure structlog once per process and return a logger bound to `service`."""
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    # Standard-library loggers (our modules' and libraries') join the same stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(service=service)
