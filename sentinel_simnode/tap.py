"""``twistd -n sentinel-simnode``: run one simulated Aztec node (see ``sentinel_simnode.node``).

A separate process per fake node lets the demo and the benchmark put real sockets and real process
boundaries between the gateway and its upstreams, e.g.::

    twistd -n sentinel-simnode --scenario lagging --listen tcp:18546:interface=127.0.0.1
    twistd -n sentinel-simnode --dialect 5 --reorder-batches shuffle   # an Aztec 5.x node
"""

from __future__ import annotations

import dataclasses

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from sentinel_simnode.node import DIALECTS, REORDERINGS, SCENARIOS, ChainParams, SimulatedNode, simulated_site

log = Logger()

_DEFAULTS = ChainParams()
_ORDERS = [o for o in REORDERINGS if o is not None]


def _dialect(value: str) -> str:
    """``--dialect``: 4 or 5; anything else stops twistd with one line (no usage dump)."""
    if value not in DIALECTS:
        raise SystemExit(f"sentinel-simnode: unknown dialect {value!r} (choose from: {', '.join(DIALECTS)})")
    return value


_dialect.coerceDoc = "One of: " + ", ".join(DIALECTS) + "."  # type: ignore[attr-defined]


def _reordering(value: str) -> str:
    """``--reorder-batches``: reverse or shuffle; anything else stops twistd with one line."""
    if value not in _ORDERS:
        raise SystemExit(f"sentinel-simnode: unknown batch order {value!r} (choose from: {', '.join(_ORDERS)})")
    return value


_reordering.coerceDoc = "One of: " + ", ".join(_ORDERS) + "."  # type: ignore[attr-defined]


class Options(usage.Options):
    """Command line of ``sentinel-simnode``; the chain parameters default to 4.x mainnet."""

    synopsis = "[--scenario NAME] [--dialect 4|5] [--listen ENDPOINT] [chain options]"
    longdesc = "Run a simulated Aztec node. Scenarios: " + ", ".join(SCENARIOS) + "."
    optParameters = [
        ["scenario", None, "pruned", "Behaviour of the node: " + ", ".join(SCENARIOS) + "."],
        ["listen", None, "tcp:18545:interface=127.0.0.1", "Endpoint description to listen on."],
        ["dialect", None, "4", "Aztec wire dialect: 4 (node_*) or 5 (aztec_*, node_* as aliases)", _dialect],
        ["reorder-batches", None, None, "Answer batches in another order than they were asked in",
         _reordering],
        ["slots-per-epoch", None, _DEFAULTS.slots_per_epoch, "Slots per epoch.", int],
        ["committee", None, _DEFAULTS.committee_size, "Validators per epoch committee.", int],
        ["slot-seconds", None, _DEFAULTS.slot_seconds, "Seconds per slot.", float],
        ["block-seconds", None, _DEFAULTS.block_seconds, "Seconds between blocks (tip +1).", float],
        ["history-epochs", None, None, "Epochs of validator-sentinel history (the scenario's otherwise).", int],
        ["delay-ms", None, None, "Latency added to every answer, in ms (a real node's; the scenario's otherwise).",
         int],
    ]

    def postOptions(self) -> None:
        """Reject an unknown scenario (or a legacy one in dialect 5) with one line, and bad chain numbers."""
        if self["scenario"] not in SCENARIOS:
            raise SystemExit(
                f"sentinel-simnode: unknown scenario {self['scenario']!r} (choose from: {', '.join(SCENARIOS)})"
            )
        if SCENARIOS[self["scenario"]].legacy and self["dialect"] != "4":
            raise SystemExit(f"sentinel-simnode: scenario {self['scenario']!r} has 2.x/3.x shapes: use --dialect 4")
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
    node = SimulatedNode(scenario, options["chain"], clock=reactor, dialect=options["dialect"],
                         reorder_batches=options["reorder-batches"])
    log.info(
        "simulated Aztec {dialect}.x node ({scenario}) listening on {listen}",
        dialect=options["dialect"],
        scenario=options["scenario"],
        listen=options["listen"],
    )
    return StreamServerEndpointService(endpoints.serverFromString(reactor, options["listen"]), simulated_site(node))
