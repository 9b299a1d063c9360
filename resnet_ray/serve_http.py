"""The service's HTTP requests without Ray: the body of ``POST /predict`` -> one decoded image (raw body with an
``image/*`` content type, or the file part of a ``multipart/form-data`` body), each refusal a
:class:`RequestError` with its 4xx status, and the optional API key (compared by its SHA-256, in constant time).
Used by :mod:`resnet_ray.serve`; unit-tested directly."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Mapping
from email.message import Message
from typing import TYPE_CHECKING, Optional

import numpy as np

from resnet_ray.config_checks import ConfigError
from resnet_ray.images import PIL_FORMATS, BadImage, ResizeSpec, decode
from resnet_ray.serve_config import ServeConfig

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

ACCEPTED_PART_TYPES = ("application/octet-stream", "")  # a multipart file part may also say just "bytes"


class RequestError(Exception):
    """A request that gets a 4xx answer: ``status``, a short ``code`` and the ``detail`` that says why."""

    def __init__(self, status: int, code: str, detail: str, headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def response(self) -> JSONResponse:
        from starlette.responses import JSONResponse  # the serve extra

        return JSONResponse(
            {"error": self.code, "detail": self.detail, "status": self.status}, self.status, headers=self.headers
        )


def parse_content_type(value: Optional[str]) -> tuple[str, dict]:
    """``'multipart/form-data; boundary="x"'`` -> ``("multipart/form-data", {"boundary": "x"})``; "" when absent."""
    if not value:
        return "", {}
    mime, *rest = value.split(";")
    params = {}
    for item in rest:
        key, eq, val = item.strip().partition("=")
        if eq:
            params[key.strip().lower()] = val.strip().strip('"')
    return mime.strip().lower(), params


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes: 413 from its Content-Length, or as soon as the bytes read pass
    the limit (the rest is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad_request", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> RequestError:
    more = "more than " if at_least else ""
    return RequestError(
        413, "body_too_large", f"request body of {more}{size} bytes is over serve.max_image_bytes={limit}"
    )


def _part_headers(head: bytes) -> Message:
    headers = Message()
    for line in head.split(b"\r\n"):
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def multipart_parts(body: bytes, boundary: Optional[str]) -> list[tuple[Message, bytes]]:
    """(headers, content) of each part of a multipart body (RFC 7578), split in memory."""
    if not boundary:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    pieces = (b"\r\n" + body).split(delimiter)  # pieces[0]: the preamble
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):  # the close delimiter
            return parts
        piece = piece.lstrip(b" \t")  # transport padding
        if not piece.startswith(b"\r\n"):
            raise RequestError(400, "bad_multipart", "a multipart delimiter is not followed by a line break")
        rest = piece[2:]
        head, sep, content = (b"", b"", rest[2:]) if rest.startswith(b"\r\n") else rest.partition(b"\r\n\r\n")
        if head and not sep:
            raise RequestError(400, "bad_multipart", "a multipart part's headers do not end")
        parts.append((_part_headers(head), content))
    raise RequestError(400, "bad_multipart", f"multipart body without its closing --{boundary}-- line")


def multipart_image(body: bytes, boundary: Optional[str]) -> bytes:
    """The image of a multipart body: the part named ``file`` (or ``image``), else its only file part."""
    files = []
    for headers, content in multipart_parts(body, boundary):
        name = headers.get_param("name", header="content-disposition")
        if headers.get_filename() is not None or name in ("file", "image"):
            files.append((name, headers.get_content_type() if "content-type" in headers else "", content))
    named = [f for f in files if f[0] in ("file", "image")]
    chosen = named or files
    if not chosen:
        raise RequestError(400, "bad_multipart", "multipart body without a file part (send the image as field 'file')")
    if len(chosen) > 1:
        raise RequestError(400, "bad_multipart", f"{len(chosen)} file parts: send one image per request")
    _, mime, content = chosen[0]
    if not (mime.startswith("image/") or mime in ACCEPTED_PART_TYPES):
        raise RequestError(415, "unsupported_media_type", f"the file part's Content-Type is {mime}, not image/*")
    return content


def image_bytes(content_type: Optional[str], body: bytes) -> bytes:
    """The encoded image of a /predict request: the body (``image/*``) or its file part (``multipart/form-data``)."""
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty: send one image")
    mime, params = parse_content_type(content_type)
    if mime.startswith("image/"):
        blob = body
    elif mime == "multipart/form-data":
        blob = multipart_image(body, params.get("boundary"))
    else:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {mime or '(none)'}: send the image as the body with an image/* type (image/png, "
            "image/jpeg, ...) or as the file part 'file' of multipart/form-data",
        )
    if not blob:
        raise RequestError(400, "empty_body", "the image part is empty: send one image")
    return blob


def decode_request_image(blob: bytes, spec: ResizeSpec, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> (S, S, 3) uint8 exactly as jobs/predict.py decodes them, after a look at the header: more
    than ``max_pixels`` pixels is refused before a single pixel is decoded (a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob), formats=PIL_FORMATS) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError as exc:
        raise RequestError(
            413,
            "image_too_large",
            f"decompression bomb refused before decoding: over serve.max_image_pixels={max_pixels} and Pillow's own "
            f"limit ({exc})",
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            422, "not_an_image", f"the body is not an image of a known format ({', '.join(PIL_FORMATS[:6])}, ...)"
        ) from None
    except Exception as exc:  # a header that is cut short or broken
        raise RequestError(422, "corrupt_image", f"cannot read the image header ({type(exc).__name__})") from None
    if width * height > max_pixels:
        raise RequestError(
            413,
            "image_too_large",
            f"image of {width}x{height} = {width * height} pixels is over serve.max_image_pixels={max_pixels} "
            "(refused before decoding)",
        )
    try:
        return decode(blob, spec)
    except BadImage as exc:
        raise RequestError(422, "corrupt_image", f"truncated or corrupt image: {exc}") from None


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_sha256(cfg: ServeConfig, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The SHA-256 of the API key named by ``serve.api_key_env`` (None: no key); ConfigError when it is unset."""
    if cfg.api_key_env is None:
        return None
    key = environ.get(cfg.api_key_env, "")
    if not key.strip():
        raise ConfigError(f"serve.api_key_env: the environment variable {cfg.api_key_env} is not set or empty")
    return key_sha256(key)


def request_key(headers: Mapping[str, str]) -> Optional[str]:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def authorized(headers: Mapping[str, str], expected_sha256: Optional[str]) -> bool:
    if expected_sha256 is None:
        return True
    key = request_key(headers)
    return key is not None and hmac.compare_digest(key_sha256(key), expected_sha256)
