"""DDAD's per-image noise without torch: the seed from the image's content, and the Gaussian draws that
``torch.randn`` makes from a CPU generator seeded with it.

torch's CPU generator is the 32-bit Mersenne Twister (MT19937) seeded by ``init_genrand`` with the low
32 bits of the seed; numpy's legacy MT19937 seeding is the same, so the raw streams are equal. A float32
``randn`` of n >= 16 values takes n uniforms u = (r & 0xFFFFFF) / 2^24 from the stream and turns each block
of 16 into normals by Box-Muller, pairing u[j] with u[j + 8] (j < 8):

    z[j] = sqrt(-2 log(1 - u[j])) cos(2 pi u[j + 8]),   z[j + 8] = sqrt(-2 log(1 - u[j])) sin(2 pi u[j + 8])

and where n is not a multiple of 16 the last 16 values are made again from 16 fresh uniforms. torch evaluates
log, cos and sin with its own vector library: the values agree to a few float32 roundings (about 1e-7
relative), well inside the 1e-4 the exported models are held to.
"""

from __future__ import annotations

import hashlib

import numpy as np


def image_seed(image: np.ndarray, seed: int) -> int:
    """A per-image noise seed from the image's content (its float32 bytes) and the run's seed: the same image
    gets the same noise in ``ddad test``, ``ddad predict`` and an exported model, alone or in any batch."""
    data = np.ascontiguousarray(image, dtype=np.float32).tobytes()
    digest = hashlib.blake2b(data, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _box_muller(blocks: np.ndarray) -> np.ndarray:
    """(k, 16) uniforms in [0, 1) -> (k, 16) standard normals, as torch pairs them."""
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - blocks[:, :8]))
    theta = np.float32(2.0 * np.pi) * blocks[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def torch_randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normals of ``shape`` as ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``
    draws them on a CPU (module docstring); at least 16 values."""
    n = int(np.prod(shape))
    if n < 16:
        raise ValueError(f"torch draws fewer than 16 normals another way; {shape} holds {n}")
    generator = np.random.MT19937(0)
    generator._legacy_seeding(int(seed) & 0xFFFFFFFF)  # init_genrand(seed & 0xFFFFFFFF), as torch seeds it
    extra = 16 if n % 16 else 0
    raw = generator.random_raw(n + extra).astype(np.uint32)
    uniform = ((raw & np.uint32(0xFFFFFF)).astype(np.float64) * 2.0 ** -24).astype(np.float32)
    out = uniform[:n].copy()
    full = n // 16 * 16
    out[:full] = _box_muller(out[:full].reshape(-1, 16)).ravel()
    if extra:
        out[n - 16:] = _box_muller(uniform[n:].reshape(1, 16)).ravel()
    return out.reshape(shape)
