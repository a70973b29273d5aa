"""Headless Chromium for the dashboard's tests: run it, and read the DOM it dumps
(tests/test_dashboard.py, test_dashboard_browser.py)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.processes import CLEAN_ENV


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM", "")
    for name in (explicit, "chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


CHROMIUM = find_chromium()


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; or set CHROMIUM=...)")


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict[str, str]
    parent: Element | None = None
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def elements(self):
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.elements()

    def find_all(self, **attrs: str | None) -> list[Element]:
        """Descendants having every given attribute (underscores stand for dashes); None matches any value."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.elements()
                if all(k in e.attrs and (v is None or e.attrs[k] == v) for k, v in wanted.items())]

    def one(self, **attrs: str | None) -> Element:
        found = self.find_all(**attrs)
        assert len(found) == 1, f"expected one element with {attrs}, found {len(found)}"
        return found[0]

    def fields(self) -> dict[str, Element]:
        return {e.attrs["data-field"]: e for e in self.find_all(data_field=None)}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Element:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def run_chromium(args: list[str], profile: Path, budget_ms: int = 8000,
                 timeout: float = 30.0) -> subprocess.CompletedProcess:
    """One headless chromium run; its whole process group is killed if it overruns.

    ``budget_ms`` of virtual time lets the page's timers run (8000: about four refreshes) without
    waiting for them in real time; network requests still complete normally.
    """
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=CLEAN_ENV, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium did not finish within {timeout} s: {command}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{stderr[-3000:]}"
    return result
