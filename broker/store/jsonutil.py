"""Compact JSON text, as the store keeps it and the services put it on the wire.

Not engine-specific: the store serialises mailbox event documents and message
bodies with it, the services and the IM plugin their responses and pushes, so a
document reads the same wherever it was written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _compact_encoder() -> Callable[[Any], str]:
    """obj -> the text of json.dumps(obj, separators=(",", ":"), ensure_ascii=False).

    json.dumps builds a JSONEncoder and a C encoder on every call; CPython's C
    encoder is built once here (no circular-reference markers: what is encoded is
    built by Roost or parsed from JSON, never cyclic). Elsewhere: a reused JSONEncoder."""
    from json import encoder as _enc

    c_make = getattr(_enc, "c_make_encoder", None)
    if c_make is None:
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    c_enc = c_make(None, _enc.JSONEncoder().default, _enc.encode_basestring, None, ":", ",", False, False, True)
    join = "".join
    return lambda obj: join(c_enc(obj, 0))


# Built once (a stateless encoder: nothing here changes after import).
compact_json: Callable[[Any], str] = _compact_encoder()
