"""Images out of the server: encoding (PNG/JPEG/WebP), base64, and the bounded store behind
``response_format="url"``."""
from __future__ import annotations

import base64
import collections
import io
import secrets
import threading

from musefast.image_metadata import png_info

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def encode(image, output_format: str = "png", compression: int | None = None, params: dict | None = None) -> bytes:
    """``image`` (PIL) as ``output_format`` bytes. ``compression`` (0-100, OpenAI's
    output_compression) is 100 - quality for JPEG/WebP and the zlib level for PNG (0-9 from
    0-100); a PNG carries ``params`` in its text chunks, so ``musefast generate --from-png``
    regenerates it."""
    fmt, _ = FORMATS[output_format]
    buf = io.BytesIO()
    if fmt == "PNG":
        kw = {"pnginfo": png_info(params)} if params else {}
        if compression is not None:
            kw["compress_level"] = min(9, round(compression * 9 / 100))
        image.save(buf, format="PNG", **kw)
    else:
        image.save(buf, format=fmt, quality=100 - (compression if compression is not None else 15))
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class FileStore:
    """Encoded images kept in memory for ``response_format="url"``: the oldest are dropped
    beyond ``max_files`` or ``max_bytes``. Names are random (128 bits): knowing one is what
    grants the download, as with the signed URLs OpenAI returns."""

    def __init__(self, max_files: int = 256, max_bytes: int = 256 * 1024 * 1024):
        self.max_files, self.max_bytes = max_files, max_bytes
        self._files: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, output_format: str) -> str:
        name = f"{secrets.token_urlsafe(16)}.{output_format}"
        with self._lock:
            self._files[name] = (data, FORMATS[output_format][1])
            self._bytes += len(data)
            while self._files and (len(self._files) > self.max_files or self._bytes > self.max_bytes):
                _, (old, _) = self._files.popitem(last=False)
                self._bytes -= len(old)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._files.get(name)
