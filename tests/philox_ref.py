"""Pure-Python Philox-4x32-10 and the Box–Muller layout of csrc/common/philox.h:
an independent statement of the random stream the kernels must produce."""

import math

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """counter: 4 words, key: 2 words -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def block(seed, counter_lo, counter_hi):
    seed &= 0xFFFFFFFFFFFFFFFF
    return philox4x32_10((counter_lo & MASK, counter_lo >> 32 & MASK, counter_hi & MASK, counter_hi >> 32 & MASK),
                         (seed & MASK, seed >> 32 & MASK))


def box_muller(a, b):
    u1 = ((a >> 8) + 1) * 2.0**-24
    u2 = (b >> 8) * 2.0**-24
    r = math.sqrt(-2.0 * math.log(u1))
    return r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)


def normal(seed, index, offset=0):
    """The N(0, 1) draw of flat element `index` for key `seed` and generator offset `offset`."""
    x, y, z, w = block(seed, offset // 4, index // 4)
    n = box_muller(x, y) + box_muller(z, w)
    return n[index % 4]
