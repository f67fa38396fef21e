"""Photometric augmentation: one description per view, two executors.

A method file declares each view's photometric ops once, with the paper's numbers:

    Photometric(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2, blur_p=0.5)

`sample()` draws every random number those ops need (is the jitter applied, ColorJitter's random
order of its four ops, the four factors, grey, blur and its sigma, solarize) into one fixed-length
float64 vector, from torch's RNG, which the loader seeds per sample (common.data): a sample's
parameters are a function of (seed, epoch, index), whichever executor then runs the ops.

- `apply_cpu(img, params)`, per image in the loader workers (the default): torchvision's
  functional ops on the PIL view as T.ColorJitter / RandomGrayscale / ... apply them, with PIL's
  GaussianBlur(radius=sigma) of the official MoCo / OpenSelfSup code unless a blur kernel is
  given (common.data.GaussianBlur). On a uint8 tensor it is torchvision's tensor ops per image:
  the reference the tests hold the batched executor to.
- `apply_batch(x, params)`, batched on the training device (--device-aug): the same ops in plain
  torch on (N, 3, H, W) uint8 or float images, each sample with its own parameters and op order,
  written to equal torchvision's tensor ops per image (uint8: the same truncations after each
  op) within 1/255 on every pixel. The blur is the exact Gaussian kernel (`blur_kernel`, 23 px
  when none is given), never PIL's box-filter approximation. Folded for few launches: the host
  turns a batch's parameters into one table (one pinned, non-blocking copy) and decides which
  ops run; each op then runs once on the whole batch and every sample takes its result or
  keeps its image (`plan`), with no host synchronisation.

`DeviceAugment` is the hook common.train uses for --device-aug and, with a tile store,
--device-crop (the crop, resize and flip of each view on the device: common.crop). Imports run
one way: common.data (files or store, parameters) -> this module -> common.crop.
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from common.crop import FILTERS, resize_crop
from common.data import DataError, GaussianBlur, MultiViewDataset, View

# The parameter vector of one view (sample() -> (P,) float64; a batch carries (N, P)).
JITTER, ORDER, FACTOR, GREY, BLUR, SIGMA, SOLARIZE, P = 0, 1, 5, 9, 10, 11, 12, 13
# ColorJitter's four ops, in the index order of torchvision's randperm(4) (ORDER entries).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
DEVICE_BLUR_KERNEL = 23  # torchvision's kernel at 224 px (docs/methods.md 0.4): ~6 sigma at sigma 2


@dataclass(frozen=True)
class Photometric:
    """One view's photometric ops, in this order: [grey if grey_first], ColorJitter(*jitter) with
    p jitter_p (its four ops in a random order per sample, as torchvision), [grey], Gaussian blur
    (sigma ~ U(blur_sigma)) with p blur_p, solarize (x >= threshold -> 255 - x) with p solarize_p.
    jitter strengths as T.ColorJitter's arguments: factors ~ U(max(0, 1 - s), 1 + s), hue
    ~ U(-s, s); a strength of 0 leaves that op out. blur_kernel None: PIL's blur on the CPU path
    (the official code), the exact 23 px kernel on the device; an odd int: that kernel on both."""
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grey_p: float = 0.0
    grey_first: bool = False  # MoCo v1: RandomGrayscale before the (always-on) jitter
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = None
    solarize_p: float = 0.0
    solarize_threshold: int = 128  # on the uint8 scale (/255 for float images)

    def ranges(self):
        """The four jitter factors' (low, high), as T.ColorJitter derives them."""
        b, c, s, h = self.jitter
        return [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s),
                (-h, h)]

    @property
    def kernel(self):
        return self.blur_kernel or DEVICE_BLUR_KERNEL

    # -- the parameters -------------------------------------------------------------------------
    def sample(self, generator=None):
        """-> (P,) float64: every random number of the ops, all drawn every time (a fixed count,
        so the draws after these do not depend on what was applied). Two torch calls: the
        loader does this twice per sample."""
        u = torch.rand(9, dtype=torch.float64, generator=generator).tolist()
        order = torch.randperm(4, generator=generator).tolist()  # as ColorJitter.get_params
        return self.vector(u, order)

    def vector(self, u, order):
        """sample()'s vector from its draws: 9 uniforms in [0, 1) and a permutation of 4 (the
        --device-crop loader draws these itself from the same generator words:
        common.draws.draw_views)."""
        (b, db), (c, dc), (s, ds), (h, dh), (g, dg) = self._spans  # lo + (hi - lo) u each
        return torch.from_numpy(np.array((  # numpy: a quarter of torch.tensor's cost
            float(u[0] < self.jitter_p), *order, b + db * u[4], c + dc * u[5], s + ds * u[6],
            h + dh * u[7], float(u[1] < self.grey_p), float(u[2] < self.blur_p), g + dg * u[8],
            float(u[3] < self.solarize_p)), np.float64))

    @functools.cached_property
    def _spans(self):
        """(lo, hi - lo) of the four jitter factors and the blur sigma."""
        return [(lo, hi - lo) for lo, hi in (*self.ranges(), self.blur_sigma)]

    def __call__(self, img):
        """Draw and apply on the CPU: a drop-in for the T.Compose it replaces."""
        return self.apply_cpu(img, self.sample())

    # -- executor 1: per image, torchvision's functional ops (PIL or tensor) ---------------------
    def apply_cpu(self, img, params):
        """img: PIL RGB or a (3, H, W) uint8 / float tensor; params: sample()'s vector."""
        p = params.tolist()
        jitter_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                      TF.adjust_hue)
        if self.grey_first and p[GREY]:
            img = TF.rgb_to_grayscale(img, 3)
        if p[JITTER]:
            for k in map(int, p[ORDER:ORDER + 4]):
                if self.jitter[k]:
                    img = jitter_ops[k](img, p[FACTOR + k])
        if not self.grey_first and p[GREY]:
            img = TF.rgb_to_grayscale(img, 3)
        if p[BLUR]:
            if isinstance(img, Image.Image) and self.blur_kernel is None:  # (s, s): no draw
                img = GaussianBlur((p[SIGMA], p[SIGMA]))(img)
            else:
                img = TF.gaussian_blur(img, self.kernel, p[SIGMA])
        if p[SOLARIZE]:
            floating = isinstance(img, torch.Tensor) and img.is_floating_point()
            img = TF.solarize(img, self.solarize_threshold / 255 if floating else
                              self.solarize_threshold)
        return img

    # -- executor 2: the batch, on any device -----------------------------------------------------
    def plan(self, params):
        """The host's half of apply_batch, from the (N, P) parameters (numpy, no device work):
        -> ((N, K) float32 table of every per-sample number the device reads, the ops to run).

        ColorJitter's brightness, contrast and saturation are all torchvision's blend
        f x + (1 - f) o, with o = 0, the mean grey or the grey image: one "slot" blends every
        sample with its own f and o = g grey + m mean (g, m in {0, 1 - f}; f = 1, g = m = 0
        leaves a sample exactly as it is). A sample's jitter ops in its own order are its
        blends before its hue, the hue, its blends after: with B blend ops and a hue, 2 B slots
        around one hue step serve every order in the batch (B slots without a hue)."""
        p = params.detach().to("cpu", torch.float64).numpy()
        n = len(p)
        blends = [k for k in (BRIGHTNESS, CONTRAST, SATURATION) if self.jitter[k]]
        has_hue = bool(self.jitter[HUE])
        n_slots = len(blends) * (2 if has_hue else 1)
        f = np.ones((n, n_slots))
        g, m = np.zeros((n, n_slots)), np.zeros((n, n_slots))
        hue_on, hue_f = np.zeros(n), np.zeros(n)
        for i in np.flatnonzero(p[:, JITTER] > 0):
            seq = [int(k) for k in p[i, ORDER:ORDER + 4] if self.jitter[int(k)]]
            if has_hue:
                j = seq.index(HUE)
                slots = list(range(len(blends) - j, len(blends))) + list(
                    range(len(blends), len(blends) + len(seq) - j - 1))
                seq = seq[:j] + seq[j + 1:]
                hue_on[i], hue_f[i] = 1.0, p[i, FACTOR + HUE]
            else:
                slots = range(len(seq))
            for s, k in zip(slots, seq):
                f[i, s] = p[i, FACTOR + k]
                one_minus = 1 - p[i, FACTOR + k]  # float64 as torchvision's python floats
                g[i, s] = one_minus if k == SATURATION else 0.0
                m[i, s] = one_minus if k == CONTRAST else 0.0
        grey_on, blur_on, sol_on = (p[:, c] > 0 for c in (GREY, BLUR, SOLARIZE))
        table = np.concatenate([np.stack([f, g, m], -1).reshape(n, -1),
                                np.stack([hue_on, hue_f, grey_on, blur_on, p[:, SIGMA],
                                          sol_on], -1)], 1).astype(np.float32)
        active = [((f[:, s] != 1) | (g[:, s] != 0) | (m[:, s] != 0)).any() for s in range(n_slots)]
        ops = {"slots": [(s, bool((g[:, s] != 0).any()), bool((m[:, s] != 0).any()))
                         for s in range(n_slots) if active[s]],
               "hue": bool(hue_on.any()), "grey": bool(grey_on.any()),
               "blur": bool(blur_on.any()), "solarize": bool(sol_on.any())}
        table = torch.from_numpy(table)
        if ops["blur"]:  # each sample's 1-D kernel, made here: ~10 device operations fewer
            table = torch.cat([table, blur_kernels(table[:, -2], self.kernel)], 1)
        return table, ops

    def apply_batch(self, x, params):
        """x: (N, 3, H, W) uint8 or float in [0, 1] on any device; params: (N, P) from sample()
        (best on the host). -> the same dtype and device, every sample with its own ops and
        order. The per-sample numbers reach the device in one copy (pinned, non-blocking on
        CUDA); which ops run is decided on the host, so nothing waits for the device; each op
        runs once on the whole batch and each sample takes its result or keeps its image."""
        table, ops = self.plan(params)
        n = len(table)
        if x.is_cuda:
            table = table.pin_memory()
        table = table.to(x.device, non_blocking=True)
        width = table.shape[1] - (self.kernel if ops["blur"] else 0)  # then the blur kernels
        cols = table[:, :width].reshape(n, -1, 1, 1, 1).unbind(1)
        hue_f, sigma = cols[-5], cols[-2]  # each (N, 1, 1, 1)
        # the four on/off columns compared once (one kernel), then taken apart (views)
        hue_on, _, grey_on, blur_on, _, sol_on = (
            table[:, width - 6:width] > 0).reshape(n, -1, 1, 1, 1).unbind(1)
        if self.grey_first and ops["grey"]:
            x = torch.where(grey_on, grey(x), x)
        hue_at = (len(cols) - 6) // 6 if self.jitter[HUE] else None  # blend slots before it
        hue_done = not ops["hue"]
        for s, use_grey, use_mean in ops["slots"]:
            if not hue_done and s >= hue_at:
                x, hue_done = torch.where(hue_on, hue(x, hue_f, None), x), True
            x = blend_slot(x, *cols[3 * s:3 * s + 3], use_grey, use_mean)
        if not hue_done:
            x = torch.where(hue_on, hue(x, hue_f, None), x)
        if not self.grey_first and ops["grey"]:
            x = torch.where(grey_on, grey(x), x)
        if ops["blur"]:  # the whole batch, then select: one conv shape for cuDNN every step
            k1 = table[:, width:] if x.dtype in (torch.uint8, torch.float32) else None
            x = torch.where(blur_on, gaussian_blur(x, sigma.view(-1), self.kernel, k1), x)
        if ops["solarize"]:
            x = solarize(x, sol_on, self.solarize_threshold)
        return x if ops["grey"] or ops["blur"] or ops["solarize"] or ops["slots"] or ops["hue"] \
            else x.clone()


