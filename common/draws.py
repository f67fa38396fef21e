"""The loader's random numbers: per-sample seeds, RandomResizedCrop boxes, and the fast path
that reads a view's numbers from torch's generator in Python.

Every sample is seeded from (seed, epoch, index) (`sample_seed`), so it looks the same in any
worker, with any number of workers, and after a resume. `crop_box` draws RandomResizedCrop's
box with the torch calls torchvision makes. `draw_views` gives the numbers the plain views of
common.data draw (box, flip, photometric vector) without a single torch draw: with a tile
store the loader does little else, and the per-call overhead of torch's tiny draws was most of
its cost. common.data checks once per process that both ways agree (`_words_agree`) and keeps
the torch calls where they might not.
"""
import functools
import math
import struct

import numpy as np
import torch


def crop_box(height, width, scale, ratio):
    """RandomResizedCrop's box -> (top, left, h, w), drawn with the same torch calls in the same
    order as T.RandomResizedCrop.get_params (so the same numbers from the same seed: tested),
    without its per-call overhead (API logging, size probing, the log of the ratio range as a
    new tensor each call), which matter once the loader does little else."""
    area = height * width
    log_lo, log_hi = _log_ratio(tuple(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.empty(1).uniform_(log_lo, log_hi).exp_().item()
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            return top, torch.randint(0, width - w + 1, size=(1,)).item(), h, w
    return centre_box(height, width, ratio)


def centre_box(height, width, ratio):
    """RandomResizedCrop after ten misses: the centred crop of the aspect ratio clamped to the
    range (no draws)."""
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_LOG_RATIO = {}


def _log_ratio(ratio):
    """The float32 logs of a ratio range, as get_params computes them (cached)."""
    if ratio not in _LOG_RATIO:
        _LOG_RATIO[ratio] = tuple(float(v) for v in torch.log(torch.tensor(ratio)))
    return _LOG_RATIO[ratio]


def sample_seed(*keys):
    """A 63-bit seed from a tuple of integers (seed, epoch, index, ...): numpy's
    SeedSequence(keys).generate_state(2, uint64)[0] >> 1. The loader's (seed, epoch, index) of
    32-bit numbers takes `_seed3`, the same hash in Python at a third of the cost."""
    keys = [int(k) for k in keys]
    if len(keys) == 3 and all(0 <= k <= _M32 for k in keys):
        return _seed3(*keys)
    return int(np.random.SeedSequence(keys).generate_state(2, np.uint64)[0] >> 1)


# SeedSequence's hash of three 32-bit words, unrolled (numpy's bit_generator.pyx: a pool of 4
# words, each hashed in, then every word mixed into every other, each hashmix with the next of a
# fixed sequence of multipliers). The (seed, epoch) part is the same for a whole epoch: cached.
_M32 = 0xFFFFFFFF
_HASH_A = [0x43B0D7E5]
for _ in range(16):
    _HASH_A.append(_HASH_A[-1] * 0x931E8875 & _M32)
_HASH_B = [0x8B51F9DD, 0x8B51F9DD * 0x58F38DED & _M32, 0x8B51F9DD * 0x58F38DED ** 2 & _M32]


def _hashmix(v, k):  # SeedSequence's k-th hashmix call
    v = (v ^ _HASH_A[k]) * _HASH_A[k + 1] & _M32
    return v ^ v >> 16


def _mix(x, y):
    r = (0xCA01F9DD * x - 0x4973F715 * y) & _M32
    return r ^ r >> 16


@functools.lru_cache(maxsize=64)
def _seed3_prefix(seed, epoch):
    m0, m1, m3 = _hashmix(seed, 0), _hashmix(epoch, 1), _hashmix(0, 3)
    m1 = _mix(m1, _hashmix(m0, 4))
    c5 = _hashmix(m0, 5)
    m3 = _mix(m3, _hashmix(m0, 6))
    m0 = _mix(m0, _hashmix(m1, 7))
    c8 = _hashmix(m1, 8)
    return m0, m1, _mix(m3, _hashmix(m1, 9)), c5, c8


def _seed3(seed, epoch, i):
    m0, m1, m3, c5, c8 = _seed3_prefix(seed, epoch)
    m2 = _mix(_mix(_hashmix(i, 2), c5), c8)
    m0, m1, m3 = _mix(m0, _hashmix(m2, 10)), _mix(m1, _hashmix(m2, 11)), _mix(m3, _hashmix(m2, 12))
    m0, m1 = _mix(m0, _hashmix(m3, 13)), _mix(m1, _hashmix(m3, 14))
    w0 = (m0 ^ _HASH_B[0]) * _HASH_B[1] & _M32
    w1 = (m1 ^ _HASH_B[1]) * _HASH_B[2] & _M32
    return ((w0 ^ w0 >> 16) | (w1 ^ w1 >> 16) << 32) >> 1


# -- the views' numbers, read from torch's generator in Python (--device-crop's loader) ---------
# torch's CPU generator is an MT19937 that manual_seed(s) seeds with s's low 32 bits, as numpy's
# legacy seeding does: the same 32-bit words. Each draw turns words into a number by fixed
# arithmetic (ATen's TransformationHelper.h): rand (float32): (w & 2^24-1) 2^-24; uniform_(a, b)
# (float32): x (b - a) + a, fused, rounded once to float32, b itself turned into a; rand
# (float64): 53 bits of two words,
# the first high; randint(0, n): w mod n; randperm(4): three words, a swap each. Doing that here
# draws the same numbers as the torch calls (tests/test_data.py, seed for seed) without their
# per-call overhead, and leaves torch's generator alone (no fork_rng). Only exp stays a torch
# call: its float32 rounding is the library's. Module state (the generator, exp's tensor): one
# thread draws per process, as in the loader's workers and a worker-less main process.
_MT = np.random.MT19937()
_MT_SEED = np.random.RandomState(_MT).seed  # legacy seeding: manual_seed's state
_F32 = struct.Struct("<f")
_EXP = torch.empty(1)  # RandomResizedCrop's exp_ on a 1-element float32 tensor
_M53 = (1 << 53) - 1


def _f32(v):
    return _F32.unpack(_F32.pack(v))[0]


@functools.lru_cache(maxsize=None)
def _float32(p):
    return float(np.float32(p))


@functools.lru_cache(maxsize=None)
def _uniform_range(lo, hi):
    """uniform_(lo, hi) on float32: (a, b - a, b) as the kernel holds them (float32)."""
    a, b = np.float32(lo), np.float32(hi)
    return float(a), float(b - a), float(b)


def _uniform32(word, a, d, b):
    """torch's float32 uniform_(a, b) (d = b - a in float32) from its word: fused x d + a,
    rounded once; a result that rounded up to b is a (ATen's uniform_kernel)."""
    p = (word & 0xFFFFFF) * 2.0 ** -24 * d  # exact in float64 (24 x 24 bits)
    s = p + a
    r = _f32(s)
    if s != r:  # s rounded (float64) and then to float32: equal to one rounding unless s fell
        t = 2 * s - r  # on a float32 midpoint (then t, the other neighbour, is a float32)
        if t != r and _f32(t) == t:
            bv = s - p
            err = (p - (s - bv)) + (a - bv)  # TwoSum: exact = s + err
            if err and (err > 0) == (t > s):
                r = t
    return a if r == b else r


def draw_views(views, size, seed):
    """[View.draw_params(size) for v in views] (common.data.View) after torch's manual_seed(seed), the same
    numbers (crop_box, the flip, Photometric.sample), drawn from the generator's words here."""
    height, width = size
    area = height * width
    _MT_SEED(seed & _M32)
    w, k, out = _MT.random_raw(26 * len(views) + 8).tolist(), 0, []
    for v in views:
        scale = _uniform_range(*v.scale)
        log_ratio = _uniform_range(*_log_ratio(tuple(v.ratio)))
        for _ in range(10):
            if len(w) - k < 26:  # a try, a box, a flip, a photometric vector
                w += _MT.random_raw(64).tolist()
            target = area * _uniform32(w[k], *scale)
            aspect = _EXP.fill_(_uniform32(w[k + 1], *log_ratio)).exp_().item()
            k += 2
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                top, left = w[k] % (height - ch + 1), w[k + 1] % (width - cw + 1)
                k += 2
                break
        else:
            top, left, ch, cw = centre_box(height, width, v.ratio)
        flip = (w[k] & 0xFFFFFF) * 2.0 ** -24 < _float32(v.flip_p)  # torch compares in float32
        k += 1
        params = None
        if hasattr(v.photometric, "sample"):  # rand(9, float64), randperm(4)
            u = [((w[j] << 32 | w[j + 1]) & _M53) * 2.0 ** -53 for j in range(k, k + 18, 2)]
            order = [0, 1, 2, 3]
            for j in range(3):
                z = j + w[k + 18 + j] % (4 - j)
                order[j], order[z] = order[z], order[j]
            k += 21
            params = v.photometric.vector(u, order)
        box = torch.from_numpy(np.array((left, top, left + cw, top + ch), dtype=np.float32))
        out.append((box, flip, params, None))
    return out
