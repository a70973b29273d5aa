"""Log lines callers cannot forge or kill: control characters and lone surrogates are escaped in
every access-log line (text and JSON) and in the JSON-lines observer, refused batch items appear
in the line, and the flush loop survives a write that fails."""
import io
import json

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.logger import LogLevel

from sentinel_proxy.ops.logs import AccessLog, JsonLinesObserver, escaped
from tests.stages_support import answer, result, rig, rpc, settled
from tests.support import JSON, http

ensure = pytest_twisted.ensureDeferred

#: What callers may put in a method name, an id or a forwarded address.
HOSTILE = ["node_x\n2026-01-01T00:00:00+0000 [sentinel_proxy.access#info] forged 200 ok",
           "node_x\r\nforged", "node_\x1b[31mred", "node_\ud800", "node_\udfff\x00", "node_\u2028sep"]


def write(log: AccessLog, methods: str = "node_getBlockNumber", request_id: str = "rid", client: str = "127.0.0.1",
          refused: str = "") -> None:
    log.write(1000.0, request_id, client, "/", (methods,), "n0:1", 200, "ok", 1.5, 1, (refused,) if refused else (),
              "miss", 1.25, 80, 120)


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_a_text_line_escapes_what_callers_send(hostile):
    stream = io.StringIO()
    log = AccessLog(stream, json_lines=False)
    write(log, methods=hostile, request_id=hostile, client=hostile, refused=hostile)
    log.flush()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n"), "one line, whatever the caller wrote"
    assert text[:-1].isprintable() and text.encode("utf-8")


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_a_json_line_escapes_what_callers_send_and_keeps_it(hostile):
    stream = io.StringIO()
    log = AccessLog(stream, json_lines=True)
    write(log, methods=hostile, request_id=hostile, refused=hostile)
    log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].isascii()
    record = json.loads(lines[0])
    kept = hostile if len(hostile) <= 64 else hostile[:64] + "..."  # names are bounded, ids are not cut
    assert (record["methods"], record["request_id"], record["refused"]) == ([kept], hostile, [kept])


def test_escaping_costs_nothing_for_printable_text_and_bounds_the_rest():
    name = "node_getBlock é"
    assert escaped(name) is name
    assert escaped("\n" * 10_000).startswith("\\n") and len(escaped("\n" * 10_000)) < 1100


def test_a_stream_that_cannot_encode_gets_escapes_not_an_error():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    log = AccessLog(stream, json_lines=False)
    write(log, methods="node_café")
    log.flush()
    assert raw.getvalue().endswith(b"node_caf\\xe9 -> n0:1 200 ok 1.5ms attempts=1 cache=miss upstream=1.2ms "
                                   b"in=80 out=120\n")


class Failing(io.StringIO):
    """A stream whose first writes fail as a full disk or a closed pipe would."""

    def __init__(self, failures: list[BaseException]):
        super().__init__()
        self.failures = failures

    def write(self, text: str) -> int:
        if self.failures:
            raise self.failures.pop(0)
        return super().write(text)


def test_the_flush_loop_survives_a_failing_write_and_says_what_was_lost(logged):
    stream = Failing([OSError(28, "No space left on device"), UnicodeEncodeError("ascii", "é", 0, 1, "no")])
    log = AccessLog(stream, json_lines=False)
    clock = task.Clock()
    loop = task.LoopingCall(log.flush)
    loop.clock = clock
    loop.start(AccessLog.FLUSH_INTERVAL)
    write(log, methods="first")
    write(log, methods="second")
    clock.advance(AccessLog.FLUSH_INTERVAL)
    assert loop.running, "the loop goes on"
    lost = [event for event in logged if event.get("log_level") == LogLevel.critical and "count" in event]
    assert [event["count"] for event in lost] == [2] and lost[0]["log_failure"].check(OSError)
    write(log, methods="third")
    clock.advance(AccessLog.FLUSH_INTERVAL)  # fails to encode, then writes the line with escapes
    write(log, methods="fourth")
    clock.advance(AccessLog.FLUSH_INTERVAL)
    assert loop.running
    assert [line.split(" POST / ")[1].split(" ")[0] for line in stream.getvalue().splitlines()] == ["third", "fourth"]
    loop.stop()


