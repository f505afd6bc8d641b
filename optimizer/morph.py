"""MoLe data morphing (methods.md §5): the data provider's secret matrix and what it does to the data.

The provider pads each sample the way the model's first convolution pads it, flattens it channel-major to a
row vector x of length D, and sends x_m = x @ M for a random invertible D x D matrix M. The model's first
convolution is replaced by the Aug-Conv matrix M⁻¹ @ Toeplitz(conv) (passes/mole.py), so that
x_m @ (M⁻¹ @ C) = x @ C = conv(x): the model sees only morphed data and computes what it computed before.

    key = make_key((1, 8, 8), pads=((1, 1), (1, 1)), seed=7)
    morphed = morph(images, key)             # [N, 100]
    save_key(key, "secret.npz"); key = load_key("secret.npz")

Matrices: "uniform" is the paper's M ~ U[0, 1)^{D x D} (condition number ~1e3 at D = 100, ~1e5 at D = 3468, so
float32 rounding of x_m is amplified that much: use float64 morphed data with it); "orthogonal" is a random
rotation (Haar), condition number 1, exact in float32. kappa > 1 makes M block diagonal: kappa copies of one
random (D/kappa)² block, which makes the Aug-Conv matrix block-sparse and cheaper.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse

from optimizer.errors import UsageError
from optimizer.io_json import write_npz

MatrixKind = Literal["orthogonal", "uniform"]
MATRIX_KINDS: tuple[str, ...] = ("orthogonal", "uniform")
MORPHED_DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass(frozen=True)
class MorphKey:
    """The provider's secret: the morphing matrix and the sample layout it applies to.

    input_name: the model input the key morphs. sample_shape: (C, *spatial) before padding. pads: (before,
    after) per spatial axis, zeros. block: the kappa-times repeated square block of M (M = I_kappa ⊗ block).
    dtype: the element type of morphed samples (the model's new input type).
    """

    input_name: str
    sample_shape: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    kind: MatrixKind
    kappa: int
    block: np.ndarray
    dtype: str = "float32"

    @property
    def padded_shape(self) -> tuple[int, ...]:
        channels, *spatial = self.sample_shape
        return (channels, *(size + before + after for size, (before, after) in zip(spatial, self.pads, strict=True)))

    @property
    def size(self) -> int:
        """D: the length of one morphed sample."""
        return int(np.prod(self.padded_shape))

    def matrix(self) -> np.ndarray:
        return np.kron(np.eye(self.kappa), self.block)

    def inverse(self) -> np.ndarray:
        inverse = self.block.T if self.kind == "orthogonal" else np.linalg.inv(self.block)
        return np.kron(np.eye(self.kappa), inverse)

    def fingerprint(self) -> str:
        """sha256 of the matrix and layout: ties a model built with this key to the key file."""
        digest = hashlib.sha256(np.ascontiguousarray(self.block, dtype=np.float64).tobytes())
        digest.update(repr((self.input_name, self.sample_shape, self.pads, self.kind, self.kappa, self.dtype)).encode())
        return digest.hexdigest()


def make_key(
    input_name: str,
    sample_shape: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    *,
    kind: MatrixKind = "orthogonal",
    kappa: int = 1,
    dtype: str | None = None,
    seed: int | None = None,
) -> MorphKey:
    """A fresh key. dtype None: float32 for orthogonal, float64 for uniform (see the module docstring).
    seed=None draws from the operating system's entropy (a secret key should not be guessable)."""
    if kind not in MATRIX_KINDS:
        raise UsageError(f"morphing matrix {kind!r}: use one of {', '.join(MATRIX_KINDS)}")
    dtype = dtype or ("float64" if kind == "uniform" else "float32")
    if dtype not in MORPHED_DTYPES:
        raise UsageError(f"morphed dtype {dtype!r}: use one of {', '.join(MORPHED_DTYPES)}")
    channels, *spatial = sample_shape
    size = int(np.prod([channels, *(s + a + b for s, (a, b) in zip(spatial, pads, strict=True))]))
    if kappa < 1 or size % kappa:
        raise UsageError(f"kappa={kappa}: must be a positive divisor of the morphed sample length {size}")
    rng = np.random.default_rng(seed)
    side = size // kappa
    if kind == "uniform":
        block = rng.random((side, side))
    else:
        q, r = np.linalg.qr(rng.standard_normal((side, side)))
        block = q * np.sign(np.diag(r))  # the sign fix makes q Haar-distributed
    return MorphKey(input_name, tuple(int(s) for s in sample_shape), tuple((int(a), int(b)) for a, b in pads), kind,
                    kappa, block, dtype)


def morph(samples: np.ndarray, key: MorphKey) -> np.ndarray:
    """[N, *sample_shape] -> [N, D]: pad, flatten channel-major, multiply by M (in float64), cast to key.dtype."""
    samples = np.asarray(samples)
    if tuple(samples.shape[1:]) != key.sample_shape:
        raise UsageError(f"morph: samples of shape {list(samples.shape[1:])} do not match the key's "
                         f"{list(key.sample_shape)} (input {key.input_name!r})")
    padded = np.pad(samples.astype(np.float64), [(0, 0), (0, 0), *key.pads])
    flat = padded.reshape(len(samples), key.kappa, -1)
    return np.einsum("nkd,de->nke", flat, key.block).reshape(len(samples), -1).astype(key.dtype)


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's weight [C_out, C_in/group, *kernel] and how it walks one sample of shape (C, *spatial)."""

    weight: np.ndarray
    sample_shape: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int

    @property
    def padded_spatial(self) -> tuple[int, ...]:
        return tuple(s + a + b for s, (a, b) in zip(self.sample_shape[1:], self.pads, strict=True))

    @property
    def out_spatial(self) -> tuple[int, ...]:
        kernel = self.weight.shape[2:]
        return tuple((p - d * (k - 1) - 1) // s + 1
                     for p, k, s, d in zip(self.padded_spatial, kernel, self.strides, self.dilations, strict=True))


def conv_matrix(conv: ConvGeometry) -> scipy.sparse.csr_matrix:
    """The convolution as a sparse matrix C with conv(x) = x_pad.flatten() @ C, channel-major on both sides.

    Row index: (input channel, padded position); column index: (output channel, output position). Each entry is
    one weight, so C is exact in any precision.
    """
    cout, cin_per_group, *kernel = conv.weight.shape
    padded, out = conv.padded_spatial, conv.out_spatial
    taps = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1).reshape(-1, len(kernel))
    places = np.stack(np.meshgrid(*[np.arange(o) for o in out], indexing="ij"), -1).reshape(-1, len(out))
    position = places[:, None, :] * np.array(conv.strides) + taps[None, :, :] * np.array(conv.dilations)
    position = np.ravel_multi_index(tuple(np.moveaxis(position, -1, 0)), padded)  # [outputs, taps]
    channels_out = np.arange(cout)
    channels_in = (channels_out // (cout // conv.group))[:, None] * cin_per_group + np.arange(cin_per_group)
    rows = channels_in[:, :, None, None] * int(np.prod(padded)) + position[None, None]
    cols = np.broadcast_to((channels_out[:, None] * len(places) + np.arange(len(places)))[:, None, :, None],
                           rows.shape)
    values = np.broadcast_to(conv.weight.reshape(cout, cin_per_group, 1, -1).astype(np.float64), rows.shape)
    shape = (conv.sample_shape[0] * int(np.prod(padded)), cout * len(places))
    return scipy.sparse.csr_matrix((values.ravel(), (rows.ravel(), cols.ravel())), shape=shape)


def aug_conv_matrix(key: MorphKey, conv: ConvGeometry) -> np.ndarray:
    """C_ac = M⁻¹ @ C in float64: morphed samples times C_ac are the convolution's outputs (flattened, no bias)."""
    if key.sample_shape != conv.sample_shape or key.pads != conv.pads:
        raise UsageError(f"the key morphs samples of shape {list(key.sample_shape)} padded "
                         f"{[list(p) for p in key.pads]}; the convolution reads {list(conv.sample_shape)} padded "
                         f"{[list(p) for p in conv.pads]}")
    return np.asarray((conv_matrix(conv).T @ key.inverse().T).T)


def key_arrays(key: MorphKey) -> dict[str, np.ndarray]:
    """The arrays of a key file (.npz), as `save_key` writes them."""
    return {"block": key.block, "input_name": np.array(key.input_name), "sample_shape": np.array(key.sample_shape),
            "kind": np.array(key.kind), "pads": np.array(key.pads, dtype=np.int64).reshape(-1, 2),
            "kappa": np.array(key.kappa), "dtype": np.array(key.dtype)}


def key_bytes(key: MorphKey) -> bytes:
    """The key file's content (.npz): what the mole pass hands the pipeline to write as its key artifact."""
    buffer = io.BytesIO()
    np.savez(buffer, **key_arrays(key))
    return buffer.getvalue()


def save_key(key: MorphKey, path: str | os.PathLike) -> None:
    write_npz(path, key_arrays(key))


def load_key(path: str | os.PathLike | bytes) -> MorphKey:
    """A key from its file, or from the file's bytes (`key_bytes`)."""
    where = "key" if isinstance(path, bytes) else path
    try:
        with np.load(io.BytesIO(path) if isinstance(path, bytes) else path, allow_pickle=False) as data:
            return MorphKey(str(data["input_name"]), tuple(int(s) for s in data["sample_shape"]),
                            tuple((int(a), int(b)) for a, b in data["pads"]), str(data["kind"]),
                            int(data["kappa"]), data["block"].astype(np.float64), str(data["dtype"]))
    except FileNotFoundError:
        raise UsageError(f"{where}: no such key file") from None
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"{where}: not a MoLe key file written by the mole pass ({e})") from None
