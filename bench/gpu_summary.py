"""bench/gpu.sh's two Python ends: the machine's versions, and summary.md from the steps' outputs.

    python bench/gpu_summary.py versions           # python, torch, CUDA, cuDNN, GPU, package versions
    python bench/gpu_summary.py summary OUT STEPS  # OUT/summary.md from OUT/<step>.txt and STEPS (name, status, s)

The summary reads the tables that the bench scripts print (pair_step.py, mckp.py, projection.py,
pair_equivalence.py) and the training logs, and puts each number beside the issue's goal; a number
whose step failed or printed nothing says so and names its file. The summary needs no torch.
"""
import operator
import re
import sys
from pathlib import Path

ARCHS = ("resnet18", "regnetx_016", "mobilenetv4_conv_medium")
AT_MOST, AT_LEAST = (operator.le, "≤"), (operator.ge, "≥")


def judged(value, bound: tuple, bound_value: float, unit: str = "") -> tuple[str, str]:
    """(the goal as text, whether ``value`` meets it: yes, no, or blank where it is no number)."""
    (holds, sign) = bound
    return f"{sign} {bound_value:g}{unit}", ("yes" if holds(value, bound_value) else "no") if isinstance(value, float) else ""


def versions() -> None:
    import importlib.metadata

    import torch

    print(f"python: {sys.version.split()[0]}")
    print(f"torch: {torch.__version__}")
    print(f"cuda: {torch.version.cuda}")
    print(f"cudnn: {torch.backends.cudnn.version()}")
    print(f"gpu: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name in ("timm", "triton", "onnxruntime", "jsonschema", "scikit-learn"):
        try:
            print(f"{name}: {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name}: absent")


class Summary:
    def __init__(self, out: Path, steps_file: Path):
        self.out = out
        self.steps = [line.split("\t") for line in steps_file.read_text().splitlines() if line.strip()]
        self.status = {name: state for name, state, _ in self.steps}
        self.versions = dict(re.findall(r"^([\w-]+): (.*)$", self.text("versions"), re.M))
        self.device = self.versions.get("device", "?")
        self.rows = []

    def text(self, step: str) -> str:
        path = self.out / f"{step}.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def row(self, label: str, step: str, value, goal: tuple[str, str] = ("", ""), unit: str = "") -> None:
        """One table row: ``value`` (None: the step's failure), ``goal``: (goal, met), as :func:`judged` gives."""
        if value is None:
            state = self.status.get(step, "not run")
            value = f"— (not in {step}.txt)" if state == "ok" else f"— ({state}; see {step}.txt)"
        elif isinstance(value, float):
            value = f"{value:g}{unit}"
        self.rows.append(f"| {label} | {value} | {goal[0]} | {goal[1]} |")

    def pair_steps(self) -> None:
        """pair / plain and quant / plain per arch at its distillation batch and at the pair batch;
        distillation's efficiency at the distillation batch; the kernel share at the pair batch."""
        for step, role in (("pair_b256", "distillation batch"), ("pair_b64", "pair batch")):
            txt = self.text(step)
            head = re.search(r"size=(\d+) batch=(\d+)", txt)
            setting = f"{head[1]} px, batch {head[2]}" if head else "?"
            fields = {f[0]: f for f in map(str.split, txt.splitlines()) if len(f) == 15 and f[0] in ARCHS}
            for arch in ARCHS:
                mobilenet = arch == "mobilenetv4_conv_medium"  # its distillation batch is the pair batch
                if mobilenet and step == "pair_b256":
                    continue
                f = fields.get(arch) or [None] * 15
                value = lambda column: f[column] and float(f[column])  # noqa: E731
                label = f"{arch}, {setting} ({'distillation and pair batch' if mobilenet else role})"
                self.row(f"pair / plain, {label}", step, value(7), judged(value(7), AT_MOST, 2.8))
                self.row(f"quant / plain, {label}", step, value(6), judged(value(6), AT_MOST, 1.5))
                if mobilenet or step == "pair_b256":
                    self.row(f"distillation's efficiency, (plain + teacher fwd) / distill, {label}", step, value(11),
                             judged(value(11), AT_LEAST, 0.9))
        shares = dict(re.findall(r"^(\w+): kernel share: (.*)$", self.text("pair_b64"), re.M))
        for arch in ARCHS:
            share = shares.get(arch) or (f"n/a on {self.device}" if self.device != "cuda" else None)
            number = re.search(r"= ([\d.]+) %$", share or "")
            goal = judged(number and float(number[1]), AT_LEAST, 80, " %") if arch == "mobilenetv4_conv_medium" else ("", "")
            self.row(f"kernel share: GPU kernel time / wall time of {arch}'s pair step, {setting}", "pair_b64", share, goal)

    def mckp(self) -> None:
        txt = self.text("mckp")
        k = re.search(r"K=(\d+)", txt)
        hit = re.search(r"^\S+\s+77\s+(\d+)\s+256\s+([\d.]+).*\s(\w+)$", txt, re.M)
        ms = hit and float(hit[2])
        self.row(f"MCKP per batch of 256, N = 77, K = {k[1] if k else '?'}, C = {hit[1] if hit else '?'}, "
                 f"the program's allocation: {hit[3] if hit else '?'}", "mckp", ms,
                 judged(ms, AT_MOST, 1, " ms"), " ms")

    def projection(self) -> None:
        txt = self.text("projection")
        total, unit = re.search(r"^total\s+([\d.]+)$", txt, re.M), re.search(r"(\w+)-hours", txt)
        config = re.search(r"config=(\S.*?) size=", txt)
        config = re.sub(r"/\S*/", "", config[1]) if config else "the paper profile"  # a temporary overlay: its name
        hours = total and float(total[1])
        self.row(f"projected {unit[1] if unit else 'device'}-hours of {config}", "projection", hours,
                 judged(hours, AT_MOST, 4.5, " H200-hours"))

    def train(self) -> None:
        epochs = {m[0]: m for m in re.findall(r"^(\w+) epoch \d+/\d+: epoch=.*?seconds=([\d.]+), val_acc=([\d.]+)",
                                              self.text("train"), re.M)}
        done = {"teacher", "distill"} <= epochs.keys() and self.status.get("train") == "ok"
        self.row(f"smoke W (config/smoke.yaml) trained on {self.device}: teacher, then distillation, one epoch each", "train",
                 f"epochs {epochs['teacher'][1]} s + {epochs['distill'][1]} s, W's val acc {epochs['distill'][2]} %"
                 if done else None, ("trains", "yes" if done else ""))

    def equivalence(self) -> None:
        txt = self.text("equivalence")
        head = re.search(r"device=(\w+) size=(\d+) batch=(\d+)", txt)
        where = (f"fast step on {head[1]}{' under bf16' if head[1] == 'cuda' else ''} against the straightforward one "
                 f"on the CPU, {head[2]} px, batch {head[3]}") if head else "?"
        rows = [f for f in map(str.split, txt.splitlines()) if len(f) == 7 and f[0] in ARCHS]
        for arch in ARCHS:
            mine = [f for f in rows if f[0] == arch]
            same = all(f[1] == "True" for f in mine)
            gap = max((abs(float(f[6])) for f in mine), default=0.0)
            self.row(f"pair-step equivalence, {arch}, {where}", "equivalence",
                     f"same bits {same}, largest loss gap {gap:.1e}" if mine else None,
                     ("same bits (the loss gap: bf16's on CUDA)", ("yes" if same else "no") if mine else ""))

    def markdown(self) -> str:
        self.pair_steps()
        self.mckp()
        self.projection()
        self.train()
        self.equivalence()
        v = self.versions
        seconds = sum(int(s) for _, _, s in self.steps)
        return "\n".join([
            "# bench/gpu.sh", "",
            f"- device: {self.device} (GPU: {v.get('gpu', '?')}; driver {v.get('driver', '?')}); torch {v.get('torch', '?')}, "
            f"CUDA {v.get('cuda', '?')}, cuDNN {v.get('cudnn', '?')}; python {v.get('python', '?')}; timm {v.get('timm', '?')}, "
            f"triton {v.get('triton', '?')}",
            *([f"- not a GPU run: the goals are the GPU's, these numbers are {self.device}'s"] if self.device != "cuda" else []),
            f"- steps, {seconds} s in all: " + ", ".join(f"{name} {state} ({s} s)" for name, state, s in self.steps), "",
            "| number | value | goal | met |", "|---|---|---|---|", *self.rows, ""])


def main() -> None:
    if sys.argv[1:] == ["versions"]:
        versions()
    elif sys.argv[1:2] == ["summary"] and len(sys.argv) == 4:
        out = Path(sys.argv[2])
        (out / "summary.md").write_text(Summary(out, Path(sys.argv[3])).markdown())
        print((out / "summary.md").read_text(), end="")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
