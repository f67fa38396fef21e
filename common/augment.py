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
  when none is given), never PIL's box-filter approximation.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from common.data import DataError, GaussianBlur

# The parameter vector of one view (sample() -> (P,) float64; a batch carries (N, P)).
JITTER, ORDER, FACTOR, GREY, BLUR, SIGMA, SOLARIZE, P = 0, 1, 5, 9, 10, 11, 12, 13
# ColorJitter's four ops, in the index order of torchvision's randperm(4) (ORDER entries).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
DEVICE_BLUR_KERNEL = 23  # torchvision's kernel at 224 px (methods.md 0.4): ~6 sigma at sigma 2


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
        factors = [lo + (hi - lo) * v for (lo, hi), v in zip(self.ranges(), u[4:8])]
        lo, hi = self.blur_sigma
        jitter, grey, blur, solarize = (float(v < q) for v, q in zip(
            u[:4], (self.jitter_p, self.grey_p, self.blur_p, self.solarize_p)))
        return torch.tensor([jitter, *order, *factors, grey, blur, lo + (hi - lo) * u[8], solarize],
                            dtype=torch.float64)

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
    def apply_batch(self, x, params):
        """x: (N, 3, H, W) uint8 or float in [0, 1] on any device; params: (N, P) from sample()
        (any device). -> the same dtype and device, every sample with its own ops and order."""
        p = params.detach().to("cpu", torch.float64)
        x = x.clone()

        def apply(mask, op, col=None):
            """x[mask] = op(x[mask], ratio, 1 - ratio) with the samples' own factors."""
            idx = mask.nonzero()[:, 0]
            if not len(idx):
                return
            i = idx.to(x.device)
            if col is None:
                x[i] = op(x[i])
                return
            f = p[idx, col].view(-1, 1, 1, 1)  # float64: 1 - f as torchvision (python floats)
            x[i] = op(x[i], f.float().to(x.device), (1 - f).float().to(x.device))

        jitter_ops = (brightness, contrast, saturation, hue)
        if self.grey_first:
            apply(p[:, GREY] > 0, grey)
        for pos in range(4):
            for k in range(4):
                if self.jitter[k]:
                    apply((p[:, JITTER] > 0) & (p[:, ORDER + pos] == k), jitter_ops[k], FACTOR + k)
        if not self.grey_first:
            apply(p[:, GREY] > 0, grey)
        blur = (p[:, BLUR] > 0).view(-1, 1, 1, 1)
        if blur.any():  # the whole batch, then select: one conv shape for cuDNN every step
            sigma = p[:, SIGMA].float().to(x.device)
            x = torch.where(blur.to(x.device), gaussian_blur(x, sigma, self.kernel), x)
        on = (p[:, SOLARIZE] > 0).view(-1, 1, 1, 1).to(x.device)
        return solarize(x, on, self.solarize_threshold)


# ---------------------------------------------------------------------------------------------
# The batched ops: (n, 3, H, W) images, (n, 1, 1, 1) float32 factors f and 1 - f. Each mirrors
# torchvision.transforms._functional_tensor's op for one image, arithmetic included.

def _bound(x):
    return 1.0 if x.is_floating_point() else 255  # an int: 255 - uint8 stays uint8


def blend(a, b, f, one_minus_f):
    """torchvision's _blend: f a + (1 - f) b, clamped, back to a's dtype (uint8: truncated)."""
    return (f * a + one_minus_f * b).clamp(0, _bound(a)).to(a.dtype)


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
    y = x if x.is_floating_point() else x.to(torch.float32) / 255.0
    h, s, v = rgb_to_hsv(y).unbind(dim=-3)
    h = (h + f.view(-1, 1, 1)) % 1.0
    y = hsv_to_rgb(h, s, v)
    return y if x.is_floating_point() else y.mul(255.0 + 1.0 - 1e-3).to(x.dtype)


def rgb_to_hsv(x):
    """(n, 3, H, W) RGB in [0, 1] -> HSV, torchvision's _rgb2hsv (Pillow's formulas)."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.max(dim=-3).values, x.min(dim=-3).values
    eqc = maxc == minc  # grey pixels: h = s = 0 (denominators replaced by 1, no NaN)
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(h, s, v):
    """torchvision's _hsv2rgb; the sextant's (v, q, p, ...) row picked by index, not a 0/1 sum
    (the same numbers: the other terms are exact zeros)."""
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    rows = (torch.stack((v, q, p, p, t, v), 1), torch.stack((t, v, v, q, p, p), 1),
            torch.stack((p, p, t, v, v, q), 1))  # (n, 6, H, W) each: R, G, B per sextant
    return torch.stack([r.gather(1, i.unsqueeze(1))[:, 0] for r in rows], dim=1)


def gaussian_blur(x, sigma, kernel_size):
    """x (n, C, H, W), sigma (n,) float32: torchvision's gaussian_blur(kernel_size, sigma) per
    sample (its exact kernel and reflect padding; uint8 rounded), as two separable passes of a
    grouped convolution with each sample's own 1-D kernel. On CUDA the convolution runs in
    float64: cuDNN's default TF32 would keep 10 bits of each product."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    work = torch.float64 if x.is_cuda else dtype
    n, c, hgt, wid = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size, dtype=dtype, device=x.device)
    pdf = torch.exp(-0.5 * (t / sigma.to(dtype).view(-1, 1)).pow(2))   # (n, k)
    k1 = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0).to(work)  # (n C, k)
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
        dataset.device_aug = True  # read by the workers, forked at each epoch's first batch

    @staticmethod
    def _crop_views(dataset):
        """--device-crop: [(size, Pillow filter)] per view, or DataError for views it cannot
        crop: a dataset that builds more than its View list's views in its own file (a
        reference view, masks, overlapping crops), geometric ops on PIL, another filter."""
        from common.crop import FILTERS
        from common.data import MultiViewDataset, View
        own = type(dataset).augment is not MultiViewDataset.augment
        if own or not all(isinstance(v, View) for v in dataset.views):
            raise DataError(f"--device-crop: {type(dataset).__name__} builds its views in its "
                            "own file (a reference view, masks, overlapping crops: see common."
                            "crop for what they need); run with --data-store and --device-aug")
        for v in dataset.views:
            if v.geometric is not None or v.interpolation not in FILTERS:
                raise DataError(f"--device-crop: {v} has geometric ops on PIL or a filter other "
                                "than bilinear / bicubic; run without --device-crop")
        return [(v.size, v.interpolation) for v in dataset.views]

    def views(self, batch):
        """--device-crop: each view's crop, resize and flip of the batch's tiles, on the device
        (uint8 (N, 3, S, S), float64: Pillow's pixels)."""
        from common.crop import resize_crop
        tiles = batch["tile"].to(self.device, non_blocking=True)
        return [resize_crop(tiles, b, size, resample, f)
                for (size, resample), b, f in zip(self.crop, batch["boxes"], batch["flips"])]

    def __call__(self, batch):
        """-> the batch's views, uint8 on the device, photometric ops applied."""
        if "photo" not in batch:
            raise DataError("--device-aug: the batch carries no photometric parameters "
                            "(batch['photo']): this script's dataset draws its views itself")
        views = self.views(batch) if self.crop is not None else batch["views"]
        return [v.to(self.device, non_blocking=True) if ph is None or not p.shape[-1]
                else ph.apply_batch(v.to(self.device, non_blocking=True), p)
                for ph, v, p in zip(self.photometric, views, batch["photo"])]
