"""Job start-up: process start to the first training batch in hand, against a bare
``python -c "import torch, timm"``, measured alternately in one run (the performance issue's goal:
at most 2 s above it).

    python bench/startup.py [--targets FILE ...] [--repeats 3] [--configfile config/seeds.yaml]

Each target is a training job's checkpoint (teacher, distillation or pair; their inputs must
exist: run the default first). Its command is the one Snakemake would run (a forced dry run
prints it), with the checkpoint, metrics and log sent to a temporary folder. The job runs with
its own imports, config check, data and network loading, and stops when its first batch arrives.
"""
import argparse
import os
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = "DPTQ_STARTUP_REPORT"  # where the child writes the wall-clock time of its first batch
TARGETS = ["checkpoints/seed0/teacher.pt", "checkpoints/seed0/distill/resnet18.pt",
           "checkpoints/seed0/pair/resnet18/I/A/detrimental.pt"]
OUTPUTS = ("--ckpt", "--metrics", "--log")


def job_command(target: str, configfiles: list[str]) -> list[str]:
    """The shell command of ``target``'s job, as a forced Snakemake dry run prints it."""
    extra = ["--configfile", *configfiles] if configfiles else []
    dry = subprocess.run(["snakemake", target, "--force", "-n", "-p", *extra],
                         cwd=ROOT, capture_output=True, text=True)
    lines = [line.partition("Shell command:")[2] for line in dry.stdout.splitlines() if "Shell command:" in line]
    if dry.returncode or not lines:
        sys.exit(f"bench/startup.py: no job command for {target} (snakemake exit {dry.returncode}):\n"
                 f"{dry.stdout[-2000:]}{dry.stderr[-2000:]}")
    return shlex.split(lines[-1].strip())


def redirected(command: list[str], folder: Path) -> list[str]:
    """``command`` with the values of its output options moved into ``folder``."""
    out = list(command)
    for i, arg in enumerate(out[:-1]):
        if arg in OUTPUTS:
            out[i + 1] = str(folder / Path(out[i + 1]).name)
    return out


def time_child(argv: list[str], report: Path | None = None) -> float:
    """Seconds from launching ``argv`` to its end, or to the first batch it reports in ``report``."""
    env = dict(os.environ, **({REPORT: str(report)} if report else {}))
    start = time.time()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if report is None:
        if done.returncode:
            sys.exit(f"bench/startup.py: {argv} failed:\n{done.stderr[-2000:]}")
        return time.time() - start
    if not report.exists():
        sys.exit(f"bench/startup.py: {argv[2:]} ended (exit {done.returncode}) before its first batch; "
                 f"see its log in {report.parent}")
    return float(report.read_text()) - start


def child(script: str, argv: list[str]) -> None:
    """Run the job ``script`` as its own process would; at its first batch, report the time and stop."""
    sys.path[:0] = [str(ROOT / Path(script).parent), str(ROOT)]  # as `python script` would, plus dptq
    from dptq.data import Data

    make_loader = Data.loader

    def first_batch_stops(self, *args, **kwargs):
        loader = make_loader(self, *args, **kwargs)

        class Stopping:
            def __iter__(self):
                for _ in loader:
                    Path(os.environ[REPORT]).write_text(repr(time.time()))
                    os._exit(0)
        return Stopping()

    Data.loader = first_batch_stops
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configfile", nargs="*", default=[], help="config overlays, as for snakemake")
    args = parser.parse_args()
    commands = {t: job_command(t, args.configfile) for t in args.targets}
    bare = [sys.executable, "-c", "import torch, timm"]
    times: dict[str, list[float]] = {"bare": [], **{t: [] for t in commands}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["bare"].append(time_child(bare))
            for target, command in commands.items():
                folder = Path(tmp) / f"{r}-{Path(target).stem}"
                folder.mkdir()
                script, *rest = command[1:]
                argv = [sys.executable, __file__, "--child", script, *redirected(rest, folder)]
                times[target].append(time_child(argv, folder / "first_batch"))
    base = statistics.median(times["bare"])
    print(f"bare `import torch, timm`: median {base:.2f} s over {args.repeats} (each: "
          + ", ".join(f"{t:.2f}" for t in times["bare"]) + ")")
    print(f"{'job (target)':<60} {'to first batch, s':>18} {'above bare, s':>14}  goal <= 2 s")
    for target in commands:
        median = statistics.median(times[target])
        print(f"{target:<60} {median:>18.2f} {median - base:>14.2f}  {'met' if median - base <= 2 else 'not met'}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