# ---------------------------------------------------------------------------------------------
# The batched ops: (n, 3, H, W) images, (n, 1, 1, 1) float32 factors f and 1 - f. Each mirrors
# torchvision.transforms._functional_tensor's op for one image, arithmetic included.

def _bound(x):
    return 1.0 if x.is_floating_point() else 255  # an int: 255 - uint8 stays uint8


def blend(a, b, f, one_minus_f):
    """torchvision's _blend: f a + (1 - f) b, clamped, back to a's dtype (uint8: truncated)."""
    return (f * a + one_minus_f * b).clamp(0, _bound(a)).to(a.dtype)


def blend_slot(x, f, g, m, use_grey=True, use_mean=True):
    """One jitter slot: f x + g grey(x) + m mean(grey(x)), clamped, in x's dtype (uint8:
    truncated), per sample (n, 1, 1, 1). With one of g, m zero it is torchvision's saturation
    or contrast blend term for term (the zero term adds an exact 0); g = m = 0: brightness."""
    y = f * x
    if use_grey or use_mean:
        r, g_, b = x.unbind(dim=-3)  # grey(x)'s first channel
        gr = 0.2989 * r + 0.587 * g_ + 0.114 * b
        if not x.is_floating_point():  # its uint8 values (in [0, 255): .to(uint8) truncates),
            gr = gr.trunc_()  # kept in float32 for the products and the mean: one kernel less
        gr = gr.unsqueeze(-3)
        if use_grey:
            y = y + g * gr
        if use_mean:
            y = y + m * gr.mean(dim=(-3, -2, -1), keepdim=True)
    return y.clamp(0, _bound(x)).to(x.dtype)


