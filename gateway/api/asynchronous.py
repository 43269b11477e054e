"""A leaf resource answered by a coroutine: the admin listener's JSON API, OAuth2 pages and dashboard."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

log = Logger()


class AsyncLeaf(resource.Resource):
    """Every request goes to :meth:`_respond` (a coroutine). ``gone`` collects the failure of a
    client that went away meanwhile: the answer is then not written."""

    isLeaf = True
    failed = "Response failed"  # the log line when _respond itself raises

    def render(self, request: server.Request) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.Deferred.fromCoroutine(self._respond(request, gone))
        d.addErrback(lambda failure: log.failure(self.failed, failure))
        return server.NOT_DONE_YET

    async def _respond(self, request: server.Request, gone: list[Failure]) -> None:
        raise NotImplementedError
