"""Animated video summaries for TensorBoard without extra dependencies.

TensorBoard shows an image summary whose payload is an animated GIF as a video; `SummaryWriter.add_video`
builds the same summary but needs moviepy, so the GIF is encoded here with Pillow.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> animated GIF, looping."""
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
    )
    return buf.getvalue()


def add_video(writer, tag: str, frames: np.ndarray, step: int, fps: float = 8.0) -> None:
    """Writes (T, H, W, 3) uint8 frames as a video summary to a torch `SummaryWriter`."""
    h, w = frames.shape[1:3]
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif_bytes(frames, fps))
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
