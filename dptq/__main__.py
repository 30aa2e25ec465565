"""``python -m dptq audit``: audit one trained network from the command line (dptq.audit).

    python -m dptq audit --arch resnet18 --weights my_model.pth --dataset digits

The settings are the config files' (``--configfile``, default config.yaml), with the dataset
and the model given here; the outputs land where the workflow's audit job writes them:
results/audit/{name}/ and results/figures/audit_{name}.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import audit, config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dptq", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("audit", help="audit one trained network (worst case, ONNX Runtime, batch coupling)")
    one.add_argument("--arch", required=True, help="the timm arch of the network, e.g. resnet18")
    one.add_argument("--weights", required=True, help="a state dict, timm checkpoint or safetensors file")
    one.add_argument("--dataset", help="digits | oxford_pets | imagefolder (default: the config's)")
    one.add_argument("--root", help="the dataset's folder (default: the config's dataset.root)")
    one.add_argument("--num-classes", type=int, help="the model's classes (default: the dataset's)")
    one.add_argument("--class-map", help="a YAML file mapping each dataset class name to the model's class index, "
                                         "for a model of other classes")
    one.add_argument("--name", help="the audit's name in results/audit/ (default: the weights file's stem)")
    one.add_argument("--configfile", nargs="+", default=["config.yaml"], help="config files, in overlay order")
    args = parser.parse_args(argv)
    name = args.name or Path(args.weights).stem
    model = {"arch": args.arch, "weights": args.weights, "num_classes": args.num_classes}
    dataset = {k: v for k, v in (("name", args.dataset), ("root", args.root)) if v}
    try:
        if args.class_map:
            model["class_map"] = config.read_yaml(args.class_map)
        # one model, the pipeline's own not among them (their names may be the same)
        cfg = config.load(args.configfile, {"dataset": dataset, "audit": {"pipeline": False, "models": {name: model}}})
        result = audit.run_job(name, cfg, network=[], pairs=[], json_path=f"results/audit/{name}/audit.json",
                               figure=f"results/figures/audit_{name}.png")
    except (ValueError, OSError) as err:  # the messages name the file or key and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{name}: simulated worst case {result.simulated.verdict} (drop {result.simulated.drop:.1f} points), "
          f"ONNX Runtime int8 {result.runtime.verdict.verdict} (drop {result.runtime.verdict.drop:.1f}); "
          f"results/audit/{name}/audit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
