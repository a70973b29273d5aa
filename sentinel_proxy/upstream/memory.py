"""How much memory node answers take: the count admission reads, and giving the memory back.

**The count** (:class:`AnswerMemory`, one per process, shared by the forwarding client and the
request path's admission). An answer's bytes are counted from the moment the client knows them
(the whole ``Content-Length`` as soon as the head says it, else each piece as it arrives) until
the client has handed the answer over and the hand-over has returned: the request path takes the
answer apart, builds the reply and gives it to the caller's connection in that one call chain,
so "handed over" is "written to the caller's connection". A failed or cancelled exchange gives
its bytes back at once. Not counted: a reply waiting in the caller's connection to be sent (a
caller slower than the node; that buffer is the web layer's) and cached answers (CACHE_SIZE_MB).

Admission refuses NEW requests while the count is over the cap (MAX_BUFFERED_ANSWERS_MB: a 503
with -32005 and ``Retry-After: 1``); it never cuts an answer already coming in. So the cap bounds
what is let in: the count stays below the cap plus what the requests admitted under it bring
back (each at most MAX_RESPONSE_BYTES); a burst that arrives all at once is admitted all at once.

**Giving memory back** (measured: 32 concurrent callers of an 8 MB answer, a gateway idle at
59 MB, RSS peak / RSS 5 s after the burst):

==========================================================  ==============  ==============
twisted's ``Agent`` (pieces joined), before                  601 MB          302 MB
this client, pieces joined                                    573 MB          243 MB
+ one buffer of the announced length (:func:`new_body`)       323 MB          300 MB
+ ``malloc_trim`` after the spike (:class:`AnswerMemory`)     323 MB          59 MB
chunked answers (no length known), with ``malloc_trim``       568 MB          59 MB
==========================================================  ==============  ==============

One buffer of the announced length halves the peak (the answer is never copied a second time,
and no pile of ~64 KiB pieces is built), but alone it gives nothing back: glibc raises its mmap
threshold to the size of each big block freed, so the next answers land in the heap, whose
freed pages it keeps. ``malloc_trim(0)`` hands them back. It runs on the reactor a second after
a spike of big answers has been handed over, when the replies have left the callers' connections
(:class:`AnswerMemory` says exactly when), and costs ~20 ms after a 300 MB spike, microseconds
when there is nothing to give back. (Fixing glibc's mmap threshold with ``mallopt`` instead gave
memory back after answers of known length only: 160 MB stayed after chunked ones.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from twisted.internet import defer

#: Answers longer than this (known from Content-Length) are received into one buffer of their
#: final size; smaller ones, nearly always a single read, are joined from their pieces.
PREALLOCATE_FROM = 64 * 1024


def _bytes_api() -> tuple[Any, Any] | None:
    """CPython's ``PyBytes_FromStringAndSize(NULL, n)`` and ``PyBytes_AsString``, or None elsewhere."""
    try:
        api = ctypes.pythonapi
        allocate = api.PyBytes_FromStringAndSize
        address = api.PyBytes_AsString
    except (AttributeError, OSError):  # not CPython
        return None
    allocate.restype, allocate.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    address.restype, address.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    return allocate, address


_API = _bytes_api()
_memmove = ctypes.memmove


def new_body(length: int) -> tuple[Any, int]:
    """A buffer for a body of ``length`` bytes, and where its data starts (an address, or 0).

    On CPython it is a ``bytes`` object made as C code makes one (allocated, not yet filled) and
    filled by :func:`fill` before anyone else sees it: the answer is handed over as that very
    object, so it is never copied. Elsewhere, a ``bytearray`` (copied once at the end).
    """
    if _API is None:
        return bytearray(length), 0
    body = _API[0](None, length)
    return body, _API[1](body)


def fill(body: Any, address: int, offset: int, data: bytes) -> None:
    """Write ``data`` into ``body`` at ``offset`` (the caller keeps ``offset + len(data)`` within it)."""
    if address:
        _memmove(address + offset, data, len(data))
    else:
        body[offset:offset + len(data)] = data


def finished(body: Any, size: int) -> bytes:
    """The body as ``bytes``: the buffer itself when it is full and already ``bytes``."""
    if type(body) is bytes and size == len(body):
        return body
    return bytes(memoryview(body)[:size])  # a bytearray, or cut short (never on a well-framed answer)


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, macOS, ...)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.restype, trim.argtypes = ctypes.c_int, (ctypes.c_size_t,)
    return trim


_TRIM = _malloc_trim()


class AnswerMemory:
    """Bytes of node answers held now, against a cap; read by admission through :meth:`over_cap`.

    And the trim: once answers of at least ``PREALLOCATE_FROM`` bytes each, ``trim_after`` bytes
    in all, have been given back since the last trim, ``malloc_trim(0)`` runs ``trim_delay``
    seconds after the last of them (each re-arms the timer, so the replies have left the callers'
    connections by then), or at the latest ``trim_wait`` seconds after the first (a steady stream
    of big answers is trimmed every few seconds). Only on ``clock``, and where glibc has it.
    Answers smaller than ``PREALLOCATE_FROM`` never touch the timer: the hot path pays nothing.
    """

    __slots__ = ("held", "cap", "freed", "_clock", "_trim_after", "_trim_delay", "_trim_wait", "_trim_call",
                 "_trim_armed")

    def __init__(self, cap: int, clock: Any = None, trim_after: int = 16 << 20, trim_delay: float = 1.0,
                 trim_wait: float = 5.0):
        self.held = 0
        self.cap = cap
        #: Bytes of big answers given back since the last trim.
        self.freed = 0
        self._clock = clock
        self._trim_after = trim_after
        self._trim_delay = trim_delay
        self._trim_wait = trim_wait
        self._trim_call: Any = None
        self._trim_armed = 0.0

    def over_cap(self) -> int:
        """Bytes held beyond the cap: more than 0 and admission refuses new requests."""
        return self.held - self.cap if self.held > self.cap else 0

    def take(self, count: int) -> None:
        self.held += count

    def give_back(self, count: int) -> None:
        self.held -= count
        if count < PREALLOCATE_FROM or _TRIM is None or self._clock is None:
            return
        self.freed += count
        if self.freed < self._trim_after:
            return
        now = self._clock.seconds()
        if self._trim_call is None:
            self._trim_armed = now
            self._trim_call = self._clock.callLater(self._trim_delay, self._trim)
        elif now + self._trim_delay - self._trim_armed <= self._trim_wait:
            self._trim_call.reset(self._trim_delay)

    def _trim(self) -> None:
        self._trim_call = None
        self.freed = 0
        _TRIM(0)

    def close(self) -> defer.Deferred[None]:
        """Cancel a trim still to come (at shutdown)."""
        if self._trim_call is not None and self._trim_call.active():
            self._trim_call.cancel()
        self._trim_call = None
        return defer.succeed(None)
