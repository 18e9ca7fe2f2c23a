"""Where a command's logs go and how they look: `swarmlm --log-level LEVEL --log-format text|json
--log-file PATH COMMAND ...` (the root options, so every command logs alike), JSON lines written by
python-json-logger (`time`, `level`, `logger`, `message`), the format log collectors read without a parser
of their own."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LogSettings:
    level: str | None = None  # None: the command's own default
    json: bool = False
    file: Path | None = None  # None: standard error


SETTINGS = LogSettings()


def setup_logging(default_level: int) -> None:
    """The root logger for this command: its level (the command's default unless --log-level), format and
    destination. hivemind's loggers go through it too when the output is JSON or a file (by default
    hivemind writes its own lines to standard error)."""
    level = getattr(logging, SETTINGS.level.upper()) if SETTINGS.level else default_level
    handler: logging.Handler = logging.FileHandler(SETTINGS.file) if SETTINGS.file else logging.StreamHandler()
    if SETTINGS.json:
        from pythonjsonlogger.json import JsonFormatter

        renamed = {"asctime": "time", "levelname": "level", "name": "logger"}
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields=renamed))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if SETTINGS.json or SETTINGS.file:
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")
