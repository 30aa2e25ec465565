"""Datasets, augmentation, mixup and loaders (docs/method.md §4).

Every dataset yields ``(image, label)``: ``image`` a float32 CHW tensor in [0, 1] at
``dataset.image_size`` (not normalised; :func:`normalize` maps a batch to the network input),
``label`` an int. Three sources, picked by ``dataset.name``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download), split 50/50
  stratified with ``split_seed``, upsampled bilinearly, grey replicated to 3 channels;
- ``oxford_pets``: ``torchvision.datasets.OxfordIIITPet`` (trainval -> train, test -> test);
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` on ``root/train`` and ``root/test``.

Splits: ``train`` (the whole training split), ``fit`` and ``val`` (a stratified, seeded split of
it; ``dataset.val_fraction`` goes to ``val``) and ``test``. All randomness of augmentation and
mixup comes from torch's RNG, so a trainer that saves and restores it resumes exactly.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from . import runtime

MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
SPLITS = ("train", "fit", "val", "test")
PETS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"


def normalize(images: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """(x - mean) / std per channel for a [B, 3, H, W] batch in [0, 1], on the batch's device."""
    kw = {"dtype": images.dtype, "device": images.device}
    return (images - torch.as_tensor(mean, **kw).view(1, -1, 1, 1)) / torch.as_tensor(std, **kw).view(1, -1, 1, 1)


# --- sources: labels known up front, one image read at a time -----------------------------------

class _Tensors:
    """Images already in memory: [n, 1, H, W] float in [0, 1], grey, at the final size."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes

    def image(self, i: int) -> Tensor:
        return self.images[i].repeat(3, 1, 1)  # a copy: callers may edit it in place


class _Files:
    """A torchvision dataset of image files whose transform yields uint8 CHW at the final size."""

    def __init__(self, dataset, paths: Sequence, labels: Sequence[int], classes: list[str]):
        self.dataset, self.paths, self.classes = dataset, [str(p) for p in paths], classes
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def image(self, i: int) -> Tensor:
        try:
            return self.dataset[i][0]
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for a bad file
            raise OSError(f"{self.paths[i]}: cannot read this image ({type(err).__name__}: {err}); "
                          "replace or delete the file") from err


class Images(Dataset):
    """A subset (``indices``) of a source, with an optional per-example ``transform``."""

    def __init__(self, source, indices: Tensor, transform=None):
        self.source, self.indices, self.transform = source, indices, transform

    @property
    def labels(self) -> Tensor:
        return self.source.labels[self.indices]

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = int(self.indices[i])
        image = self.source.image(j)
        if self.transform is not None:
            image = self.transform(image)
        return v2.functional.to_dtype(image, torch.float32, scale=True), int(self.source.labels[j])


@functools.lru_cache(maxsize=4)
def _digits_split(size: int, seed: int) -> dict[str, _Tensors]:
    """Load once per (size, seed): 1,797 images, 8x8 values 0..16 -> [0, 1], bilinear to size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    # bilinear upsampling is a convex combination of pixels, so the range stays [0, 1]
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train, test = _stratified(digits.target, 0.5, seed)
    classes = [str(c) for c in digits.target_names]
    return {"train": _Tensors(images[train], labels[train], classes), "test": _Tensors(images[test], labels[test], classes)}


def _file_transform(size: int):
    return v2.Compose([v2.Resize((size, size), antialias=True), v2.PILToTensor()])


def _pets(root: str, download: bool, image_size: int, part: str) -> _Files:
    """Oxford-IIIT Pet in torchvision's layout: ``root/oxford-iiit-pet/{images,annotations}``."""
    split = {"train": "trainval", "test": "test"}[part]
    base = Path(root) / "oxford-iiit-pet"
    needed = [base / "images", base / "annotations", base / "annotations" / f"{split}.txt"]
    missing = [p for p in needed if not p.exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"dataset.root: Oxford-IIIT Pet not found: {missing[0]} ({missing[0].absolute()}) does not exist. "
            f"Set dataset.download: true on a machine with internet, or copy the dataset there "
            f"(images.tar.gz and annotations.tar.gz from {PETS_URL} unpacked into {base})")
    ds = datasets.OxfordIIITPet(root, split=split, target_types="category",
                                transform=_file_transform(image_size), download=download)
    # torchvision keeps the file list and labels private; reading them avoids decoding every image
    return _Files(ds, ds._images, ds._labels, ds.classes)


def _imagefolder(root: str, image_size: int, part: str) -> _Files:
    """``root/train/<class>/*`` and ``root/test/<class>/*``; both must name the same classes."""
    root = Path(root)
    folders = {p: root / p for p in ("train", "test")}
    for folder in folders.values():
        if not folder.is_dir():
            raise FileNotFoundError(
                f"dataset.root: {folder} ({folder.absolute()}) is not a folder; the imagefolder dataset needs "
                f"{root}/train/<class>/<image> and {root}/test/<class>/<image>")
    classes = {p: datasets.folder.find_classes(f)[0] for p, f in folders.items()}
    if classes["train"] != classes["test"]:
        only = {p: sorted(set(classes[p]) - set(classes[q])) for p, q in (("train", "test"), ("test", "train"))}
        raise ValueError(f"dataset.root: the class folders of {folders['train']} and {folders['test']} differ "
                         f"(only in train: {only['train']}, only in test: {only['test']}); "
                         "both splits need the same class folders")
    ds = datasets.ImageFolder(folders[part], transform=_file_transform(image_size))
    return _Files(ds, [p for p, _ in ds.samples], ds.targets, ds.classes)


