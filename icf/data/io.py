"""Reading AVSBench media: WAV audio, RGB frames, GT masks, palette colouring, and the cheap media checks of
the index stage (`media_errors`: headers and CRCs, no full decode).

Every reader raises ``ValueError`` whose message names the file and the reason (missing, unreadable,
empty, truncated, wrong mode), so callers can turn it into a failed manifest row or a one-line error.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from icf.data.datasets import load_info
from icf.data.sample import Sample


def _data_chunk(path: Path) -> tuple[int, int] | None:
    """``(offset, declared_size)`` of a RIFF/WAVE file's ``data`` chunk, or None if not a plain RIFF WAV.

    libsndfile silently clamps a WAV whose data chunk is cut short, so truncation is detected here by
    comparing the size the header declares with the bytes actually present.
    """
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                return fh.tell(), size
            fh.seek(size + (size & 1), 1)


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as ``.npy`` file bytes (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """``.npy`` file bytes → the array (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


MISSING, UNREADABLE_IMAGE, UNREADABLE_AUDIO = "missing file", "unreadable image", "unreadable audio"
MISSING_AUDIO, BROKEN_LINK, FOLDER = "missing audio file", "broken or looping symlink", "a folder, not a file"
UNAVAILABLE = (MISSING, MISSING_AUDIO, BROKEN_LINK, FOLDER, UNREADABLE_IMAGE, UNREADABLE_AUDIO)  # may be transient


def missing_reason(path: Path) -> str:
    """Why a path is not a readable file: a broken or looping symlink, a folder, or missing."""
    if path.is_symlink():
        return BROKEN_LINK
    if path.is_dir():
        return FOLDER
    return MISSING


def check_wav(path: str | Path) -> int:
    """Header check of a WAV without decoding it: readable, non-empty, not truncated.

    Returns the number of samples per channel; raises ``ValueError`` naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        reason = missing_reason(path)
        raise ValueError(f"{path}: {MISSING_AUDIO if reason == MISSING else reason}")
    try:
        frames = sf.info(str(path)).frames
    except Exception as err:  # libsndfile reports many kinds of damage; all mean "unreadable"
        raise ValueError(f"{path}: {UNREADABLE_AUDIO} ({err})") from None
    if frames <= 0:
        raise ValueError(f"{path}: empty audio (0 samples)")
    chunk = _data_chunk(path)
    if chunk is not None:
        offset, declared = chunk
        present = path.stat().st_size - offset
        if declared not in (0, 0xFFFFFFFF) and present < declared:
            raise ValueError(f"{path}: truncated WAV (header declares {declared} data bytes, file holds {present})")
    return frames


def read_wav(path: str | Path, sr: int = 16000) -> np.ndarray:
    """Read a WAV as float32 mono at ``sr`` Hz: shape ``(N,)``, values in [-1, 1].

    Stereo is averaged to mono; other sample rates are resampled with
    ``torchaudio.functional.resample`` (band-limited sinc interpolation). Raises ``ValueError`` naming
    the file for a missing, unreadable, empty or truncated WAV.
    """
    path = Path(path)
    check_wav(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise ValueError(f"{path}: {UNREADABLE_AUDIO} ({err})") from None
    wav = data.mean(axis=1, dtype=np.float32)
    if rate != sr:  # torch is imported only here: the header checks of the index stay light
        import torch
        import torchaudio.functional as AF

        wav = AF.resample(torch.from_numpy(wav), rate, sr).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{path}: {missing_reason(path)}")
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:
        raise ValueError(f"{path}: {UNREADABLE_IMAGE} ({err})") from None
    return img


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit greyscale PNGs open in these modes


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a frame as uint8 RGB, shape ``(H, W, 3)``; a 16-bit greyscale frame is scaled to 8 bits
    (``round(v / 257)``), not clipped to white as ``convert('RGB')`` would."""
    img = _open_image(Path(path))
    if img.mode in WIDE_GREY_MODES:
        grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


COLOUR_MODES = ("RGB", "RGBA")  # palette-coloured class masks (AVSS labels_rgb)
INDEX_MODES = ("L", "P")  # class-index masks (AVSS labels_semantic)


def read_mask(path: str | Path, dataset: str) -> np.ndarray:
    """Read a GT mask as a uint8 index map, shape ``(H, W)``.

    S4/MS3: binary PNG (0/255, any of the modes ``1``/``L``/``P``/``RGB``) → 0/1, foreground where the
    grey value is ≥ 128. AVSS: a ``labels_semantic`` class-index PNG (mode ``L`` or ``P``) → its ids,
    which must be < the number of classes; a ``labels_rgb`` colour PNG (mode ``RGB``/``RGBA``) → ids by
    exact match against the manifest's palette (:func:`decolorize`).
    """
    path = Path(path)
    info = load_info(dataset)
    img = _open_image(path)
    if problem := lossy_mask(path, img.format):
        raise ValueError(problem)
    if info.binary:
        return (np.asarray(img.convert("L")) >= 128).astype(np.uint8)
    if img.mode in COLOUR_MODES:
        try:
            return decolorize(np.asarray(img.convert("RGB")), info.palette)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if img.mode not in INDEX_MODES:
        raise ValueError(f"{path}: class mask must be a class-index (L, P) or palette-colour (RGB) PNG, found mode {img.mode}")
    ids = np.asarray(img, dtype=np.uint8)
    top = int(ids.max(initial=0))
    if top >= info.num_classes:
        raise ValueError(f"{path}: class id {top} out of range (the {dataset} manifest has {info.num_classes} classes)")
    return ids


def colorize(ids: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """Index map ``(H, W)`` → RGB ``(H, W, 3)`` uint8 using ``palette`` (e.g. ``load_info('avss').palette``)."""
    lut = np.asarray(palette, dtype=np.uint8)
    return lut[ids]


def decolorize(rgb: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """RGB ``(H, W, 3)`` → index map ``(H, W)`` by exact colour match (the official ``labels_rgb`` rule).

    Raises ``ValueError`` if a pixel has a colour outside the palette.
    """
    lut = np.asarray(palette, dtype=np.int64)
    codes = (lut[:, 0] << 16) | (lut[:, 1] << 8) | lut[:, 2]
    pix = rgb.astype(np.int64)
    pcodes = (pix[..., 0] << 16) | (pix[..., 1] << 8) | pix[..., 2]
    order = np.argsort(codes)
    pos = np.clip(np.searchsorted(codes[order], pcodes), 0, len(codes) - 1)
    ids = order[pos]
    off = codes[ids] != pcodes
    if off.any():
        r, g, b = (int(v) for v in rgb[off][0])
        raise ValueError(f"{int(off.sum())} pixels have colours outside the palette, e.g. ({r}, {g}, {b})")
    return ids.astype(np.uint8)


def lossy_mask(path: str | Path, fmt: str | None) -> str | None:
    """Why a GT mask file whose bytes are in format ``fmt`` (PIL's name) cannot be used, or None: masks must be
    PNG (every AVSBench subset ships PNG). JPEG bytes under a ``.png`` name decode, but their compression
    noise shifts pixels to class ids that occur nowhere in the clip."""
    if fmt == "PNG":
        return None
    return f"{path}: a mask must be a PNG (lossless), found {fmt or 'unknown'} bytes (lossy compression invents class ids)"


def image_size(path: str) -> tuple[tuple[int, int], str, str | None]:
    """``((width, height), mode, format)`` of an image, checked without decoding pixels.

    Raises ``ValueError`` naming the file: missing, unreadable, corrupt PNG chunk, truncated JPEG.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {missing_reason(Path(path))}")
    try:
        with Image.open(path) as img:
            size, mode, fmt = img.size, img.mode, img.format
            if fmt == "PNG":
                img.verify()  # walks every chunk and checks its CRC; no inflate
    except Exception as err:
        raise ValueError(f"{path}: {UNREADABLE_IMAGE} ({err})") from None
    if fmt == "JPEG":
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 64))
            if b"\xff\xd9" not in fh.read():
                raise ValueError(f"{path}: truncated JPEG (no end-of-image marker)")
    return size, mode, fmt


def media_errors(sample: Sample) -> list[str]:
    """Every problem with a clip's files, read without decoding: each frame and GT mask readable (PNG CRCs, JPEG end
    marker), a mask a PNG the size of its frame and of the dataset's kind, the WAV whole. Each names the file."""
    info = load_info(sample.dataset)
    errors = []
    for frame, mask in zip(sample.frame_paths, sample.mask_paths):
        try:
            frame_size, _, _ = image_size(frame)
        except ValueError as err:
            errors.append(str(err))
            frame_size = None
        if not mask:
            continue
        try:
            mask_size, mode, fmt = image_size(mask)
        except ValueError as err:
            errors.append(str(err))
            continue
        if problem := lossy_mask(mask, fmt):
            errors.append(problem)
            continue
        if not info.binary and mode not in INDEX_MODES + COLOUR_MODES:
            errors.append(f"{mask}: class mask must be a class-index (L, P) or palette-colour (RGB) PNG, found mode {mode}")
        if frame_size is not None and mask_size != frame_size:
            errors.append(
                f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its frame is {frame_size[0]}x{frame_size[1]}"
            )
    try:
        check_wav(sample.audio_path)
    except ValueError as err:
        errors.append(str(err))
    return errors


def sample_files(sample: Sample) -> list[str]:
    """Every file a clip is read from: frames, GT masks, the WAV."""
    return [*sample.frame_paths, *(m for m in sample.mask_paths if m), sample.audio_path]


def unavailable_file(sample: Sample, error: str) -> str | None:
    """The file of ``sample`` that a failure reason (a reader's ``"<path>: <reason>"``, possibly the first of
    several joined by ``"; "``) blames for being missing or unreadable, or None (a content problem, or
    no file named): such a failure may be transient (a file briefly moved, a network filesystem's read
    error) and is worth re-checking."""
    for path in sample_files(sample):
        if error.startswith(f"{path}: ") and error[len(path) + 2 :].startswith(UNAVAILABLE):
            return path
    return None


def healed(sample: Sample, error: str | None) -> bool:
    """Whether a clip that failed with ``error`` because a file was missing or unreadable now passes the
    index's cheap checks for that file (`media_errors`), so recomputing it may succeed."""
    path = unavailable_file(sample, error or "")
    return path is not None and not any(e.startswith(f"{path}: ") for e in media_errors(sample))
