# No imports of klein, txredisapi or the project here: they would install the default reactor
# before twistd honours --reactor (design.md).
from twisted.application.service import ServiceMaker

sentinel_proxy = ServiceMaker(
    "sentinel-proxy", "sentinel_proxy.tap", "JSON-RPC gateway in front of Aztec nodes", "sentinel-proxy")
sentinel_simnode = ServiceMaker(
    "sentinel-simnode", "sentinel_simnode.tap", "A simulated Aztec node (tests, demo, bench)",
    "sentinel-simnode")
