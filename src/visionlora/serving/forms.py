"""What a request brings: its multipart form (within the upload limit), its images and the task's options.

Every problem is an :class:`ApiError` with the status and message the client is answered.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from visionlora.core.outputs import per_image_values
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.errors import VisionLoraError
from visionlora.serving.models import ServedModel

DRAIN_FACTOR = 4  # a refused upload is read (and dropped) up to this many times the limit


class ApiError(Exception):
    """A bad request (or one the server cannot serve now): its status code, a message naming the
    problem and the answer's extra headers (e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The multipart form of ``request``, refusing bodies over ``max_bytes`` (413) and malformed ones."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "expected a multipart/form-data upload with a 'file' field")
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the upload is larger than the server's limit of {max_bytes / 1024 / 1024:g} MB")
    stream = request.stream()
    if length.isdigit() and int(length) > max_bytes:
        await _drain(stream, DRAIN_FACTOR * max_bytes)
        raise too_large

    async def limited():
        total = 0
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise too_large
            yield chunk

    try:
        return await MultiPartParser(request.headers, limited(), max_part_size=max_bytes).parse()
    except MultiPartException as err:
        raise ApiError(400, f"malformed multipart body: {err.message}") from None
    except ApiError:
        await _drain(stream, DRAIN_FACTOR * max_bytes)
        raise


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


async def read_images(form: FormData) -> tuple[list[str], list[Any]]:
    """The uploaded ``file`` fields, decoded; an unreadable one is a 400 naming it."""
    uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
    if not uploads:
        raise ApiError(400, "no 'file' field: upload one or more images as multipart field 'file'")
    names, images = [], []
    for index, upload in enumerate(uploads):
        name = upload.filename or f"file{index + 1}"
        try:
            images.append(load_rgb(await upload.read()))
        except UnreadableImage as err:
            raise ApiError(400, f"file {name!r}: {err}") from None
        names.append(name)
    return names, images


def parse_options(served: ServedModel, form: FormData,
                  names: list[str]) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """(the task's predict options, the per-image ones among them, its box options' values) from the
    form fields; unknown fields and bad values are a 400."""
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
