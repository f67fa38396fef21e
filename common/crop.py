"""Crop and resize on the device, as Pillow does it: `img.resize((size, size), filter, box)`.

Pillow's bilinear and bicubic resize (Resample.c) is separable. For each output column it
centres the filter on the box's matching input position, widens it by the downscaling factor
(the antialiasing: support 1 for bilinear, 2 for bicubic, times max(1, scale)), keeps the input
pixels within the support (rounded bounds, clipped to the image), normalises the weights to sum
to 1 and rounds them to 22-bit fixed point. The horizontal pass then rounds and clips each
value to uint8, and the vertical pass does the same on that intermediate image. Here the weights
of each sample are a dense (N, out, in) matrix built from its box, and each pass is one batched
matrix multiply: in float64 the products and sums of the fixed-point weights are exact, so the
result equals Pillow's bit for bit; in float32 it is within a grey level or two.

Label maps use Pillow's nearest neighbour, which is an affine transform: the source column of
output x is int(x0 + (x + 0.5) * (x1 - x0) / size), the position accumulated by repeated
addition as Pillow's loop does (kept here, on the CPU, so the rare rounding at an integer edge
matches too); pixels outside the image are 0.
"""
import torch
from PIL import Image

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2


def _bilinear(x):
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _bicubic(x):
    """Keys' cubic with a = -0.5, Pillow's bicubic_filter, term for term."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


FILTERS = {Image.BILINEAR: (_bilinear, 1.0), Image.BICUBIC: (_bicubic, 2.0)}


def _rows(in_size, lo, hi, out_size, support):
    """Per output pixel, on the host in float64 as Pillow computes them: (N, out, 4) of the
    filter's centre, first and one-past-last input pixel, and 1 / filterscale."""
    lo32 = torch.as_tensor(lo).detach().cpu().to(torch.float32)
    hi32 = torch.as_tensor(hi).detach().cpu().to(torch.float32)
    scale = (hi32 - lo32).to(torch.float64).view(-1, 1) / out_size   # (float)(in1 - in0) / out
    filterscale = scale.clamp(min=1.0)
    support = support * filterscale
    xx = torch.arange(out_size, dtype=torch.float64).view(1, -1)
    center = lo32.to(torch.float64).view(-1, 1) + (xx + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.trunc(center + support + 0.5).clamp(max=in_size)
    return torch.stack([center, xmin, xmax, (1.0 / filterscale).expand_as(center)], dim=-1)


def _weights(rows, in_size, resample):
    """(N, out, 4) rows (on the device) -> (N, out, in) float64 weights: Pillow's normalised
    coefficients rounded to its 22-bit fixed point, in units of 2^-22."""
    fn = FILTERS[resample][0]
    center, xmin, xmax, ss = rows.unsqueeze(-1).unbind(-2)
    j = torch.arange(in_size, dtype=torch.float64, device=rows.device)
    w = fn((j - center + 0.5) * ss) * ((j >= xmin) & (j < xmax))
    ww = w.sum(-1, keepdim=True)
    k = w / torch.where(ww != 0, ww, 1.0)  # all-zero rows (C: left as they are) stay zero
    q = torch.trunc(k * (1 << PRECISION_BITS) + torch.where(k < 0, -0.5, 0.5))
    return q / (1 << PRECISION_BITS)


def pillow_weights(in_size, lo, hi, out_size, resample=Image.BILINEAR):
    """Pillow's resampling coefficients (precompute_coeffs + normalize_coeffs_8bpc) for boxes
    [lo, hi) (float (N,) tensors, rounded to float32 as Pillow takes them) of an axis of in_size
    pixels -> float64 (N, out_size, in_size) on lo's device: row o holds the weights of output
    pixel o, in units of 2^-22 (exact in float32 too), zero outside Pillow's support."""
    if resample not in FILTERS:
        raise ValueError(f"resample {resample}: Pillow's BILINEAR or BICUBIC")
    rows = _rows(in_size, lo, hi, out_size, FILTERS[resample][1])
    return _weights(rows.to(torch.as_tensor(lo).device), in_size, resample)


def _pass(weights, x):
    """weights (N, O, I), x (N, I, M) -> clip(round(weights @ x)) (N, O, M): Pillow's
    (sum + 2^21) >> 22 and clip8, exact in float64."""
    return torch.bmm(weights, x).add_(0.5).floor_().clamp_(0, 255)


def resize_crop(tiles, boxes, size, resample=Image.BILINEAR, flips=None, dtype=torch.float64):
    """tiles (N, H, W, 3) uint8 as stored (channels last) on any device; boxes (N, 4) as PIL's
    box (x0, y0, x1, y1), flips (N,) bool or None, both best on the host -> (N, 3, size, size)
    uint8 on the tiles' device: each tile's img.resize((size, size), resample, box=box),
    mirrored left-right where flipped. dtype float64: equal to Pillow; float32: within 1-2
    grey levels. The per-pixel filter positions are computed on the host and reach the device
    in one copy (pinned, non-blocking on CUDA); both axes' weights are one computation there."""
    if resample not in FILTERS:
        raise ValueError(f"resample {resample}: Pillow's BILINEAR or BICUBIC")
    n, h, w, c = tiles.shape
    boxes = torch.as_tensor(boxes).detach().cpu()
    support = FILTERS[resample][1]
    rx = _rows(w, boxes[:, 0], boxes[:, 2], size, support)
    if flips is not None:  # mirroring the output = reversing the rows of its weights
        f = torch.as_tensor(flips, dtype=torch.bool).cpu().view(-1, 1, 1)
        rx = torch.where(f, rx.flip(1), rx)
    ry = _rows(h, boxes[:, 1], boxes[:, 3], size, support)
    rows = torch.cat([rx, ry])
    if tiles.is_cuda:
        rows = rows.pin_memory()
    rows = rows.to(tiles.device, non_blocking=True)
    if h == w:
        wx, wy = _weights(rows, w, resample).to(dtype).split(n)
    else:
        wx, wy = (_weights(r, s, resample).to(dtype) for r, s in zip(rows.split(n), (w, h)))
    x = tiles.to(dtype).permute(0, 2, 1, 3).reshape(n, w, h * c)          # (N, W, H C)
    t = _pass(wx, x).view(n, size, h, c)                                   # (N, S, H, C)
    t = t.permute(0, 2, 1, 3).reshape(n, h, size * c)                      # (N, H, S C)
    out = _pass(wy, t).view(n, size, size, c)                              # (N, T, S, C)
    return out.permute(0, 3, 1, 2).to(torch.uint8).contiguous()


def nearest_indices(lo, hi, out_size, in_size):
    """Pillow's nearest source index of each output pixel along one axis, for boxes [lo, hi)
    (N,) -> int64 (N, out_size), -1 where it falls outside the image. On the CPU in float64,
    accumulated as Pillow's loop (xo = x0 + a / 2, then xo += a per pixel)."""
    lo32 = torch.as_tensor(lo).detach().cpu().to(torch.float32)
    hi32 = torch.as_tensor(hi).detach().cpu().to(torch.float32)
    a = (hi32 - lo32).to(torch.float64).view(-1, 1) / out_size
    steps = torch.cat([lo32.to(torch.float64).view(-1, 1) + a * 0.5,
                       a.expand(-1, out_size - 1)], dim=1)
    pos = torch.cumsum(steps, dim=1)  # sequential on the CPU: Pillow's repeated addition
    idx = torch.where(pos < 0, torch.full_like(pos, -1), torch.trunc(pos)).to(torch.int64)
    return torch.where(idx >= in_size, torch.full_like(idx, -1), idx)


def nearest_crop(maps, boxes, size, flips=None):
    """maps (N, H, W) label maps (any dtype) on any device; boxes (N, 4) as PIL's box ->
    (N, size, size): Pillow's resize((size, size), NEAREST, box) of each map (0 outside the
    image), mirrored left-right where flipped."""
    n, h, w = maps.shape
    boxes = torch.as_tensor(boxes).cpu()
    xi = nearest_indices(boxes[:, 0], boxes[:, 2], size, w)
    yi = nearest_indices(boxes[:, 1], boxes[:, 3], size, h)
    if flips is not None:
        f = torch.as_tensor(flips, dtype=torch.bool).cpu().view(-1, 1)
        xi = torch.where(f, xi.flip(1), xi)
    xi, yi = xi.to(maps.device), yi.to(maps.device)
    rows = maps.gather(1, yi.clamp(min=0).unsqueeze(-1).expand(n, size, w))       # (N, T, W)
    out = rows.gather(2, xi.clamp(min=0).unsqueeze(1).expand(n, size, size))     # (N, T, S)
    inside = (yi >= 0).unsqueeze(-1) & (xi >= 0).unsqueeze(1)
    return torch.where(inside, out, torch.zeros_like(out))
