"""Request, response and event envelopes (PROTOCOL.md, "Requests and responses")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from contract.bodies import BODIES
from contract.errors import ErrorCode, ProtocolError
from contract.events import EVENTS
from contract.ops import MAX_HISTORY_LIMIT, MAX_SYNC_LIMIT
from contract.ops import OPS as OP_SPECS

MAX_REQUEST_ID_LEN = 64

# Names only, for importers that need no more; the registries themselves are
# contract.ops.OPS, contract.events.EVENTS and contract.bodies.BODIES.
OPS = tuple(OP_SPECS)
EVENT_KINDS = tuple(str(kind) for kind in EVENTS)
BODY_TYPES = tuple(BODIES)

__all__ = ["MAX_HISTORY_LIMIT", "MAX_REQUEST_ID_LEN", "MAX_SYNC_LIMIT", "OPS", "EVENT_KINDS", "BODY_TYPES",
           "Request", "parse_request", "ok_response", "error_response", "dumps"]


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    op: str
    params: dict[str, Any]


def parse_request(payload: bytes) -> Request:
    """Decode a request; raises ProtocolError(bad_request) with the id when known.

    The error's `request_id` attribute carries the id (or None) so the caller can
    answer even a malformed request exactly once.
    """
    # NaN, Infinity and numbers too large for a float are read by Python's json but
    # are not JSON: stored, they would be pushed as text strict parsers reject.
    non_finite: list[str] = []
    try:
        # Strict UTF-8 first: json.loads(bytes) would decode with 'surrogatepass'
        # (and guess UTF-16/32), letting encoded surrogates through.
        text = payload.decode("utf-8")
        try:
            doc = _DECODER.decode(text)   # every request: one decoder, built once
        except _NonFinite:
            # read again, noting the numbers, so the error can name the request's id
            doc = json.loads(text, parse_constant=lambda t: _non_finite(non_finite, t),
                             parse_float=lambda t: _finite_float(non_finite, t))
    except (UnicodeDecodeError, ValueError):
        raise _bad(None, "payload is not JSON") from None
    if not isinstance(doc, dict):
        raise _bad(None, "request must be a JSON object")
    rid = doc.get("id")
    if not isinstance(rid, str) or not (1 <= len(rid) <= MAX_REQUEST_ID_LEN):
        raise _bad(None, f"'id' must be a string of 1..{MAX_REQUEST_ID_LEN} characters")
    if not _is_unicode(rid):
        raise _bad(None, "'id' is not valid Unicode (lone UTF-16 surrogate escape)")
    if non_finite:
        raise _bad(rid, f"{non_finite[0][:32]} is not a finite JSON number")
    if _may_hold_surrogates(payload) and not _all_unicode(doc):
        raise _bad(rid, "a string is not valid Unicode (lone UTF-16 surrogate escape)")
    op = doc.get("op")
    if not isinstance(op, str):
        raise _bad(rid, "'op' must be a string")
    params = {k: v for k, v in doc.items() if k not in ("id", "op")}
    nul = _param_with_nul(params)
    if nul is not None:
        raise _bad(rid, f"'{nul[:32]}' contains a NUL character (U+0000)")
    return Request(id=rid, op=op, params=params)


def _param_with_nul(params: dict[str, Any]) -> str | None:
    """The first parameter whose string (or a string of its list) holds U+0000.

    Ids, names, notes and cmids are text keys in every store; PostgreSQL's text
    cannot hold NUL at all, so it is refused here, the same on every engine.
    JSON values carried whole (a message `body`, a command's `data`) are stored
    as encoded JSON, where NUL is the escape \\u0000, and are not looked into."""
    for key, value in params.items():
        if isinstance(value, str) and "\0" in value:
            return key
        if isinstance(value, list) and any(isinstance(v, str) and "\0" in v for v in value):
            return key
    return None


class _NonFinite(ValueError):
    """A number that is not a finite JSON number: the request is read again to say so."""


def _refuse_non_finite(text: str) -> float:
    raise _NonFinite(text)


def _strict_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):     # 1e999
        raise _NonFinite(text)
    return value


# Built once (json.loads with hooks builds a decoder and its scanner per call); stateless.
_DECODER = json.JSONDecoder(parse_constant=_refuse_non_finite, parse_float=_strict_float)


def _non_finite(found: list[str], text: str) -> float:
    found.append(text)
    return math.nan


def _finite_float(found: list[str], text: str) -> float:
    value = float(text)
    if not math.isfinite(value):     # 1e999
        found.append(text)
    return value


def _may_hold_surrogates(payload: bytes) -> bool:
    """After strict UTF-8 decoding a surrogate can only come from a `\\uD800`..
    `\\uDFFF` escape: payloads without `\\ud`/`\\uD` skip the walk."""
    # find(), not `in`: bytes.__contains__ tries its argument as an integer first,
    # raising and clearing a TypeError each time (about 1,800 instructions a test)
    return payload.find(b"\\ud") >= 0 or payload.find(b"\\uD") >= 0


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (json.loads lets `"\\ud800"`
    through): it cannot be written as UTF-8, so not stored, echoed or answered."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _all_unicode(doc: Any) -> bool:
    """Every key and string value in `doc` is valid Unicode (iterative: the nesting
    was already bounded by the parser, but no recursion is needed)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _bad(rid: str | None, message: str) -> ProtocolError:
    err = ProtocolError(ErrorCode.BAD_REQUEST, message)
    err.request_id = rid
    return err


def ok_response(rid: str, result: dict[str, Any]) -> bytes:
    return dumps({"id": rid, "ok": True, "result": result})


def error_response(rid: str | None, code: ErrorCode | str, message: str) -> bytes:
    return dumps({"id": rid, "ok": False, "error": {"code": str(code), "message": message}})


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
