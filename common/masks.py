"""Region masks shared by the mask-based methods (ConCL, DetCon): batched cosine k-means on
feature maps, Felzenszwalb-Huttenlocher segments with an on-disk cache, and grids."""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@torch.no_grad()
def kmeans(x, k, iters=10):
    """Cosine k-means per item of a batch, on the device.

    x: (B, N, D) features -> (B, N) labels in [0, min(k, N)). Initialised by greedy k-means++
    on the cosine distance, so well-separated clusters are found (ConCL's random init with replacement
    can start two centroids on one cluster, pitfall P16); a cluster left empty is re-seeded with
    the point farthest from its centroid. Randomness comes from torch's global RNG.
    """
    x = F.normalize(x.float(), dim=-1)
    B, N, _ = x.shape
    k = min(k, N)
    rows = torch.arange(B, device=x.device)
    centres = x[rows, torch.randint(N, (B,), device=x.device)].unsqueeze(1)   # (B, 1, D)
    dist = 1 - (x @ centres.transpose(1, 2)).squeeze(2)                       # (B, N)
    trials = 2 + int(np.log(k))  # greedy k-means++ (as scikit-learn): best of a few draws
    for _ in range(1, k):
        p = dist.clamp_min(0) ** 2 + 1e-12
        cand = torch.multinomial(p / p.sum(1, keepdim=True), trials)            # (B, L)
        cand_dist = torch.minimum(dist.unsqueeze(2),
                                  1 - x @ x[rows[:, None], cand].transpose(1, 2))  # (B, N, L)
        best = (cand_dist.clamp_min(0) ** 2).sum(1).argmin(1)                   # (B,)
        centres = torch.cat([centres, x[rows, cand[rows, best]].unsqueeze(1)], 1)
        dist = cand_dist[rows, :, best]
    for _ in range(iters):
        sim = x @ centres.transpose(1, 2)                                     # (B, N, k)
        labels = sim.argmax(2)
        onehot = F.one_hot(labels, k).to(x.dtype)
        sums = onehot.transpose(1, 2) @ x                                     # (B, k, D)
        centres = F.normalize(sums, dim=-1)
        empty = onehot.sum(1) == 0                                            # (B, k)
        if empty.any():
            own = sim.gather(2, labels.unsqueeze(2)).squeeze(2)               # (B, N)
            for b in torch.nonzero(empty.any(1)).flatten().tolist():
                far = own[b].argsort()[: int(empty[b].sum())]                 # least similar
                centres[b, empty[b]] = x[b, far]
    return (x @ centres.transpose(1, 2)).argmax(2)


def grid_labels(size, g):
    """(size, size) int64 map of a g x g grid, cell id = row * g + col."""
    idx = torch.arange(size) * g // size
    return idx[:, None] * g + idx[None, :]


def felzenszwalb(img, scale, min_size, sigma=0.8):
    """FH segments of an RGB uint8 array as consecutive int32 ids 0..n-1 (never uint8: ids of
    256 and more would wrap onto other segments, pitfall P15)."""
    from skimage.segmentation import felzenszwalb as fh
    seg = fh(np.asarray(img), scale=scale, sigma=sigma, min_size=min_size)
    return np.unique(seg, return_inverse=True)[1].reshape(seg.shape).astype(np.int32)


class FHCache:
    """FH label maps computed once per image and kept as 16-bit PNGs (a few KB each; a 224 x 224
    tile has fewer than 2^16 pixels, so ids fit). Safe to fill from several loader workers."""

    def __init__(self, folder, scale, min_size, sigma=0.8):
        self.folder = Path(folder) / f"fh_s{scale}_m{min_size}_g{sigma}"
        self.scale, self.min_size, self.sigma = scale, min_size, sigma
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, key, img):
        """key: a unique name for the image (relative path or index); img: PIL RGB."""
        path = self.folder / (str(key).replace("/", "__") + ".png")
        if path.exists():
            try:
                return np.asarray(Image.open(path), dtype=np.int32)
            except OSError:
                pass  # a torn write from a killed run: recompute
        seg = felzenszwalb(img, self.scale, self.min_size, self.sigma)
        if seg.max() >= 2 ** 16:
            raise ValueError(f"{key}: {seg.max() + 1} FH segments do not fit a 16-bit PNG")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        Image.fromarray(seg.astype(np.uint16)).save(tmp, format="PNG")
        os.replace(tmp, path)
        return seg
