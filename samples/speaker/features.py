"""Log-mel filterbank features with per-utterance mean normalisation (numpy only).

25 ms Hamming windows every 10 ms, a 256-point FFT, `N_MELS` triangular mel filters, log energy, then the
utterance mean of every band is subtracted (cepstral mean normalisation's filterbank form). A signal of
`samples_for_frames(n)` samples yields exactly n frames.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from samples.speaker.voices import SAMPLE_RATE

N_MELS = 24
WINDOW = 200
HOP = 80
N_FFT = 256
LOW_HZ, HIGH_HZ = 40.0, 3800.0


def samples_for_frames(n_frames: int) -> int:
    return WINDOW + (n_frames - 1) * HOP


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, N_FFT // 2 + 1] triangular filters, equally spaced on the mel scale between LOW_HZ and HIGH_HZ."""
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(LOW_HZ), _hz_to_mel(HIGH_HZ), n_mels + 2))
    bins_hz = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
    bank = np.zeros((n_mels, len(bins_hz)))
    for m in range(n_mels):
        left, centre, right = edges_hz[m : m + 3]
        rising = (bins_hz - left) / (centre - left)
        falling = (right - bins_hz) / (right - centre)
        bank[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    return bank


_BANK = mel_filterbank().astype(np.float32)
_WINDOW_FN = np.hamming(WINDOW).astype(np.float32)


def log_mel(samples: np.ndarray) -> np.ndarray:
    """[N_MELS, n_frames] float32 mean-normalised log-mel energies of a mono signal at SAMPLE_RATE."""
    if len(samples) < WINDOW:
        raise ValueError(f"signal of {len(samples)} samples is shorter than one {WINDOW}-sample window")
    frames = np.lib.stride_tricks.sliding_window_view(samples.astype(np.float32), WINDOW)[::HOP] * _WINDOW_FN
    spectrum = scipy.fft.rfft(frames, n=N_FFT, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    energies = np.log(power @ _BANK.T + 1e-6)
    energies -= energies.mean(axis=0, keepdims=True)
    return energies.T.astype(np.float32)
