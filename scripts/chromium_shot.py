"""A page photographed by headless Chromium (Debian's ``chromium``), cut below its content.

Shared by the screenshot scripts in this folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image


def shoot(
    html: Path,
    width: int,
    png: Path,
    profile: Path,
    *,
    background: tuple[int, int, int],
    height: int = 4200,
    margin: int = 16,
) -> Image.Image:
    """``html`` at ``width`` pixels, without the empty ``background`` below the content."""
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(png) as shot:
        image = shot.convert("RGB")
    bottom = image.height
    pixels = image.load()
    assert pixels is not None
    while bottom > 1 and all(pixels[x, bottom - 1] == background for x in range(0, image.width, 7)):
        bottom -= 1
    return image.crop((0, 0, image.width, min(bottom + margin, image.height)))
