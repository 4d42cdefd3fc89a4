"""The site icon: an SVG for browsers that take one, and the same picture as /favicon.ico.

Three nodes joined to a hub (a gateway federating servers), white on the pages' dark blue. The
ICO holds one 32x32 PNG, drawn here so no binary file needs to live in the repository.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib

BACKGROUND = (0x1F, 0x29, 0x33)
FOREGROUND = (0xFF, 0xFF, 0xFF)
HUB = (16.0, 16.0)
NODES = ((16.0, 6.0), (7.0, 23.0), (25.0, 23.0))

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="6" fill="#1f2933"/>'
    '<g stroke="#fff" stroke-width="2">'
    + "".join(f'<line x1="{HUB[0]:g}" y1="{HUB[1]:g}" x2="{x:g}" y2="{y:g}"/>' for x, y in NODES)
    + "</g>"
    f'<circle cx="{HUB[0]:g}" cy="{HUB[1]:g}" r="3.5" fill="#fff"/>'
    + "".join(f'<circle cx="{x:g}" cy="{y:g}" r="3" fill="#fff"/>' for x, y in NODES)
    + "</svg>"
)


def _covered(x: float, y: float) -> bool:
    if math.dist((x, y), HUB) <= 3.5 or any(math.dist((x, y), node) <= 3 for node in NODES):
        return True
    for nx, ny in NODES:  # the spokes: within 1 of the segment hub-node
        dx, dy = nx - HUB[0], ny - HUB[1]
        t = max(0.0, min(1.0, ((x - HUB[0]) * dx + (y - HUB[1]) * dy) / (dx * dx + dy * dy)))
        if math.dist((x, y), (HUB[0] + t * dx, HUB[1] + t * dy)) <= 1.0:
            return True
    return False


def _png(size: int = 32) -> bytes:
    rows = []
    for py in range(size):
        row = bytearray([0])  # filter: none
        for px in range(size):
            color = FOREGROUND if _covered(px + 0.5, py + 0.5) else BACKGROUND
            row += bytes(color) + b"\xff"
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


@functools.cache
def ico() -> bytes:
    """An ICO file with one 32x32 PNG image (Windows Vista+ and every browser read these)."""
    png = _png(32)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 32, 32, 0, 0, 1, 32, len(png), 6 + 16) + png
