"""sentinel-proxy: a JSON-RPC gateway in front of a fleet of Aztec nodes."""

#: The one place the version is written: setup.py, ``--version`` and ``sentinel_proxy_build_info`` read it.
__version__ = "0.2.0"
