"""Pillow's reference for OpenFlamingo's preprocessing of an image with partial transparency (the fixtures' RGBA
image is opaque): a seeded 37x23 RGBA PNG whose alpha spans 0-255, and what open_clip's eval transform makes of it
before ToTensor (Resize(32, BICUBIC) of the short side as torchvision calls Pillow: `img.resize((w, h), BICUBIC)`;
CenterCrop(32) at int(round((L - 32) / 2)); convert('RGB')), as an RGB PNG. Written by Pillow, never by the engine:
    python3 scripts/make-rgba-resize-reference.py tests/fixtures/rgba-resize
"""
import random
import sys
from pathlib import Path

from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(21)
w, h, size = 37, 23, 32
src = Image.new("RGBA", (w, h))
src.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.choice([0, 1, 64, 128, 200, 255, rng.randrange(256)]))
             for _ in range(w * h)])
src.save(out / "input_37x23_rgba.png")
new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
resized = src.resize((new_w, new_h), Image.BICUBIC)
left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
resized.crop((left, top, left + size, top + size)).convert("RGB").save(out / "expected_32x32_rgb.png")
print(f"pillow {Image.__version__}: {w}x{h} -> {new_w}x{new_h}, crop at ({left}, {top})")
