"""Logging setup for the launcher, the Python models and the engine process: plain lines or,
with --json-output, one JSON object per line in the shape of TGI's (timestamp, level,
fields.message, target)."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "fields": {"message": record.getMessage()},
            "target": record.name,
        }
        if record.exc_info:
            entry["fields"]["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(json_output: bool, logger_name: str = "textgen") -> None:
    """Sends `logger_name`'s INFO and above to stderr (the models' stderr is tritonserver's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else
                         logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