# --- splits --------------------------------------------------------------------------------------

def _stratified(labels: np.ndarray, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted index sets (kept, held out): ``fraction`` of every class held out, seeded."""
    from sklearn.model_selection import train_test_split

    kept, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    return torch.as_tensor(np.sort(kept)), torch.as_tensor(np.sort(held))


def augmentation(image_size: int, crop_padding: int, hflip: bool, color_jitter: float,
                 randaugment: Mapping) -> v2.Compose:
    """Per-example training augmentation (paper Sect. 3): padded random crop, optional horizontal
    flip, colour jitter (the dataset's), RandAugment (the stage's). Takes uint8 or float [0, 1]
    CHW; draws from torch's RNG."""
    steps = [v2.RandomCrop(image_size, padding=crop_padding)] if crop_padding else []
    steps += [v2.RandomHorizontalFlip()] if hflip else []
    steps += [v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)] if color_jitter else []
    num_ops, magnitude = randaugment["num_ops"], randaugment["magnitude"]
    steps += [v2.RandAugment(num_ops=num_ops, magnitude=magnitude)] if num_ops else []
    return v2.Compose(steps or [v2.Identity()])  # Compose refuses an empty list


class Data:
    """The config's ``dataset`` section (``Data(**dataset)``): its splits, loaders and inputs.

    The train/test split (digits) and the fit/val split are drawn with ``split_seed``, never with
    the training seed, so every training seed is measured on the same test images.
    """

    def __init__(self, *, name: str, root: str, image_size: int, num_workers: int, download: bool,
                 split_seed: int, val_fraction: float, augment: Mapping):
        self.name, self.root, self.image_size, self.num_workers = name, root, image_size, num_workers
        self.download, self.split_seed, self.val_fraction = download, split_seed, val_fraction
        self.augment = dict(augment)

    def _source(self, part: str):
        if self.name == "digits":
            return _digits_split(self.image_size, self.split_seed)[part]
        if self.name == "oxford_pets":
            return _pets(self.root, self.download, self.image_size, part)
        return _imagefolder(self.root, self.image_size, part)

    def num_classes(self) -> int:
        return len(self._source("train").classes)

    def _indices(self, labels: Tensor, split: str) -> Tensor:
        """Indices of ``split`` into its source; fit/val split the training split (``val_fraction``)."""
        fraction = self.val_fraction
        if split in ("train", "test") or (split == "fit" and fraction == 0):
            return torch.arange(len(labels))
        if fraction == 0:
            raise ValueError("dataset.val_fraction: 0 leaves no validation part, but the 'val' split was asked for; "
                             "set dataset.val_fraction above 0 (or pairs.select_best: false)")
        try:
            fit, val = _stratified(labels.numpy(), fraction, self.split_seed)
        except ValueError as err:
            raise ValueError(f"dataset.val_fraction: {fraction} of {len(labels)} training images cannot be split "
                             f"stratified ({err}); change dataset.val_fraction or use more images") from None
        return fit if split == "fit" else val

    def build(self, split: str, randaugment: Mapping | None = None) -> Images:
        """The ``split`` (train | fit | val | test); augmented (the dataset's crop, flip and jitter,
        then ``randaugment``) when ``randaugment`` is given."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        source = self._source("test" if split == "test" else "train")
        transform = None if randaugment is None else augmentation(self.image_size, **self.augment, randaugment=randaugment)
        return Images(source, self._indices(source.labels, split), transform)

    def loader(self, dataset: Dataset, batch_size: int, rt: runtime.Runtime, shuffle: bool = False, seed: int = 0,
               batches: Sequence[Sequence[int]] | None = None) -> DataLoader:
        """A deterministic DataLoader: batches from ``batches`` or :func:`batch_order`.

        Its own generator keeps the loader's worker base seed from drawing on torch's global RNG,
        which the trainer saves and restores for an exact mid-epoch resume.
        """
        if batches is None:
            batches = batch_order(len(dataset), batch_size, shuffle, seed)
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=rt.dev.type == "cuda", generator=torch.Generator().manual_seed(seed))


def network_input(images: Tensor, rt: runtime.Runtime, normalize=normalize) -> Tensor:
    """A [0, 1] batch as the network sees it: on the device, normalised, in the run's memory format."""
    return normalize(images.to(rt.dev, non_blocking=True)).contiguous(memory_format=rt.memory_format)


# --- mixup and loaders ---------------------------------------------------------------------------

def mixup(images: Tensor, alpha: float, generator: torch.Generator | None = None) -> tuple[Tensor, float, Tensor]:
    """Mixup within the batch: λ ~ Beta(α, α), mixed = λ x + (1 - λ) x[perm].

    λ is drawn as g₁ / (g₁ + g₂) with gᵢ ~ Gamma(α, 1), and ``perm`` with ``torch.randperm``, both
    on the CPU from ``generator`` (torch's global RNG by default), so the draw is the same on
    every device. α = 0 returns the batch unchanged (λ = 1, identity permutation, no draw).
    """
    n = images.shape[0]
    if alpha == 0:
        return images, 1.0, torch.arange(n, device=images.device)
    g = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    lam = float(g[0] / (g[0] + g[1]))
    perm = torch.randperm(n, generator=generator).to(images.device)
    return lam * images + (1.0 - lam) * images[perm], lam, perm


def batch_order(n: int, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[list[int]]:
    """Index lists of consecutive batches; shuffled by ``torch.randperm`` seeded with ``seed``.

    A trainer that resumes mid-epoch passes ``batch_order(...)[done:]`` to :func:`loader`.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    return [chunk.tolist() for chunk in order.split(batch_size)]
