"""Frozen-feature evaluation shared by linear_probe.py and the online kNN monitor of pre-training:
a deterministic tile loader, feature extraction that leaves the backbone untouched, the weighted
kNN classifier of InstDisc / DINO, and accuracy / macro F1 without sklearn.

    loader = tile_loader(dataset, img_size=224, batch_size=256, workers=8)
    feats, labels = extract_features(backbone, loader, device)        # (N, D) float32, (N,) on CPU
    pred = knn_predict(train_f, train_y, test_f, num_classes)          # k=20, T=0.07, cosine
    accuracy(pred, test_y), macro_f1(pred, test_y, num_classes)        # percent
"""
import os
import sys

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

from common import data as cdata


# ---------------------------------------------------------------------------------------------
# Tiles in, features out

class CentreTiles(torch.utils.data.Dataset):
    """(PIL image, label) dataset -> (uint8 CHW, label): shorter side resized to `size`, centre
    crop, no augmentation, so every evaluation sees the same pixels."""

    def __init__(self, base, size):
        self.base = base
        self.transform = T.Compose([T.Resize(size), T.CenterCrop(size)])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return cdata.pil_to_uint8(self.transform(img)), label


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one, as
    DataLoader's own check); a scheduler's cgroup quota is not seen."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def tile_loader(dataset, img_size, batch_size, workers):
    """Batches of (uint8 (B, 3, S, S), labels (B,)) in dataset order; normalise with
    common.data.to_device. Workers ignore SIGTERM like the pre-training loader's, so a monitor
    running when a job is pre-empted finishes its pass. `workers` is capped at the available
    cores: more only add start-up time (and DataLoader's warning)."""
    workers = min(workers, available_cores())
    return torch.utils.data.DataLoader(
        CentreTiles(dataset, img_size), batch_size=batch_size, shuffle=False,
        num_workers=workers, worker_init_fn=cdata.worker_init,
        prefetch_factor=4 if workers > 0 else None)


@torch.no_grad()
def extract_features(backbone, loader, device, progress=None):
    """-> (features float32 (N, D) on CPU, labels (N,) long). Runs in eval mode, so BN uses and
    keeps its running statistics; the backbone's train/eval mode is restored afterwards.
    progress=None shows a tqdm bar when there are more than 20 batches."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    show = len(loader) > 20 if progress is None else progress
    try:
        for x, y in tqdm(loader, desc="features", disable=not show, leave=False,
                         dynamic_ncols=True, file=sys.stdout):
            feats.append(backbone(cdata.to_device(x, device)).float().flatten(1).cpu())
            labels.append(torch.as_tensor(y, dtype=torch.long))
    finally:
        backbone.train(was_training)
    if not feats:  # an empty share
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------------------------
# Weighted kNN (Wu et al. 2018, InstDisc; DINO's eval_knn.py uses the same vote)

@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=20, T=0.07, chunk=1024):
    """train_f (N, D), train_y (N,), test_f (M, D) -> (M,) long predictions.

    Features are L2-normalised; each test row takes its k most cosine-similar train rows, each
    neighbour votes for its class with weight exp(sim / T), the class with the largest total wins.
    Test rows go in chunks so the (chunk, N) similarity matrix is the only large temporary
    (1024 x 100k floats = 400 MB). Runs on train_f's device; k is clamped to N.
    """
    device = train_f.device
    train_f = F.normalize(train_f.float(), dim=1)
    train_y = train_y.to(device)
    k = min(k, train_f.shape[0])
    out = []
    for q in test_f.split(chunk):
        q = F.normalize(q.to(device).float(), dim=1)
        sim, idx = (q @ train_f.t()).topk(k, dim=1)                         # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())               # (m, C)
        out.append(votes.argmax(1))
    return torch.cat(out).to(test_f.device) if out else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Metrics, in percent

def accuracy(pred, target):
    return 100.0 * (pred.cpu() == target.cpu()).float().mean().item()


def macro_f1(pred, target, num_classes):
    """Mean per-class F1 over the classes that occur in target or in pred, in percent.

    Per class c: F1_c = 2 tp / (2 tp + fp + fn), which equals 2 P R / (P + R) and is 0 when
    tp = 0 (a class never predicted, or only wrongly). Classes in neither target nor pred are
    left out. This is sklearn's f1_score(average='macro') with its default labels (the union of
    the labels in y_true and y_pred) and zero_division=0.
    """
    pred, target = pred.cpu().long(), target.cpu().long()
    tp = torch.bincount(target[pred == target], minlength=num_classes).double()
    n_pred = torch.bincount(pred, minlength=num_classes).double()    # tp + fp
    n_true = torch.bincount(target, minlength=num_classes).double()  # tp + fn
    present = (n_pred + n_true) > 0
    f1 = 2 * tp[present] / (n_pred[present] + n_true[present])
    return 100.0 * f1.mean().item() if present.any() else 0.0
