"""What a request brings (within the upload limit): its images and the task's options.

Three shapes of body are read alike:

- a multipart form: ``file`` fields (one or more images) and the options as fields;
- a raw image (``Content-Type: image/*`` or ``application/octet-stream``), options in the query string;
- JSON ``{"inputs": BASE64 | [BASE64, ...], "parameters": {...}}``, as Hugging Face's clients send it
  (a body without a content type, or with curl's default form type, is JSON when it starts with ``{``,
  else a raw image).

Reading a request keeps its images' bytes: :func:`decoded_images` decodes them, in a worker thread
(decoding is most of a small model's request), refusing each past ``max_pixels`` from its header,
before decoding. Every problem is an :class:`ApiError` with the status and message the client is
answered.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Mapping

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from visionlora.core.outputs import per_image_values
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.errors import VisionLoraError
from visionlora.serving.models import ServedModel

DRAIN_FACTOR = 4  # a refused upload is read (and dropped) up to this many times the limit
RAW_TYPES = ("image/", "application/octet-stream")
UNSAID = "application/x-www-form-urlencoded"  # the type of a body whose sender named none (curl -d, urllib)
BODY_SHAPES = ("expected a multipart/form-data upload with a 'file' field, a raw image body (Content-Type: "
               "image/*) or JSON {\"inputs\": BASE64, \"parameters\": {...}}")


class ApiError(Exception):
    """A bad request (or one the server cannot serve now): its status code, a message naming the
    problem and the answer's extra headers (e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Upload:
    """A request's images (their bytes, not decoded yet), their names, and its option fields as text."""

    names: list[str]
    data: list[bytes]
    fields: dict[str, str] = field(default_factory=dict)


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image bytes and option fields of ``request``, in any of the three shapes the module takes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == UNSAID:  # curl --data-binary @photo.png says this unless told otherwise
        content_type = ""
    if content_type == "multipart/form-data":
        form = await read_form(request, max_bytes)
        names, data = await read_files(form)
        return Upload(names, data, {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)})
    if content_type and content_type != "application/json" and not content_type.startswith(RAW_TYPES):
        raise ApiError(415, f"content type {content_type!r} is not taken: {BODY_SHAPES}")
    body = await read_body(request, max_bytes)
    if not body:
        raise ApiError(400, f"empty body: {BODY_SHAPES}")
    if content_type == "application/json" or (not content_type and body.lstrip()[:1] == b"{"):
        return _json_upload(body)
    return Upload(["image"], [body], dict(request.query_params))


def decoded_images(upload: Upload, max_pixels: int | None) -> list[Any]:
    """The upload's images decoded as RGB; an unreadable or oversized one is a 400 naming it."""
    return [_decoded(data, name, max_pixels) for name, data in zip(upload.names, upload.data)]


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body of ``request``, refusing one over ``max_bytes`` (413)."""
    return b"".join([chunk async for chunk in _limited(request, request.stream(), max_bytes)])


def _json_upload(body: bytes) -> Upload:
    """A JSON body ``{"inputs": BASE64 | [BASE64, ...], "parameters": {...}}`` (data URLs taken too)."""
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise ApiError(400, f"the JSON body does not parse: {err}") from None
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    listed = inputs if isinstance(inputs, list) else [inputs]
    if not listed or not all(isinstance(item, str) and item for item in listed):
        raise ApiError(400, f"the JSON body has no image: {BODY_SHAPES}")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ApiError(400, "'parameters' must be a JSON object of the task's options")
    names = [f"inputs[{index}]" if isinstance(inputs, list) else "inputs" for index in range(len(listed))]
    data = [_base64(text, name) for text, name in zip(listed, names)]
    fields = {key: value if isinstance(value, str) else json.dumps(value)
              for key, value in parameters.items() if value is not None}
    return Upload(names, data, fields)


def _base64(text: str, name: str) -> bytes:
    """The bytes of base64 ``text`` (a ``data:...;base64,`` prefix dropped)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name}: not base64 image bytes") from None


def _decoded(data: bytes, name: str, max_pixels: int | None) -> Any:
    """``data`` decoded as an RGB image; an unreadable or oversized one is a 400 naming it."""
    try:
        return load_rgb(data, max_pixels)
    except UnreadableImage as err:
        raise ApiError(400, f"file {name!r}: {err}") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the upload is larger than the server's limit of {max_bytes / 1024 / 1024:g} MB")


async def _limited(request: Request, stream: AsyncIterator[bytes], max_bytes: int) -> AsyncGenerator[bytes, None]:
    """The chunks of ``stream`` while they stay within ``max_bytes`` (413 past it, by Content-Length or
    by count), the rest of a refused body drained."""
    length = request.headers.get("content-length", "")
    total = 0
    try:
        if length.isdigit() and int(length) > max_bytes:
            raise _too_large(max_bytes)
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            yield chunk
    except ApiError:
        await _drain(stream, DRAIN_FACTOR * max_bytes)
        raise


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The multipart form of ``request``, refusing bodies over ``max_bytes`` (413) and malformed ones."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, BODY_SHAPES)
    try:
        return await MultiPartParser(request.headers, _limited(request, request.stream(), max_bytes),
                                     max_part_size=max_bytes).parse()
    except MultiPartException as err:
        raise ApiError(400, f"malformed multipart body: {err.message}") from None


async def _drain(stream, limit: int) -> None:
    """Read and drop up to ``limit`` more bytes of a refused body, so the client (still sending)
    receives the answer instead of a reset connection; past that the connection is closed."""
    dropped = 0
    try:
        async for chunk in stream:
            dropped += len(chunk)
            if dropped > limit:
                break
    except Exception:  # the client went away: nothing to answer
        pass


async def read_files(form: FormData) -> tuple[list[str], list[bytes]]:
    """The names and bytes of the uploaded ``file`` fields."""
    uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
    if not uploads:
        raise ApiError(400, "no 'file' field: upload one or more images as multipart field 'file'")
    names, data = [], []
    for index, upload in enumerate(uploads):
        names.append(upload.filename or f"file{index + 1}")
        data.append(await upload.read())
    return names, data


def parse_options(served: ServedModel, form: Mapping[str, Any],
                  names: list[str]) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """(the task's predict options, the per-image ones among them, its box options' values) from the
    request's fields; unknown fields and bad values are a 400."""
    task = served.task
    known = {option.name: option for option in (*task.predict_options, *task.box_options)}
    unknown = sorted(key for key in form.keys() if key != "file" and key not in known)
    if unknown:
        takes = ", ".join(known) or "none"
        raise ApiError(400, f"{task.name} models take no option {unknown[0]!r} (options: {takes})")
    options: dict[str, Any] = {}
    per_image = []
    for name, option in known.items():
        text = form.get(name)
        if text is None or isinstance(text, UploadFile):
            continue
        try:
            value = option.parse_field(text)
        except VisionLoraError as err:
            raise ApiError(400, f"option {name!r}: {err}") from None
        if option.per_image:
            value = per_image_values(value, names) if isinstance(value, dict) else [value] * len(names)
            per_image.append(name)
        options[name] = value
    for name in [o.name for o in task.predict_options if o.per_image and o.name not in options]:
        options[name] = [None] * len(names)
        per_image.append(name)
    box_values = {option.name: options.pop(option.name, None) for option in task.box_options}
    return options, tuple(per_image), box_values
