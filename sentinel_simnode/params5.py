"""Parameter parsing of the 5.x dialect, after the ``@aztec/stdlib`` zod schemas (upstream source; the
number schemas are ``@aztec/foundation`` 5.2.0's ``branded-types``).

A block parameter is tried as the real ``BlockParameterSchema`` union tries it, in order: an object
variant (``{number}``, ``{hash}``, ``{archive}``, ``{tag}``), a block hash, a tag, a block number, the
anchored ``{number, hash}``, then a lenient object that must still name exactly one block.  So a decimal
string such as ``"5"`` is a *hash* (the field element 5), never block 5, while ``{"number": "5"}`` is
block 5.  Schema failures are -32701; a string that passes the hex check but is no field element throws
inside the schema and comes back as -32702 with the ``Fr`` error message, as on a real node.
"""

from __future__ import annotations

import re
from typing import Any

from sentinel_simnode.rpc import RpcError, is_int, params_error

MAX_SAFE_INTEGER = 2**53 - 1
FR_MODULUS = 0x30644E72E131A029B85045B68181585D2833E84879B9709143E1F593F0000001
BLOCK_TAGS = ("proposed", "checkpointed", "proven", "finalized")  # BlockTagWithoutLatestSchema
CHECKPOINT_TAGS = ("checkpointed", "proven", "finalized")  # CheckpointTagSchema
_SELECTORS = ("number", "hash", "archive", "tag")
_IS_HEX = re.compile(r"(0x)?[0-9a-fA-F]*")  # @aztec/foundation isHex
_DECIMAL = re.compile(r"\d+")

#: A parsed block parameter: ("tag", name) | ("number", n) | ("hash", h) | ("archive", h) | ("anchored", n, h),
#: hashes as 0x + 64 lowercase hex ("latest" is the tag "proposed").
BlockRef = tuple


def field_string(value: str) -> str:
    """``Fr.fromString`` of a string that passed the hex check: 0x + 64 hex, or the node's -32702."""
    if _DECIMAL.fullmatch(value):
        number = int(value)
    elif value[:2].lower() == "0x":
        if not re.fullmatch(r"[0-9a-fA-F]+", value[2:]):
            raise RpcError(-32702, f'Invalid hex-encoded string: "{value}"')
        number = int(value[2:], 16)
    else:
        raise RpcError(-32702, f"Tried to create a Fr from an invalid string: {value}")
    # The real check is ``>= FR_MODULUS``; the simulator's sha256 hashes are not reduced modulo the field
    # (gobench's are not either), so only values that cannot be 32 bytes are refused.
    if number >> 256:
        raise RpcError(-32702, f"Value 0x{number:x} is greater or equal to field modulus.")
    return f"0x{number:064x}"


def _hash(value: Any) -> str | None:
    """``BlockHash.schema`` / ``schemas.Fr``: a hex-looking string -> normalised hash, else None."""
    if isinstance(value, str) and _IS_HEX.fullmatch(value):
        return field_string(value)
    return None


def _integer(value: Any, minimum: int) -> int | None:
    """A JSON number that is an integer (``5.0`` included), ``minimum..MAX_SAFE_INTEGER``; else None."""
    if is_int(value) or (isinstance(value, float) and value.is_integer()):
        number = int(value)
        return number if minimum <= number <= MAX_SAFE_INTEGER else None
    return None


def block_number(value: Any, minimum: int = 0) -> int | None:
    """``BlockNumberSchema`` (5.2.0): an integer or a decimal string, ``>= minimum``; else None."""
    if isinstance(value, str):
        return int(value) if _DECIMAL.fullmatch(value) and minimum <= int(value) <= MAX_SAFE_INTEGER else None
    return _integer(value, minimum)


