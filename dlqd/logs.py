"""structlog set-up: JSON lines on stderr (console on a TTY), secrets scrubbed,
repeated warnings and errors limited to one line per kind per ``REPEAT_INTERVAL``
(the next one says how many were held back: ``repeated``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRETS: set[str] = set()

#: a warning or error of the same kind is written at most once per this many
#: seconds (a client flood that exhausts descriptors made asyncio log one per
#: accept: 317,000 lines in a minute)
REPEAT_INTERVAL = 10.0
_MAX_KINDS = 1000


class RepeatLimiter:
    """Which lines of a kind may be written now, and how many were held back."""

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        self.interval = interval
        self._kinds: dict[tuple[str, str], list[float | int]] = {}

    def allow(self, kind: tuple[str, str]) -> int | None:
        """None: hold this line back; else the lines held back before it."""
        now = time.monotonic()
        seen = self._kinds.get(kind)
        if seen is not None and now - float(seen[0]) < self.interval:
            seen[1] = int(seen[1]) + 1
            return None
        if len(self._kinds) >= _MAX_KINDS:
            self._kinds.clear()  # bounded memory; at worst a kind is written again
        self._kinds[kind] = [now, 0]
        return int(seen[1]) if seen is not None else 0


_LIMITER = RepeatLimiter()


def _kind(message: object) -> str:
    text = str(message)
    return text.split("\n", 1)[0][:120]


class _RepeatFilter(logging.Filter):
    """The standard library's records (asyncio, hypercorn, psycopg_pool)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        held = _LIMITER.allow((record.name, _kind(record.getMessage())))
        if held is None:
            return False
        if held:
            record.repeated = held
        return True


def _repeated_of_record(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event.get("_record")
    held = getattr(record, "repeated", None)
    if held:
        event["repeated"] = held
    return event


def _limit_repeats(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """dlqd's own warnings and errors: one per event and error per interval
    (a row's own events, with its ``dlq_id``, are never held back)."""
    if method not in ("warning", "error", "critical", "exception") or "dlq_id" in event:
        return event
    held = _LIMITER.allow((str(event.get("event")), _kind(event.get("error", ""))))
    if held is None:
        raise structlog.DropEvent
    if held:
        event["repeated"] = held
    return event


def register_secret(value: str | None) -> None:
    """Never print ``value``: every log field containing it is scrubbed."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if not _SECRETS:
        return event
    for key, value in event.items():
        if isinstance(value, str):
            text = value
            for secret in _SECRETS:
                text = text.replace(secret, "***")
            event[key] = text
    return event


def configure_logging(fmt: str, level: str) -> None:
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    # Libraries (psycopg_pool) log through the standard library: same format,
    # same scrubbing, warnings and above only.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _repeated_of_record,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _scrub,
                renderer,
            ],
        )
    )
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # psycopg warns "error ignored terminating <AsyncPipeline>" after an error
    # dlqd already handled (a failed target in a pipeline): noise to an operator.
    # The pool's own warnings (connections failing) still come through.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _limit_repeats,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
