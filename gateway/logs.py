"""``log.format: json``: one JSON object per line (``time``, ``level``, ``event``, ``message``, fields).

The gateway logs with ``twisted.logger`` throughout; its key lines carry an
``event`` name (``session.start``, ``login``, ``session.end``,
``oauth2.refresh``, ``listening``, ...) and their values as fields, so the
JSON line of a login is ``{"time": ..., "level": "info", "event": "login",
"proto": "IMAP", "account": "alice", "result": "fail", "reason": "bad-token",
..., "message": "IMAP login account=alice ..."}``. Lines without a name (Twisted's
own) get the logging module's namespace as their ``event``.

Nothing secret reaches a log line in the first place (no token, password,
refresh token or message byte is ever a field); this module only formats.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, cast

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

# Keys of Twisted's own bookkeeping and of legacy log.msg events: not fields.
_SKIP = {"message", "isError", "system", "format", "time", "why", "failure", "printed", "event"}


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as one line of JSON (newline-terminated)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso(float(event.get("log_time") or 0.0)),
        "level": getattr(level, "name", "info"),
        "event": str(event.get("event") or event.get("log_namespace") or "log"),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        record[key] = _plain(value)
    record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def json_observer(out: IO[str]) -> ILogObserver:
    """A file observer writing :func:`event_as_json` lines to ``out``."""
    return cast(ILogObserver, FileLogObserver(out, event_as_json))  # @implementer, invisible to mypy


def twistd_output(parent_options: Any) -> IO[str]:
    """Where twistd would write its log: ``--logfile`` (``-`` is stdout), else stdout in the
    foreground (``-n``) and ``twistd.log`` when daemonized, as twistd's own logger does."""
    from twisted.python.logfile import LogFile

    logfile = parent_options.get("logfile") if parent_options is not None else "-"
    nodaemon = parent_options.get("nodaemon") if parent_options is not None else True
    if logfile == "-" or (not logfile and nodaemon):
        return sys.__stdout__ or sys.stdout  # twistd replaces sys.stdout with a logger later
    return LogFile.fromFullPath(logfile or "twistd.log")