def test_refused_batch_items_appear_in_the_line_escaped_and_bounded():
    gateway = rig(default=answer([result(7, 0)]))
    batch = [rpc("node_getBlockNumber", id_=0), rpc("nodeAdmin_x\nforged", id_=1), rpc("eth_call", id_=2),
             {"jsonrpc": "2.0", "id": 3}, rpc("x" * 5000, id_=4)]
    assert settled(gateway.handle(batch)).status == 200
    (line,) = gateway.lines()
    assert line["methods"] == ["node_getBlockNumber"]
    assert line["refused"] == ["nodeAdmin_x\nforged", "eth_call", "?", "x" * 64 + "..."]
    assert line["refused_calls"] == 4 and "refused=nodeAdmin_x\nforged,eth_call,?,+1" in line["message"]
    everything_refused = [rpc("nodeAdmin_" + "y" * 5000, id_=i) for i in range(100)]
    assert settled(gateway.handle(everything_refused)).status == 200
    line = gateway.lines()[-1]
    assert len(line["refused"]) == 10 and all(len(name) == 67 for name in line["refused"])
    assert line["refused_calls"] == 100 and line["message"].endswith(",+97")


def test_the_json_observer_keeps_every_event_on_one_line():
    stream = io.StringIO()
    observer = JsonLinesObserver(stream)
    for hostile in HOSTILE:
        observer({"log_level": LogLevel.info, "log_namespace": "t", "log_time": 1000.0,
                  "log_format": "request {request_id} for {method}", "request_id": hostile, "method": hostile})
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(HOSTILE) and all(line.isascii() for line in lines)
    for hostile, line in zip(HOSTILE, lines):
        record = json.loads(line)
        assert record["method"] == hostile and record["message"] == f"request {hostile} for {hostile}"


def test_the_json_observer_writes_to_a_stream_that_cannot_encode():
    raw = io.BytesIO()
    observer = JsonLinesObserver(io.TextIOWrapper(raw, encoding="ascii"))
    observer({"log_level": LogLevel.info, "log_namespace": "t", "log_time": 1000.0, "log_format": "x",
              "method": "node_\ud800\n"})
    assert json.loads(raw.getvalue())["method"] == "node_\ud800\n"


@ensure
async def test_a_method_name_cannot_forge_a_line_of_the_daemon(cluster):
    node = cluster.node("pruned")
    service, url = await cluster.gateway([node])
    stream = io.StringIO()
    service.access_log._stream = stream
    body = b'[{"jsonrpc":"2.0","id":1,"method":"node_getBlockNumber"},' \
           b'{"jsonrpc":"2.0","id":2,"method":"nodeAdmin_x\\n2026 [sentinel_proxy.access#info] forged"},' \
           b'{"jsonrpc":"2.0","id":3,"method":"nodeDebug_\\u001b[2J"}]'
    answer_ = await http("POST", url, body, JSON)
    assert answer_.code == 200 and [item["id"] for item in answer_.json()] == [1, 2, 3]
    await http("POST", url, b'{"jsonrpc":"2.0","id":4,"method":"node_x\\r\\nforged"}', JSON)
    service.access_log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.isprintable() for line in lines)
    assert "refused=nodeAdmin_x\\n2026 [sentinel_proxy.access#info] forged,nodeDebug_\\x1b[2J" in lines[0]
    assert "node_x\\r\\nforged" in lines[1]


def test_a_line_that_cannot_be_formatted_loses_only_itself(logged):
    """Lines are formatted together at flush: one bad request's fields cost its own line, not the
    other requests' lines of the batch."""
    stream = io.StringIO()
    log = AccessLog(stream, json_lines=False)
    write(log, methods="first")
    log.write(1000.0, "bad", "127.0.0.1", "/", ("node_x",), "n0:1", 200, "ok", None, 1)  # type: ignore[arg-type]
    write(log, methods="third")
    log.flush()
    assert [line.split(" POST / ")[1].split(" ")[0] for line in stream.getvalue().splitlines()] == ["first", "third"]
    lost = [event for event in logged if event.get("log_level") == LogLevel.critical]
    assert [event["request_id"] for event in lost] == ["bad"] and lost[0]["log_failure"].check(TypeError)
