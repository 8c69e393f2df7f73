"""Datasets and samplers for ``resnext.train``.

Three sources, each returning a :class:`DataSplits` (train set, validation set, class count):

* ``digits`` (the default): scikit-learn's bundled handwritten digits, 1,797 8x8 grey images of
  10 classes, so a run needs no download. A fixed stratified split holds out 360 images for
  validation; images are upsampled (bilinear) to the model's input size, copied to 3 channels
  and standardised with the training set's mean and std. No augmentation: the default run is a
  couple of epochs, too short to overfit.
* ``imagenet``: an ImageFolder tree (``train/`` and ``val/``, one folder per class) with the
  standard ImageNet augmentation: random resized crop and horizontal flip for training, resize
  to 256/224 of the crop size and centre crop for validation. Needs torchvision.
* ``synthetic``: random images with random labels, for throughput runs (no decoding cost).
"""

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

__all__ = ["DataError", "DataSplits", "ResumableSampler", "build_digits", "build_imagefolder",
           "build_synthetic", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_VAL_SIZE = 360  # 20% of 1,797, stratified
DIGITS_SPLIT_SEED = 0  # fixed, so every run validates on the same held-out images


class DataError(ValueError):
    """A dataset that cannot be built (missing directory or package); main() prints it on one line."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    name: str  # "digits" | "imagenet" | "synthetic"


def build_digits(image_size: int) -> DataSplits:
    """scikit-learn's digits upsampled to ``image_size``, with a fixed 1,437 / 360 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=DIGITS_VAL_SIZE,
                                          stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return DataSplits(TensorDataset(images[train_idx], labels[train_idx]),
                      TensorDataset(images[val_idx], labels[val_idx]), 10, "digits")


def build_imagefolder(root: str, image_size: int) -> DataSplits:
    """ImageFolder ``root/train`` and ``root/val`` with ImageNet augmentation (needs torchvision)."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: no such directory")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"--data {root}: no {split}/ folder (expected the ImageFolder layout "
                            "train/<class>/*.jpg and val/<class>/*.jpg)")
    try:
        from torchvision import datasets, transforms as T
    except ImportError as e:
        raise DataError(f"--data needs the torchvision package to decode and augment images ({e}); "
                        "install it with `pip install torchvision`") from None

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size),
                        T.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
        val = datasets.ImageFolder(os.path.join(root, "val"), val_tf)
    except (FileNotFoundError, RuntimeError) as e:  # e.g. a class folder without images
        raise DataError(f"--data {root}: {e}") from None
    if train.classes != val.classes:
        raise DataError(f"--data {root}: train/ has {len(train.classes)} classes and val/ has "
                        f"{len(val.classes)}, or their names differ; they must match")
    return DataSplits(train, val, len(train.classes), "imagenet")


class _RandomImages(Dataset):
    """``size`` random images with random labels, drawn from a small pool to keep memory bounded."""

    POOL = 256

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.images = torch.randn(min(size, self.POOL), 3, image_size, image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return self.images[i % len(self.images)], self.labels[i]


def build_synthetic(image_size: int, num_samples: int, num_classes: int = 1000) -> DataSplits:
    """Random data: ``num_samples`` training images and a tenth as many for validation."""
    return DataSplits(_RandomImages(num_samples, image_size, num_classes, seed=1),
                      _RandomImages(max(1, num_samples // 10), image_size, num_classes, seed=2),
                      num_classes, "synthetic")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (a seeded shuffle per epoch, one shard per rank) that can start an
    epoch part-way through, so a run resumed after Ctrl-C sees exactly the batches it had left."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Shuffle for ``epoch`` and skip its first ``start`` samples (of this rank's shard)."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(0, self.num_samples - self.start)
