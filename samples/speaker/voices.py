"""Source-filter speech synthesis: per-speaker voice parameters and random phonetic content.

A speaker is a handful of numbers that real voices differ in: mean pitch and pitch range, vocal-tract
length (scales every formant), idiosyncratic vowel formants, formant bandwidths, glottal spectral tilt,
breathiness, jitter and speaking rate. An utterance is a random syllable string rendered by exciting a
4-formant resonator cascade with a glottal pulse train (voiced phones) and/or noise (fricatives).
Everything is drawn from numpy Generators, so a (seed, speaker, utterance) triple always gives the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import signal

SAMPLE_RATE = 8000
NYQUIST_MARGIN_HZ = 300.0

# Canonical adult formants (F1..F4, Hz), Peterson & Barney-like averages.
VOWELS = {
    "iy": (270, 2290, 3010, 3500),
    "ih": (390, 1990, 2550, 3400),
    "eh": (530, 1840, 2480, 3400),
    "ae": (660, 1720, 2410, 3400),
    "ah": (520, 1190, 2390, 3300),
    "aa": (730, 1090, 2440, 3300),
    "ao": (570, 840, 2410, 3300),
    "uh": (440, 1020, 2240, 3300),
    "uw": (300, 870, 2240, 3300),
    "er": (490, 1350, 1690, 3300),
}
NASALS = {"m": (250, 1100, 2200, 3300), "n": (250, 1500, 2500, 3400)}
# Fricatives: noise through high resonances (place of articulation), optionally voiced.
FRICATIVES = {
    "s": ((2500, 3300, 3600, 3750), False),
    "sh": ((1800, 2600, 3300, 3700), False),
    "f": ((1500, 2600, 3400, 3700), False),
    "z": ((2500, 3300, 3600, 3750), True),
    "v": ((1500, 2600, 3400, 3700), True),
}
STOPS = ("p", "t", "k", "b", "d", "g")
# Log-normal spread of a speaker's formants: one factor per formant for every phone (tract shape), and one
# factor per (phone, formant) (accent, idiolect).
FORMANT_SHAPE_SPREAD = 0.10
VOWEL_SPREAD = 0.04


@dataclass(frozen=True)
class Voice:
    """One speaker's vocal apparatus (all frequencies in Hz)."""

    f0_hz: float
    f0_range_semitones: float
    tract_scale: float
    vowel_offsets: dict[str, np.ndarray]
    bandwidth_scale: float
    tilt_pole: float
    breathiness: float
    jitter: float
    rate: float
    filters: dict[str, np.ndarray]


def draw_voice(rng: np.random.Generator) -> Voice:
    """A random speaker. Pitch and vocal-tract length are correlated as in real voices (short tract, high pitch)."""
    size = rng.uniform(0.0, 1.0)
    f0 = float(np.exp(np.log(85.0) + size * np.log(255.0 / 85.0) + rng.normal(0, 0.08)))
    tract_scale = float(0.86 + 0.24 * size + rng.normal(0, 0.06))
    shape = np.exp(rng.normal(0, FORMANT_SHAPE_SPREAD, size=4))
    offsets = {name: shape * np.exp(rng.normal(0, VOWEL_SPREAD, size=4)) for name in (*VOWELS, *NASALS)}
    bandwidth_scale = float(rng.uniform(0.7, 1.6))
    filters = {
        name: _phone_filter(tract_scale * offsets[name] * formants, bandwidth_scale)
        for name, formants in (VOWELS | NASALS).items()
    }
    filters |= {
        name: _phone_filter(tract_scale * shape * np.asarray(formants), bandwidth_scale)
        for name, (formants, _) in FRICATIVES.items()
    }
    return Voice(
        f0_hz=f0,
        f0_range_semitones=float(rng.uniform(1.0, 4.0)),
        tract_scale=tract_scale,
        vowel_offsets=offsets,
        bandwidth_scale=bandwidth_scale,
        tilt_pole=float(rng.uniform(0.80, 0.97)),
        breathiness=float(rng.uniform(0.01, 0.25)),
        jitter=float(rng.uniform(0.002, 0.02)),
        rate=float(rng.uniform(0.8, 1.25)),
        filters=filters,
    )


