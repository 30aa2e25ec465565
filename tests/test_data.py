"""dptq.data: digits, Oxford-IIIT Pet and ImageFolder through the real loaders, splits,
augmentation, mixup, normalisation and loaders. Fixtures are written in each dataset's real
on-disk layout with a few tiny images."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dptq import config, data
from dptq.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16

torch.set_num_threads(1)


RA = {"num_ops": 3, "magnitude": 15}  # a stage's RandAugment
CPU = Runtime(0, device="cpu", bf16=False, channels_last=False, threads=1)


def make_data(**dataset) -> data.Data:
    base = config.read_yaml(ROOT / "config.yaml")
    return data.Data(**config.merge(base, {"dataset": {"image_size": SIZE, **dataset}})["dataset"])


def write_image(path: Path, seed: int, size=(20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# Oxford-IIIT Pet: image id, class id (1..37), species (1 cat, 2 dog), breed id
PETS = {"Abyssinian": (1, 1, 1), "american_bulldog": (2, 2, 1), "Bengal": (3, 1, 2)}


@pytest.fixture
def pets_root(tmp_path) -> Path:
    """torchvision's layout: root/oxford-iiit-pet/images/<id>.jpg, annotations/{trainval,test}.txt."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, ids in (("trainval", range(100, 104)), ("test", range(200, 202))):
        lines = []
        for breed, (label, species, breed_id) in PETS.items():
            for i in ids:
                write_image(base / "images" / f"{breed}_{i}.jpg", seed=i * label, size=(18 + label, 14))
                lines.append(f"{breed}_{i} {label} {species} {breed_id}\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return tmp_path


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """ImageFolder layout: root/{train,test}/<class>/<image>.png."""
    for split, count in (("train", 4), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                write_image(tmp_path / split / name / f"{i}.png", seed=10 * c + i, size=(12 + i, 10))
    return tmp_path


def fixture_data(name, root, **dataset) -> data.Data:
    return make_data(name=name, root=str(root), val_fraction=0.25, **dataset)


# --- digits --------------------------------------------------------------------------------------

def test_digits_shapes_range_and_stratified_halves():
    d = make_data()
    train, test = d.build("train"), d.build("test")
    assert len(train) + len(test) == 1797 and abs(len(train) - len(test)) <= 1
    image, label = train[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey in 3 channels
    batch = torch.stack([train[i][0] for i in range(64)])
    assert batch.min() >= 0 and batch.max() <= 1 and batch.max() > 0.9
    counts = {s: Counter(ds.labels.tolist()) for s, ds in (("train", train), ("test", test))}
    assert d.num_classes() == 10 and train.classes == [str(d) for d in range(10)]
    assert all(abs(counts["train"][c] - counts["test"][c]) <= 1 for c in range(10))


def test_digits_split_depends_only_on_split_seed():
    """The training seed is not the Data's at all: every training seed sees the same test images."""
    def split(split_seed):
        data._digits_split.cache_clear()  # really redo the split, not a cached copy
        ds = make_data(split_seed=split_seed).build("test")
        return ds.source.images, ds.labels

    first, again, other = split(0), split(0), split(1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_digits_are_the_bundled_images_upsampled_bilinearly():
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16
    every = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    image, label = make_data().build("test")[5]
    match = (every[:, 0] - image[0]).abs().flatten(1).max(1).values.argmin()
    assert torch.equal(every[match, 0], image[0]) and int(digits.target[match]) == label


# --- fit / val -----------------------------------------------------------------------------------

def test_fit_val_disjoint_cover_train_and_stratified():
    d = make_data(val_fraction=0.2)
    train, fit, val = (d.build(s) for s in ("train", "fit", "val"))
    fit_idx, val_idx = set(fit.indices.tolist()), set(val.indices.tolist())
    assert not fit_idx & val_idx and fit_idx | val_idx == set(range(len(train)))
    assert abs(len(val) - 0.2 * len(train)) <= 1
    per_class = Counter(train.labels.tolist())
    for c, n in Counter(val.labels.tolist()).items():
        assert abs(n - 0.2 * per_class[c]) <= 1
    assert torch.equal(d.build("val").indices, val.indices)  # seeded
    assert torch.equal(make_data(val_fraction=0.2).build("val").indices, val.indices)
    assert not torch.equal(make_data(val_fraction=0.2, split_seed=3).build("val").indices, val.indices)
    assert torch.equal(fit[0][0], train[int(fit.indices[0])][0])


def test_val_fraction_zero_fit_is_train_and_val_is_refused():
    d = make_data(val_fraction=0.0)
    assert torch.equal(d.build("fit").indices, d.build("train").indices)
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        d.build("val")


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'validation'"):
        make_data().build("validation")


# --- augmentation and mixup ----------------------------------------------------------------------

FULL_AUGMENT = {"crop_padding": 4, "hflip": True, "color_jitter": 0.4}


def test_augmentation_keeps_shape_range_and_follows_torch_rng():
    d = make_data(augment=FULL_AUGMENT)
    ds, plain = d.build("train", randaugment=RA), d.build("train")

    def draw():
        torch.manual_seed(5)
        return torch.stack([ds[i][0] for i in range(16)])

    first, again = draw(), draw()
    assert first.shape == (16, 3, SIZE, SIZE) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.stack([plain[i][0] for i in range(16)]))
    assert [ds[i][1] for i in range(16)] == [plain[i][1] for i in range(16)]


def test_augmentation_on_uint8_files_returns_float(folder_root):
    d = fixture_data("imagefolder", folder_root, augment=FULL_AUGMENT)
    torch.manual_seed(0)
    for image, _ in d.build("train", randaugment=RA):
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1


def steps(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_augmented_iff_a_randaugment_is_given():
    """The dataset's crop, flip and jitter, then the stage's RandAugment (none when num_ops is 0)."""
    d = make_data(augment=FULL_AUGMENT)
    assert d.build("fit").transform is None
    assert steps(d.build("fit", randaugment={"num_ops": 0, "magnitude": 9}).transform) == [
        "RandomCrop", "RandomHorizontalFlip", "ColorJitter"]
    full = d.build("fit", randaugment=RA).transform
    assert steps(full) == ["RandomCrop", "RandomHorizontalFlip", "ColorJitter", "RandAugment"]
    assert (full.transforms[0].padding, full.transforms[3].num_ops, full.transforms[3].magnitude) == ([4, 4, 4, 4], 3, 15)
    none = dict(crop_padding=0, hflip=False, color_jitter=0.0)
    assert steps(make_data(augment=none).build("train", randaugment=RA).transform) == ["RandAugment"]


def test_no_augmentation_at_all_is_the_identity():
    none = dict(crop_padding=0, hflip=False, color_jitter=0.0)
    transform = data.augmentation(SIZE, **none, randaugment={"num_ops": 0, "magnitude": 9})
    x = torch.rand(3, SIZE, SIZE)
    assert torch.equal(transform(x), x)


def test_mixup_alpha_zero_is_identity():
    x = torch.rand(5, 3, 4, 4)
    mixed, lam, perm = data.mixup(x, 0.0)
    assert mixed is x and lam == 1.0 and torch.equal(perm, torch.arange(5))


def test_mixup_is_a_convex_pair_mix_reproducible_from_torch_rng():
    x = torch.rand(6, 3, 4, 4)
    torch.manual_seed(7)
    mixed, lam, perm = data.mixup(x, 1.0)
    torch.manual_seed(7)
    again = data.mixup(x, 1.0)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    assert torch.equal(mixed, again[0]) and lam == again[1] and torch.equal(perm, again[2])
    gen = data.mixup(x, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(gen[0], mixed)  # the global RNG and a generator with the same seed agree


def test_mixup_lambda_follows_beta():
    torch.manual_seed(0)
    x = torch.zeros(2, 1)
    lams = torch.tensor([data.mixup(x, 0.5)[1] for _ in range(2000)])
    # Beta(0.5, 0.5): mean 1/2, variance 1/8
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.125) < 0.015


# --- normalisation and loaders -------------------------------------------------------------------

def test_normalize_matches_hand_computation():
    x = torch.rand(2, 3, 3, 5)
    out = data.normalize(x)
    for c in range(3):
        assert torch.allclose(out[:, c], (x[:, c] - data.MEAN[c]) / data.STD[c])
    shifted = data.normalize(x, mean=(0.0, 0.5, 1.0), std=(1.0, 2.0, 4.0))
    assert torch.allclose(shifted[:, 2], (x[:, 2] - 1.0) / 4.0)
    assert data.MEAN == pytest.approx((0.485, 0.456, 0.406)) and data.STD == pytest.approx((0.229, 0.224, 0.225))


def test_network_input_is_normalised_on_the_device_in_the_memory_format():
    x = torch.rand(2, 3, 4, 5)
    rt = Runtime(0, device="cpu", bf16=False, channels_last=True, threads=1)
    out = data.network_input(x, rt)
    assert out.device == rt.dev and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, data.normalize(x))
    assert torch.equal(data.network_input(x, CPU, normalize=lambda images: 2 * images), 2 * x)


def test_loader_order_is_deterministic_and_batches_skip():
    d = make_data()
    ds = d.build("test")
    labels = torch.cat([y for _, y in d.loader(ds, 128, CPU)])
    assert labels.dtype == torch.int64 and torch.equal(labels, ds.labels)

    def shuffled(seed, **kw):
        return torch.cat([y for _, y in d.loader(ds, 128, CPU, shuffle=True, seed=seed, **kw)])

    assert torch.equal(shuffled(1), shuffled(1)) and not torch.equal(shuffled(1), shuffled(2))
    order = data.batch_order(len(ds), 128, shuffle=True, seed=1)
    assert torch.equal(shuffled(1), ds.labels[torch.tensor(sum(order, []))])
    resumed = torch.cat([y for _, y in d.loader(ds, 128, CPU, batches=order[3:])])
    assert torch.equal(resumed, shuffled(1)[3 * 128:])


def test_loader_workers_give_the_same_batches():
    d = make_data(num_workers=1)
    ds = d.build("val")
    with_workers = [x for x, _ in d.loader(ds, 32, CPU)]
    in_process = [x for x, _ in make_data().loader(ds, 32, CPU)]
    assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process, strict=True))


# --- Oxford-IIIT Pet and ImageFolder through the real loaders ------------------------------------

def test_oxford_pets_fixture_loads(pets_root):
    d = fixture_data("oxford_pets", pets_root)
    train, test, val = d.build("train"), d.build("test"), d.build("val")
    assert (len(train), len(test), len(val)) == (12, 6, 3)
    assert train.classes == ["Abyssinian", "American Bulldog", "Bengal"] and d.num_classes() == 3
    assert Counter(test.labels.tolist()) == {0: 2, 1: 2, 2: 2}
    assert Counter(val.labels.tolist()) == {0: 1, 1: 1, 2: 1}
    batch, labels = next(iter(d.loader(test, 6, CPU)))
    assert batch.shape == (6, 3, SIZE, SIZE) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1 and labels.tolist() == test.labels.tolist()


def test_imagefolder_fixture_loads(folder_root):
    d = fixture_data("imagefolder", folder_root)
    train, test = d.build("train"), d.build("test")
    assert (len(train), len(test)) == (8, 4) and d.num_classes() == 2
    assert train.classes == ["cat", "dog"] and test.labels.tolist() == [0, 0, 1, 1]
    image, label = test[3]
    expected = torch.as_tensor(np.array(Image.open(folder_root / "test/dog/1.png").resize((SIZE, SIZE))))
    assert image.shape == (3, SIZE, SIZE) and label == 1
    # the same picture resized (torchvision vs PIL resize of noise: close, not equal; another image is ~64 off)
    assert (image.permute(1, 2, 0) * 255 - expected.float()).abs().mean() < 25


def test_missing_pets_root_says_where_and_how_to_fetch(tmp_path):
    d = fixture_data("oxford_pets", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        d.build("train")
    assert "dataset.download: true" in str(err.value) and "copy the dataset" in str(err.value)


def test_imagefolder_missing_split_folder(folder_root):
    import shutil

    shutil.rmtree(folder_root / "test")
    with pytest.raises(FileNotFoundError, match=r"test.*is not a folder"):
        fixture_data("imagefolder", folder_root).build("train")


def test_imagefolder_class_lists_must_match(folder_root):
    write_image(folder_root / "test" / "owl" / "0.png", seed=0)
    with pytest.raises(ValueError, match=r"only in test: \['owl'\]"):
        fixture_data("imagefolder", folder_root).build("test")


@pytest.mark.parametrize("name", ["oxford_pets", "imagefolder"])
def test_corrupt_image_is_named(name, request):
    root = request.getfixturevalue({"oxford_pets": "pets_root", "imagefolder": "folder_root"}[name])
    ds = fixture_data(name, root).build("test")
    bad = Path(ds.source.paths[1])
    bad.write_bytes(b"not an image at all")
    ds[0]  # the others still load
    with pytest.raises(OSError, match=bad.name):
        ds[1]
