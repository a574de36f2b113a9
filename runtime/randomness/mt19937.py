"""The mt19937 engine of torch's CPU generator (ATen/core/MT19937RNGEngine.h) and torch's state bytes.

torch seeds the engine with the low 32 bits of the seed (Knuth's initialisation of the 624-word
state) and reads it as ``random()`` does: a word is tempered on the way out, and the state is
regenerated (twisted) when it runs out. ``left`` and ``next`` are torch's two counters: ``next``
is the read position, and the state is regenerated before a read when ``left`` has come down to 1.
A freshly seeded engine has ``left = 1``, so its first read regenerates.

``get_state()`` of a ``torch.Generator("cpu")`` is a ``CPUGeneratorImplState`` (CPUGeneratorImpl.cpp):
the seed, the engine's counters and words, and the normal samples the generator keeps for its
next call. ``pack_state`` and ``unpack_state`` write and read those 5056 bytes.
"""

from __future__ import annotations

import numpy as np

from .common import U32, U64, as_state_bytes

N = 624  # words of state
_M = 397
_MATRIX_A = U32(0x9908B0DF)
_UPPER = U32(0x80000000)
_LOWER = U32(0x7FFFFFFF)


def init_key(seed32: int) -> np.ndarray:
    """Knuth's initialisation of the 624-word state from a 32-bit seed."""
    key = [0] * N
    x = seed32 & 0xFFFFFFFF
    key[0] = x
    for j in range(1, N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        key[j] = x
    return np.array(key, dtype=U32)


def twist(key: np.ndarray) -> np.ndarray:
    """One regeneration of the state, vectorised.

    Word i becomes ``key[i + 397] ^ twist(key[i], key[i + 1])`` where indices past the end wrap to
    words already regenerated; 227 = 624 - 397 words can be computed at once.
    """
    old = key
    new = np.empty_like(old)
    y = (old[:-1] & _UPPER) | (old[1:] & _LOWER)
    t = (y >> U32(1)) ^ ((old[1:] & U32(1)) * _MATRIX_A)
    k = N - _M  # 227
    new[:k] = old[_M:] ^ t[:k]
    new[k:2 * k] = new[:k] ^ t[k:2 * k]
    new[2 * k:N - 1] = new[k:_M - 1] ^ t[2 * k:]
    y_last = (int(old[-1]) & 0x80000000) | (int(new[0]) & 0x7FFFFFFF)
    new[-1] = int(new[_M - 1]) ^ (y_last >> 1) ^ (0x9908B0DF if int(new[0]) & 1 else 0)
    return new


def temper(y: np.ndarray) -> np.ndarray:
    """mt19937's output function, applied to state words as they are read."""
    y = y ^ (y >> U32(11))
    y ^= (y << U32(7)) & U32(0x9D2C5680)
    y ^= (y << U32(15)) & U32(0xEFC60000)
    y ^= y >> U32(18)
    return y


class MT19937:
    """torch's engine: the 624 state words ``key`` and the counters ``left`` and ``next``."""

    def __init__(self, key: np.ndarray, left: int, next_: int):
        self.key = key
        self.left = left
        self.next = next_
        self._bitgen = None

    @classmethod
    def seeded(cls, seed32: int) -> "MT19937":
        return cls(init_key(seed32), 1, 0)

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs, as torch's ``random()`` would return them."""
        out = np.empty(n, dtype=U32)
        k = min(n, self.left - 1)  # words left before torch regenerates the state
        if k > 0:
            if self.next + k > N:
                raise RuntimeError("mt19937 state is inconsistent (next + left > 625); torch would read "
                                   "past its state array here")
            out[:k] = temper(self.key[self.next:self.next + k])
            self.next += k
            self.left -= k
        rest = n - k
        if rest <= 0:
            return out
        if rest <= 2 * N:
            pos = k
            while rest > 0:
                self.key = twist(self.key)
                take = min(rest, N)
                out[pos:pos + take] = temper(self.key[:take])
                pos += take
                rest -= take
                self.next = take
                self.left = N + 1 - take
            return out
        # Long draws: numpy's MT19937 bit generator runs the same recurrence and tempering in C.
        # Its state is the 624 words and a read position; position 624 means "regenerate before
        # the next read", which is where torch stands now.
        if self._bitgen is None:
            self._bitgen = np.random.MT19937()
        bg = self._bitgen
        bg.state = {"bit_generator": "MT19937", "state": {"key": self.key, "pos": N}}
        out[k:] = bg.random_raw(rest)
        st = bg.state["state"]
        self.key = np.asarray(st["key"], dtype=U32).copy()
        self.next = int(st["pos"])
        self.left = N + 1 - self.next
        return out


# torch's CPUGeneratorImplState, 5056 bytes on LP64 platforms
_STATE_DTYPE = np.dtype({
    "names": ["seed", "left", "seeded", "next", "state", "normal_x", "normal_y", "normal_rho",
              "normal_is_valid", "next_float", "next_float_valid"],
    "formats": ["<u8", "<i4", "<i4", "<u8", ("<u8", (N,)), "<f8", "<f8", "<f8", "<i4", "<f4", "u1"],
    "offsets": [0, 8, 12, 16, 24, 5016, 5024, 5032, 5040, 5048, 5052],
    "itemsize": 5056,
})
STATE_SIZE = _STATE_DTYPE.itemsize


def pack_state(seed: int, engine: MT19937, next_double: float | None, next_float: float | None) -> np.ndarray:
    """torch's ``get_state()`` bytes (a uint8 array of 5056 bytes). ``next_double`` and
    ``next_float`` are the cached normals (None: none cached)."""
    rec = np.zeros((), dtype=_STATE_DTYPE)
    rec["seed"] = seed
    rec["left"] = engine.left
    rec["seeded"] = 1
    rec["next"] = engine.next
    rec["state"] = engine.key.astype(U64)
    if next_double is not None:
        rec["normal_is_valid"] = 1
        rec["normal_y"] = next_double
    if next_float is not None:
        rec["next_float_valid"] = 1
        rec["next_float"] = next_float
    return np.frombuffer(rec.tobytes(), dtype=np.uint8).copy()


def unpack_state(new_state):
    """Read ``get_state()`` bytes (sdort's or torch's): returns (seed, engine, next_double, next_float)."""
    arr = as_state_bytes(new_state, STATE_SIZE)
    rec = arr.view(_STATE_DTYPE)[0]
    left, seeded, nxt = int(rec["left"]), int(rec["seeded"]), int(rec["next"]) & 0xFFFFFFFF
    if not (seeded != 0 and 0 < left <= N and nxt <= N):
        raise ValueError("Invalid mt19937 state")
    engine = MT19937(rec["state"].astype(U32), left, nxt)  # torch copies the uint64 words into uint32
    next_double = float(rec["normal_y"]) if int(rec["normal_is_valid"]) else None
    next_float = float(rec["next_float"]) if int(rec["next_float_valid"]) else None
    return int(rec["seed"]), engine, next_double, next_float
