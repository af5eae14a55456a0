"""Pictures and files sent in messages (docs/PROTOCOL.md, "Files").

An upload goes through the gateway like every request, so the CLI, devices and
the web page have one way: `file.upload` (name, media type, size) opens it,
`file.chunk` appends base64 chunks at the offset the server expects (hashing
as it goes, SHA-256), `file.finish` checks the size and the content against
the media type, stores the uploader's record (quota checked in the same
transaction) and then the blob (content-addressed, deduplicated), and answers
the reference a `file` body carries: {id, name, size, media_type}. Refused input
stores nothing, and a blob once stored is never deleted (see _store_upload).

Uploads in progress are bounded: their bytes count against the uploader's
quota and against `files.max_uploading` for everyone, each principal has at
most MAX_UPLOADS_EACH at once, and one idle for `files.upload_ttl` is dropped.

A file is served (`file.download`, and the web app's GET route through
`authorize`) to its uploader and to the members of any conversation it was sent
in; to anyone else it does not exist (`not_found`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.services.base import Caller, Handler, Publisher, bad, cancel_and_wait, param_int, param_str
from broker.services.events import PrincipalRemoved
from broker.store.base import BlobStore, FileRecord, NotFoundError
from contract.bodies import FILE_TYPES, file_name_problem, is_file_id
from contract.errors import ErrorCode, ProtocolError
from contract.ops import FILE_CHUNK, MAX_CHUNK_TEXT, MAX_NUMBER, MAX_UPLOAD_ID

if TYPE_CHECKING:
    from broker.services.runtime import Services

log = logging.getLogger("roost.files")

MAX_UPLOADS_EACH = 4          # uploads one principal may have in progress at once

# What the first bytes of a file of these types are: content that does not match is refused.
MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
    "application/zip": (b"PK\x03\x04", b"PK\x05\x06"),
}


def content_matches(media_type: str, head: bytes) -> bool:
    """Whether the file's first bytes fit its declared media type (types without a
    fixed signature always do)."""
    if media_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    signatures = MAGIC.get(media_type)
    return signatures is None or any(head.startswith(s) for s in signatures)


def not_found(file_id: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_FOUND, f"no file {file_id!r}")


@dataclass
class Upload:
    id: str
    owner: str
    name: str
    media_type: str
    size: int
    touched: float
    received: int = 0
    head: bytes = b""                      # the first bytes, for the content check
    hasher: Any = field(default_factory=hashlib.sha256)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class FileStats:
    uploads_started: int = 0
    files_stored: int = 0          # finished uploads (deduplicated ones included)
    blobs_written: int = 0         # new contents on disk
    refused: int = 0               # uploads refused or abandoned (nothing stored)
    expired: int = 0               # of which: idle past files.upload_ttl
    chunks_served: int = 0


class FileService:
    def __init__(self, services: Services, blobs: BlobStore) -> None:
        self._services = services
        self._store = services.store.files
        self._blobs = blobs
        self._cfg = services.config.files
        self._clock = services.clock
        self._uploads: dict[str, Upload] = {}
        self._expirer: asyncio.Task[None] | None = None
        self.stats = FileStats()
        services.bus.subscribe(PrincipalRemoved, self._principal_removed)

    # ---- service lifecycle -------------------------------------------------------
    async def load(self) -> None:
        dropped = await self._blobs.clear_staging()
        if dropped:
            log.info("dropped %d uploads left unfinished by the previous run", dropped)

    async def start(self, publisher: Publisher) -> None:
        self._expirer = asyncio.create_task(self._expire_loop(), name="roost-files-expire")

    async def stop(self) -> None:
        await cancel_and_wait(self._expirer)
        self._expirer = None
        for upload in list(self._uploads.values()):
            await self._drop(upload)

    def ops(self) -> dict[str, Handler]:
        return {"file.upload": self.op_upload, "file.chunk": self.op_chunk, "file.finish": self.op_finish,
                "file.download": self.op_download}

    async def _principal_removed(self, event: PrincipalRemoved) -> None:
        """Its uploads in progress go (its records went with it in the store)."""
        for upload in [u for u in self._uploads.values() if u.owner == event.principal]:
            await self._drop(upload)

    # ---- uploads -------------------------------------------------------------------
    def uploading_bytes(self, owner: str | None = None) -> int:
        return sum(u.size for u in self._uploads.values() if owner is None or u.owner == owner)

    async def op_upload(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        name = param_str(params, "name", max_len=1024)
        problem = file_name_problem(name)
        if problem is not None:
            raise bad(problem)
        assert name is not None
        media_type = param_str(params, "media_type", max_len=1024)
        if media_type not in FILE_TYPES:
            raise bad(f"'media_type' must be one of {', '.join(FILE_TYPES)}")
        size = param_int(params, "size", minimum=1, maximum=MAX_NUMBER)
        if size > self._cfg.max_size:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"a file may have at most {self._cfg.max_size} bytes")
        owner = caller.principal
        if sum(1 for u in self._uploads.values() if u.owner == owner) >= MAX_UPLOADS_EACH:
            raise ProtocolError(ErrorCode.RATE_LIMITED, f"at most {MAX_UPLOADS_EACH} uploads in progress at once")
        await self._check_quota(owner, size + self.uploading_bytes(owner))
        if self.uploading_bytes() + size > self._cfg.max_uploading:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "too many uploads in progress; try again later")
        upload = Upload(secrets.token_hex(16), owner, name, media_type, size, self._clock())
        self._uploads[upload.id] = upload
        try:
            await self._blobs.begin(upload.id)
        except BaseException:
            self._uploads.pop(upload.id, None)
            raise
        self.stats.uploads_started += 1
        return {"upload": upload.id, "chunk_size": FILE_CHUNK}

    async def _check_quota(self, owner: str, more: int) -> None:
        used = await self._store.usage(owner)
        if used + more > self._cfg.quota:
            raise ProtocolError(ErrorCode.QUOTA_EXCEEDED,
                                f"your files would take more than your quota of {self._cfg.quota} bytes "
                                f"({used} used)")

    @staticmethod
    def _upload_id(params: dict[str, Any]) -> str:
        upload_id = param_str(params, "upload", max_len=MAX_UPLOAD_ID)
        if not upload_id:
            raise bad("'upload' must not be empty")
        return upload_id

    def _own_upload(self, caller: Caller, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.owner != caller.principal:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no upload {upload_id!r} in progress")
        return upload

    async def op_chunk(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        upload_id = self._upload_id(params)
        offset = param_int(params, "offset", maximum=MAX_NUMBER)
        text = param_str(params, "data", max_len=MAX_CHUNK_TEXT)
        try:
            data = base64.b64decode(text or "", validate=True)
        except (binascii.Error, ValueError):
            raise bad("'data' must be base64") from None
        if not data:
            raise bad("'data' must not be empty")
        if len(data) > FILE_CHUNK:
            raise bad(f"a chunk has at most {FILE_CHUNK} bytes")
        upload = self._own_upload(caller, upload_id)
        async with upload.lock:   # chunks of one upload one after the other, in order
            if upload.id not in self._uploads:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"no upload {upload.id!r} in progress")
            if offset != upload.received:
                raise bad(f"'offset' must be {upload.received} (the bytes received so far)")
            if upload.received + len(data) > upload.size:
                raise bad(f"more bytes than the {upload.size} announced")
            await self._blobs.append(upload.id, data)
            upload.hasher.update(data)
            if len(upload.head) < 16:
                upload.head = (upload.head + data)[:16]
            upload.received += len(data)
            upload.touched = self._clock()
            return {"upload": upload.id, "received": upload.received}

    async def op_finish(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        upload = self._own_upload(caller, self._upload_id(params))
        async with upload.lock:
            if upload.id not in self._uploads:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"no upload {upload.id!r} in progress")
            if upload.received != upload.size:
                raise bad(f"{upload.received} of {upload.size} bytes received")
            # From here the upload ends, stored or refused.
            del self._uploads[upload.id]
            try:
                return await self._store_upload(upload)
            except BaseException:
                self.stats.refused += 1
                await self._blobs.discard(upload.id)
                raise

    async def _store_upload(self, upload: Upload) -> dict[str, Any]:
        # The record first, then the bytes. A refused upload (over its quota, its uploader
        # removed) has committed nothing, so it never deletes a blob: deleting one after the
        # fact could take the bytes of another upload of the same content (on this node or
        # another) that is recording them now. A failure between the two steps leaves a
        # record of an upload never answered; its retry (the same content) commits the bytes.
        if not content_matches(upload.media_type, upload.head):
            raise bad(f"the content is not {upload.media_type}")
        digest = upload.hasher.hexdigest()
        rec = FileRecord(digest, upload.owner, upload.name, upload.size, upload.media_type, self._clock())
        try:
            accepted = await self._store.add_upload(rec, quota=self._cfg.quota)
        except NotFoundError:
            accepted = False   # the uploader was removed meanwhile
        if not accepted:
            raise ProtocolError(ErrorCode.QUOTA_EXCEEDED,
                                f"your files would take more than your quota of {self._cfg.quota} bytes")
        created = await self._blobs.commit(upload.id, digest)
        self.stats.files_stored += 1
        self.stats.blobs_written += int(created)
        stored = await self._store.get_upload(digest, upload.owner) or rec
        return {"id": digest, "name": upload.name, "size": stored.size, "media_type": stored.type}

    async def _drop(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)
        self.stats.refused += 1
        await self._blobs.discard(upload.id)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self._cfg.upload_ttl / 4)))
            await self.expire_idle()

    async def expire_idle(self) -> int:
        """Drop uploads idle for `files.upload_ttl`; how many."""
        cutoff = self._clock() - self._cfg.upload_ttl
        idle = [u for u in self._uploads.values() if u.touched <= cutoff and not u.lock.locked()]
        for upload in idle:
            self.stats.expired += 1
            await self._drop(upload)
            log.info("upload %s of %s abandoned (idle for %.0f s)", upload.name, upload.owner, self._cfg.upload_ttl)
        return len(idle)

    # ---- sending and serving ----------------------------------------------------------
    async def check_send(self, sender: str, conv: str, body: dict[str, Any]) -> None:
        """A `file` body about to be sent in `conv` (its rules already checked): it must
        name content its sender uploaded, or content already sent in `conv`. Records
        the conversation, so its members may download it."""
        file_id = str(body["id"])
        own = await self._store.get_upload(file_id, sender)
        rec = own or await self._store.find(file_id)
        if rec is None or (own is None and conv not in await self._store.convs_of(file_id)):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no file {file_id!r} you may send: upload it first")
        if body["size"] != rec.size:
            raise bad(f"file {file_id!r} has {rec.size} bytes, not {body['size']}")
        await self._store.add_conv(file_id, conv)

    async def authorize(self, principal: str, file_id: object) -> FileRecord:
        """The file's record if `principal` may have it (its uploader, or a member of a
        conversation it was sent in); not_found otherwise, as for no file at all."""
        if not is_file_id(file_id):
            raise bad("'file' must be a file id (64 lower-case hex digits)")
        assert isinstance(file_id, str)
        own = await self._store.get_upload(file_id, principal)
        if own is not None:
            return own
        messaging = self._services.store.messaging
        for conv in await self._store.convs_of(file_id):
            if await messaging.is_member(conv, principal):
                rec = await self._store.find(file_id)
                if rec is not None:
                    return rec
        raise not_found(file_id)

    async def read(self, rec: FileRecord, offset: int, length: int) -> bytes:
        """Bytes of an authorized file (unavailable if its blob is missing)."""
        try:
            data = await self._blobs.read(rec.id, offset, length)
        except NotFoundError:
            log.error("file %s is recorded but its bytes are missing", rec.id)
            raise ProtocolError(ErrorCode.UNAVAILABLE, f"file {rec.id!r} cannot be read now") from None
        self.stats.chunks_served += 1
        return data

    async def op_download(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        file_id = param_str(params, "file", max_len=64)
        offset = param_int(params, "offset", required=False, default=0, maximum=MAX_NUMBER)
        rec = await self.authorize(caller.principal, file_id)
        if offset > rec.size:
            raise bad(f"'offset' beyond the file's {rec.size} bytes")
        data = await self.read(rec, offset, FILE_CHUNK)
        return {"id": rec.id, "name": rec.name, "size": rec.size, "media_type": rec.type, "offset": offset,
                "data": base64.b64encode(data).decode("ascii"), "eof": offset + len(data) >= rec.size}
