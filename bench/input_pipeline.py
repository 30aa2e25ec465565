"""The Oxford-IIIT Pet input pipeline: decode + resize, augmentation, and the loader's images/s.

    python bench/input_pipeline.py [--config config.yaml config/paper.yaml] [--root DIR]
                                   [--images 512] [--workers 0 1 2] [--threads 1]

Without ``--root`` it writes ``--images`` synthetic photos (500 x 375 JPEG at quality 90, about
the size of a Pets image) in torchvision's layout under a temporary folder. Through ``dptq.data``
with the profile's settings it prints ms per image for the decode + resize (the dataset's file
transform), for the training augmentation alone, and the images/s that ``dptq.data.Data.loader``
delivers for one epoch of the ``fit`` split, augmented as the distillation augments it (the
dataset's crop, flip and jitter, then ``kd.randaugment``), at ``kd.batch_size`` with each worker count.
The pipeline is not the bottleneck while it delivers more images/s than the training step
consumes (``bench/pair_step.py``: batch / distill ms, on the same machine).
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dptq import config, data
from dptq.config import section_for
from dptq.runtime import Runtime

BREEDS = {"Abyssinian": (1, 1, 1), "american_bulldog": (2, 2, 1), "Bengal": (3, 1, 2), "beagle": (4, 2, 2)}


def write_pets(root: Path, images: int, seed: int = 0) -> None:
    """``images`` trainval and a quarter as many test photos: smooth colour fields plus grain."""
    rng = np.random.default_rng(seed)
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    for split, count in (("trainval", images), ("test", max(1, images // 4))):
        lines = []
        for i in range(count):
            breed, (label, species, breed_id) = list(BREEDS.items())[i % len(BREEDS)]
            name = f"{breed}_{split}_{i}"
            coarse = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), dtype=np.int16)
            pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"{name}.jpg", quality=90)
            lines.append(f"{name} {label} {species} {breed_id}\n")
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))


def ms_per_image(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.perf_counter() - start) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["config.yaml", "config/paper.yaml"])
    parser.add_argument("--root", help="a folder holding oxford-iiit-pet/ (default: synthetic photos)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        if not args.root:
            write_pets(root, args.images)
        cfg = config.load(args.config, overrides={"dataset": {"name": "oxford_pets", "root": str(root), "download": False},
                                                  "runtime": {"device": "cpu"}})
        rt = Runtime(0, **{**cfg["runtime"], "threads": args.threads})
        dataset = data.Data(**cfg["dataset"])
        plain, augmented = dataset.build("fit"), dataset.build("fit", randaugment=cfg["kd"]["randaugment"])
        n = min(len(plain), args.images)
        batch = max(section_for(cfg, "kd", arch)["batch_size"] for arch in cfg["kd"]["archs"])
        decoded = [plain.source.image(plain.indices[i]) for i in range(n)]
        print(f"{len(plain)} fit images at {cfg['dataset']['image_size']} px, augmentation: {augmented.transform}")
        print(f"decode + resize   {ms_per_image(lambda i: plain.source.image(plain.indices[i]), n):8.2f} ms/image")
        print(f"augmentation      {ms_per_image(lambda i: augmented.transform(decoded[i]), n):8.2f} ms/image")
        print(f"whole item        {ms_per_image(lambda i: augmented[i], n):8.2f} ms/image")
        for workers in args.workers:
            loader = data.Data(**{**cfg["dataset"], "num_workers": workers}).loader(augmented, batch, rt, shuffle=True)
            start, seen = time.perf_counter(), 0
            for images, _ in loader:
                seen += len(images)
            print(f"loader, {workers} worker(s), batch {batch}: {seen / (time.perf_counter() - start):8.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
