"""The pipeline's one description (the Snakemake rules) on the default config: the paper's DAG,
lint-clean, the generated dvc.yaml current, the seed axis, and each job's command line."""

import re
from importlib import metadata

import pandas as pd
import torch
import yaml

from conftest import BIN, ROOT, copy_project, run, tool_env

# Jobs per rule on the default config (docs/method.md §1): 3 archs, 3 versions x 3 budgets x 2 modes,
# the hinge-alone D beside each arch's at its paper cell (pairs.hinge_beside),
# and the audit of the first seed's three W networks.
EXPECTED_JOBS = {"teacher": 1, "distill": 3, "pair": 54, "hinge_pair": 3, "evaluate": 3, "tables": 1, "layer_scan": 3,
                 "histograms": 3, "corruptions": 3, "remedy": 3, "figures": 1, "audit_model": 3, "report": 1, "all": 1}
PER_SEED = {"teacher", "distill", "pair", "hinge_pair", "evaluate", "layer_scan", "histograms", "corruptions", "remedy"}


def job_stats(*args: str) -> dict[str, int]:
    out = run([str(BIN / "snakemake"), "-n", "--forceall", "--cores", "1", *args], ROOT, 600).stdout
    stats = out[out.index("Job stats:"):]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)}
    return {k: v for k, v in counts.items() if k != "total"}


def test_dry_run_shows_the_papers_dag():
    assert job_stats() == EXPECTED_JOBS


def test_seeds_profile_repeats_every_per_seed_job_once_per_seed():
    stats = job_stats("--configfile", "config/seeds.yaml")
    assert stats == {rule: n * (3 if rule in PER_SEED else 1) for rule, n in EXPECTED_JOBS.items()}


def test_each_seeds_jobs_read_only_that_seeds_files():
    """Every per-seed job's files are under its own seed's folders: a cluster can spread the seeds."""
    from dptq import dvc

    for job in dvc.jobs(["config/seeds.yaml"], ROOT):
        seed = job.wildcards.get("seed")
        if seed is None:
            continue
        for path in [*map(str, job.input), *map(str, job.output)]:
            assert f"/seed{seed}/" in path, f"{job.rule} of seed {seed} touches {path}"


def test_committed_dvc_yaml_is_generated_from_the_rules():
    from dptq import dvc

    assert (ROOT / "dvc.yaml").read_text() == dvc.pipeline(["config.yaml"], ROOT), \
        "dvc.yaml is stale: regenerate it with `python -m dptq.dvc`"


