"""Audio of the read sentences (``audio/<SEN_...>.wav``).

A short, valid 16-bit mono WAV written with the standard library: a voiced buzz (a few
harmonics of a slowly gliding pitch) whose loudness follows the jaw opening of the
expression, so sound and motion line up the way speech and lips do. No time stamps are
written, so the bytes are reproducible.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
CAPTURE_FPS = 30.0


def sentence_waveform(seed: int, expression_index: int, jaw: np.ndarray, frame_step: int) -> np.ndarray:
    """Samples of one sentence.

    Args:
        seed: entity seed.
        expression_index: position of the sentence in the expression list.
        jaw: (num_frames,) float64 jaw-opening coefficient of each kept frame.
        frame_step: capture frames between kept frames (the clip lasts
            ``num_frames * frame_step / 30`` seconds).

    Returns:
        (num_samples,) int16.
    """
    rng = np.random.default_rng([seed, 401, expression_index])
    duration = len(jaw) * frame_step / CAPTURE_FPS
    time = np.arange(int(round(duration * SAMPLE_RATE))) / SAMPLE_RATE
    pitch = rng.uniform(95.0, 180.0) * (1.0 + 0.08 * np.sin(2.0 * np.pi * 0.7 * time))
    phase = 2.0 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    harmonics = np.array([1.0, 0.6, 0.45, 0.25, 0.15, 0.1])
    voice = sum(weight * np.sin((k + 1) * phase) for k, weight in enumerate(harmonics)) / harmonics.sum()
    frame_time = (np.arange(len(jaw)) + 0.5) * frame_step / CAPTURE_FPS
    opening = np.interp(time, frame_time, np.asarray(jaw, dtype=np.float64))
    syllables = 0.5 + 0.5 * np.sin(2.0 * np.pi * rng.uniform(3.0, 5.0) * time)
    envelope = (0.15 + 0.85 * np.clip(opening, 0.0, 1.0)) * syllables
    return np.rint(0.4 * 32767.0 * envelope * voice).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    """Write (N,) int16 samples as a mono 16 kHz WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
