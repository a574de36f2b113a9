"""sdort.runtime.randomness against torch: bit-exact CPU generator, Philox known answers.

Every comparison with torch is on bit patterns (shape, dtype and bytes), never a tolerance.
Set SDORT_RANDOM_EXHAUSTIVE=1 to also run the exhaustive check of the float32 kernel (every one
of the 2**24 radius inputs and 2**24 angle inputs through torch itself; about a minute).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdort.runtime.randomness import (
    DEFAULT_SEED,
    cpu_kernel,
    PhiloxGenerator,
    TorchGenerator,
    as_generator,
    philox4x32_10,
    randn_tensor,
)

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = ml_dtypes.bfloat16
DTYPES = [np.float32, np.float64, np.float16, BF16]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16, BF16: torch.bfloat16}
SEEDS = [0, 1, 42, 2**32 - 1, 2**32, 2**32 + 7, 2**63, 2**64 - 1, -1, -42, -(2**63), 0x5DEECE66_1234ABCD]

cpu_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or cpu_kernel() != "avx2",
    reason="these compare the float32 block path with torch's AVX2 kernel",
)


def to_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def assert_same_bits(ours, theirs, what=""):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert ours.dtype == theirs.dtype, (what, ours.dtype, theirs.dtype)
    if not np.array_equal(ours.reshape(-1).view(np.uint8), theirs.reshape(-1).view(np.uint8)):
        a, b = ours.astype(np.float64), theirs.astype(np.float64)
        bad = np.flatnonzero(a.ravel() != b.ravel())
        raise AssertionError(f"{what}: {bad.size} of {a.size} values differ, max |diff| "
                             f"{np.abs(a - b).max():.3g}, first at {bad[:5]}")


def assert_same_state(ours: TorchGenerator, theirs, what=""):
    assert_same_bits(ours.get_state(), theirs.get_state().numpy(), f"state {what}")


def draw_both(ours, theirs, op, shape, dtype):
    if op == "randn":
        return ours.randn(shape, dtype=dtype), to_numpy(torch.randn(shape, generator=theirs, dtype=TORCH_DTYPES[dtype]))
    return ours.rand(shape, dtype=dtype), to_numpy(torch.rand(shape, generator=theirs, dtype=TORCH_DTYPES[dtype]))


# --------------------------------------------------------------------------------------------
# seeding and state
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS + [random.Random(7).getrandbits(64) for _ in range(3)])
def test_manual_seed_state_matches_torch(seed):
    theirs = torch.Generator().manual_seed(seed)
    ours = TorchGenerator(seed)
    assert ours.initial_seed() == theirs.initial_seed()
    assert_same_state(ours, theirs)
    assert ours.manual_seed(seed) is ours
    assert_same_state(ours, theirs)


def test_default_generator_matches_torch():
    ours, theirs = TorchGenerator(), torch.Generator()
    assert ours.initial_seed() == theirs.initial_seed() == DEFAULT_SEED
    assert_same_state(ours, theirs)
    assert_same_bits(*draw_both(ours, theirs, "randn", (40,), np.float32))


def test_seed_out_of_range_rejected_like_torch():
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            torch.Generator().manual_seed(bad)
        with pytest.raises(ValueError):
            TorchGenerator(bad)
    with pytest.raises(TypeError):
        TorchGenerator(1.5)


def test_seed_reseeds_nondeterministically():
    g = TorchGenerator(3)
    s = g.seed()
    assert g.initial_seed() == s
    assert_same_bits(g.randn(20), TorchGenerator(s).randn(20))


# --------------------------------------------------------------------------------------------
# randn / rand: shapes, dtypes, seeds
# --------------------------------------------------------------------------------------------

SHAPES = [(), (0,), (1,), (2,), (3,), (7,), (15,), (16,), (17,), (31,), (32,), (33,), (100,), (1000,),
          (3, 5, 7), (1, 4, 8, 8), (2, 4, 64, 64), (1, 4, 96, 96)]


@cpu_avx2
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_randn_fresh_generators(dtype):
    for seed in SEEDS:
        for shape in SHAPES:
            theirs = torch.Generator().manual_seed(seed)
            ours = TorchGenerator(seed)
            assert_same_bits(*draw_both(ours, theirs, "randn", shape, dtype), f"seed={seed} shape={shape}")
            assert_same_state(ours, theirs, f"seed={seed} shape={shape}")


@cpu_avx2
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=lambda d: np.dtype(d).name)
def test_randn_latents(dtype):
    for seed, shape in [(42, (1, 4, 128, 128)), (2**64 - 1, (4, 4, 128, 128)), (-7, (2, 4, 128, 128)),
                        (1234, (1, 16, 1, 255, 3))]:
        theirs = torch.Generator().manual_seed(seed)
        ours = TorchGenerator(seed)
        for _ in range(2):
            assert_same_bits(*draw_both(ours, theirs, "randn", shape, dtype), f"seed={seed} shape={shape}")
        assert_same_state(ours, theirs)


def test_randn_float64_latent():
    theirs = torch.Generator().manual_seed(99)
    ours = TorchGenerator(99)
    assert_same_bits(*draw_both(ours, theirs, "randn", (1, 4, 64, 64), np.float64))
    assert_same_bits(*draw_both(ours, theirs, "randn", (1, 4, 8, 9), np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_rand(dtype):
    for seed in (0, 2**64 - 1, -3):
        theirs = torch.Generator().manual_seed(seed)
        ours = TorchGenerator(seed)
        for shape in [(1,), (5,), (16,), (1000,), (2, 4, 32, 32)]:
            assert_same_bits(*draw_both(ours, theirs, "rand", shape, dtype), f"seed={seed} shape={shape}")
        assert_same_state(ours, theirs)


def test_half_and_bfloat16_are_not_rounded_float32():
    """float16/bfloat16 draw uniforms block by block: with a tail block they differ from rounding
    the float32 draw (and consume fewer words), as in torch."""
    a = TorchGenerator(5).randn(40, dtype=np.float16)
    b = TorchGenerator(5).randn(40, dtype=np.float32).astype(np.float16)
    assert not np.array_equal(a[24:], b[24:])  # the last 16 come from different uniforms
    assert np.array_equal(a[:24], b[:24])


def test_shape_forms_and_dtype_names():
    a = TorchGenerator(1).randn((2, 3))
    assert_same_bits(TorchGenerator(1).randn(2, 3), a)
    assert_same_bits(TorchGenerator(1).randn([2, 3], dtype="float32"), a)
    assert TorchGenerator(1).randn(4, dtype="bfloat16").dtype == np.dtype(BF16)
    assert TorchGenerator(1).randn(4, dtype="half").dtype == np.float16
    assert TorchGenerator(1).randn(()).shape == ()
    with pytest.raises(TypeError):
        TorchGenerator(1).randn(4, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# sequences of calls: the cached normal, state advance across sizes and dtypes
# --------------------------------------------------------------------------------------------

SEQ_SIZES = [0, 1, 2, 3, 5, 8, 11, 15, 16, 17, 23, 32, 33, 48, 100, 257, 311, 623, 624, 625,
             1000, 1247, 1248, 1249, 4097, 16387]


def random_ops(rng, count):
    ops = []
    for _ in range(count):
        n = rng.choice(SEQ_SIZES)
        shape = (n,) if rng.random() < 0.5 or n < 4 else ((n // 4, 4) if n % 4 == 0 else (1, n))
        ops.append(("rand" if rng.random() < 0.15 else "randn", shape, rng.choice(DTYPES)))
    return ops


@cpu_avx2
@pytest.mark.parametrize("seed", [0, 2**32 + 1, -99, 0xFEEDFACE_CAFEBEEF])
def test_mixed_call_sequence(seed):
    rng = random.Random(seed & 0xFFFF)
    theirs = torch.Generator().manual_seed(seed)
    ours = TorchGenerator(seed)
    for i, (op, shape, dtype) in enumerate(random_ops(rng, 70)):
        what = f"call {i}: {op}{shape} {np.dtype(dtype).name}"
        assert_same_bits(*draw_both(ours, theirs, op, shape, dtype), what)
        assert_same_state(ours, theirs, what)


def test_cached_normal_survives_between_calls():
    theirs = torch.Generator().manual_seed(11)
    ours = TorchGenerator(11)
    for shape, dtype in [((3,), np.float32), ((64,), np.float32), ((1,), np.float64), ((2,), np.float16),
                         ((1,), BF16), ((5,), np.float32)]:
        assert_same_bits(*draw_both(ours, theirs, "randn", shape, dtype), str(shape))
        assert_same_state(ours, theirs, str(shape))
    # odd count leaves a cached sample; manual_seed clears it
    ours.randn(1)
    assert ours.get_state()[5040] == 1
    ours.manual_seed(11)
    assert ours.get_state()[5040] == 0


# --------------------------------------------------------------------------------------------
# get_state / set_state, both ways
# --------------------------------------------------------------------------------------------

@cpu_avx2
def test_state_from_torch_to_ours_and_back():
    theirs = torch.Generator().manual_seed(2024)
    torch.randn(1003, generator=theirs)
    torch.randn(3, generator=theirs)  # leaves a cached normal
    state = theirs.get_state()

    ours = TorchGenerator().set_state(state)  # a torch tensor
    assert_same_state(ours, theirs)
    assert ours.initial_seed() == 2024
    for source in (state.numpy(), bytes(state.numpy()), ours.get_state()):
        assert_same_bits(TorchGenerator(5).set_state(source).get_state(), state.numpy())

    rng = random.Random(3)
    for i, (op, shape, dtype) in enumerate(random_ops(rng, 25)):
        assert_same_bits(*draw_both(ours, theirs, op, shape, dtype), f"call {i}")

    # ours -> torch, in the middle of a block and with a cached normal
    ours.randn(7)
    back = torch.Generator().set_state(torch.from_numpy(ours.get_state()))
    assert_same_state(ours, back)
    for i, (op, shape, dtype) in enumerate(random_ops(rng, 25)):
        assert_same_bits(*draw_both(ours, back, op, shape, dtype), f"call {i} after set_state")


def test_clone_is_independent():
    g = TorchGenerator(8)
    g.randn(5)
    c = g.clone()
    assert_same_bits(c.randn(100), g.randn(100))
    c.randn(3)
    assert not np.array_equal(c.get_state(), g.get_state())


def test_invalid_states_rejected():
    good = TorchGenerator(1).get_state()
    with pytest.raises(ValueError):
        TorchGenerator().set_state(good[:-1])
    bad = good.copy()
    bad[8:12] = np.frombuffer(np.int32(0).tobytes(), np.uint8)  # left = 0
    with pytest.raises(ValueError):
        TorchGenerator().set_state(bad)
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(torch.from_numpy(bad))
    with pytest.raises(TypeError):
        TorchGenerator().set_state(good.astype(np.float32))


# --------------------------------------------------------------------------------------------
# the float32 kernel on chosen uniforms, fed through crafted engine states
# --------------------------------------------------------------------------------------------

def untemper(y):
    """Inverse of mt19937's output tempering."""
    y = np.asarray(y, np.uint32).copy()
    y ^= y >> np.uint32(18)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    t = y.copy()
    for _ in range(5):
        t = y ^ ((t << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = t
    t = y.copy()
    for _ in range(3):
        t = y ^ (t >> np.uint32(11))
    return t


_TEMPLATE = TorchGenerator(0).get_state()


def crafted_state(words):
    """A state whose next len(words) <= 623 outputs are ``words``."""
    state = _TEMPLATE.copy()
    rec = state.view(np.uint8)
    key = np.frombuffer(rec[24:24 + 624 * 8].tobytes(), "<u8").copy()
    key[:len(words)] = untemper(words)
    rec[24:24 + 624 * 8] = np.frombuffer(key.tobytes(), np.uint8)
    rec[8:12] = np.frombuffer(np.int32(624).tobytes(), np.uint8)  # left
    rec[16:24] = np.frombuffer(np.uint64(0).tobytes(), np.uint8)  # next
    return state


def test_untemper_inverts_tempering():
    from sdort.runtime.randomness.mt19937 import temper
    w = np.random.default_rng(0).integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32)
    assert np.array_equal(temper(untemper(w)), w)


def edge_words():
    """24-bit uniforms where the kernel's branches and roundings change."""
    top = 1 << 24
    radius = [0, 1, 2, 3, top - 1, top - 2, top // 2, top // 2 - 1, top // 2 + 1, top // 4, 3 * top // 4]
    radius += [top - int(0.70710677 * top) + d for d in range(-3, 4)]  # the sqrt(0.5) branch point
    radius += [top - (top >> s) + d for s in range(1, 24) for d in (-1, 0, 1)]
    angle = [0, 1, top - 1, top - 2, top // 2, top // 4, 3 * top // 4]
    angle += [int(j * top / 8) + d for j in range(1, 8) for d in range(-3, 4)]
    rng = np.random.default_rng(1)
    blocks = []
    for i in range(0, max(len(radius), len(angle)), 8):
        r = (radius[i:i + 8] + [5] * 8)[:8]
        a = (angle[i:i + 8] + [9] * 8)[:8]
        blocks.append(r + a)
    w = np.array(blocks, dtype=np.uint64) | (rng.integers(0, 256, (len(blocks), 16), dtype=np.uint64) << 24)
    return w.astype(np.uint32).reshape(-1)


@cpu_avx2
def test_kernel_on_edge_and_random_uniforms():
    rng = np.random.default_rng(123)
    streams = [edge_words()] + [rng.integers(0, 2**32, 608, dtype=np.uint64).astype(np.uint32) for _ in range(60)]
    for dtype in (np.float32, np.float16):
        for words in streams:
            n = len(words) - len(words) % 16
            state = crafted_state(words[:n])
            theirs = torch.Generator().set_state(torch.from_numpy(state))
            ours = TorchGenerator().set_state(state)
            assert_same_bits(*draw_both(ours, theirs, "randn", (n,), dtype))


@pytest.mark.skipif(not os.environ.get("SDORT_RANDOM_EXHAUSTIVE"), reason="set SDORT_RANDOM_EXHAUSTIVE=1")
@cpu_avx2
def test_kernel_exhaustive():
    """All 2**24 radius inputs (angle 0, so outputs are the radii), then all 2**24 angle inputs with
    a radius input whose radius is exactly 1 (so outputs are the cosines and sines)."""
    from sdort.runtime.randomness.avx2_kernel import box_muller_f32
    k = np.arange(1 << 24, dtype=np.uint32).reshape(-1, 8)
    per_call = 38  # 608 words
    radius_one = None
    for lanes in ("radius", "angle"):
        blocks = np.zeros((k.shape[0], 16), np.uint32)
        if lanes == "radius":
            blocks[:, :8] = k
        else:
            blocks[:, 8:] = k
            blocks[:, :8] = radius_one
        ours = box_muller_f32(blocks)
        for i in range(0, blocks.shape[0], per_call):
            chunk = blocks[i:i + per_call].reshape(-1)
            theirs = torch.Generator().set_state(torch.from_numpy(crafted_state(chunk)))
            t = torch.randn(chunk.size, generator=theirs).numpy()
            assert np.array_equal(t.view(np.uint32), ours[i:i + per_call].reshape(-1).view(np.uint32)), (lanes, i)
        if lanes == "radius":
            radius_one = int(np.flatnonzero(ours[:, :8].reshape(-1) == 1.0)[0])


def test_default_kernel_matches_torch_without_avx2():
    """torch's scalar kernel (ATEN_CPU_CAPABILITY=default, as on CPUs without AVX2 and aarch64)."""
    code = textwrap.dedent("""
        import numpy as np, torch, ml_dtypes
        from sdort.runtime.randomness import TorchGenerator, cpu_kernel
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        assert cpu_kernel() == "default"
        dts = {np.float32: torch.float32, np.float16: torch.float16, ml_dtypes.bfloat16: torch.bfloat16}
        for seed in (0, 2**64 - 1, -5):
            theirs = torch.Generator().manual_seed(seed)
            ours = TorchGenerator(seed)
            assert ours.kernel == "default"
            for shape in ((16,), (17,), (1000,), (2, 4, 64, 64), (5,), (1, 4, 96, 96)):
                for dt, tdt in dts.items():
                    t = torch.randn(shape, generator=theirs, dtype=tdt)
                    t = t.view(torch.int16).numpy() if tdt is torch.bfloat16 else t.numpy()
                    a = ours.randn(shape, dtype=dt)
                    assert np.array_equal(a.view(np.uint8), t.view(np.uint8)), (seed, shape, dt)
            assert np.array_equal(ours.get_state(), theirs.get_state().numpy())
        print("ok")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_kernels_differ_only_in_last_bits():
    a = TorchGenerator(3, kernel="avx2").randn(1, 4, 64, 64)
    b = TorchGenerator(3, kernel="default").randn(1, 4, 64, 64)
    assert not np.array_equal(a, b)
    assert np.abs(a - b).max() < 3e-6
    with pytest.raises(ValueError):
        TorchGenerator(3, kernel="sse")


# --------------------------------------------------------------------------------------------
# no torch at runtime
# --------------------------------------------------------------------------------------------

def test_module_works_without_torch():
    code = textwrap.dedent("""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from sdort.runtime.randomness import TorchGenerator, PhiloxGenerator, as_generator
        a = TorchGenerator(42).randn((1, 4, 8, 8))
        b = as_generator([3, 4])
        c = PhiloxGenerator(0).randn(5)
        d = TorchGenerator(1).randn(3, dtype="bfloat16")
        assert "torch" not in sys.modules
        sys.stdout.write(a.tobytes().hex() + " " + c.tobytes().hex())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    a_hex, c_hex = out.stdout.split()
    assert a_hex == TorchGenerator(42).randn((1, 4, 8, 8)).tobytes().hex()
    assert c_hex == PhiloxGenerator(0).randn(5).tobytes().hex()


# --------------------------------------------------------------------------------------------
# as_generator and randn_tensor
# --------------------------------------------------------------------------------------------

def test_as_generator():
    assert as_generator(None) is None
    g = TorchGenerator(3)
    p = PhiloxGenerator(3)
    n = np.random.default_rng(3)
    assert as_generator(g) is g and as_generator(p) is p and as_generator(n) is n
    conv = as_generator([1, g, np.int64(5), None])
    assert isinstance(conv, list) and conv[1] is g and conv[3] is None
    assert conv[0].initial_seed() == 1 and conv[2].initial_seed() == 5
    assert isinstance(as_generator((1, 2)), list)
    with pytest.raises(TypeError):
        as_generator("42")
    with pytest.raises(TypeError):
        as_generator(1.0)


def test_as_generator_copies_torch_generators():
    theirs = torch.Generator().manual_seed(77)
    torch.randn(5, generator=theirs)
    ours = as_generator(theirs)
    assert isinstance(ours, TorchGenerator)
    assert_same_bits(*draw_both(ours, theirs, "randn", (1, 4, 8, 8), np.float32))


@cpu_avx2
def test_randn_tensor_matches_diffusers_semantics():
    shape = (3, 4, 16, 16)
    # one generator for the batch
    ours = randn_tensor(shape, generator=as_generator(42), dtype=np.float32)
    theirs = torch.randn(shape, generator=torch.Generator().manual_seed(42))
    assert_same_bits(ours, theirs.numpy())
    # one generator per image: each draws shape (1, ...)
    seeds = [1, 2**40, -5]
    ours = randn_tensor(shape, generator=as_generator(seeds), dtype=np.float16)
    theirs = torch.cat([torch.randn((1,) + shape[1:], generator=torch.Generator().manual_seed(s),
                                    dtype=torch.float16) for s in seeds])
    assert_same_bits(ours, theirs.numpy())


# --------------------------------------------------------------------------------------------
# PhiloxGenerator (torch CUDA): known answers and published outputs
# --------------------------------------------------------------------------------------------

# Random123 kat_vectors, philox4x32 10: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(np.asarray(v)) for v in philox4x32_10(counter, key)) == expected


def test_philox_vectorised_matches_scalar():
    rng = np.random.default_rng(5)
    ctr = rng.integers(0, 2**32, (4, 100), dtype=np.uint64).astype(np.uint32)
    out = philox4x32_10(tuple(ctr), (0xDEADBEEF, 0x12345678))
    for i in (0, 17, 99):
        one = philox4x32_10(tuple(int(c[i]) for c in ctr), (0xDEADBEEF, 0x12345678))
        assert tuple(int(np.asarray(v)) for v in one) == tuple(int(v[i]) for v in out)


# torch.manual_seed(0); x = torch.randn(8, 8, device="cuda"); y = torch.randn(8, 8, device="cuda");
# b = torch.randn(8, device="cuda"); relu(x + 0.5 * y + b), as printed in kapilsh/cuda-mode-lecture
# (README, "[TRITON] Fused Mul Add Relu").
CUDA_SEED0_X = np.array([
    [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
    [-1.0745, -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820],
    [-0.1271, 1.2169, 1.4353, 1.0605, -0.4941, -1.4244, -0.7244, -1.2973],
    [0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373, 1.3506, -0.2879],
    [-0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150],
    [0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554],
    [-0.1836, 0.3824, 0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863],
    [-0.5499, -0.3231, -0.5469, 0.9049, 0.2837, 0.1210, 0.4730, -1.0823]])
CUDA_SEED0_RELU = np.array([
    [1.7098e+00, 0, 0, 0, 6.7049e-01, 0, 3.4424e-01, 1.1223e-02],
    [1.8750e+00, 0, 0, 2.2105e+00, 6.6808e-01, 0, 1.8445e+00, 1.9246e+00],
    [2.2614e+00, 1.3964e+00, 5.1802e-01, 2.0114e+00, 0, 0, 2.7715e-01, 0],
    [2.4750e+00, 0, 1.9079e+00, 5.4869e-01, 3.7923e-01, 0, 3.1791e+00, 6.6843e-01],
    [1.8234e+00, 0, 1.1147e-01, 0, 0, 0, 2.4250e+00, 3.2593e+00],
    [2.2903e+00, 0, 1.1721e+00, 6.9331e-01, 1.0583e+00, 6.7518e-01, 0, 2.6185e-01],
    [1.5804e+00, 0, 9.0740e-01, 1.6670e-01, 5.5230e-02, 0, 1.5325e+00, 3.5984e-01],
    [1.5554e+00, 0, 0, 9.4380e-01, 2.9795e-03, 7.4125e-02, 1.6286e+00, 0]])


def test_philox_published_cuda_outputs_seed0_three_calls():
    g = PhiloxGenerator(0)
    x = g.randn(8, 8)
    assert g.get_offset() == 4
    np.testing.assert_allclose(x, CUDA_SEED0_X, atol=5.1e-5, rtol=0)
    y, b = g.randn(8, 8), g.randn(8)
    assert g.get_offset() == 12
    np.testing.assert_allclose(np.maximum(x + 0.5 * y + b, 0), CUDA_SEED0_RELU, rtol=5.1e-5, atol=5.1e-7)


def test_philox_published_cuda_outputs_seed42():
    # flashinfer-ai/flashinfer (LogitsPipe docstring): torch.manual_seed(42); torch.randn(2, 5, device="cuda")
    expected = [[0.1940, 2.1614, -0.1721, 0.8491, -1.9244], [0.6530, -0.6494, -0.8175, 0.5280, -1.2753]]
    np.testing.assert_allclose(PhiloxGenerator(42).randn(2, 5), expected, atol=5.1e-5, rtol=0)
    # values printed in a public torch._foreach_sub reproduction script: six successive
    # torch.randn(4, device="cuda") draws after seeding 42 (the offset advances by 4 per call)
    expected = [[0.1940, 2.1614, -0.1721, 0.8491], [0.1391, -0.1082, -0.7174, 0.7566],
                [-0.5187, 1.2268, 0.6255, -0.9117], [-0.6974, -1.8688, -0.8832, -1.6627],
                [-1.2682, -0.0383, -0.1029, 1.4400], [1.4640, -0.3238, 0.7740, 1.5892]]
    g = PhiloxGenerator(42)
    np.testing.assert_allclose([g.randn(4) for _ in range(6)], expected, atol=5.1e-5, rtol=0)
    assert g.get_offset() == 24


def test_philox_published_large_tensor_grid_stride():
    # torch.manual_seed(42); torch.randn((1823, 781), device="cuda")[0:10]: corners as printed in a
    # public Triton softmax example. 1.4M elements exceed every GPU's grid cap, so the grid-stride
    # loop runs several iterations per thread; the first rows are the first normal of threads 0..
    expected = {0: [0.1940, 2.1614, -0.1721, -0.8353, -1.6443, 0.1315],
                1: [-0.1797, 0.9744, -2.0136, 0.0543, 0.2508, -0.2370],
                2: [1.1266, 1.5895, 0.1072, -0.4797, 1.4313, 1.7260],
                7: [1.9695, 0.5996, 0.5583, -0.0692, 2.9254, 0.9274],
                8: [-1.7301, 1.2562, -1.2144, -0.4262, -2.0327, -1.0277],
                9: [-0.2987, 0.1946, 1.1640, -0.2081, -1.0439, 0.7082]}
    g = PhiloxGenerator(42, max_blocks=108 * 8)
    x = g.randn(1823, 781)
    assert g.get_offset() == 4 * -(-1823 * 781 // (256 * 864 * 4))
    for row, vals in expected.items():
        np.testing.assert_allclose(x[row, [0, 1, 2, 778, 779, 780]], vals, atol=5.1e-5, rtol=0)


def _reference_cuda_randn(seed, offset, n, max_blocks, unroll, double=False):
    """The grid-stride kernel written as loops over threads and iterations."""
    grid = min(-(-n // 256), max_blocks)
    stride = 256 * grid
    out = np.full(n, np.nan)
    iters = (n - 1) // (stride * unroll) + 1
    for t in range(stride):
        for k in range(iters):
            ctr = offset // 4 + k
            x = [int(np.asarray(v)) for v in philox4x32_10(
                (ctr & 0xFFFFFFFF, ctr >> 32, t & 0xFFFFFFFF, t >> 32), (seed & 0xFFFFFFFF, seed >> 32))]
            if double:
                u = ((x[0] ^ (x[1] << 21)) * 2.0**-53) + 2.0**-54
                v = ((x[2] ^ (x[3] << 21)) * 2.0**-52) + 2.0**-53
                r = np.sqrt(-2 * np.log(u))
                vals = [r * np.sin(np.pi * v), r * np.cos(np.pi * v)]
            else:
                vals = []
                for a, b in ((x[0], x[1]), (x[2], x[3])):
                    u = np.float32(np.float64(np.float32(a)) * 2.0**-32 + 2.0**-33)
                    c = np.float64(np.float32(np.float32(2.3283064e-10) * np.float32(6.2831855)))
                    v = np.float64(np.float32(np.float64(np.float32(b)) * c + c / 2))
                    r = np.sqrt(-2 * np.log(np.float64(u)))
                    vals += [r * np.sin(v), r * np.cos(v)]
            for ii in range(unroll):
                li = t + k * stride * unroll + ii * stride
                if li < n:
                    out[li] = vals[ii]
    return out


@pytest.mark.parametrize("n,max_blocks", [(1000, 1), (3000, 2), (700, None)])
def test_philox_grid_stride_layout(n, max_blocks):
    g = PhiloxGenerator(123456789, max_blocks=max_blocks)
    g.set_offset(8)
    ours = g.randn(n)
    ref = _reference_cuda_randn(123456789, 8, n, max_blocks or 10**9, 4)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-6)
    grid = min(-(-n // 256), max_blocks or 10**9)
    assert g.get_offset() == 8 + 4 * ((n - 1) // (256 * grid * 4) + 1)
    g = PhiloxGenerator(77, max_blocks=max_blocks)
    ours = g.randn(n, dtype=np.float64)
    ref = _reference_cuda_randn(77, 0, n, max_blocks or 10**9, 2, double=True)
    np.testing.assert_allclose(ours, ref, atol=1e-12, rtol=0)


def test_philox_state_and_dtypes():
    g = PhiloxGenerator(-1)
    assert g.initial_seed() == 2**64 - 1
    g.randn(10)
    state = g.get_state()
    assert state.dtype == np.uint8 and state.size == 16
    assert int(state[:8].view("<u8")[0]) == 2**64 - 1 and int(state[8:].view("<i8")[0]) == 4
    h = PhiloxGenerator().set_state(state)
    assert_same_bits(h.randn(50), g.randn(50))
    assert g.manual_seed(5) is g and g.get_offset() == 0
    half = PhiloxGenerator(5).randn(300, dtype=np.float16)
    assert_same_bits(half, PhiloxGenerator(5).randn(300).astype(np.float16))
    bf = PhiloxGenerator(5).randn(300, dtype=BF16)
    assert_same_bits(bf, PhiloxGenerator(5).randn(300).astype(BF16))
    u = PhiloxGenerator(5).rand(1000)
    assert u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert PhiloxGenerator(5).rand(10, dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError):
        g.set_offset(3)
