"""Observations as RGB clips, and clips as PNG strips (the frames stacked top to bottom) for the page."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Distinct colours on black, one per MinAtar channel (Seaquest, the largest game, has 10 channels).
MINATAR_PALETTE = np.array(
    [
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (255, 225, 25),  # yellow
        (0, 130, 200),  # blue
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 240, 240),  # cyan
        (240, 50, 230),  # magenta
        (210, 245, 60),  # lime
        (250, 190, 212),  # pink
        (0, 128, 128),  # teal
        (255, 255, 255),  # white
    ],
    dtype=np.uint8,
)


def _upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (T, H, W, ...) by an integer factor: each pixel becomes a scale x scale block."""
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return images.repeat(scale, axis=1).repeat(scale, axis=2)


def render_minatar(boards: np.ndarray, scale: int = 24) -> np.ndarray:
    """(T, C, 10, 10) MinAtar boards (uint8 in {0, 255} or bool, channel-first as the env gives) ->
    (T, 10 * scale, 10 * scale, 3) uint8 RGB: black background, channel c drawn in MINATAR_PALETTE[c], later channels
    on top of earlier ones."""
    boards = np.asarray(boards)
    if boards.ndim != 4:
        raise ValueError(f"MinAtar boards must be (T, C, H, W), got shape {boards.shape}")
    steps, channels, height, width = boards.shape
    if channels > len(MINATAR_PALETTE):
        raise ValueError(f"at most {len(MINATAR_PALETTE)} channels can be coloured, got {channels}")
    rgb = np.zeros((steps, height, width, 3), dtype=np.uint8)
    for channel in range(channels):
        rgb[boards[:, channel] > 0] = MINATAR_PALETTE[channel]
    return _upscale(rgb, scale)


def render_gray(frames: np.ndarray, scale: int = 4) -> np.ndarray:
    """(T, H, W) uint8 grayscale frames (Atari's 84x84) -> (T, H * scale, W * scale, 3) uint8 RGB, nearest-neighbour."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"grayscale frames must be uint8 (T, H, W), got {frames.dtype} {frames.shape}")
    return np.repeat(_upscale(frames, scale)[..., None], 3, axis=-1)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes (Pillow, its default compression: clips are mostly flat colour)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"a PNG image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def check_clip(name: str, clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or 0 in clip.shape:
        raise ValueError(f"{name} must be a non-empty uint8 RGB video (T, H, W, 3), got {clip.dtype} {clip.shape}")
    return clip
