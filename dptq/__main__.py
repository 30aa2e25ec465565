"""``python -m dptq audit``: audit one trained network from the command line (dptq.audit).

    python -m dptq audit --arch resnet18 --weights my_model.pth --dataset digits

The settings are the config files' (``--configfile``; default: the defaults packaged with dptq,
so it runs from any folder), with the model, the dataset and the options given here overlaid.
The record, tables, ONNX files and policies land in OUT/audit/{name}/, the figure in
OUT/figures/audit_{name}.png (OUT: ``--out``, default results).
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from . import audit, config

DEFAULTS = resources.files("dptq").joinpath("defaults.yaml")  # config.yaml, packaged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dptq", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("audit", help="audit one trained network (worst case, ONNX Runtime, batch coupling)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    one.add_argument("--arch", required=True, help="the timm arch of the network, e.g. resnet18")
    one.add_argument("--weights", required=True, help="a state dict, timm checkpoint or safetensors file")
    one.add_argument("--dataset", help="digits | oxford_pets | imagefolder (default: the config's)")
    one.add_argument("--root", help="the dataset's folder (default: the config's dataset.root)")
    one.add_argument("--num-classes", type=int, help="the model's classes (default: the dataset's)")
    one.add_argument("--class-map", help="a YAML file mapping each dataset class name to the model's class index, "
                                         "for a model of other classes")
    one.add_argument("--image-size", type=int, help="the side the model sees, in pixels (default: the config's dataset.image_size)")
    one.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="the model's input mean (default: ImageNet's)")
    one.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="the model's input std (default: ImageNet's)")
    one.add_argument("--cells", nargs="+", metavar="CELL", help="grid cells to audit, version-budget, e.g. I-A II-B "
                                                                "(default: the config's audit.cells)")
    one.add_argument("--name", help="the audit's name (default: the weights file's stem)")
    one.add_argument("--out", default="results", help="the output folder (default: results)")
    one.add_argument("--configfile", nargs="+", help="config files, in overlay order (default: dptq's packaged "
                                                     "defaults, the repository's config.yaml)")
    args = parser.parse_args(argv)
    name = args.name or Path(args.weights).stem
    model = {"arch": args.arch, "weights": args.weights, "num_classes": args.num_classes, "image_size": args.image_size,
             "mean": args.mean, "std": args.std}
    dataset = {k: v for k, v in (("name", args.dataset), ("root", args.root)) if v}
    audited = {"pipeline": False, "models": {name: model}, **({"cells": args.cells} if args.cells else {})}
    out = Path(args.out)
    try:
        if args.class_map:
            model["class_map"] = config.read_yaml(args.class_map)
        with resources.as_file(DEFAULTS) as defaults:
            # one model, the pipeline's own not among them (their names may be the same)
            cfg = config.load(args.configfile or [defaults], {"dataset": dataset, "audit": audited})
        result = audit.run_job(name, cfg, network=[], pairs=[], json_path=out / "audit" / name / "audit.json",
                               figure=out / "figures" / f"audit_{name}.png")
    except (ValueError, OSError) as err:  # the messages name the file or key and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary(out / "audit" / name / "audit.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
