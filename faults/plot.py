"""A small line chart written straight to PNG (numpy + zlib, no plotting library).

loom draws one kind of picture - per-rank wait per step with fault markers -
so a few primitives (lines, rectangles, a 3x5 pixel font) and a PNG encoder
are enough; matplotlib would be a large dependency for one figure.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 glyphs: five rows of three pixels, '#' = ink
_FONT = {
    "0": "###/#.#/#.#/#.#/###", "1": ".#./##./.#./.#./###", "2": "###/..#/###/#../###",
    "3": "###/..#/.##/..#/###", "4": "#.#/#.#/###/..#/..#", "5": "###/#../###/..#/###",
    "6": "###/#../###/#.#/###", "7": "###/..#/..#/.#./.#.", "8": "###/#.#/###/#.#/###",
    "9": "###/#.#/###/..#/###", "A": ".#./#.#/###/#.#/#.#", "B": "##./#.#/##./#.#/##.",
    "C": ".##/#../#../#../.##", "D": "##./#.#/#.#/#.#/##.", "E": "###/#../##./#../###",
    "F": "###/#../##./#../#..", "G": ".##/#../#.#/#.#/.##", "H": "#.#/#.#/###/#.#/#.#",
    "I": "###/.#./.#./.#./###", "J": "..#/..#/..#/#.#/.#.", "K": "#.#/#.#/##./#.#/#.#",
    "L": "#../#../#../#../###", "M": "#.#/###/###/#.#/#.#", "N": "##./#.#/#.#/#.#/#.#",
    "O": ".#./#.#/#.#/#.#/.#.", "P": "##./#.#/##./#../#..", "Q": ".#./#.#/#.#/##./.##",
    "R": "##./#.#/##./#.#/#.#", "S": ".##/#../.#./..#/##.", "T": "###/.#./.#./.#./.#.",
    "U": "#.#/#.#/#.#/#.#/###", "V": "#.#/#.#/#.#/#.#/.#.", "W": "#.#/#.#/###/###/#.#",
    "X": "#.#/#.#/.#./#.#/#.#", "Y": "#.#/#.#/.#./.#./.#.", "Z": "###/..#/.#./#../###",
    " ": ".../.../.../.../...", ".": ".../.../.../.../.#.", "-": ".../.../###/.../...",
    ":": ".../.#./.../.#./...", "/": "..#/..#/.#./#../#..", "(": ".#./#../#../#../.#.",
    ")": ".#./..#/..#/..#/.#.", ">": "#../.#./..#/.#./#..", "_": ".../.../.../.../###",
    "%": "#.#/..#/.#./#../#.#", "=": ".../###/.../###/...", "#": "#.#/###/#.#/###/#.#",
    ",": ".../.../.../.#./#..",
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
          (127, 127, 127), (188, 189, 34), (23, 190, 207), (214, 39, 40)]
FAULT_COLORS = {"straggler": (255, 140, 0), "slow_link": (0, 160, 160), "mismatch": (160, 0, 160),
                "hang": (220, 0, 0), "lost_rank": (120, 0, 0)}


class Canvas:
    def __init__(self, width: int, height: int):
        self.px = np.full((height, width, 3), 255, dtype=np.uint8)

    @property
    def size(self) -> tuple[int, int]:
        return self.px.shape[1], self.px.shape[0]

    def rect(self, x0, y0, x1, y1, color) -> None:
        w, h = self.size
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        self.px[max(y0, 0):min(y1 + 1, h), max(x0, 0):min(x1 + 1, w)] = color

    def line(self, x0, y0, x1, y1, color, width: int = 1, dash: int = 0) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
        if dash:
            keep = (np.arange(n) // dash) % 2 == 0
            xs, ys = xs[keep], ys[keep]
        w, h = self.size
        half = width // 2
        for dx in range(-half, width - half):
            for dy in range(-half, width - half):
                x = np.clip(np.round(xs).astype(int) + dx, 0, w - 1)
                y = np.clip(np.round(ys).astype(int) + dy, 0, h - 1)
                self.px[y, x] = color

    def text(self, x, y, s: str, color=(0, 0, 0), scale: int = 2) -> int:
        """Draw upper-cased ``s`` with its top-left at (x, y); returns its width."""
        x0 = x
        for ch in s.upper():
            for r, row in enumerate(_FONT.get(ch, _FONT[" "]).split("/")):
                for col in (i for i, px in enumerate(row) if px == "#"):
                    self.rect(x + col * scale, y + r * scale, x + col * scale + scale - 1,
                              y + r * scale + scale - 1, color)
            x += 4 * scale
        return x - x0

    def save(self, path: str) -> None:
        write_png(path, self.px)


def text_width(s: str, scale: int = 2) -> int:
    return 4 * scale * len(s)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                 chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _nice(x: float) -> float:
    """The smallest 1/2/5 x 10^k at or above x."""
    if x <= 0:
        return 1.0
    k = 10 ** np.floor(np.log10(x))
    return float(next(m * k for m in (1, 2, 5, 10) if m * k >= x))


def wait_chart(path: str, steps: list[int], waits: dict[int, list[float]], faults=(),
               title: str = "wait per step by rank (ms)", width: int = 900, height: int = 420) -> None:
    """Lines of each rank's wait (seconds, one value per step, NaN = unknown)
    against the step, with a dashed marker per fault (``faults``: (step, label, kind))."""
    c = Canvas(width, height)
    left, right, top, bottom = 70, width - 150, 40, height - 40
    c.text(left, 12, title)
    ys = sorted(v for vs in waits.values() for v in vs if v == v)
    # the 98th percentile sets the scale (a slow first step would flatten the
    # rest); higher values are drawn at the top edge
    ymax = _nice(ys[min(len(ys) - 1, int(0.98 * len(ys)))] * 1e3 * 1.1 if ys and ys[-1] > 0 else 1.0)
    s0, s1 = (min(steps), max(steps)) if steps else (0, 1)
    s1 = s1 if s1 > s0 else s0 + 1

    def px(step, ms):
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - min(ms, ymax) / ymax * (bottom - top))

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and y labels
        y = bottom - frac * (bottom - top)
        c.line(left, y, right, y, (225, 225, 225))
        label = f"{frac * ymax:g}"
        c.text(left - 8 - text_width(label), y - 5, label)
    c.line(left, top, left, bottom, (0, 0, 0))
    c.line(left, bottom, right, bottom, (0, 0, 0))
    for step in (s0, (s0 + s1) // 2, s1):
        x, _ = px(step, 0)
        c.line(x, bottom, x, bottom + 4, (0, 0, 0))
        c.text(x - text_width(str(step)) / 2, bottom + 8, str(step))
    c.text((left + right) / 2 - text_width("step") / 2, bottom + 24, "step")
    for i, (rank, values) in enumerate(sorted(waits.items())):
        color = COLORS[i % len(COLORS)]
        pts = [px(s, v * 1e3) for s, v in zip(steps, values) if v == v]
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            c.line(xa, ya, xb, yb, color, width=2)
        if len(pts) == 1:
            c.rect(pts[0][0] - 1, pts[0][1] - 1, pts[0][0] + 1, pts[0][1] + 1, color)
        ly = top + 6 + 18 * i
        c.rect(right + 14, ly, right + 28, ly + 8, color)
        c.text(right + 34, ly, f"rank {rank}")
    for j, (step, label, kind) in enumerate(faults):
        if step is None:
            continue
        color = FAULT_COLORS.get(kind, (0, 0, 0))
        x, _ = px(min(max(step, s0), s1), 0)
        c.line(x, top, x, bottom, color, dash=4)
        c.text(min(x + 4, right - text_width(label)), top + 4 + 14 * (j % 6), label, color)
    c.save(path)