def grey(x):
    """rgb_to_grayscale(x, 3): ITU-R 601-2 luma in x's dtype (uint8: truncated), three channels."""
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(x.dtype).unsqueeze(-3).expand(x.shape)


def brightness(x, f, one_minus_f):
    return blend(x, torch.zeros_like(x), f, one_minus_f)


def contrast(x, f, one_minus_f):
    dtype = x.dtype if x.is_floating_point() else torch.float32
    mean = grey(x)[:, :1].to(dtype).mean(dim=(-3, -2, -1), keepdim=True)  # (n, 1, 1, 1)
    return blend(x, mean, f, one_minus_f)


def saturation(x, f, one_minus_f):
    return blend(x, grey(x)[:, :1], f, one_minus_f)


def hue(x, f, _):
    """Rotate the hue by f (in turns): RGB -> HSV, h + f mod 1, -> RGB, as torchvision."""
    y = x if x.is_floating_point() else x / 255.0  # uint8 / float: float32, one kernel
    h, s, v = rgb_to_hsv(y)
    h = (h + f.view(-1, 1, 1)) % 1.0
    y = hsv_to_rgb(h, s, v)
    return y if x.is_floating_point() else y.mul(255.0 + 1.0 - 1e-3).to(x.dtype)


def rgb_to_hsv(x):
    """(n, 3, H, W) RGB in [0, 1] -> h, s, v (n, H, W): torchvision's _rgb2hsv (Pillow's
    formulas), its masked sum of three hue terms as the one term the mask keeps (the others
    are exact zeros)."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    eqc = maxc == minc  # grey pixels: h = s = 0 (denominators replaced by 1, no NaN)
    cr = maxc - minc
    s = cr / maxc.masked_fill(eqc, 1.0)  # masked_fill: no scalar tensor made on the device
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / cr.masked_fill(eqc, 1.0).unsqueeze(-3)).unbind(-3)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc


_SEXTANTS = {}  # device -> (6, 3) int64: per hue sextant, R, G, B as indices into (v, q, p, t)


def hsv_to_rgb(h, s, v):
    """torchvision's _hsv2rgb; each channel's value of the sextant picked by index from
    (v, q, p, t), not by a 0/1 weighted sum (the same numbers: the other terms are exact
    zeros)."""
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    lut = _SEXTANTS.get(h.device)
    if lut is None:  # R: v q p p t v, G: t v v q p p, B: p p t v v q
        lut = _SEXTANTS[h.device] = torch.tensor(
            [[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=h.device)
    return torch.stack((v, q, p, t), 1).gather(1, lut[i].permute(0, 3, 1, 2))


def blur_kernels(sigma, kernel_size, dtype=torch.float32):
    """sigma (n,) -> (n, kernel_size): torchvision's normalised 1-D Gaussian kernels in dtype
    (its arithmetic: on the host it is the very kernel torchvision's CPU op uses)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma.to(dtype).view(-1, 1)).pow(2))   # (n, k)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(x, sigma, kernel_size, k1=None):
    """x (n, C, H, W), sigma (n,) float32: torchvision's gaussian_blur(kernel_size, sigma) per
    sample (its exact kernel and reflect padding; uint8 rounded), as two separable passes of a
    grouped convolution with each sample's own 1-D kernel (k1 (n, k): given, made from sigma
    otherwise). On CUDA the convolution runs in float64: cuDNN's default TF32 would keep 10
    bits of each product."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    work = torch.float64 if x.is_cuda else dtype
    n, c, hgt, wid = x.shape
    if k1 is None:
        k1 = blur_kernels(sigma, kernel_size, dtype)
    k1 = k1.repeat_interleave(c, 0).to(work)  # (n C, k)
    pad = kernel_size // 2
    y = F.pad(x.to(work).reshape(1, n * c, hgt, wid), [pad] * 4, mode="reflect")
    y = F.conv2d(y, k1.view(n * c, 1, kernel_size, 1), groups=n * c)  # vertical
    y = F.conv2d(y, k1.view(n * c, 1, 1, kernel_size), groups=n * c)  # horizontal
    y = y.reshape(n, c, hgt, wid).to(dtype)
    return y if x.is_floating_point() else torch.round(y).to(x.dtype)


def solarize(x, on, threshold=128):
    """Samples with `on` (n, 1, 1, 1) bool: pixels >= threshold (uint8 scale) -> max - x."""
    bound = _bound(x)
    thr = threshold / 255 if x.is_floating_point() else threshold
    return torch.where(on & (x >= thr), bound - x, x)


# ---------------------------------------------------------------------------------------------
# The hook common.train uses for --device-aug

class DeviceAugment:
    """--device-aug: tells a MultiViewDataset's workers to draw the photometric parameters
    without applying them (batch["photo"]: one (N, P) tensor per view), and applies each view's
    ops to its batch on `device`. The descriptions are the dataset's views' `photometric`, or,
    for a dataset that builds its views itself, its `photometrics` list (one per view; it then
    honours `device_aug` and fills "photo" as MultiViewDataset.augment does). Views without
    photometric ops pass through."""

    def __init__(self, dataset, device):
        ops = getattr(dataset, "photometrics", None)
        if ops is None:
            ops = [getattr(v, "photometric", None) for v in getattr(dataset, "views", [])]
        if not ops:
            raise DataError("--device-aug: this script's dataset builds its views itself "
                            "(no common.data.View list, no `photometrics`); run without "
                            "--device-aug")
        for ph in ops:
            if ph is not None and not isinstance(ph, Photometric):
                raise DataError(f"--device-aug: a view's photometric ops ({ph!r}) are not a "
                                "common.augment.Photometric; run without --device-aug")
        self.photometric = list(ops)
        self.device = device
        self.crop = None
        if getattr(getattr(dataset, "base", None), "device_crop", False):
            self.crop = self._crop_views(dataset)
            dataset.device_crop = True
        dataset.device_aug = True  # read by the workers: set before the first batch forks them

    @staticmethod
    def _crop_views(dataset):
        """--device-crop: [(size, Pillow filter, geometric op or None)] per view, or DataError
        for views it cannot crop. A dataset whose augment() builds more than its View list's
        views (a reference view, masks, overlapping crops) must also extend draw_params (the
        same numbers without pixels) and, without a View list, name its crops in `crop_views`
        [(size, filter)]; it then finishes its extras on the device in its own file, from
        batch["tile"] (the uint8 tiles on the device)."""
        name = type(dataset).__name__
        own = type(dataset).augment is not MultiViewDataset.augment
        if own and type(dataset).draw_params is MultiViewDataset.draw_params:
            raise DataError(f"--device-crop: {name} builds its views in its own file and does "
                            "not draw them without pixels (draw_params); run with --data-store "
                            "and --device-aug")
        spec = getattr(dataset, "crop_views", None)
        if spec is not None:
            spec = [(size, resample, None) for size, resample in spec]
        elif dataset.views and all(isinstance(v, View) for v in dataset.views):
            spec = [(v.size, v.interpolation, v.geometric) for v in dataset.views]
        else:
            raise DataError(f"--device-crop: {name} has no common.data.View list and no "
                            "`crop_views`; run with --data-store and --device-aug")
        for size, resample, g in spec:
            if resample not in FILTERS or not (g is None or hasattr(g, "apply_batch")):
                raise DataError(f"--device-crop: {name}'s view ({size} px, {resample}, {g}) has "
                                "geometric ops on PIL only or a filter other than bilinear / "
                                "bicubic; run without --device-crop")
        return spec

    def views(self, batch):
        """--device-crop: each view's crop, resize and flip of the batch's tiles, then its
        geometric ops, on the device (uint8 (N, 3, S, S), float64: Pillow's pixels). The tiles
        stay in batch["tile"], on the device, for a method's extras (ConCL's reference view)."""
        batch["tile"] = tiles = batch["tile"].to(self.device, non_blocking=True)
        out = []
        for k, (size, resample, g) in enumerate(self.crop):
            v = resize_crop(tiles, batch["boxes"][k], size, resample, batch["flips"][k])
            out.append(v if g is None else g.apply_batch(v, batch["geo"][k]))
        return out

    def __call__(self, batch):
        """-> the batch's views, uint8 on the device, photometric ops applied."""
        if "photo" not in batch:
            raise DataError("--device-aug: the batch carries no photometric parameters "
                            "(batch['photo']): this script's dataset draws its views itself")
        views = self.views(batch) if self.crop is not None else batch["views"]
        return [v.to(self.device, non_blocking=True) if ph is None or not p.shape[-1]
                else ph.apply_batch(v.to(self.device, non_blocking=True), p)
                for ph, v, p in zip(self.photometric, views, batch["photo"])]
