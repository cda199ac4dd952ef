"""Writes the conditioning images in other formats and sizes that the tests send: PIL makes them
from a committed PNG (bundles/examples/cond_a.png, 64×64), so their bytes come from the reference
encoders, not from katz's own.

    .katz/py/bin/python tools/make_conditioning_examples.py   # tools/py-env.sh makes the venv

bundles/examples/photo-200x120.jpg   cond_a.png resized to 200×120 (Lanczos), JPEG quality 90
bundles/examples/photo-200x120.webp  the same pixels, lossless WebP
"""
from pathlib import Path

from PIL import Image

ex = Path(__file__).resolve().parent.parent / "bundles" / "examples"
img = Image.open(ex / "cond_a.png").convert("RGB").resize((200, 120), Image.LANCZOS)
img.save(ex / "photo-200x120.jpg", quality=90)
img.save(ex / "photo-200x120.webp", lossless=True)
print("wrote", ex / "photo-200x120.jpg", ex / "photo-200x120.webp")
