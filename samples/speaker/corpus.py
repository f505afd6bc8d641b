"""A deterministic synthetic far-field speaker corpus: training speakers and held-out verification speakers.

`build(config)` synthesises every utterance (voices.py), puts it in a random far-field condition
(farfield.py), computes log-mel features (features.py) and caches the arrays under
samples/speaker/generated/, keyed by a hash of the configuration. The same config always yields the
same bytes: every utterance draws from its own Generator seeded by (seed, split, speaker, utterance).

Toy use:
    corpus = build(CorpusConfig(n_train_speakers=3, train_utterances=2, n_test_speakers=2, test_utterances=2))
    corpus.train_features.shape   # (6, 24, 400): utterances, mel bands, frames
    corpus.test_labels            # [0 0 1 1]: held-out speaker index of each test utterance
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from samples.speaker.farfield import FarField, apply_farfield
from samples.speaker.features import log_mel, samples_for_frames
from samples.speaker.voices import draw_voice, synthesize

GENERATED_DIR = Path(__file__).resolve().parent / "generated"
CORPUS_VERSION = 4
_SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0
    n_train_speakers: int = 60
    train_utterances: int = 20
    train_frames: int = 400
    n_test_speakers: int = 40
    test_utterances: int = 16
    test_frames: int = 300
    farfield: FarField = field(default_factory=FarField)

    def digest(self) -> str:
        text = json.dumps({"version": CORPUS_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Corpus:
    """Features are [utterances, mel bands, frames] float32; labels are speaker indices within the split."""

    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray


def utterance_features(config: CorpusConfig, split: str, speaker: int, utterance: int, n_frames: int) -> np.ndarray:
    """[N_MELS, n_frames] features of one utterance; depends only on its arguments."""
    voice = draw_voice(np.random.default_rng([config.seed, _SPLIT_SEEDS[split], speaker]))
    rng = np.random.default_rng([config.seed, _SPLIT_SEEDS[split], speaker, utterance + 1])
    clean = synthesize(voice, samples_for_frames(n_frames), rng)
    return log_mel(apply_farfield(clean, config.farfield, rng))


def _speaker_features(args: tuple[CorpusConfig, str, int, int, int]) -> np.ndarray:
    config, split, speaker, n_utterances, n_frames = args
    return np.stack([utterance_features(config, split, speaker, u, n_frames) for u in range(n_utterances)])


def _split(config: CorpusConfig, split: str, n_speakers: int, n_utterances: int, n_frames: int, workers: int):
    jobs = [(config, split, speaker, n_utterances, n_frames) for speaker in range(n_speakers)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_speaker = list(pool.map(_speaker_features, jobs))
    else:
        per_speaker = [_speaker_features(job) for job in jobs]
    return np.concatenate(per_speaker), np.repeat(np.arange(n_speakers), n_utterances)


def generate(config: CorpusConfig, workers: int = 1) -> Corpus:
    """Synthesise the whole corpus; `workers` processes share the speakers (the result does not depend on it)."""
    train = _split(config, "train", config.n_train_speakers, config.train_utterances, config.train_frames, workers)
    test = _split(config, "test", config.n_test_speakers, config.test_utterances, config.test_frames, workers)
    return Corpus(*train, *test)


def cache_path(config: CorpusConfig, directory: Path = GENERATED_DIR) -> Path:
    return directory / f"corpus-{config.digest()}.npz"


def build(config: CorpusConfig, directory: Path = GENERATED_DIR, workers: int = 1) -> Corpus:
    """The corpus for `config`, from the cache when present (features stored as float16 to halve the file)."""
    path = cache_path(config, directory)
    if path.exists():
        with np.load(path) as data:
            return Corpus(
                data["train_features"].astype(np.float32),
                data["train_labels"],
                data["test_features"].astype(np.float32),
                data["test_labels"],
            )
    corpus = generate(config, workers)
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(
        partial,
        train_features=corpus.train_features.astype(np.float16),
        train_labels=corpus.train_labels,
        test_features=corpus.test_features.astype(np.float16),
        test_labels=corpus.test_labels,
    )
    partial.replace(path)
    return build(config, directory)
