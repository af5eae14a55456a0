"""Message body types and their rules (PROTOCOL.md, "Message bodies").

The one registry of body types: `BODIES` names each type, its fields and the
pure function that checks a body of that type. `validate_body` is the whole
rule set a `send` applies, in the broker's order; clients may call it (or
`check_body`) to refuse a body before sending it.

Checks raise `ProtocolError` (`bad_request`, or `too_large` for the size) with
the message the broker answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from contract.errors import ErrorCode, ProtocolError

# Bounded nesting keeps every later encode/decode of a body (pushes, sync,
# history) far from Python's recursion limit.
MAX_BODY_DEPTH = 32

# Value types of body fields.
STRING = "string"          # a non-empty string where the rules say so
OBJECT = "object"
INTEGER = "integer"        # a whole number (never a bool)
CHOICE = "choice"          # one of `BodyField.choices`


@dataclass(frozen=True, slots=True)
class BodyField:
    name: str
    type: str                          # string | object | integer | choice
    required: bool = True
    choices: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class BodySpec:
    """One `type` of body: its fields and the pure check of a body of this type
    (called with an object whose `type` is `name`; raises ProtocolError)."""

    name: str
    fields: tuple[BodyField, ...]
    purpose: str
    check: Callable[[Mapping[str, Any]], None]
    # Reserved by the shared contract but not accepted yet (`file`).
    reserved: bool = False


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _optional_object(body: Mapping[str, Any], key: str) -> None:
    if key in body and not isinstance(body[key], dict):
        raise _bad(f"body.{key} must be an object")


def _named(body: Mapping[str, Any], what: str) -> None:
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{what} body needs 'name' (a string)")


def check_text(body: Mapping[str, Any]) -> None:
    if not isinstance(body.get("text"), str):
        raise _bad("a text body needs 'text' (a string)")


def check_command(body: Mapping[str, Any]) -> None:
    _named(body, "a command")
    _optional_object(body, "args")


def check_result(body: Mapping[str, Any]) -> None:
    ref = body.get("for")
    if isinstance(ref, bool) or not isinstance(ref, int) or ref < 1:
        raise _bad("a result body needs 'for' (the command's seq)")
    if body.get("status") not in RESULT_STATUSES:
        raise _bad("a result body needs 'status': ok or error")
    _optional_object(body, "data")


def check_event(body: Mapping[str, Any]) -> None:
    _named(body, "an event")
    _optional_object(body, "data")


# Media types a `file` body may carry (docs/PROTOCOL.md, "Files"). Nothing a browser
# would run as a page (text/html, image/svg+xml) is ever accepted.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
FILE_TYPES = (*IMAGE_TYPES, "application/pdf", "text/plain", "application/zip", "audio/mpeg", "audio/ogg",
              "video/mp4", "application/octet-stream")
MAX_FILE_NAME = 255
FILE_ID_LEN = 64           # the content's SHA-256, lower-case hex
_HEX = frozenset("0123456789abcdef")


def file_name_problem(name: object) -> str | None:
    """Why `name` cannot be a file's name (None: it can): 1..255 characters, no path
    (`/`, `\\`), no NUL or other control character, not `.` or `..`."""
    if not isinstance(name, str) or not name:
        return "a file name must be a non-empty string"
    if len(name) > MAX_FILE_NAME:
        return f"a file name is at most {MAX_FILE_NAME} characters"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "a file name must not contain a path"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "a file name must not contain control characters"
    return None


def is_file_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == FILE_ID_LEN and set(value) <= _HEX


def check_file(body: Mapping[str, Any]) -> None:
    if not is_file_id(body.get("id")):
        raise _bad("a file body needs 'id' (the content's SHA-256, 64 lower-case hex digits)")
    problem = file_name_problem(body.get("name"))
    if problem is not None:
        raise _bad(problem)
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _bad("a file body needs 'size' (bytes, >= 1)")
    if body.get("media_type") not in FILE_TYPES:
        raise _bad(f"a file body needs 'media_type', one of {', '.join(FILE_TYPES)}")


RESULT_STATUSES = ("ok", "error")

BODIES: Mapping[str, BodySpec] = MappingProxyType({spec.name: spec for spec in (
    BodySpec("text", (BodyField("text", STRING),), "a message between principals", check_text),
    BodySpec("command", (BodyField("name", STRING, description="non-empty"), BodyField("args", OBJECT, required=False)),
             "a person or integration to a device", check_command),
    BodySpec("result", (BodyField("for", INTEGER, description="the command's seq (>= 1)"),
                        BodyField("status", CHOICE, choices=RESULT_STATUSES),
                        BodyField("data", OBJECT, required=False)),
             "a device's answer to a command", check_result),
    BodySpec("event", (BodyField("name", STRING, description="non-empty"), BodyField("data", OBJECT, required=False)),
             "a device telling people something", check_event),
    BodySpec("file", (BodyField("id", STRING, description="the content's SHA-256 (64 hex digits)"),
                      BodyField("name", STRING, description="1..255 characters, no path"),
                      BodyField("size", INTEGER, description="bytes (>= 1)"),
                      BodyField("media_type", CHOICE, choices=FILE_TYPES)),
             "a picture or file stored by the broker, sent by reference (never the bytes)", check_file),
)})


def _accepted_types() -> str:
    return ", ".join(name for name, spec in BODIES.items() if not spec.reserved)


def _depth_within(value: Any, limit: int) -> bool:
    """True when containers nest at most `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def check_body_structure(body: object) -> dict[str, Any]:
    """The body if it is an object nesting at most MAX_BODY_DEPTH levels."""
    if not isinstance(body, dict):
        raise _bad("'body' must be an object")
    if not _depth_within(body, MAX_BODY_DEPTH):
        raise _bad(f"body nests deeper than {MAX_BODY_DEPTH} levels")
    return body


def check_body_type(body: Mapping[str, Any]) -> None:
    """The rules of the body's own `type` (BODIES); an unknown type is bad_request."""
    kind = body.get("type")
    spec = BODIES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise _bad(f"body.type must be one of {_accepted_types()}")
    spec.check(body)


def check_body(body: object) -> None:
    """Every body rule but the size (which is the operator's `limits.max_body`)."""
    check_body_type(check_body_structure(body))


def compact_json(doc: Any) -> str:
    """The canonical text of a body: compact JSON, UTF-8 characters as they are."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def validate_body(body: object, max_bytes: int, encode: Callable[[Any], str] = compact_json) -> str:
    """Check a `send` body against every rule and return its canonical JSON text.

    The order is the broker's: an object, nesting, size (`too_large` over
    `max_bytes` of compact UTF-8 JSON), then the type's rules. `encode` must
    give `compact_json`'s text; the broker passes its faster encoder.
    """
    checked = check_body_structure(body)
    text = encode(checked)
    if len(text.encode()) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"body is larger than {max_bytes} bytes")
    check_body_type(checked)
    return text
