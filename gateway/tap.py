"""twistd entry point: `twistd -n gateway --config gateway.yaml`."""

from __future__ import annotations

import sys
from typing import Any, cast

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
        top: service.MultiService = make_service(config, reactor)
        if config.log.format == "json":
            top = JSONLogged(top, getattr(options, "parent", None))
        # MultiService provides IService through @implementer, which mypy cannot see.
        return cast(service.IService, top)
    except ConfigError as e:
        sys.stderr.write(f"gateway: {e}\n")
        raise SystemExit(1)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"gateway: cannot start: {e}\n")
        raise SystemExit(1)


class JSONLogged(service.MultiService):
    """The gateway's services, logging JSON lines (``log.format: json``).

    twistd picks its log observer after makeService, from the application's
    ILogObserver component when there is one: this service sets that component
    on the application it is added to. Output goes where twistd's own text log
    would (``--logfile``, stdout with ``-n``).
    """

    def __init__(self, inner: service.MultiService, twistd_options: Any) -> None:
        super().__init__()
        inner.setServiceParent(self)
        self.twistd_options = twistd_options

    def setServiceParent(self, parent: Any) -> None:
        from twisted.logger import ILogObserver

        from gateway.logs import json_observer, twistd_output

        super().setServiceParent(parent)
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, json_observer(twistd_output(self.twistd_options)))