def _resonator_cascade(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Second-order sections (one 2-pole resonator per formant), unit gain at DC for each section."""
    sos = np.zeros((len(formants), 6))
    for i, (freq, bw) in enumerate(zip(formants, bandwidths, strict=True)):
        radius = np.exp(-np.pi * bw / SAMPLE_RATE)
        theta = 2 * np.pi * freq / SAMPLE_RATE
        a1, a2 = -2 * radius * np.cos(theta), radius * radius
        sos[i] = (1 + a1 + a2, 0, 0, 1, a1, a2)
    return sos


def _phone_filter(formants_hz: np.ndarray, bandwidth_scale: float) -> np.ndarray:
    freqs = np.clip(np.sort(np.asarray(formants_hz, dtype=float)), 150.0, SAMPLE_RATE / 2 - NYQUIST_MARGIN_HZ)
    bandwidths = np.array([60.0, 90.0, 140.0, 200.0]) * bandwidth_scale
    sos = _resonator_cascade(freqs, bandwidths)
    # Unit power gain for white input: a phone's loudness is set by its excitation level alone.
    sos[0, :3] /= np.sqrt(np.mean(_power_response(sos)))
    return sos


_GRID = np.exp(-1j * np.pi * (np.arange(256) + 0.5) / 256)


def _power_response(sos: np.ndarray) -> np.ndarray:
    """|H|^2 of all-pole second-order sections (b1 = b2 = 0) on a 256-point grid over [0, Nyquist)."""
    denominators = 1 + sos[:, 4:5] * _GRID + sos[:, 5:6] * _GRID**2
    return np.prod(np.abs(sos[:, 0:1] / denominators) ** 2, axis=0)


def _glottal_source(voice: Voice, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Pulse train with a slow random intonation contour and jitter, shaped by the speaker's spectral tilt."""
    n_knots = max(2, n_samples // (SAMPLE_RATE // 3))
    contour = rng.normal(0, voice.f0_range_semitones / 2, size=n_knots)
    semitones = np.interp(np.arange(n_samples), np.linspace(0, n_samples, n_knots), contour)
    f0 = voice.f0_hz * 2 ** (semitones / 12) * (1 + voice.jitter * rng.standard_normal(n_samples))
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    # Glottal flow falls ~12 dB/octave (two poles, the speaker's tilt); lip radiation adds +6 dB/octave (a zero at DC).
    flow = signal.lfilter([1.0], [1.0, -voice.tilt_pole], signal.lfilter([1.0], [1.0, -voice.tilt_pole], pulses))
    return np.diff(flow, prepend=0.0)


def _phone_sequence(rng: np.random.Generator) -> Iterator[str]:
    """Endless random consonant-vowel syllables with occasional pauses."""
    vowels, consonants = list(VOWELS), [*NASALS, *FRICATIVES, *STOPS]
    while True:
        if rng.random() < 0.08:
            yield "sil"
        if rng.random() < 0.8:
            yield consonants[rng.integers(len(consonants))]
        yield vowels[rng.integers(len(vowels))]


def _duration(phone: str, voice: Voice, rng: np.random.Generator) -> int:
    if phone == "sil":
        base_s = 0.15
    elif phone in STOPS:
        base_s = 0.05
    elif phone in VOWELS:
        base_s = 0.11
    else:
        base_s = 0.07
    return int(SAMPLE_RATE * base_s * voice.rate * rng.uniform(0.6, 1.6))


# Segment loudness relative to vowels (dB): real consonants are weaker than vowels.
LEVEL_DB = {"vowel": 0.0, "nasal": -6.0, "fricative": -12.0, "stop": -14.0, "sil": -60.0}
RAMP_S = 0.008
RING_SAMPLES = int(0.03 * SAMPLE_RATE)


def _phone_class(phone: str) -> str:
    if phone in VOWELS:
        return "vowel"
    if phone in NASALS:
        return "nasal"
    if phone in FRICATIVES:
        return "fricative"
    return "sil" if phone == "sil" else "stop"


def _envelope(length: int) -> np.ndarray:
    """Raised-cosine fade in and out, so phone boundaries do not click."""
    ramp = min(int(RAMP_S * SAMPLE_RATE), length // 2)
    env = np.ones(length)
    if ramp:
        fade = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
        env[:ramp], env[-ramp:] = fade, fade[::-1]
    return env


def _excitation(phone: str, voice: Voice, glottal: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source signal, resonator sections) of one phone segment."""
    kind = _phone_class(phone)
    if kind in ("sil", "stop"):
        burst = np.zeros(len(noise))
        if kind == "stop":
            burst[-min(len(noise), 120) :] = noise[-min(len(noise), 120) :]
        voicing = 0.3 * glottal if phone in ("b", "d", "g") else 0.0
        place = "s" if phone in ("t", "d", "k", "g") else "f"
        return burst + voicing, voice.filters[place]
    if kind == "fricative":
        voiced = FRICATIVES[phone][1]
        return noise + (0.5 * glottal if voiced else 0.0), voice.filters[phone]
    return glottal + voice.breathiness * noise, voice.filters[phone]


def synthesize(voice: Voice, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """`n_samples` of clean speech (float64, unit power) from this voice."""
    glottal = _glottal_source(voice, n_samples, rng)
    glottal /= np.std(glottal) + 1e-9
    noise = rng.standard_normal(n_samples)
    out = np.zeros(n_samples)
    start = 0
    for phone in _phone_sequence(rng):
        if start >= n_samples:
            break
        length = min(_duration(phone, voice, rng), n_samples - start)
        seg = slice(start, start + length)
        excitation, sos = _excitation(phone, voice, glottal[seg], noise[seg])
        level_db = LEVEL_DB[_phone_class(phone)] + rng.uniform(-3.0, 3.0)
        excitation = excitation / (np.sqrt(np.mean(excitation**2)) + 1e-9) * 10 ** (level_db / 20)
        # Each phone is filtered on its own and its resonances ring into the next (overlap-add).
        end = min(start + length + RING_SAMPLES, n_samples)
        source = np.zeros(end - start)
        source[:length] = excitation * _envelope(length)
        out[start:end] += signal.sosfilt(sos, source)
        start += length
    return out / (np.std(out) + 1e-9)
