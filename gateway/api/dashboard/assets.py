"""The dashboard's static files (``static/``: one stylesheet, one script, an icon), read once, with a content
hash for their URLs so that browsers may cache them for good and still see a new release at once."""

from __future__ import annotations

import hashlib
from importlib import resources

FILES = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
         "favicon.svg": "image/svg+xml"}
PREFIX = "/dashboard/static/"


class Static:
    """name -> (content, content type, version)."""

    def __init__(self) -> None:
        folder = resources.files("gateway.api.dashboard").joinpath("static")
        self._files: dict[str, tuple[bytes, str, str]] = {}
        for name, content_type in FILES.items():
            body = folder.joinpath(name).read_bytes()
            self._files[name] = (body, content_type, hashlib.sha256(body).hexdigest()[:12])

    def get(self, name: str) -> tuple[bytes, str, str] | None:
        return self._files.get(name)

    def url(self, name: str) -> str:
        return f"{PREFIX}{name}?v={self._files[name][2]}"
