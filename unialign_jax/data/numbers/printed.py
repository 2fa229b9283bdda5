"""Printed numbers 0-99: numerals rendered with Pillow in the fonts matplotlib ships.

Fonts (`FONTS`: DejaVu Sans / Sans Mono / Serif, STIX and Computer Modern, from
matplotlib/mpl-data/fonts/ttf; DejaVu and Bitstream Vera licences, STIX SIL OFL, BaKoMa CM fonts)
are split between train and test by file: `TEST_FONTS` (one per family) only render the test split.
An instance draws a font, a size (`SCALE_RANGE` of the canvas height), a rotation (`ANGLE_DEGREES`)
and an offset of the centre (`SHIFT_FRACTION` of the canvas); the numeral is drawn white on black
at `SUPERSAMPLE` times the output resolution, rotated (bilinear), box-averaged down to
`size` x 2 `size` pixels, and Gaussian pixel noise (`NOISE_STD`) is added, clipped to [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

# file stem -> (family, style) used in captions
FONTS = {
    "DejaVuSans": ("DejaVu Sans", ""), "DejaVuSans-Bold": ("DejaVu Sans", "bold"),
    "DejaVuSans-Oblique": ("DejaVu Sans", "oblique"), "DejaVuSans-BoldOblique": ("DejaVu Sans", "bold oblique"),
    "DejaVuSansMono": ("DejaVu Sans Mono", ""), "DejaVuSansMono-Bold": ("DejaVu Sans Mono", "bold"),
    "DejaVuSansMono-Oblique": ("DejaVu Sans Mono", "oblique"),
    "DejaVuSansMono-BoldOblique": ("DejaVu Sans Mono", "bold oblique"),
    "DejaVuSerif": ("DejaVu Serif", ""), "DejaVuSerif-Bold": ("DejaVu Serif", "bold"),
    "DejaVuSerif-Italic": ("DejaVu Serif", "italic"), "DejaVuSerif-BoldItalic": ("DejaVu Serif", "bold italic"),
    "STIXGeneral": ("STIX", ""), "STIXGeneralBol": ("STIX", "bold"), "STIXGeneralItalic": ("STIX", "italic"),
    "STIXGeneralBolIta": ("STIX", "bold italic"),
    "cmr10": ("Computer Modern", ""), "cmb10": ("Computer Modern", "bold"), "cmti10": ("Computer Modern", "italic"),
    "cmss10": ("Computer Modern Sans", ""), "cmtt10": ("Computer Modern Typewriter", ""),
}
TEST_FONTS = ("DejaVuSans-BoldOblique", "DejaVuSansMono", "DejaVuSerif-Italic", "STIXGeneralBol", "cmss10")
SCALE_RANGE = (0.55, 0.95)
ANGLE_DEGREES = 20.0
SHIFT_FRACTION = 0.12
NOISE_STD = 0.1
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Rendering:
    """How one printed number is drawn (the noise is seeded by `noise_seed`)."""

    number: int
    font: str
    scale: float
    angle: float  # degrees, counter-clockwise
    shift: tuple[float, float]  # (rows, columns) as fractions of the canvas
    noise_seed: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"font={self.font}:scale={self.scale:.3f}:angle={self.angle:.1f}:shift={self.shift[0]:.3f},{self.shift[1]:.3f}"

    def describe(self) -> str:
        """'DejaVu Serif bold, tilted left' (tilt words beyond 7 degrees)."""
        family, style = FONTS[self.font]
        tilt = "tilted left" if self.angle > 7 else "tilted right" if self.angle < -7 else "upright"
        return f"{family}{' ' + style if style else ''}, {tilt}"


def split_fonts(split: str) -> tuple[str, ...]:
    return tuple(font for font in FONTS if (font in TEST_FONTS) == (split == "test"))


def draw_rendering(split: str, number: int, rng: np.random.Generator, noise_seed: tuple[int, ...]) -> Rendering:
    fonts = split_fonts(split)
    return Rendering(number, fonts[rng.integers(len(fonts))], float(rng.uniform(*SCALE_RANGE)),
                     float(rng.uniform(-ANGLE_DEGREES, ANGLE_DEGREES)),
                     tuple(float(v) for v in rng.uniform(-SHIFT_FRACTION, SHIFT_FRACTION, size=2)), noise_seed)


@functools.cache
def font_path(font: str) -> pathlib.Path:
    """The font file in matplotlib's mpl-data (FileNotFoundError naming it if this matplotlib lacks it)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    path = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{font}.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"printed numbers: font {path} is not in this matplotlib installation")
    return path


def render(rendering: Rendering, size: int) -> np.ndarray:
    """The printed number (module docstring): float32[size, 2 size] in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel

    height, width = size * SUPERSAMPLE, 2 * size * SUPERSAMPLE
    font = ImageFont.truetype(str(font_path(rendering.font)), max(1, round(rendering.scale * height)))
    canvas = Image.new("L", (width, height), 0)
    center = (width * (0.5 + rendering.shift[1]), height * (0.5 + rendering.shift[0]))
    ImageDraw.Draw(canvas).text(center, str(rendering.number), fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(rendering.angle, resample=Image.Resampling.BILINEAR, center=center)
    pixels = np.asarray(canvas, np.float64).reshape(size, SUPERSAMPLE, 2 * size, SUPERSAMPLE).mean(axis=(1, 3)) / 255
    noise = np.random.default_rng(rendering.noise_seed).normal(0.0, NOISE_STD, pixels.shape)
    return np.clip(pixels + noise, 0.0, 1.0).astype(np.float32)
