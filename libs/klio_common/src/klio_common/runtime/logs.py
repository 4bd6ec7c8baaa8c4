"""Logging: JSON lines for machines, or ``KLIO_LOG_FORMAT=text`` for humans."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from klio_common.errors import KlioError

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "service",
}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}
_HANDLER_NAME = "klio"
_NOISY = ("nats", "asyncio", "botocore", "aiobotocore", "urllib3")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message and extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


class TextFormatter(logging.Formatter):
    """``time level service logger: message key=value ...`` for a terminal."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = (
            f"{_time(record)} {record.levelname.lower():<7} {self._service} {record.name}: "
            f"{record.getMessage()}{' ' + extras if extras else ''}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(
    service: str,
    level: str = "info",
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send every log record of the process to ``stream`` in Klio's format.

    Args:
        service: the name written in every record (``relay``).
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
        env: the environment; ``KLIO_LOG_FORMAT=text`` selects the human format.
        stream: where to write; standard error by default.
    """
    text = (env or {}).get("KLIO_LOG_FORMAT", "json").lower() == "text"
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(TextFormatter(service) if text else JsonFormatter(service))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # configured twice: replace ours, keep others'
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    if root.level <= logging.DEBUG:
        return
    # Libraries' info chatter (reconnect attempts every 2 s) would drown the service's own.
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def log_error(logger: logging.Logger, exc: BaseException, what: str) -> None:
    """Log ``exc``: a `KlioError` as its message and hint, anything else with its traceback.

    Args:
        logger: where to log.
        exc: the exception.
        what: what failed, e.g. ``"relay stopped"``; prefixed to the message.
    """
    if isinstance(exc, KlioError):
        logger.error("%s: %s", what, exc.message, extra={"hint": exc.hint} if exc.hint else None)
    else:
        logger.error("%s: %s", what, exc, exc_info=exc)
