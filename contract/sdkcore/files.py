"""Uploading and downloading files through the request ops (PROTOCOL.md, "Files"),
for both SDKs: `call(op, params) -> result` is the SDK's request function.

Pure Python, standard library only (firmware-side code may import it).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

from contract.bodies import FILE_TYPES, IMAGE_TYPES

Call = Callable[[str, dict[str, Any]], dict[str, Any]]

# File name endings -> the accepted media type they mean (anything else is sent as octet-stream).
_BY_SUFFIX = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".pdf": "application/pdf", ".txt": "text/plain", ".zip": "application/zip", ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg", ".mp4": "video/mp4",
}


def media_type_for(name: str) -> str:
    """The media type a file named `name` is sent as."""
    dot = name.rfind(".")
    found = _BY_SUFFIX.get(name[dot:].lower()) if dot >= 0 else None
    return found if found in FILE_TYPES else "application/octet-stream"


def is_image(media_type: str) -> bool:
    return media_type in IMAGE_TYPES


def upload(call: Call, data: bytes, name: str, media_type: str | None = None) -> dict[str, Any]:
    """Upload `data`; returns the reference {id, name, size, media_type} for a
    `file` body. Raises the SDK's RequestError as the server answered."""
    started = call("file.upload", {"name": name, "media_type": media_type or media_type_for(name),
                                   "size": len(data)})
    upload_id, chunk = started["upload"], int(started["chunk_size"])
    offset = 0
    while offset < len(data):
        piece = data[offset:offset + chunk]
        answer = call("file.chunk", {"upload": upload_id, "offset": offset,
                                     "data": base64.b64encode(piece).decode("ascii")})
        offset = int(answer["received"])
    return call("file.finish", {"upload": upload_id})


def file_body(ref: dict[str, Any]) -> dict[str, Any]:
    """The `file` body for an uploaded file's reference."""
    return {"type": "file", "id": ref["id"], "name": ref["name"], "size": ref["size"],
            "media_type": ref["media_type"]}


class CorruptDownload(ValueError):
    """The bytes received do not hash to the file's id."""


def download(call: Call, file_id: str, max_bytes: int | None = None) -> tuple[dict[str, Any], bytes]:
    """The file's metadata {id, name, size, media_type} and its bytes (checked
    against its SHA-256 id). `max_bytes`: refuse a larger file before fetching it."""
    parts: list[bytes] = []
    offset = 0
    while True:
        answer = call("file.download", {"file": file_id, "offset": offset})
        if max_bytes is not None and int(answer["size"]) > max_bytes:
            raise CorruptDownload(f"{answer['name']} has {answer['size']} bytes, more than {max_bytes}")
        piece = base64.b64decode(answer["data"])
        parts.append(piece)
        offset += len(piece)
        if answer["eof"] or not piece:
            break
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != file_id:
        raise CorruptDownload(f"the bytes of {answer['name']} do not match its id")
    meta = {k: answer[k] for k in ("id", "name", "size", "media_type")}
    return meta, data
