"""The multipart body of ``/v1/images/edits``: the uploaded image, OpenAI's mask, the fields.

OpenAI's mask convention is the alpha channel: fully transparent pixels (alpha 0) are the ones
to repaint. musefast's own masks are white = repaint; this module converts one into the other,
so a mask made for OpenAI's API works unchanged. A mask without an alpha channel is refused:
read as white = repaint it would silently do the opposite of what an OpenAI client meant.
"""
from __future__ import annotations

import io

from musefast.serve.config import Limits
from musefast.serve.errors import APIError, invalid

FORM_FIELDS = 64


async def read_edit_form(request, limits: Limits):
    """-> (text fields, RGB image, L mask (255 = repaint) or None)."""
    from starlette.datastructures import UploadFile

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "images/edits takes multipart/form-data with an 'image' file (and an optional 'mask')",
                       code="invalid_content_type")
    try:
        form = await request.form(max_files=3, max_fields=FORM_FIELDS, max_part_size=limits.max_body_bytes)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed multipart: one line, no traceback
        raise APIError(400, f"cannot read the multipart body: {exc}", code="invalid_multipart") from None
    fields, files = {}, {}
    for key, value in form.multi_items():
        name = "image" if key == "image[]" else key
        if isinstance(value, UploadFile):
            if name in files:
                raise invalid(name, f"send one {name} file; this server edits one image per request")
            files[name] = value
        elif name in fields:
            raise invalid(name, f"field {name!r} is given twice")
        else:
            fields[name] = value
    for name in fields.keys() & {"image", "mask"}:
        raise invalid(name, f"{name} must be an uploaded file, not a text field (no field names a server path)")
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise invalid(unknown[0], f"unexpected file field {unknown[0]!r}; send 'image' and optionally 'mask'")
    if "image" not in files:
        raise invalid("image", "image is required: upload the image to edit", "missing_required_parameter")
    image = _open(await files["image"].read(), "image", limits)
    mask = None
    if "mask" in files:
        mask_image = _open(await files["mask"].read(), "mask", limits)
        if mask_image.size != image.size:
            raise invalid("mask", f"mask is {mask_image.width}x{mask_image.height} but image is "
                                  f"{image.width}x{image.height}: they must have the same size")
        mask = openai_mask(mask_image)
    return fields, image.convert("RGB"), mask


def openai_mask(mask):
    """OpenAI's mask (transparent = repaint) -> musefast's (L, 255 = repaint)."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise invalid("mask", "mask must be a PNG with an alpha channel: fully transparent pixels are repainted "
                              "(OpenAI's convention)")
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def _open(data: bytes, name: str, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise invalid(name, f"{name} is an empty file")
    try:
        image = Image.open(io.BytesIO(data))
        if max(image.size) > limits.max_side:  # before decoding the pixels
            raise invalid(name, f"{name} is {image.width}x{image.height}; this server accepts sides up to "
                                f"{limits.max_side} pixels")
        image.load()
    except APIError:
        raise
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise invalid(name, f"{name} is not a readable PNG, JPEG or WebP image ({exc})") from None
    return image
