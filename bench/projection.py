"""Device-hours of a whole profile (default: the paper's), projected from step times measured now.

    python bench/projection.py [--config config.yaml config/paper.yaml] [--device cuda]
                               [--train-images N] [--test-images N] [--max-batch B]
                               [--threads 1] [--repeats 3]

Each step is timed at the profile's own image size and batch size (``pair_step.step_times``);
``--max-batch`` caps the batch where the device cannot hold it (then the per-image time of the
smaller batch stands in, which overestimates a GPU's cost). The split sizes are the dataset's
own, or Oxford-IIIT Pet's published ones (trainval 3,680, test 3,669) where it is not on this
machine. With n_fit = n - n_val, n_val = round(v · n):

- teacher: E_T · ⌈n_fit / b_T⌉ training steps of ``teacher.arch`` + E_T · n_val teacher forwards;
- distill (per arch): E_KD · ⌈n_fit / b_KD⌉ distillation steps + E_KD · n_val forwards;
- pairs (per arch): P = |versions| · |budgets| · |modes| runs of E_P · ⌈n_fit / b_P⌉ pair steps
  + E_P · n_val pair evaluations;
- evaluate: over the test set, every pair at FP and quantized, plus Table 3 (W at FP; W, R and
  D each with three policies);
- analyses: layer scan 2 networks · 3N masks · each split's examples (``analysis.max_examples``)
  quantized; histograms 2 · (FP + quantized) over the test set; corruptions 2 · (FP + quantized)
  per clean or corrupted pass (seedless corruptions once, the others ``seeds`` times); remedy
  3 networks at FP and 16 quantized settings over the test set.

The whole study runs once per training seed (``seed`` may be a list): every count above is
multiplied by their number. Job start-up, data loading and checkpoint writes are not counted.
"""
import argparse
import math

import torch

from dptq import config, corruptions, data
from dptq.config import section_for
from pair_step import step_times


PETS_SIZES = {"train": 3680, "test": 3669}


def split_size(cfg, split: str) -> int:
    """Images in ``split`` of the configured dataset (nothing is downloaded)."""
    try:
        return len(data.Data(**{**cfg["dataset"], "download": False}).build(split))
    except FileNotFoundError:
        if cfg["dataset"]["name"] == "oxford_pets":
            return PETS_SIZES[split]
        raise


def per_image(times: dict[str, float], batch: int) -> dict[str, float]:
    """ms per image of every step timed at ``batch``."""
    return {name: ms / batch for name, ms in times.items()}


def project(cfg, arch_times, teacher_times, n_layers, n_train, n_test) -> dict[tuple[str, str], float]:
    """Seconds per (stage, arch), all training seeds together, from per-image milliseconds (see the
    module docstring)."""
    n_val = round(cfg["dataset"]["val_fraction"] * n_train)
    n_fit = n_train - n_val
    p = cfg["pairs"]
    pairs = len(p["versions"]) * len(p["budgets"]) * len(p["modes"])
    a, c = cfg["analysis"], cfg["analysis"]["corruptions"]
    subset = lambda n: min(n, a["max_examples"]) if a["max_examples"] > 0 else n  # noqa: E731
    split_sizes = {"train": n_train, "test": n_test}
    corrupted_passes = 1 + sum(c["degrees"] * (1 if name in corruptions.SEEDLESS else c["seeds"]) for name in c["names"])
    t = cfg["teacher"]
    seconds = {("teacher", t["arch"]): t["epochs"] * (math.ceil(n_fit / t["batch_size"]) * t["batch_size"] * teacher_times["plain"]
                                                    + n_val * teacher_times["infer fp"]) / 1000}
    for arch, ms in arch_times.items():
        kd, pr = section_for(cfg, "kd", arch), section_for(cfg, "pairs", arch)
        fp_q = ms["infer fp"] + ms["infer q"]
        seconds[("distill", arch)] = kd["epochs"] * (math.ceil(n_fit / kd["batch_size"]) * kd["batch_size"] * ms["distill"]
                                                     + n_val * ms["infer fp"]) / 1000
        seconds[("pairs", arch)] = pairs * pr["epochs"] * (math.ceil(n_fit / pr["batch_size"]) * pr["batch_size"] * ms["pair"]
                                                           + n_val * ms["pair eval"]) / 1000
        seconds[("evaluate", arch)] = n_test * (pairs * fp_q + ms["infer fp"] + 9 * ms["infer q"]) / 1000
        seconds[("analyses", arch)] = (
            2 * 3 * n_layers[arch] * sum(subset(split_sizes[s]) for s in a["layer_scan"]["splits"]) * ms["infer q"]
            + 2 * n_test * fp_q
            + 2 * corrupted_passes * subset(n_test) * fp_q
            + n_test * (3 * ms["infer fp"] + 16 * ms["infer q"])) / 1000
    runs = len(config.seeds(cfg))
    return {key: runs * s for key, s in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["config.yaml", "config/paper.yaml"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-images", type=int, help="default: the dataset's train split")
    parser.add_argument("--test-images", type=int, help="default: the dataset's test split")
    parser.add_argument("--max-batch", type=int, default=None, help="cap every batch (per-image time of the smaller batch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = config.load(args.config)
    torch.set_num_threads(args.threads)
    device, size = torch.device(args.device), cfg["dataset"]["image_size"]
    cap = (lambda b: min(b, args.max_batch)) if args.max_batch else (lambda b: b)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} CPU thread(s)'}) "
          f"config={' + '.join(args.config)} size={size} max_batch={args.max_batch} seeds={config.seeds(cfg)}")

    def timed(arch, batch, steps):
        n, times = step_times(arch, size, cap(batch), device, args.repeats, cfg["runtime"]["channels_last"], only=set(steps),
                              teacher_arch=cfg["teacher"]["arch"])
        return n, per_image(times, cap(batch))

    _, teacher_times = timed(cfg["teacher"]["arch"], cfg["teacher"]["batch_size"], ["plain", "infer fp"])
    arch_times, n_layers = {}, {}
    for arch in cfg["kd"]["archs"]:
        n_layers[arch], kd_times = timed(arch, section_for(cfg, "kd", arch)["batch_size"], ["distill"])
        _, pair_times = timed(arch, section_for(cfg, "pairs", arch)["batch_size"], ["pair", "pair eval"])
        _, eval_times = timed(arch, cfg["evaluate"]["batch_size"], ["infer fp", "infer q"])
        arch_times[arch] = {"distill": kd_times["distill"], "infer fp": eval_times["infer fp"], "infer q": eval_times["infer q"],
                            "pair": pair_times["pair"], "pair eval": pair_times["pair eval"]}
        print(f"  {arch}: ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in arch_times[arch].items()), flush=True)
    n_train, n_test = args.train_images or split_size(cfg, "train"), args.test_images or split_size(cfg, "test")
    print(f"  train images {n_train}, test images {n_test}")
    seconds = project(cfg, arch_times, teacher_times, n_layers, n_train, n_test)
    unit = "GPU" if device.type == "cuda" else "CPU"
    print(f"{'stage':<10}{'arch':<26}{unit + '-hours':>12}")
    for (stage, arch), s in seconds.items():
        print(f"{stage:<10}{arch:<26}{s / 3600:>12.2f}")
    print(f"{'total':<36}{sum(seconds.values()) / 3600:>12.2f}")


if __name__ == "__main__":
    main()
