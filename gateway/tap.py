"""twistd entry point: `twistd -n gateway --config gateway.yaml`."""

from __future__ import annotations

import sys
from typing import cast

from twisted.application import service
from twisted.python import usage

from gateway.config import ConfigError, find_config, load_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to gateway.yaml (built-in defaults when omitted)."],
    ]


def makeService(options: Options) -> service.IService:
    """Load the configuration (one clear line and exit 1 when it is bad) and build the service."""
    from twisted.internet import reactor

    from gateway.service import make_service

    try:
        config = load_config(find_config(options["config"]))
        # MultiService provides IService through @implementer, which mypy cannot see.
        return cast(service.IService, make_service(config, reactor))
    except ConfigError as e:
        sys.stderr.write(f"gateway: {e}\n")
        raise SystemExit(1)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"gateway: cannot start: {e}\n")
        raise SystemExit(1)
