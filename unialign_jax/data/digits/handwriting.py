"""Handwritten digits (scikit-learn's copy of the UCI optdigits test set) as row sequences and short clips.

scikit-learn ships 1,797 8x8 images (pixel counts 0..16) written by 13 people, with no writer ids.
The images appear in form order (0, 1, ..., 9, 0, 1, ... per writer's form), so the split takes
contiguous index blocks: the first `TRAIN_FRACTION` of the images train, the rest test. This keeps
writers apart except, at most, the one writer whose form straddles the boundary.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.ndimage

NUM_IMAGES = 1797
IMAGE_SIZE = 8
TRAIN_FRACTION = 0.8
_MAX_PIXEL = 16.0

# Motion of a clip: the digit zooms in from a smaller scale, drifts to the centre and turns upright.
START_SCALE_RANGE = (0.45, 0.75)  # scale of the first frame (the last frame has scale 1)
START_SHIFT_FRACTION = 0.35  # largest start offset of the digit centre, as a fraction of the frame size
START_ANGLE_DEGREES = 30.0  # largest start rotation


@functools.cache
def load_handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32[1797, 8, 8] in [0, 1], labels int64[1797]) from scikit-learn (no download)."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    digits = load_digits()
    return (digits.images / _MAX_PIXEL).astype(np.float32), digits.target.astype(np.int64)


def split_indices(split: str, label: int) -> np.ndarray:
    """Indices of the images of one class in one split ('train': first 80 % of the indices, 'test': rest)."""
    _, labels = load_handwritten_digits()
    boundary = int(round(TRAIN_FRACTION * NUM_IMAGES))
    block = {"train": np.arange(boundary), "test": np.arange(boundary, NUM_IMAGES)}[split]
    return block[labels[block] == label]


def image_rows(image: np.ndarray, num_rows: int, width: int) -> np.ndarray:
    """The image resampled (bilinear, corners aligned) to `num_rows` x `width`; row t is step t (top first).

    Returns:
        float32[num_rows, width] in [0, 1].
    """
    rows = np.linspace(0, image.shape[0] - 1, num_rows)
    cols = np.linspace(0, image.shape[1] - 1, width)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    return scipy.ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)


def digit_clip(image: np.ndarray, num_frames: int, frame_size: int, rng: np.random.Generator) -> np.ndarray:
    """A clip of the digit zooming in, drifting to the centre and turning upright (bilinear warps).

    The start scale, offset and angle are drawn from `rng`; they move linearly to (1, 0, 0), which
    the last frame reaches (the whole digit, upright, filling a `frame_size` x `frame_size` frame).
    Pixels outside the digit are 0.

    Returns:
        float32[num_frames, frame_size * frame_size]: each frame's pixels, row-major, in [0, 1].
    """
    return drift_in_clip(image, num_frames, (frame_size, frame_size), rng)


def drift_in_clip(image: np.ndarray, num_frames: int, frame_shape: tuple[int, int],
                  rng: np.random.Generator) -> np.ndarray:
    """`digit_clip` for an image of any shape: frames of `frame_shape` (rows, columns), which should
    have the image's aspect ratio (the last frame shows the whole image, upright, filling the frame).

    Returns:
        float32[num_frames, rows * columns]: each frame's pixels, row-major, in [0, 1].
    """
    rows, columns = frame_shape
    start_scale = rng.uniform(*START_SCALE_RANGE)
    start_shift = rng.uniform(-START_SHIFT_FRACTION, START_SHIFT_FRACTION, size=2) * np.array(frame_shape)
    start_angle = np.deg2rad(rng.uniform(-START_ANGLE_DEGREES, START_ANGLE_DEGREES))
    progress = np.linspace(0.0, 1.0, num_frames)[:, None, None]
    scale = start_scale + (1.0 - start_scale) * progress  # [T, 1, 1]
    angle = start_angle * (1.0 - progress)
    shift = start_shift[:, None, None, None] * (1.0 - progress)  # [2, T, 1, 1]

    # Output pixel (y, x) -> image pixel: undo the shift, rotation and scale about the frame centre.
    y, x = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    dy, dx = y - (rows - 1) / 2 - shift[0], x - (columns - 1) / 2 - shift[1]
    cos, sin = np.cos(angle), np.sin(angle)
    pixels_per_frame_pixel = image.shape[0] / (rows * scale)
    source_y = (cos * dy + sin * dx) * pixels_per_frame_pixel + (image.shape[0] - 1) / 2
    source_x = (-sin * dy + cos * dx) * pixels_per_frame_pixel + (image.shape[1] - 1) / 2
    frames = scipy.ndimage.map_coordinates(image, np.stack([source_y, source_x]), order=1, mode="constant", cval=0.0)
    return np.clip(frames, 0.0, 1.0).reshape(num_frames, rows * columns).astype(np.float32)
