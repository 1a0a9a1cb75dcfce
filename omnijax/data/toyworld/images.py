"""Scenes as square grids of image codes, the inverse parser, and a PNG renderer.

Codebook: codes [0, background_codes) are background tones; then one code per (shape, colour,
quadrant of the object's patch), so a patch of codes says what the object is and where in it each
code sits. Each cell of the scene grid is a patch of grid // cells codes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import numpy as np

from omnijax.data.toyworld.scenes import COLOURS, SHAPES, Scene, Thing

QUADRANTS = 4
# Pixels per code side an image read back may have (saved ones have 8): beyond it a PNG is refused
# before its pixels are decoded.
MAX_PIXELS_PER_CODE = 64
_RGB = {"red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.2, 0.35, 0.9),
        "yellow": (0.95, 0.8, 0.1)}


def _shape_mask(shape: str, size: int) -> np.ndarray:
  centres = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
  v, u = np.meshgrid(centres, centres, indexing="ij")
  if shape == "circle":
    return u * u + v * v <= 0.81
  if shape == "square":
    return np.maximum(abs(u), abs(v)) <= 0.8
  if shape == "triangle":  # apex up
    return abs(u) <= (v + 1) / 2
  return (np.minimum(abs(u), abs(v)) <= 0.3) & (np.maximum(abs(u), abs(v)) <= 0.9)  # cross


@dataclasses.dataclass(frozen=True)
class ImageCodebook:
  grid: int = 16
  cells: int = 2
  background_codes: int = 4

  def __post_init__(self):
    if self.grid % self.cells or self.grid // self.cells < 2:
      raise ValueError(f"image grid {self.grid} must split into {self.cells} cells of >= 2 codes")
    if any(not _shape_mask(shape, self.patch).any() for shape in SHAPES):
      raise ValueError(f"patches of {self.patch} codes are too small to draw every shape")

  @property
  def patch(self) -> int:
    return self.grid // self.cells

  @property
  def codes_used(self) -> int:
    return self.background_codes + len(SHAPES) * len(COLOURS) * QUADRANTS

  @property
  def codes_per_image(self) -> int:
    return self.grid * self.grid

  def _object_code(self, shape: str, colour: str, quadrant) -> np.ndarray:
    kind = SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)
    return self.background_codes + kind * QUADRANTS + quadrant

  def encode(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Scene -> int32 [grid * grid] codes, row-major; the background tone is drawn from rng."""
    if scene.cells != self.cells:
      raise ValueError(f"scene has {scene.cells}x{scene.cells} cells, codebook {self.cells}")
    tone = rng.integers(self.background_codes)
    speckle = rng.random((self.grid, self.grid)) < 0.1  # a few pixels one tone off
    codes = np.where(speckle, (tone + 1) % self.background_codes, tone).astype(np.int32)
    p = self.patch
    half = np.arange(p) >= p / 2
    quadrant = 2 * half[:, None] + half[None, :]
    for thing in scene.things:
      row, col = divmod(thing.cell, self.cells)
      block = codes[row * p:(row + 1) * p, col * p:(col + 1) * p]
      mask = _shape_mask(thing.shape, p)
      block[mask] = self._object_code(thing.shape, thing.colour, quadrant)[mask]
    return codes.reshape(-1)

  def decode(self, codes) -> Scene:
    """Codes -> scene: per cell, the majority object among its object codes, if enough of them.

    A cell counts as holding an object when at least half the pixels of the smallest shape carry
    object codes, so scattered wrong codes in a generated image do not invent objects.
    """
    grid = np.asarray(codes).reshape(self.grid, self.grid)
    p = self.patch
    threshold = max(1, min(int(_shape_mask(s, p).sum()) for s in SHAPES) // 2)
    things = []
    for cell in range(self.cells * self.cells):
      row, col = divmod(cell, self.cells)
      block = grid[row * p:(row + 1) * p, col * p:(col + 1) * p].ravel()
      kinds = (block[(block >= self.background_codes) & (block < self.codes_used)]
               - self.background_codes) // QUADRANTS
      if len(kinds) < threshold:
        continue
      kind = int(np.bincount(kinds).argmax())
      shape, colour = divmod(kind, len(COLOURS))
      things.append(Thing(cell, SHAPES[shape], COLOURS[colour]))
    return Scene(tuple(things), self.cells)

  @functools.cached_property
  def palette(self) -> np.ndarray:
    """uint8 [codes_used, 3]: one distinct colour per code, so a PNG maps back to its codes.

    Greys for the background tones; an object code is its colour at a shade set by shape and
    quadrant (quadrants visible, so a misplaced code shows). Shades differ by 0.04, at least 7
    levels in the colour's dominant channel, so no two codes round to the same RGB.
    """
    palette = np.zeros((self.codes_used, 3))
    palette[:self.background_codes] = 0.9 - 0.06 * np.arange(self.background_codes)[:, None]
    for s, shape in enumerate(SHAPES):
      for colour in COLOURS:
        for quadrant in range(QUADRANTS):
          shade = 1.0 - 0.04 * (QUADRANTS * s + quadrant)
          palette[self._object_code(shape, colour, quadrant)] = np.array(_RGB[colour]) * shade
    return (palette * 255).round().astype(np.uint8)

  def to_rgb(self, codes, pixels_per_code: int = 8) -> np.ndarray:
    """Codes -> uint8 RGB image; codes outside the used range show as black."""
    grid = np.asarray(codes).reshape(self.grid, self.grid)
    valid = (grid >= 0) & (grid < self.codes_used)
    rgb = np.where(valid[..., None], self.palette[np.clip(grid, 0, self.codes_used - 1)], 0)
    rgb = np.repeat(np.repeat(rgb, pixels_per_code, axis=0), pixels_per_code, axis=1)
    return rgb.astype(np.uint8)

  def from_rgb(self, rgb) -> np.ndarray:
    """RGB image (what `to_rgb` draws, at any pixels per code) -> int32 [grid * grid] codes.

    Each code's square of pixels is averaged and takes the nearest palette colour, so a
    resaved or lightly retouched image still reads back.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
      raise ValueError(f"expected an RGB image, got an array of shape {rgb.shape}")
    height, width = rgb.shape[:2]
    if height != width or height % self.grid:
      raise ValueError(f"image is {width}x{height} pixels; the toy world's images are square "
                       f"with a multiple of {self.grid} pixels a side")
    size = height // self.grid
    blocks = rgb[..., :3].astype(np.float64).reshape(self.grid, size, self.grid, size, 3)
    means = blocks.mean(axis=(1, 3)).reshape(-1, 1, 3)
    distances = ((means - self.palette[None].astype(np.float64)) ** 2).sum(-1)
    return distances.argmin(-1).astype(np.int32)

  def load_png(self, path: str | os.PathLike) -> np.ndarray:
    from PIL import Image

    # A few kilobytes of PNG can describe gigapixels: the size is checked before the pixels are
    # read, and PIL's own bomb warning is an error rather than a second line on stderr.
    most = self.grid * MAX_PIXELS_PER_CODE
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
          if max(image.size) > most:
            raise ValueError(f"image is {image.size[0]}x{image.size[1]} pixels; the toy world's "
                             f"images have at most {most} pixels a side")
          return self.from_rgb(np.asarray(image.convert("RGB")))
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
      raise ValueError(f"{path}: not a readable image ({e})") from None  # OSError: unidentified
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None

  def save_png(self, codes, path: str | os.PathLike, pixels_per_code: int = 8) -> None:
    from PIL import Image  # a matplotlib dependency, so always present with omnijax

    # The format is named: atomic writes go through a temporary name without the .png suffix.
    Image.fromarray(self.to_rgb(codes, pixels_per_code)).save(path, format="PNG")
