"""Logging, configured in one place: loguru to stderr, JSON (journald) or text.

Every process of the daemon (supervisor, source and apply workers) calls
``configure`` once; components bind ``workflow=`` / ``component=`` and log one line
per lifecycle event. Stdlib loggers (psycopg, pymysqlreplication, asyncio,
watchfiles) are routed through loguru so the format is the same everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

_JOURNALD_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(component=record.name).opt(exception=record.exc_info).log(
            level, record.getMessage()
        )


def _json_sink(message: Message) -> None:
    r: Record = message.record
    out: dict[str, Any] = {
        "ts": r["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": r["level"].name,
        "priority": _JOURNALD_PRIORITY.get(r["level"].name, 6),
        "msg": r["message"],
    }
    out.update({k: v for k, v in r["extra"].items() if k != "_text"})
    if r["exception"] is not None:
        exc = r["exception"]
        out["exception"] = f"{exc.type.__name__ if exc.type else ''}: {exc.value}"
    sys.stderr.write(json.dumps(out, default=str, ensure_ascii=False) + "\n")
    sys.stderr.flush()


_TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {extra[component]}{extra[_wf]} {message}"


def _text_patch(record: Record) -> bool:
    # Used as a filter so it runs per record: fills the text format's fields.
    extra = record["extra"]
    extra.setdefault("component", "dataflare")
    wf = extra.get("workflow")
    extra["_wf"] = f"[{wf}]" if wf else ""
    return True


_handler_id: int | None = None
_handler_settings: tuple[str, str] | None = None  # (level, format) of _handler_id


def configure(level: str = "INFO", fmt: str = "json", component: str = "dataflare") -> None:
    """(Re)configure logging; safe to call again on reload. A process whose handler
    already has this level and format (a worker forked from the zygote, which set
    it up for them) only renames its component: adding a loguru handler costs
    5-10 ms (sysconfig paths for tracebacks), on the path to a worker's start."""
    global _handler_id, _handler_settings
    logger.configure(extra={"component": component})
    if _handler_id is not None and _handler_settings == (level.upper(), fmt):
        return
    logger.remove()
    if fmt == "json":
        _handler_id = logger.add(_json_sink, level=level.upper(), backtrace=False, diagnose=False)
    else:
        _handler_id = logger.add(
            sys.stderr,
            level=level.upper(),
            format=_TEXT_FORMAT,
            colorize=False,
            backtrace=False,
            diagnose=False,
            filter=_text_patch,
        )
    _handler_settings = (level.upper(), fmt)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
