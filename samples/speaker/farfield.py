"""Far-field conditions: a synthetic room impulse response, a microphone colouring and additive noise.

The room is the statistical (Polack) model: a direct path, a few early reflections, then a late tail of
exponentially decaying Gaussian noise whose decay gives the reverberation time RT60 and whose level sets
the direct-to-reverberant ratio (distance from the talker). Noise is a mix of coloured (1/f^k) noise and
a mains hum, scaled to a signal-to-noise ratio. Each utterance draws its own condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from samples.speaker.voices import SAMPLE_RATE


@dataclass(frozen=True)
class FarField:
    """How hard the recording conditions are: ranges each utterance draws from."""

    rt60_s: tuple[float, float] = (0.15, 0.5)
    drr_db: tuple[float, float] = (0.0, 12.0)
    snr_db: tuple[float, float] = (8.0, 30.0)
    mic_eq_db: float = 3.0


@dataclass(frozen=True)
class Condition:
    rt60_s: float
    drr_db: float
    snr_db: float


def room_impulse_response(rt60_s: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Unit direct path at a small delay, early reflections, and a late tail with the given RT60 and DRR."""
    delay = int(rng.integers(8, 40))
    length = delay + int(rt60_s * SAMPLE_RATE)
    t = np.arange(length - delay) / SAMPLE_RATE
    tail = rng.standard_normal(length - delay) * 10 ** (-3 * t / rt60_s)
    # High frequencies die faster in real rooms: a one-pole low-pass on the tail.
    tail = signal.lfilter([0.6], [1.0, -0.4], tail)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0
    for _ in range(6):
        at = int(rng.integers(int(0.002 * SAMPLE_RATE), int(0.03 * SAMPLE_RATE)))
        tail[at] += rng.uniform(-0.7, 0.7)
    tail *= 10 ** (-drr_db / 20) / np.sqrt(np.sum(tail**2) + 1e-12)
    rir = np.zeros(length)
    rir[delay] = 1.0
    rir[delay:] += tail
    return rir


def microphone_colouring(max_db: float, rng: np.random.Generator) -> np.ndarray:
    """Two random peaking-EQ sections (second-order sections): every device and placement sounds a bit different."""
    sections = []
    for _ in range(2):
        freq = rng.uniform(200.0, 3200.0)
        gain = 10 ** (rng.uniform(-max_db, max_db) / 40)
        q = rng.uniform(0.5, 2.0)
        w0 = 2 * np.pi * freq / SAMPLE_RATE
        alpha = np.sin(w0) / (2 * q)
        b = np.array([1 + alpha * gain, -2 * np.cos(w0), 1 - alpha * gain])
        a = np.array([1 + alpha / gain, -2 * np.cos(w0), 1 - alpha / gain])
        sections.append(np.concatenate([b / a[0], a / a[0]]))
    return np.array(sections)


def coloured_noise(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """1/f^k noise with a random k in [0, 2] (white to brown) plus a weak mains hum; unit power."""
    spectrum = rng.standard_normal(n_samples // 2 + 1) + 1j * rng.standard_normal(n_samples // 2 + 1)
    freqs = np.maximum(np.fft.rfftfreq(n_samples, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs ** (rng.uniform(0.0, 2.0) / 2), n=n_samples)
    noise /= np.std(noise) + 1e-12
    hum_hz = rng.choice([50.0, 60.0])
    t = np.arange(n_samples) / SAMPLE_RATE
    hum = sum(rng.uniform(0, 0.3) / k * np.sin(2 * np.pi * k * hum_hz * t + rng.uniform(0, 6.3)) for k in (1, 2, 3))
    noise = noise + hum
    return noise / (np.std(noise) + 1e-12)


def draw_condition(farfield: FarField, rng: np.random.Generator) -> Condition:
    return Condition(
        rt60_s=float(rng.uniform(*farfield.rt60_s)),
        drr_db=float(rng.uniform(*farfield.drr_db)),
        snr_db=float(rng.uniform(*farfield.snr_db)),
    )


def apply_farfield(clean: np.ndarray, farfield: FarField, rng: np.random.Generator) -> np.ndarray:
    """Reverberate, colour and add noise to `clean`; returns the same length, unit power."""
    condition = draw_condition(farfield, rng)
    rir = room_impulse_response(condition.rt60_s, condition.drr_db, rng)
    reverberant = signal.fftconvolve(clean, rir)[: len(clean)]
    reverberant = signal.sosfilt(microphone_colouring(farfield.mic_eq_db, rng), reverberant)
    speech_power = np.mean(reverberant**2)
    noise = coloured_noise(len(clean), rng) * np.sqrt(speech_power / 10 ** (condition.snr_db / 10))
    noisy = reverberant + noise
    return noisy / (np.std(noisy) + 1e-12)
