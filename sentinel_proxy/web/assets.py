"""The dashboard's files, shipped inside the package: operators run this in closed networks, so no
CDN, no web fonts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.web import pages
from twisted.web.resource import IResource
from twisted.web.static import File

STATIC_DIR = Path(__file__).resolve().parent / "static"


class StaticFiles(File):
    """The dashboard's assets, without a directory listing of the package folder."""

    def directoryListing(self) -> IResource:
        return pages.notFound()

    def getChild(self, path: bytes, request: Any) -> IResource:
        """A name no file can have (``%00``) is not found, not a ValueError from the file system."""
        if b"\x00" in path:
            return pages.notFound()
        return super().getChild(path, request)
