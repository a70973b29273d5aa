"""The deployment files as data: the Dockerfile's instructions, YAML, runbook anchors
(tests/test_deploy.py, test_k8s.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


YAML_INSTALL = "pip install pyyaml"


def yaml_module():
    try:
        import yaml
    except ImportError:  # a failure, not a skip: these checks must run on CI
        pytest.fail(f"PyYAML is needed to check docker-compose.yml and the alert rules: {YAML_INSTALL}")
    return yaml


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def runbook_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, spaces to dashes, punctuation dropped)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
