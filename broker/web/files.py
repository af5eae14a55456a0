"""The web app's file route: `GET /files/<id>` (pictures shown inline in the page,
other files downloaded), for the signed-in person of the session cookie, by the
rule `file.download` applies (broker/services/files.py `authorize`: the uploader,
or a member of a conversation the file was sent in; anyone else 404, as for no
file at all).

Uploads are not here: the page uploads through the gateway's `file.*` ops over
its WebSocket, like every other client (docs/PROTOCOL.md, "Files").

What a file can do in the browser is bounded by its response: the media type
recorded at upload (only the accepted types exist), `nosniff`, images `inline` and everything else `attachment` (never rendered
as a page of this origin), and a Content-Security-Policy of its own that allows
nothing and sandboxes the document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from aiohttp import web

from broker.store.base import StoreUnavailable
from broker.web.app import SECURITY_HEADERS
from contract.bodies import IMAGE_TYPES
from contract.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from broker.services.files import FileService
    from broker.web.sessions import WebSession

READ_CHUNK = 256 * 1024           # bytes read from the blob store per write to the socket
# content-addressed: the bytes of an id never change; private: only this person may see them
CACHE = "private, max-age=86400"
FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"


class WebAppSeam(Protocol):
    """What this module needs of broker/web/app.py's WebApp."""

    files: FileService | None

    async def session_of(self, request: web.Request) -> WebSession | None: ...


def content_disposition(name: str, inline: bool) -> str:
    """`inline`/`attachment` with the name (RFC 6266/5987: an ASCII fallback and the UTF-8 name)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "file"
    return f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def routes(app: WebAppSeam) -> list[web.RouteDef]:
    async def get_file(request: web.Request) -> web.StreamResponse:
        session = await app.session_of(request)
        if session is None:
            return web.json_response({"error": "not signed in"}, status=401)
        files = app.files
        if files is None:
            return web.json_response({"error": "not found"}, status=404)
        try:
            rec = await files.authorize(session.principal, request.match_info["file_id"])
        except ProtocolError as err:
            status = 400 if err.code == ErrorCode.BAD_REQUEST else 404
            return web.json_response({"error": err.message}, status=status)
        etag = f'"{rec.id}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag, "Cache-Control": CACHE})
        image = rec.type in IMAGE_TYPES
        inline = image and request.query.get("download") is None
        content_type = "text/plain; charset=utf-8" if rec.type == "text/plain" else rec.type
        # A streamed response is sent before the app's middleware sees it: its security headers go on here.
        response = web.StreamResponse(headers={
            **SECURITY_HEADERS,
            "Content-Type": content_type,
            "Content-Length": str(rec.size),
            "Content-Disposition": content_disposition(rec.name, inline),
            "Content-Security-Policy": FILE_CSP,
            "Cache-Control": CACHE,
            "ETag": etag,
        })
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        offset = 0
        while offset < rec.size:
            try:
                data = await files.read(rec, offset, READ_CHUNK)
            except (ProtocolError, StoreUnavailable):
                break   # the short body tells the browser it failed (a missing blob is logged by the service)
            if not data:
                break
            await response.write(data)
            offset += len(data)
        await response.write_eof()
        return response

    return [web.get(r"/files/{file_id:[0-9a-f]{64}}", get_file)]
