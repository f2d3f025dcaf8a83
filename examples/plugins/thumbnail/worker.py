"""Thumbnails with Pillow (a C-extension library): image bytes in, PNG bytes out."""
import io

from PIL import Image


def thumbnail(data: bytes, width: int = 128, height: int = 128) -> dict:
    with Image.open(io.BytesIO(data)) as img:
        img.thumbnail((width, height))
        out = io.BytesIO()
        img.save(out, format="PNG")
        return {"png": out.getvalue(), "size": list(img.size), "mode": img.mode}


def describe(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as img:
        return {"format": img.format, "size": list(img.size), "mode": img.mode}