def checkpoint_number(value: Any, minimum: int = 0) -> int | None:
    """``CheckpointNumberSchema``: number, or string coerced with ``Number()`` (so ``""`` is 0); else None."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return 0 if minimum <= 0 else None
        if "_" in text:  # Python's float() reads "1_0"; JavaScript's Number() does not
            return None
        try:
            value = float(text) if not re.fullmatch(r"0[xX][0-9a-fA-F]+", text) else int(text, 16)
        except ValueError:
            return None
    return _integer(value, minimum)


def parse_block_param(value: Any) -> BlockRef:
    """One block parameter, as the 5.x ``BlockParameterSchema`` reads it."""
    if type(value) is int and 0 <= value <= MAX_SAFE_INTEGER:  # the common case; a number is never a hash
        return ("number", value)
    if isinstance(value, dict):
        return _block_object(value)
    hash_ = _hash(value)
    if hash_ is not None:
        return ("hash", hash_)
    if value == "latest":
        return ("tag", "proposed")
    if value in BLOCK_TAGS:
        return ("tag", value)
    number = block_number(value)
    if number is not None:
        return ("number", number)
    raise params_error("expected a block number, hash, tag or {number|hash|archive|tag} object")


def _block_object(value: dict[str, Any]) -> BlockRef:
    present = [key for key in _SELECTORS if key in value]
    parsed: dict[str, Any] = {}
    for key in present:  # every selector present is validated, as the lenient variant does
        item = value[key]
        if key == "number":
            parsed[key] = block_number(item)
        elif key == "tag":
            parsed[key] = item if item in BLOCK_TAGS else None
        else:
            parsed[key] = _hash(item)
        if parsed[key] is None:
            raise params_error(f"invalid {key} in block parameter object")
    if present == ["number", "hash"]:
        return ("anchored", parsed["number"], parsed["hash"])
    if len(present) == 1:
        return (present[0], parsed[present[0]])
    raise params_error(
        "A block parameter object must name exactly one block, via a single one of number, hash, archive, tag "
        f"or via number and hash together, but got [{', '.join(present)}]")


def inspect_block_param(ref: BlockRef) -> str:
    """``inspectBlockParameter`` of a normalised parameter, as error messages print it."""
    if ref[0] == "anchored":
        return f"number={ref[1]},hash={ref[2]}"
    return f"{ref[0]}={ref[1]}"


def tag_param(value: Any, tags: tuple[str, ...]) -> str | None:
    """An optional tag parameter (``getBlockNumber``, ``getCheckpointNumber``): None when absent."""
    if value is None or value in tags:
        return value
    raise params_error(f"expected one of {', '.join(tags)}")


def options_param(value: Any, keys: tuple[str, ...]) -> dict[str, bool]:
    """An optional include-options object: known boolean flags (unknown keys are stripped, as zod does)."""
    if value is None:
        return dict.fromkeys(keys, False)
    if not isinstance(value, dict):
        raise params_error("options must be an object")
    out = {}
    for key in keys:
        flag = value.get(key)
        if flag is not None and not isinstance(flag, bool):
            raise params_error(f"{key} must be a boolean")
        out[key] = bool(flag)
    return out


def checkpoint_param(value: Any) -> tuple[str, int | str]:
    """``CheckpointParameterSchema``: ("number", c) | ("slot", s) | ("tag", name)."""
    if isinstance(value, dict):
        keys = list(value)
        if keys == ["number"] and checkpoint_number(value["number"]) is not None:
            return ("number", checkpoint_number(value["number"]))
        if keys == ["slot"] and checkpoint_number(value["slot"]) is not None:
            return ("slot", checkpoint_number(value["slot"]))
        raise params_error("expected {number} or {slot}")
    if value in CHECKPOINT_TAGS:
        return ("tag", value)
    number = checkpoint_number(value)
    if number is None:
        raise params_error("expected a checkpoint number, {number}, {slot} or a checkpoint tag")
    return ("number", number)


def limit_param(value: Any, maximum: int = 50) -> int:
    """``z.number().gt(0).lte(maximum)`` (a fraction passes the schema; the node counts whole items)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
        raise params_error(f"limit must be a number > 0 and <= {maximum}")
    return int(value)