def test_an_empty_list_input_is_left_off_the_jobs_command():
    """The bit-floor profile trains no hinge-alone pair: its evaluate commands have no --hinge_pairs (an
    option with no value made DVC read the stage as changed); the default's name each arch's pair."""
    from dptq import dvc

    stages = yaml.safe_load(dvc.pipeline(["config.yaml", "config/bit_floor.yaml"], ROOT))["stages"]
    assert "--hinge_pairs" not in stages["evaluate-seed0-resnet18"]["cmd"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert ("--hinge_pairs checkpoints/seed0/hinge/regnetx_016/III/B/detrimental.pt --table1"
            in stages["evaluate-seed0-regnetx_016"]["cmd"])


def test_dvc_stage_runs_the_rules_command_and_lists_its_keys():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    pair = stages["pair-seed0-mobilenetv4_conv_medium-II-B-detrimental"]
    cmd = pair["cmd"].split()
    assert cmd[:2] == ["python", "workflow/scripts/pair.py"]
    option = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
    assert option["--seed"] == "0" and option["--version"] == "II" and option["--budget"] == "B"
    assert option["--network"] == "checkpoints/seed0/distill/mobilenetv4_conv_medium.pt"
    keys = cmd[cmd.index("--keys") + 1:cmd.index("--log")]
    # one entry of each per-arch map and of the grid's own maps, never the whole map
    assert {"pairs.lr.mobilenetv4_conv_medium", "pairs.alpha.mobilenetv4_conv_medium.detrimental.II", "pairs.versions.II",
            "pairs.budgets.B", "pairs.budget_offset.II", "kd.temperature", "evaluate.batch_size"} <= set(keys)
    assert not {"pairs.lr", "pairs.versions", "pairs.budgets", "kd", "pairs", "evaluate"} & set(keys)
    # a per-mode key whose file value is one value for the arch (or all archs) is tracked at that value's path
    from dptq import dvc
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert pair["params"] == [{"config.yaml": [dvc.param_key(default, key) for key in keys]}]
    assert {"pairs.range_grad.mobilenetv4_conv_medium", "pairs.objective.loss"} <= set(pair["params"][0]["config.yaml"])
    assert pair["outs"] == ["checkpoints/seed0/pair/mobilenetv4_conv_medium/II/B/detrimental.pt",
                            "checkpoints/seed0/pair/mobilenetv4_conv_medium/II/B/detrimental.csv"]
    assert stages["report"]["metrics"] == ["results/metrics.json"]


def test_dvc_params_follow_the_profile_that_sets_each_key():
    from dptq import dvc

    assert dvc.param_key({"pairs": {"lr": 0.1}}, "pairs.lr.resnet18") == "pairs.lr"
    assert dvc.param_key({"pairs": {"lr": {"resnet18": 0.1}}}, "pairs.lr.resnet18") == "pairs.lr.resnet18"
    assert dvc.param_key({"pairs": {"margin": 0.1}}, "pairs.lr.resnet18") is None
    # a per-mode entry: the robust job tracks its own value, not the detrimental one
    alpha = {"pairs": {"alpha": {"resnet18": {"robust": 1.0, "detrimental": 3.0}}}}
    assert dvc.param_key(alpha, "pairs.alpha.resnet18.robust") == "pairs.alpha.resnet18.robust"
    # a per-version entry: the II job tracks II's value; where the mode has one value, that value
    epochs = {"pairs": {"epochs": {"resnet18": {"robust": 4, "detrimental": {"I": 4, "II": 8}}}}}
    assert dvc.param_key(epochs, "pairs.epochs.resnet18.detrimental.II") == "pairs.epochs.resnet18.detrimental.II"
    assert dvc.param_key(epochs, "pairs.epochs.resnet18.robust.II") == "pairs.epochs.resnet18.robust"
    assert dvc.param_key({"dataset": {"image_size": 16}}, "dataset") == "dataset"


def test_config_check_needs_neither_torch_nor_timm():
    code = ("import sys, dptq.config as c; c.load(['config.yaml', 'config/paper.yaml']); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    assert run([str(BIN / "python"), "-c", code], ROOT, 300).stdout.strip().splitlines()[-1] == "[]"


def test_lint_clean():
    out = run([str(BIN / "snakemake"), "--lint"], ROOT, 600).stdout
    assert "Lints for" not in out, out


def test_snakefmt_clean():
    run([str(BIN / "snakefmt"), "--check", "."], ROOT, 300)


def test_bad_config_fails_dry_run_naming_the_key(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("pairs:\n  margin: 7\n")
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--configfile", str(overlay)], ROOT, 600, check=False)
    assert out.returncode != 0
    error = [line for line in out.stdout.splitlines() if line.startswith("Config error:")]
    assert len(error) == 1 and "pairs.margin" in error[0] and "7" in error[0], out.stdout[-3000:]
    assert "Traceback" not in out.stdout


def test_command_line_config_override_is_refused_with_the_fix():
    out = run([str(BIN / "snakemake"), "-n", "--cores", "1", "--config", "seed=3"], ROOT, 600, check=False)
    assert out.returncode != 0 and "--configfile" in out.stdout and "Traceback" not in out.stdout, out.stdout[-3000:]


def test_bad_config_fails_a_dvc_stage_command_naming_the_key(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("kd:\n  archs: [resnet18, not_a_net]\n")
    out = run([str(BIN / "python"), "workflow/scripts/teacher.py", "--seed", "0", "--ckpt", str(tmp_path / "t.pt"),
               "--metrics", str(tmp_path / "t.csv"), "--config", "config.yaml", str(overlay), "--keys", "teacher",
               "--log", str(tmp_path / "t.log")], ROOT, 300, check=False)
    assert out.returncode != 0 and "kd.archs" in out.stdout and "not_a_net" in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stdout


def pins(text: str) -> dict[str, str]:
    found = re.findall(r"^\s*(?:-\s*)?([A-Za-z0-9_.\-]+)==([^\s#]+)", text, re.MULTILINE)
    return {name.lower(): version for name, version in found}


def test_conda_env_and_installed_versions_match_requirements():
    required = pins((ROOT / "requirements.txt").read_text())
    conda = pins((ROOT / "envs" / "dptq.yaml").read_text())
    assert conda and all(required.get(name) == version for name, version in conda.items()), (conda, required)
    installed = {name: metadata.version(name) for name in required}
    assert installed == required


def test_the_cores_option_changes_no_number(tmp_path):
    """`--cores` only decides how many jobs run at once: a job's torch threads are `runtime.threads`
    even when Snakemake scales the job's threads (and OMP_NUM_THREADS) down to fit the cores.
    The smoke teacher at two torch threads, run with --cores 1 and --cores 2: the same weights.
    The --cores 1 run also has no venv on PATH, as the README's `.venv/bin/snakemake` has not:
    its job must still find the venv's python."""
    trained = {}
    for cores in (1, 2):
        workdir = copy_project(tmp_path / f"cores{cores}", smoke=True)
        cfg = yaml.safe_load((workdir / "config.yaml").read_text())
        cfg["runtime"]["threads"] = 2
        (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = {**tool_env(), "PATH": "/usr/bin:/bin"} if cores == 1 else None
        run([str(BIN / "snakemake"), "--cores", str(cores), "checkpoints/seed0/teacher.pt"], workdir, 600, env=env)
        metrics = pd.read_csv(workdir / "checkpoints/seed0/teacher.csv").drop(columns="seconds")
        trained[cores] = torch.load(workdir / "checkpoints/seed0/teacher.pt", weights_only=True)["model"], metrics
    (one, one_metrics), (two, two_metrics) = trained[1], trained[2]
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    pd.testing.assert_frame_equal(one_metrics, two_metrics)
