"""What the `csmf` command shows: the records of the `csmf` loggers, as plain lines or JSON objects.

Library code never prints; each module logs on `logging.getLogger(__name__)` (all under `csmf`). The command
installs the one handler below for as long as it runs, so its human output is what the library logs at INFO
(on stdout) and WARNING and up (on stderr), the streams its lines were printed to before (issue 28).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")
PACKAGE_LOGGER = "csmf"


class ConsoleHandler(logging.Handler):
    """One record a line: below WARNING on stdout, WARNING and up on stderr. The stream is looked up per
    record, so a redirected sys.stdout (a test's capture, a caller's) receives what print would have."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            print(text, file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout, flush=True)
        except Exception:  # logging's contract: a failing handler reports and never raises into the caller
            self.handleError(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message; exception when a traceback rides."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    """text: the message alone, as the command printed it; json: JsonFormatter."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: give one of {FORMATS}")
    return JsonFormatter() if fmt == "json" else logging.Formatter("%(message)s")


@contextmanager
def cli_logging(level: str = "info", fmt: str = "text") -> Iterator[None]:
    """While the command runs, the `csmf` loggers' records at `level` and up go to the console handler, and to it
    alone (not on to the root logger, where a library that configured logging would show each line twice).
    The logger is restored after, so `csmf.cli.main` called in a program leaves that program's setup as it was."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    saved = (logger.level, logger.propagate, logger.handlers[:])
    handler = ConsoleHandler()
    handler.setFormatter(formatter(fmt))
    logger.handlers = [handler]
    logger.setLevel(LEVELS[level])
    logger.propagate = False
    try:
        yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def uvicorn_log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """uvicorn's `log_config` for `csmf serve`: the `csmf` loggers as `cli_logging` sets them, and uvicorn's own
    lines (warnings and errors: its start-up lines stay off, as before) in the same format, applied by uvicorn in
    each worker process as well. Text keeps uvicorn's own layout ("WARNING:  ...")."""
    text = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s", "use_colors": None}
    json_format = {"()": f"{__name__}.JsonFormatter"}
    uvicorn_level = max(LEVELS[level], logging.WARNING)
    return {
        "version": 1,
        "disable_existing_loggers": False,  # loggers made before uvicorn starts (csmf's) keep working
        "formatters": {
            "csmf": json_format if fmt == "json" else {"format": "%(message)s"},
            "uvicorn": json_format if fmt == "json" else text,
        },
        "handlers": {
            "csmf": {"()": f"{__name__}.ConsoleHandler", "formatter": "csmf"},
            "uvicorn": {"()": f"{__name__}.ConsoleHandler", "formatter": "uvicorn", "level": uvicorn_level},
        },
        "loggers": {
            PACKAGE_LOGGER: {"handlers": ["csmf"], "level": LEVELS[level], "propagate": False},
            "uvicorn": {"handlers": ["uvicorn"], "level": logging.INFO, "propagate": False},
        },
    }
