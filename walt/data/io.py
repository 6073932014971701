"""Video files in and out, through PyAV (which bundles FFmpeg).

Frames on this side of the library are uint8 arrays ``(T, H, W, 3)`` in RGB order; the tensor side
(``(3, T, H, W)`` floats in [-1, 1]) starts in :mod:`walt.data.transforms`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from walt.atomic import atomic_path

if TYPE_CHECKING:
    import av

__all__ = ["VideoInfo", "VideoReadError", "probe_video", "read_video", "write_video"]

# Encoder settings by file suffix: (codec, pixel format, container format).
# h264 at CRF 18 is visually lossless for generated clips; XVID-tagged MPEG-4 part 2 is what UCF-101 ships.
_ENCODERS = {
    ".mp4": ("libx264", "yuv420p", "mp4"),
    ".avi": ("mpeg4", "yuv420p", "avi"),
    ".gif": ("gif", "pal8", "gif"),
}


def _pyav():
    """PyAV, imported on first use: the procedural datasets and latent shards need no video codec."""
    try:
        import av
    except ImportError as err:
        raise ImportError("reading and writing video files needs PyAV: pip install av") from err
    return av


class VideoReadError(RuntimeError):
    """A video file could not be decoded (missing, corrupt, truncated or without a video stream)."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video stream, without decoding it."""

    num_frames: int  # 0 when the container does not record a frame count
    fps: float
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read stream metadata; cheap, decodes nothing."""
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            num_frames = stream.frames
            if num_frames == 0 and stream.duration is not None and stream.time_base is not None and fps > 0:
                num_frames = round(float(stream.duration * stream.time_base) * fps)
            return VideoInfo(num_frames, fps, stream.codec_context.width, stream.codec_context.height)
    except (av.FFmpegError, OSError) as err:
        raise VideoReadError(f"cannot open video {path}: {err}") from err


def read_video(path: str | os.PathLike, frame_indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode a video to uint8 RGB frames ``(T, H, W, 3)``.

    With ``frame_indices`` only those frames are returned (in the given order, repeats allowed), and decoding
    stops after the largest one, so reading the start of a long video is cheap.
    Raises :class:`VideoReadError` when the file cannot be decoded or ends before a requested frame.
    """
    wanted = None if frame_indices is None else np.asarray(frame_indices, dtype=np.int64)
    if wanted is not None and (wanted.size == 0 or wanted.min() < 0):
        raise ValueError(f"frame_indices must be non-empty and non-negative, got {frame_indices!r}")
    last = None if wanted is None else int(wanted.max())
    frames: list[np.ndarray] = []
    av = _pyav()
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if last is not None and len(frames) > last:
                    break
    except (av.FFmpegError, OSError) as err:
        raise VideoReadError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise VideoReadError(f"video {path} has no decodable frames")
    if last is not None and last >= len(frames):
        raise VideoReadError(
            f"video {path} ended after {len(frames)} frames but frame {last} was requested (truncated file?)"
        )
    video = np.stack(frames)  # (T, H, W, 3)
    return video if wanted is None else video[wanted]


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` to ``.mp4`` (h264), ``.avi`` (MPEG-4/XVID) or ``.gif``.

    The file appears atomically (:func:`walt.atomic.atomic_path`): it is encoded under a hidden temporary name
    beside ``path`` and renamed when complete, so an interrupted run never leaves a half-written video behind,
    and a folder listing that skips hidden files never sees the temporary one.
    """
    path = Path(path)
    codec, pix_fmt, fmt = _encoder_for(path)
    frames = _check_frames(frames, even=pix_fmt == "yuv420p")
    with atomic_path(path) as tmp:
        _encode(str(tmp), fmt, codec, pix_fmt, frames, fps)
    return path


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.VideoStream:
    if not container.streams.video:
        raise VideoReadError(f"{path} has no video stream")
    # FFmpeg opens a still image under any name (a PNG renamed .avi) as a one-frame "video" through its image
    # demuxers; as a clip it would be one frame looped, with nothing in the data to tell. (A real one-frame
    # video, e.g. an MP4 of an image-to-video context, comes through a video container and is kept.)
    demuxer = container.format.name
    if demuxer.startswith("image2") or demuxer.endswith("_pipe"):
        raise VideoReadError(f"{path} is a still image ({demuxer.removesuffix('_pipe')} data), not a video")
    return container.streams.video[0]


def _encoder_for(path: Path) -> tuple[str, str, str]:
    suffix = path.suffix.lower()
    if suffix not in _ENCODERS:
        raise ValueError(f"cannot write {path}: unknown suffix {suffix!r}; use one of {sorted(_ENCODERS)}")
    return _ENCODERS[suffix]


def _check_frames(frames: np.ndarray, even: bool) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T >= 1, got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8, got {frames.dtype}; convert [-1, 1] tensors with walt.data.to_uint8"
        )
    if even and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise ValueError(
            f"h264/MPEG-4 with 4:2:0 chroma need even height and width, got {frames.shape[1]}x{frames.shape[2]};"
            " crop or pad the frames, or write a .gif"
        )
    return np.ascontiguousarray(frames)


def _encode(tmp: str, fmt: str, codec: str, pix_fmt: str, frames: np.ndarray, fps: float) -> None:
    av = _pyav()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # x264's macroblock-tree rate control made repeated encodes of the same frames differ (measured:
            # 2-5 different bitstreams in 60 encodes of a noisy clip); without it the same frames always give
            # the same file, so the same seed gives the same MP4.
            stream.options = {"crf": "18", "preset": "medium", "x264-params": "mbtree=0"}
        elif codec == "mpeg4":
            stream.codec_context.codec_tag = "XVID"
            stream.bit_rate = _mpeg4_bit_rate(frames, fps)
        for i, frame in enumerate(_av_frames(frames, pix_fmt)):
            frame.pts = i
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _mpeg4_bit_rate(frames: np.ndarray, fps: float) -> int:
    # MPEG-4 part 2 has no constant-quality mode in this API; ~0.5 bit per pixel keeps small clips near-lossless.
    return max(int(frames.shape[1] * frames.shape[2] * fps * 0.5), 200_000)


def _av_frames(frames: np.ndarray, pix_fmt: str):
    av = _pyav()
    if pix_fmt != "pal8":
        for rgb in frames:
            yield av.VideoFrame.from_ndarray(rgb, format="rgb24")
        return
    indices, palette = _quantize(frames)
    for idx in indices:
        yield av.VideoFrame.from_ndarray((idx, palette), format="pal8")


def _quantize(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 256-colour palette for the whole clip (so colours do not flicker between frames) and per-frame indices."""
    t, h, w, _ = frames.shape
    montage = Image.fromarray(frames.reshape(t * h, w, 3))
    quantized = montage.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    rgb = np.asarray(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)
    palette = np.zeros((256, 4), dtype=np.uint8)  # PyAV wants ARGB rows
    palette[: len(rgb), 1:] = rgb[:256]
    palette[:, 0] = 255
    indices = np.asarray(quantized, dtype=np.uint8).reshape(t, h, w)
    return indices, palette
