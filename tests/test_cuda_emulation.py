"""The project's CUDA kernels run on the CPU under the CUDA emulation
(tests/cuda_emu/cuda_emu.h, harness in tests/cuda_emu/): first the emulator's own
tests (tensor-core fragments, warp collectives, barriers, atomics, kernels that
break the rules, planted races, the counters), then the project's kernels against
the counter targets. Each op's kernels have their own file:
tests/test_<op>_cuda_emulation.py."""

import contextlib
import math

import pytest
import torch

import cuda_emu

pytestmark = cuda_emu.requires_emulation


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ================================================================ the emulator itself

# ---------------------------------------------------------------- tensor cores: cp.async, ldmatrix, mma


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_nk", [False, True], ids=["B_kn_ldmatrix_trans", "B_nk_ldmatrix"])
def test_mma_matmul_equals_matmul(emu, dtype, b_nk):
    # Small integers: every product and sum is exact, so any fragment-layout error shows as a mismatch.
    g = _gen(0)
    m, n, k = 128, 64, 96  # 2 x 2 blocks of 4 warps, 3 k-tiles
    a = torch.randint(-8, 9, (m, k), generator=g).to(dtype)
    b = torch.randint(-8, 9, (k, n), generator=g).to(dtype)
    c = emu.selftest_mma_matmul(a, b.t().contiguous() if b_nk else b, b_nk)
    assert torch.equal(c, a.double().matmul(b.double()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_matmul_random_values(emu, dtype):
    g = _gen(1)
    a = torch.randn(64, 64, generator=g).to(dtype)
    b = torch.randn(64, 32, generator=g).to(dtype)
    c = emu.selftest_mma_matmul(a, b, False)
    torch.testing.assert_close(c.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-5)


def test_mma_fragment_layout_single_element(emu):
    # One non-zero per operand pins each fragment register to its (row, col): C[i, j] = A[i, p] * B[p, j].
    for i, p in [(0, 0), (15, 15), (9, 3), (6, 12), (13, 8), (63, 31), (40, 17)]:
        a = torch.zeros(64, 32, dtype=torch.bfloat16)
        b = torch.zeros(32, 32, dtype=torch.bfloat16)
        a[i, p] = 2.0
        b[p, :] = torch.arange(1, 33, dtype=torch.bfloat16)
        c = emu.selftest_mma_matmul(a, b, False)
        expected = torch.zeros(64, 32)
        expected[i, :] = 2.0 * torch.arange(1, 33, dtype=torch.float32)
        assert torch.equal(c, expected), (i, p)


def test_pack_16bit(emu):
    x = torch.randn(256, generator=_gen(2)) * 100
    x[:4] = torch.tensor([1.0 + 2**-9, -3.0 - 2**-12, 65504.0, 1e-8])  # rounding, f16 max, subnormal
    words = emu.selftest_pack(x).long() & 0xFFFFFFFF

    def packed(t):
        bits = t.view(torch.int16).long() & 0xFFFF
        return bits[0::2] | (bits[1::2] << 16)

    assert torch.equal(words[0::2], packed(x.bfloat16()))
    assert torch.equal(words[1::2], packed(x.half()))


# ---------------------------------------------------------------- warp collectives, barriers, atomics


def _butterfly(v):  # __shfl_xor_sync sum in the kernel's float32 order
    lane = torch.arange(32)
    s = v.clone()
    for off in (16, 8, 4, 2, 1):
        s = s + s[lane ^ off]
    return s


@pytest.mark.parametrize("blocks, block", [(2, (64, 2, 1)), (3, (32, 1, 3))])
def test_warp_collectives_barriers_atomics(emu, blocks, block):
    nthreads = block[0] * block[1] * block[2]
    total = blocks * nthreads
    x = torch.rand(total, generator=_gen(3)) * 6 - 3
    out, totals = emu.selftest_warp_ops(x, blocks, list(block))
    lane = torch.arange(32)
    for b in range(blocks):
        xb = x[b * nthreads:(b + 1) * nthreads]
        partial = []
        for w in range(nthreads // 32):
            v = xb[32 * w:32 * (w + 1)]
            o = out[b * nthreads + 32 * w:b * nthreads + 32 * (w + 1)]
            assert torch.equal(o[:, 0], v[(lane * 7 + 3) % 32])
            assert torch.equal(o[:, 1], torch.where(lane >= 3, v[(lane - 3).clamp(min=0)], v))
            assert torch.equal(o[:, 2], torch.where(lane + 5 < 32, v[(lane + 5).clamp(max=31)], v))
            assert torch.equal(o[:, 3], v[lane ^ 9])
            assert torch.equal(o[:, 4], v[lane ^ 2])
            assert torch.equal(o[:, 5], v[(lane & ~15) + 1])
            down = torch.where(lane + 1 < 32, v[(lane + 1).clamp(max=31)], v)
            assert torch.equal(o[:, 6], (down.double() * 3.0).float())
            ballot = sum(1 << i for i in range(32) if v[i] > 0)
            assert torch.all(o[:, 7] == (ballot & 0xFFFF)) and torch.all(o[:, 8] == (ballot >> 16))
            assert torch.all(o[:, 9] == float(bool((v > 2.5).any())))
            assert torch.all(o[:, 10] == float(bool((v > -2.5).all())))
            assert torch.all(o[:, 11] == 496)
            assert torch.all(o[:, 12] == (v * 100).to(torch.int32).max().float())
            s = _butterfly(v)
            assert torch.equal(o[:, 13], s)
            assert torch.equal(o[:, 14], v[(lane + 1) % 16 + (lane & 16)])
            assert torch.all(o[:, 19] == 3)
            assert torch.equal(o[:, 20], v)
            popc = torch.tensor([bin(i).count("1") for i in range(32)], dtype=torch.float32)
            ffs = torch.tensor([0] + [(i & -i).bit_length() for i in range(1, 32)], dtype=torch.float32)
            assert torch.equal(o[:, 21], popc + 100 * ffs)
            torch.testing.assert_close(o[:, 22], torch.exp(v), rtol=2e-6, atol=0)
            assert torch.equal(o[:, 23], (v > 0).float()[lane ^ 1])
            assert torch.equal(o[:, 24], v.half().float()[lane ^ 3])
            partial.append(s[0])
        block_sum = torch.zeros((), dtype=torch.float32)
        for p in partial:
            block_sum = block_sum + p
        ob = out[b * nthreads:(b + 1) * nthreads]
        assert torch.all(ob[:, 15] == block_sum)
        assert torch.all(ob[:, 16] == (xb > 0).sum())
        assert torch.all(ob[:, 17] == 1)
        assert torch.all(ob[:, 18] == float(bool((xb > 2.9).any())))
    fsum, count, usum, dsum, imax, cas = totals.tolist()
    assert math.isclose(fsum, x.double().sum().item(), rel_tol=1e-5, abs_tol=1e-3)
    assert count == total and usum == 2 * total and cas == 3 * total
    assert math.isclose(dsum, x.double().sum().item(), rel_tol=1e-12, abs_tol=1e-9)
    assert imax == (x * 1000).to(torch.int32).max().item()


def test_partial_warp(emu):
    # 48 threads: warp 1 has lanes 0-15 only; the lanes that do not exist take no part.
    x = torch.randn(48, generator=_gen(4))
    out = emu.selftest_partial_warp(x)
    for w, lanes in [(0, 32), (1, 16)]:
        v = x[32 * w:32 * w + lanes]
        o = out[32 * w:32 * w + lanes]
        sums = torch.stack([_xor_sum16(v[i & ~15:(i & ~15) + 16], i & 15) for i in range(lanes)])
        assert torch.equal(o[:, 0], sums)
        src = torch.arange(lanes) + 4
        inside = src < lanes
        assert torch.equal(o[inside, 1], v[src[inside]])
        if lanes == 32:
            assert torch.equal(o[~inside, 1], v[~inside])  # beyond lane 31: own value
        else:
            assert torch.isnan(o[~inside, 1]).all()  # lanes 16-19 do not exist: undefined (NaN)
        assert torch.all(o[:, 2] == lanes)


def _xor_sum16(v, lane):
    s = v.clone()
    idx = torch.arange(16)
    for off in (1, 2, 4, 8):
        s = s + s[idx ^ off]
    return s[lane]


def test_exited_lanes_leave_the_warp(emu):
    x = torch.randn(32, generator=_gen(5))
    out = emu.selftest_exited_lanes(x)
    assert torch.equal(out[:20, 0], x[4:24])
    assert torch.isnan(out[20:24, 0]).all()  # read exited lanes 24-27
    assert torch.all(out[:24, 1] == 24)  # ballot over the 24 lanes left
    assert torch.isnan(out[24:]).all()  # exited lanes wrote nothing: device memory starts as NaN


def test_nanosleep_lets_other_threads_run(emu):
    assert emu.selftest_spin_wait() == 1


def test_barrier_orders_shared_memory(emu):
    n, blocks = 96, 3
    out = emu.selftest_neighbours(blocks, n, True)
    t = torch.arange(n)
    expected = torch.cat([b * n + (t + 1) % n for b in range(blocks)]).float()
    assert torch.equal(out, expected)


@contextlib.contextmanager
def _checks(emu, racecheck, counters=False):
    old = emu.set_checks(racecheck, counters)
    try:
        yield
    finally:
        emu.set_checks(bool(old[0]), bool(old[1]))


def test_missing_barrier_is_reported_as_a_race(emu):
    # Thread 0 runs first and reads slot 1 before thread 1 writes it: the write comes after another
    # thread's read with no barrier between, which the race detector names with both source lines.
    with pytest.raises(RuntimeError, match=r"thread \(1,0,0\).*shared-memory race \(write after read\) on byte 4 of "
                       r"dynamic shared memory: thread \(0,0,0\) \[warp 0 lane 0\] read it at selftest.cu:\d+ in "
                       r".*neighbour_kernel, then this thread wrote it at selftest.cu:\d+"):
        emu.selftest_neighbours(2, 64, False)


def test_missing_barrier_reads_poison_without_racecheck(emu):
    # Without the barrier a thread reads its neighbour's slot before (even blocks run threads in order) or
    # after (odd blocks, reverse order) the neighbour wrote it: every block shows the race.
    n, blocks = 64, 2
    with _checks(emu, racecheck=False):
        out = emu.selftest_neighbours(blocks, n, False).view(blocks, n)
    assert torch.isnan(out).any(dim=1).all()


def test_cp_async(emu):
    x = torch.randn(4 * 64, generator=_gen(6))
    rolled = x.view(64, 4).roll(-1, dims=0).flatten()
    assert torch.equal(emu.selftest_cp_async_copy(x, True, True), rolled)
    assert torch.equal(emu.selftest_cp_async_copy(x, True, False), torch.zeros_like(x))  # pred false: zero fill
    # Without cp.async.wait_group the copies have not landed when other threads read them: a race.
    with pytest.raises(RuntimeError, match=r"shared-memory race \(write after read\).*the shared-memory write of a cp.async"):
        emu.selftest_cp_async_copy(x, False, True)
    with _checks(emu, racecheck=False):
        assert torch.isnan(emu.selftest_cp_async_copy(x, False, True)).any()


# (case of selftest.cu's race_kernel, the hazard it plants)
RACES = [  # (which hazard is seen first depends on the order the emulator runs the threads in)
    (0, r"(read after write|write after read)\) on byte \d+ of dynamic shared memory: thread \(\d+,0,0\) "
        r"\[warp \d lane \d+\] (wrote|read) it at selftest.cu:\d+ in .*race_kernel, then this thread"),
    (1, r"write after read\) on byte \d+ of dynamic"),
    (2, r"write after write\) on byte [0-3] of dynamic.*thread \(0,0,0\) \[warp 0 lane 0\] wrote it"),
    (3, r"(read after write|write after read)\).*no __syncthreads or __syncwarp of both lanes between them"),
    (4, r"(read after write|write after read)\).*\[warp 0 lane \d+\] (wrote|read) it.*__syncwarp of both lanes"),
    (5, r"(read after write|write after read)\).*(at|the shared-memory write of a) cp.async \(selftest.cu:\d+\)"),
    (6, r"(read after write|write after read)\) on byte \d+ of static shared memory"),
    (7, r"(read after write|write after read)\).*(read|wrote) it at ldmatrix.x4 \(selftest.cu:\d+\)"),
]


@pytest.mark.parametrize("what, message", RACES, ids=["raw", "war", "waw", "warp_raw", "partial_syncwarp",
                                                      "cp_async_no_wait", "static_smem", "ldmatrix"])
def test_planted_race_is_caught_and_its_fix_is_clean(emu, what, message):
    with pytest.raises(RuntimeError, match=r"race_kernel\(int, bool, float\*\) <<<.*shared-memory race \(" + message):
        emu.selftest_race(what, False)
    out = emu.selftest_race(what, True)  # the same kernel with the synchronisation it lacked: no report
    assert not torch.isnan(out).any()
    assert emu.selftest_noop(2, [32, 1, 1]) == 64  # the emulator recovers


def test_shared_memory_atomics_do_not_race(emu):
    assert torch.equal(emu.selftest_race(8, False), torch.full((64,), 64.0))


def _counters(emu):
    rows = {}
    for line in emu.counters().splitlines():
        name, *fields = line.split("\t")
        rows[name] = {k: int(v) for k, v in (f.split("=") for f in fields)}
    return rows


def test_counters_see_coalescing_and_bank_conflicts(emu):
    def measure(pattern):
        emu.reset_counters()
        with _checks(emu, racecheck=True, counters=True):
            emu.selftest_pattern(pattern)
        (row,) = [r for name, r in _counters(emu).items() if "pattern_kernel(int" in name]
        return row

    coalesced = measure(0)  # 32 lanes x 4 bytes: 4 sectors for the load, 4 for the store
    assert coalesced["global_requests"] == 2 and coalesced["global_sectors"] == 8
    assert coalesced["global_ideal_sectors"] == 8
    strided = measure(1)    # stride 2: the load spans 8 sectors for 4 sectors' worth of bytes
    assert strided["global_sectors"] == 8 + 4 and strided["global_ideal_sectors"] == 4 + 4
    conflict = measure(2)   # 32 lanes on one bank: 32 passes
    assert conflict["shared_requests"] == 1 and conflict["shared_wavefronts"] == 32
    assert conflict["shared_ideal_wavefronts"] == 1
    vector = measure(3)     # float4 stores: 4 quarter-warp phases, conflict-free
    assert vector["shared_wavefronts"] == 4 and vector["shared_ideal_wavefronts"] == 4
    wide = measure(4)       # 16-byte loads: 512 bytes in 16 sectors
    assert wide["global_sectors"] == 16 + 4


def test_counters_count_mma_ldmatrix_and_barriers(emu):
    emu.reset_counters()
    a = torch.randn(64, 32).to(torch.bfloat16)
    b = torch.randn(32, 32).to(torch.bfloat16)
    with _checks(emu, racecheck=True, counters=True):
        emu.selftest_mma_matmul(a, b, False)
    (row,) = [r for name, r in _counters(emu).items() if "mma_matmul_kernel<__nv_bfloat16" in name]
    # 4 warps, each 16 rows x 32 cols with K = 32: 4 column tiles x 2 k-steps of m16n8k16
    assert row["mma"] == 4 * 4 * 2
    assert row["ldmatrix"] > 0 and row["ldmatrix_wavefronts"] == row["ldmatrix_ideal_wavefronts"]
    assert row["barriers"] >= 1 and row["cp_async_requests"] > 0


def test_dynamic_shared_memory_limits(emu):
    floats = 20000  # 80 KB
    expected = 2 * floats * (floats - 1) / 2
    assert math.isclose(emu.selftest_big_smem(floats, True), expected, rel_tol=1e-4)
    with pytest.raises(RuntimeError, match="set_max_dynamic_smem"):
        emu.selftest_big_smem(floats + 1, False)
    with pytest.raises(RuntimeError, match="set_max_dynamic_smem failed: invalid argument"):
        emu.selftest_big_smem(60000, True)  # over 227 KB


def test_launch_configuration(emu):
    assert emu.selftest_noop(3, [8, 4, 2]) == 3 * 64
    assert emu.selftest_noop(1, [1024, 1, 1]) == 1024
    for blocks, block, smem in [(1, [1025, 1, 1], 0), (1, [32, 32, 2], 0), (1, [1, 1, 65], 0), (0, [32, 1, 1], 0),
                                (1, [32, 1, 1], 49153), (1, [32, 1, 1], 232449)]:
        with pytest.raises(RuntimeError, match="vae_ext CUDA emulation: launch of"):
            emu.selftest_noop(blocks, block, smem)


MISBEHAVIOUR = [
    ("smem_write_overrun", 8, r"wrote past the end of dynamic shared memory \(100 bytes\)"),
    ("smem_read_overrun", 8, r"out-of-bounds shared memory access: .* byte 256 of dynamic shared memory, which has"),
    ("smem_write_before_start", 8, r"wrote before the start of dynamic shared memory"),
    ("divergent_barrier", 64, r"divergent barrier: reached __syncthreads \(selftest.cu:\d+\) while 32 threads"),
    ("skipped_barrier", 128, r"thread \(64,0,0\).*exited while 64 threads of the block wait at __syncthreads"),
    ("divergent_shuffle", 64,
     r"deadlock: .*lanes 0-15 wait at __shfl_xor_sync .* for lanes 16-31 \(16-31 at __syncwarp"),
    ("partial_mma", 64, r"exited while lanes 0-30 of its warp wait at mma.m16n8k16"),
    ("mma_partial_warp", 48,
     r"needs all 32 lanes of the warp, but the block of 48 threads gives warp 1 only lanes 0-15"),
    ("misaligned_ldmatrix", 32, r"ldmatrix.x2 \(selftest.cu:\d+\): lane 0 gives row address .* not 16-byte aligned"),
    ("global_read_overrun", 5, r"out-of-bounds global memory access: .* device buffer of 20 bytes"),
    ("global_write_overrun", 5, r"wrote past the end of a device buffer of 20 bytes"),
    ("trap", 128, r"thread \(37,0,0\).*__trap\(\)"),
    ("divide_by_zero", 32, r"arithmetic exception"),
    ("assert", 64, r"thread \(40,0,0\).*assertion `threadIdx.x < 40' failed \(selftest.cu:\d+\) in"),
    ("stack_overflow", 100, r"stack overflow of an emulated thread"),
    ("spin_forever", 32, r"livelock: .* __nanosleep"),
]


@pytest.mark.parametrize("what, n, message", MISBEHAVIOUR, ids=[m[0] for m in MISBEHAVIOUR])
def test_rule_breaking_kernel_is_reported(emu, what, n, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest_misbehave(what, n)
    assert emu.selftest_noop(2, [32, 1, 1]) == 64  # the emulator recovers


def test_undefined_cuda_runtime_functions_are_refused():
    # The harness refuses a library that would call into a real CUDA runtime.
    import os
    import tempfile
    src = "extern \"C\" int cudaFancyNewApi(int); int f(int x) { return cudaFancyNewApi(x); }\n"
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, "libx.so")
        with open(os.path.join(tmp, "x.cpp"), "w") as f:
            f.write(src)
        import subprocess
        subprocess.run(["g++", "-shared", "-fPIC", "-o", lib, os.path.join(tmp, "x.cpp")], check=True)
        with pytest.raises(RuntimeError, match="cudaFancyNewApi"):
            cuda_emu._check_cuda_symbols(lib)


def test_project_kernels_meet_their_counter_targets(emu):
    # The targets of tools/emu_counters.py's report, kept in CI: the elementwise kernels (reparameterize,
    # ELBO) read and write with the fewest sectors their bytes allow; the attention kernels' shared-memory
    # stores, loads and ldmatrix run without bank conflicts. One exception, explained: the ELBO's one-block
    # finalize_kernel reads each row's few partial sums with a row stride (B x slots doubles, read once).
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import emu_counters

    _, summary = emu_counters.table(emu, quick=True)
    assert any(label.startswith("attention") for label, _ in summary)
    for (label, kernel), c in summary.items():
        if label.startswith(("reparameterize", "elbo")) and not kernel.startswith("finalize_kernel"):
            assert c["global_sectors"] == c["global_ideal_sectors"], (label, kernel, c)
        if label.startswith("attention"):
            assert c["shared_wavefronts"] == c["shared_ideal_wavefronts"], (label, kernel, c)
            assert c["ldmatrix_wavefronts"] == c["ldmatrix_ideal_wavefronts"], (label, kernel, c)
            if "fwd_kernel" in kernel or "dkdv_kernel" in kernel:
                assert c["ldmatrix"] > 0 and c["mma"] > 0 and c["shared_requests"] > 0, (label, kernel, c)
