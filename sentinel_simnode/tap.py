"""``twistd -n sentinel-simnode``: run one simulated Aztec node (see ``sentinel_simnode.node``).

A separate process per fake node lets the demo and the benchmark put real sockets and real process
boundaries between the gateway and its upstreams, e.g.::

    twistd -n sentinel-simnode --scenario lagging --listen tcp:18546:interface=127.0.0.1
"""

from __future__ import annotations

import dataclasses

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from sentinel_simnode.node import SCENARIOS, ChainParams, SimulatedNode, simulated_site

log = Logger()

_DEFAULTS = ChainParams()


class Options(usage.Options):
    """Command line of ``sentinel-simnode``; the chain parameters default to 4.x mainnet."""

    synopsis = "[--scenario NAME] [--listen ENDPOINT] [chain options]"
    longdesc = "Run a simulated Aztec node. Scenarios: " + ", ".join(SCENARIOS) + "."
    optParameters = [
        ["scenario", None, "pruned", "Behaviour of the node: " + ", ".join(SCENARIOS) + "."],
        ["listen", None, "tcp:18545:interface=127.0.0.1", "Endpoint description to listen on."],
        ["slots-per-epoch", None, _DEFAULTS.slots_per_epoch, "Slots per epoch.", int],
        ["committee", None, _DEFAULTS.committee_size, "Validators per epoch committee.", int],
        ["slot-seconds", None, _DEFAULTS.slot_seconds, "Seconds per slot.", float],
        ["block-seconds", None, _DEFAULTS.block_seconds, "Seconds between blocks (tip +1).", float],
        ["history-epochs", None, None, "Epochs of validator-sentinel history (the scenario's otherwise).", int],
        ["delay-ms", None, None, "Latency added to every answer, in ms (a real node's; the scenario's otherwise).",
         int],
    ]

    def postOptions(self) -> None:
        """Reject an unknown scenario with one line (no usage dump), and bad chain numbers."""
        if self["scenario"] not in SCENARIOS:
            raise SystemExit(
                f"sentinel-simnode: unknown scenario {self['scenario']!r} (choose from: {', '.join(SCENARIOS)})"
            )
        try:
            self["chain"] = ChainParams(
                slots_per_epoch=self["slots-per-epoch"],
                committee_size=self["committee"],
                slot_seconds=self["slot-seconds"],
                block_seconds=self["block-seconds"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: IReactorTime | None = None) -> IService:
    """One simulated node served on ``--listen``; the reactor is also the node's clock."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    scenario = SCENARIOS[options["scenario"]]
    if options["delay-ms"] is not None:
        scenario = dataclasses.replace(scenario, delay_seconds=options["delay-ms"] / 1000.0)
    if options["history-epochs"] is not None:
        scenario = dataclasses.replace(scenario, history_epochs=options["history-epochs"])
    node = SimulatedNode(scenario, options["chain"], clock=reactor)
    log.info(
        "simulated Aztec node ({scenario}) listening on {listen}",
        scenario=options["scenario"],
        listen=options["listen"],
    )
    return StreamServerEndpointService(endpoints.serverFromString(reactor, options["listen"]), simulated_site(node))
