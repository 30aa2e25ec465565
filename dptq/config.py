"""Configuration: load ``config.yaml`` plus overlays, validate against the schema and the
cross-field rules that a schema cannot say (docs/method.md §6).

Every error is a :class:`ConfigError` whose one-line message names the key path, the bad value
and what is allowed, so that ``snakemake -n`` and ``dvc repro`` refuse a bad config before any
job runs.
"""
from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from . import budgets

SCHEMA_NAME = "config.schema.yaml"
# keys that moved, old path -> new path: an old profile is told where its key went
MOVED = {"quant.range_grad": "pairs.range_grad"}


class ConfigError(ValueError):
    """A configuration value that the pipeline refuses; the message says how to fix it."""


@functools.cache
def schema() -> dict:
    return yaml.safe_load(resources.files("dptq").joinpath(SCHEMA_NAME).read_text())


def merge(base: Mapping, overlay: Mapping) -> dict:
    """Deep merge: mappings merge key by key, everything else in ``overlay`` replaces ``base``."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return dict(data)


def load(paths: Sequence[str | Path], overrides: Mapping | None = None) -> dict:
    """Read ``paths`` in order (later files overlay earlier ones), apply ``overrides``, check."""
    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, read_yaml(path))
    if overrides:
        cfg = merge(cfg, overrides)
    return check(cfg, source=" + ".join(str(p) for p in paths) or "config")


def _key(path: Sequence) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    """One readable sentence for a schema violation: key path, bad value, what is allowed."""
    where, value, sub = _key(error.absolute_path), error.instance, error.schema
    if error.validator == "additionalProperties" and isinstance(value, Mapping):
        allowed = sorted(sub.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        if allowed:
            hints = [f"'{k}' (moved to {MOVED[moved]})" if (moved := f"{where}.{k}") in MOVED
                     else f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, allowed, 1)) else f"'{k}'"
                     for k in unknown]
            return f"{where}: unknown key {', '.join(hints)}; allowed keys: {', '.join(allowed)}"
    if error.validator == "required":
        return f"{where}: {error.message}; every key of config.yaml must be present after the overlay"
    if error.validator == "enum":
        return f"{where}: {value!r} is not allowed; allowed values: {', '.join(map(repr, error.validator_value))}"
    if error.validator == "type":
        return f"{where}: {value!r} has the wrong type; expected {error.validator_value}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bounds = {k: sub[k] for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum") if k in sub}
        return f"{where}: {value!r} is out of range; allowed: {bounds}"
    if error.validator in ("minItems", "maxItems"):
        low, high = sub.get("minItems", 0), sub.get("maxItems", "any")
        shape = "[low, high]" if (low, high) == (2, 2) else f"{low}..{high} items"
        return f"{where}: {value!r} has {len(value)} item(s); expected {shape}"
    if error.validator == "oneOf":
        # a map of the right shape with one bad entry: name that entry, not the whole map
        deepest = max(error.context, key=lambda e: len(e.absolute_path), default=None)
        if deepest is not None and len(deepest.absolute_path) > len(error.absolute_path):
            return _describe(deepest)
        # a value of one form's type that breaks that form's rules (a map with an unknown key)
        matched = [e for e in error.context if e.validator != "type"]
        if matched:
            return _describe(matched[0])
        defs = schema()["$defs"]
        forms = [defs[s["$ref"].rpartition("/")[2]] if "$ref" in s else s for s in error.validator_value]
        return f"{where}: {value!r} has the wrong form; allowed: one of {[f.get('type', f) for f in forms]}"
    return f"{where}: {value!r}: {error.message}"


def check(cfg: Mapping, source: str = "config") -> dict:
    """Validate ``cfg`` (schema, then cross-field rules); return it as a plain dict. A
    :class:`ConfigError` names every problem found, on one line."""
    cfg = dict(cfg)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    # every problem at once (a profile's author fixes them in one round); the cross-field rules
    # read the keys the schema checks, so they run on a config the schema accepts
    problems = list(dict.fromkeys(map(_describe, errors))) or _every(_cross_field_problems(cfg))
    if len(problems) == 1:
        raise ConfigError(f"{source}: {problems[0]}")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problems: " + " | ".join(problems))
    return cfg


def _every(problems) -> list[str]:
    """The messages of a problem generator, up to a rule that a problem already found breaks (a
    later rule may read a key that an earlier one found missing): those found are the answer."""
    found = []
    try:
        found.extend(problems)
    except (KeyError, TypeError, ValueError, IndexError):
        if not found:
            raise
    return found


def _cross_field_problems(cfg: Mapping):
    """Rules that span several keys; yields one message per problem, in key order."""
    from . import models  # deferred: the schema check must not need torch

    pairs = cfg["pairs"]
    for version, (low, high) in pairs["versions"].items():
        if low > high:
            yield f"pairs.versions.{version}: [{low}, {high}] has its low end above its high end; write [low, high] with low <= high"
    missing = sorted(set(pairs["versions"]) - set(pairs["budget_offset"]))
    if missing:
        yield f"pairs.budget_offset: no offset for version(s) {missing}; add one per key of pairs.versions"
    extra = sorted(set(pairs["budget_offset"]) - set(pairs["versions"]))
    if extra:
        yield f"pairs.budget_offset: version(s) {extra} are not in pairs.versions ({sorted(pairs['versions'])})"
    archs = list(cfg["kd"]["archs"])
    for section in ("teacher", "kd", "pairs"):
        lrs = cfg[section]["lr"]
        lowest = min(lrs.values()) if isinstance(lrs, Mapping) else lrs
        if cfg[section]["min_lr"] > lowest:
            yield f"{section}.min_lr: {cfg[section]['min_lr']} is above {section}.lr ({lrs}); the cosine schedule decays from lr down to min_lr"
        epochs = cfg[section]["epochs"]
        fewest = min(_values(epochs))
        if cfg[section]["warmup_epochs"] > fewest:
            yield (f"{section}.warmup_epochs: {cfg[section]['warmup_epochs']} is more than {section}.epochs "
                   f"({epochs}); the warm-up is part of the epochs, use at most {fewest}")
    bad_archs = False
    for key, arch in [("teacher.arch", cfg["teacher"]["arch"]), *(("kd.archs", a) for a in archs)]:
        if not models.exists(arch):
            bad_archs = True
            close = difflib.get_close_matches(arch, models.known_names(), 3)
            yield f"{key}: {arch!r} is not a timm model" + (f"; did you mean {close}?" if close else "; see timm.list_models()")
    unknown = sorted(set(cfg["analysis"]["histogram"]["archs"]) - set(archs))
    if unknown:
        yield f"analysis.histogram.archs: {unknown} are not in kd.archs ({archs})"
    hist = cfg["analysis"]["histogram"]
    if hist["bin_width"] > hist["range"]:
        yield (f"analysis.histogram.bin_width: {hist['bin_width']} is larger than analysis.histogram.range "
               f"({hist['range']}); use a bin width below the range")
    audit = cfg["audit"]
    clash = sorted(set(archs) & set(audit["models"])) if audit["pipeline"] else []
    if clash:
        yield f"audit.models: {clash} also name pipeline networks (audit.pipeline audits every arch of kd.archs); rename the model(s)"
    every = [cell_name(v, b) for v in pairs["versions"] for b in pairs["budgets"]]
    unknown = [name for name in pairs.get("cells") or () if name not in every]
    if unknown:
        yield (f"pairs.cells: {unknown} are not cells of pairs.versions x pairs.budgets ({', '.join(every)}); "
               f"use version-budget, or null for all")
    grid = grid_cells(pairs)
    unknown = sorted(set(audit["cells"] or ()) - set(grid))
    if unknown:
        yield f"audit.cells: {unknown} are not cells of the grid ({', '.join(grid)}); use version-budget, or null for all"
    for name, spec in audit["models"].items():
        if not models.exists(spec["arch"]):
            bad_archs = True
            yield f"audit.models.{name}.arch: {spec['arch']!r} is not a timm model; see timm.list_models()"
    if bad_archs:  # the rules below need real arch names: the budgets build each arch to count its layers
        return
    for section, keys in PER_ARCH.items():
        for key in keys:
            value = at(cfg[section], key)
            # extra archs are allowed: a profile that narrows kd.archs cannot delete map keys
            if isinstance(value, Mapping) and set(archs) - set(value):
                yield (f"{section}.{key}: the map has no value for {sorted(set(archs) - set(value))} of kd.archs "
                       f"{archs}; give one value per arch, or one value for all")
            # merged into a per-arch map, a version's key would pass as one more arch and do nothing
            misplaced = sorted(set(value) & set(pairs["versions"])) if isinstance(value, Mapping) else []
            if misplaced:
                yield (f"{section}.{key}: {misplaced} name versions, not archs; per-version values go under an arch "
                       f"and a mode ({{arch: {{robust: {{{misplaced[0]}: ...}}, detrimental: ...}}}})")
    for section, keys in PER_MODE.items():
        for key in keys:
            value = at(cfg[section], key)
            for arch, entry in value.items() if isinstance(value, Mapping) else ():
                if isinstance(entry, Mapping) and set(pairs["modes"]) - set(entry):
                    yield (f"{section}.{key}.{arch}: the map has no value for {sorted(set(pairs['modes']) - set(entry))} "
                           f"of pairs.modes; give one value per mode, or one value for both")
    trained = sorted({version for version, _ in cells(pairs).values()})
    for section, keys in PER_VERSION.items():
        for key in keys:
            value = at(cfg[section], key)
            for arch, entry in value.items() if isinstance(value, Mapping) else ():
                for mode, inner in entry.items() if isinstance(entry, Mapping) else ():
                    # versions the grid does not train may be left out: a profile that trains its own cannot delete keys
                    if isinstance(inner, Mapping) and set(trained) - set(inner):
                        yield (f"{section}.{key}.{arch}.{mode}: the map has no value for version(s) "
                               f"{sorted(set(trained) - set(inner))} of the grid's cells; give one value per "
                               f"version of pairs.versions, or one value for all")
    yield from _objective_problems(cfg)
    yield from _budget_problems(cfg)


def _budget_problems(cfg: Mapping):
    """The first infeasible cell of the grid (docs/method.md §2.6): no allocation of the arch's N
    layers over the version's options sums to its capacity."""
    from . import models  # deferred: the schema check must not need torch

    pairs = cfg["pairs"]
    for arch in cfg["kd"]["archs"]:
        n = models.num_quantizable_layers(arch)
        for version, budget in cells(pairs).values():
            if version not in pairs["versions"] or budget not in pairs["budgets"]:
                continue  # pairs.cells names it wrongly: a rule above says so
            (low, high), level, offset = pairs["versions"][version], pairs["budgets"][budget], pairs["budget_offset"][version]
            try:
                budgets.check_feasible(n, budgets.options(low, high), budgets.capacity(n, level, offset))
            except ValueError as err:
                yield (f"pairs.budgets.{budget}: {level} with pairs.budget_offset.{version} = {offset} is infeasible "
                       f"for arch {arch}, version {version} [{low}, {high}]: {err}; choose levels a with "
                       f"{low} <= a + offset <= {high} for every version")
                return


def _values(value) -> list:
    """Every value of a setting that may be one value, per arch, or per arch and mode."""
    return [v for entry in value.values() for v in _values(entry)] if isinstance(value, Mapping) else [value]


def _objective_problems(cfg: Mapping):
    """The squared target penalty and the spread term are detrimental objectives: a robust pair that
    resolves to either is refused."""
    pairs = cfg["pairs"]
    if "robust" not in pairs["modes"]:
        return
    robust = {arch: section_for(cfg, "pairs", arch, "robust")["objective"] for arch in cfg["kd"]["archs"]}
    target = [arch for arch, objective in robust.items() if "target" in _values(objective["loss"])]
    if target:
        yield (f"pairs.objective.loss: the robust pairs of {target} get 'target', the detrimental objective (it "
               f"drives the quantized cross-entropy up); give those archs {{robust: hinge, detrimental: target}}")
    spread = [arch for arch, objective in robust.items() if any(w > 0 for w in _values(objective["spread_weight"]))]
    if spread:
        yield (f"pairs.objective.spread_weight: the robust pairs of {spread} get a spread term, a detrimental objective "
               f"(it coarsens the quantizer's steps); give those archs {{robust: 0, detrimental: WEIGHT}}")


# Settings that may be one value for every arch or a map arch -> value (the paper distils
# MobileNetV4 at batch 64; on digits it needs more distillation epochs and its pairs a lower
# learning rate). A dotted name is a key inside a key of the section (``objective.loss``).
OBJECTIVE = ("objective.loss", "objective.target", "objective.weight", "objective.spread_weight", "objective.spread_target")
PER_ARCH = {"kd": ("epochs", "batch_size"), "pairs": ("epochs", "range_grad", "lr", "alpha", "beta", *OBJECTIVE)}
# Of those, the settings whose value for an arch may be a map mode -> value: the KD weight holds
# the detrimental pair's FP accuracy near W, which its hinge pulls away and the robust hinge does not;
# the quantized term's objective differs between the modes when the detrimental one is the target penalty,
# and so may the schedule (the hinge's detrimental pair at 4- and 5-bit floors needs more steps, bench/SCIENCE.md §8-9).
PER_MODE = {"pairs": ("epochs", "range_grad", "alpha", "beta", *OBJECTIVE)}
# Of those, the settings whose value for an arch and mode may be a map version -> value: a recipe
# that collapses D at a 4-bit floor can cost the 3-bit cell its FP (bench/SCIENCE.md §18).
PER_VERSION = PER_MODE


def at(section: Mapping, key: str):
    """The value of the dotted ``key`` inside ``section`` (``objective.loss``: section["objective"]["loss"])."""
    for part in key.split("."):
        section = section[part]
    return section


def _resolve(tree: Mapping, key: str, choice: str) -> Mapping:
    """``tree`` with the map at the dotted ``key`` replaced by its ``choice`` entry (an arch or a
    mode); a key that is absent or already one value is left as it is. Maps on the way are copied."""
    head, _, rest = key.partition(".")
    if head not in tree or not isinstance(tree[head], Mapping):
        return tree
    out = dict(tree)
    out[head] = _resolve(out[head], rest, choice) if rest else out[head][choice]
    return out


def cell_name(version: str, budget: str) -> str:
    """A grid cell's name, ``{version}-{budget}`` (e.g. ``I-A``): the one spelling of a cell."""
    return f"{version}-{budget}"


def grid_cells(pairs: Mapping) -> list[str]:
    """The cells of the grid by name: ``pairs.cells``, or where it is null every one of
    ``pairs.versions`` × ``pairs.budgets``, versions first."""
    if pairs.get("cells") is not None:
        return list(pairs["cells"])
    return [cell_name(v, b) for v in pairs["versions"] for b in pairs["budgets"]]


def cells(pairs: Mapping, names: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
    """Cell name → (version, budget) for ``names`` (None: the whole grid); e.g. the audit's
    ``audit.cells``, checked against the grid by :func:`check`."""
    return {name: tuple(name.partition("-")[::2]) for name in (grid_cells(pairs) if names is None else names)}


def off_hinge(objective: Mapping) -> bool:
    """Whether a resolved ``pairs.objective`` is not the paper's hinge alone (the target penalty, or a spread term)."""
    return objective["loss"] != "hinge" or objective["spread_weight"] > 0


def hinge_alone(pairs: Mapping) -> dict:
    """A resolved pairs section with the paper's hinge as its only quantized term, every other setting
    kept: the ablation trained beside an off-hinge detrimental pair (``pairs.hinge_beside``)."""
    return {**pairs, "objective": {"loss": "hinge", "spread_weight": 0.0}}


def hinge_beside(cfg: Mapping, arch: str, cell: str | None) -> list[tuple[str, str]]:
    """``[(version, budget)]`` of ``cell`` (the paper's for ``arch``) when ``pairs.hinge_beside`` is on,
    the grid trains its detrimental pair and that pair's objective is off the hinge; else ``[]``."""
    pairs, grid = cfg["pairs"], cells(cfg["pairs"])
    if not pairs["hinge_beside"] or cell not in grid or "detrimental" not in pairs["modes"]:
        return []
    version = grid[cell][0]
    return [grid[cell]] if off_hinge(section_for(cfg, "pairs", arch, "detrimental", version)["objective"]) else []


def seeds(cfg: Mapping) -> list[int]:
    """The training seeds: ``seed`` is one seed or a list of them (docs/method.md §1)."""
    seed = cfg["seed"]
    return [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed)]


def section_for(cfg: Mapping, section: str, arch: str | None, mode: str | None = None,
                version: str | None = None) -> dict:
    """``cfg[section]`` with every per-arch key of :data:`PER_ARCH` resolved for ``arch``; with
    ``mode`` given, every per-mode one of :data:`PER_MODE` for it; with ``version`` too, every
    per-version one of :data:`PER_VERSION` for that."""
    out = dict(cfg[section])
    for levels, choice in ((PER_ARCH, arch), (PER_MODE, mode), (PER_VERSION, version)):
        if choice is None:
            break
        for key in levels.get(section, ()):
            out = _resolve(out, key, choice)
    return dict(out)


# --- what one job may read -----------------------------------------------------------------------

def declared(cfg: Mapping, keys: Sequence[str]) -> dict:
    """The part of ``cfg`` that ``keys`` (dotted paths) name, nested as in ``cfg``.

    A path may go below a value that is not a map: ``pairs.lr.resnet18`` takes ``pairs.lr`` when
    it is one value for every arch.
    """
    out: dict = {}
    for key in keys:
        node, target, parts = cfg, out, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, Mapping):
                break
            if part not in node:
                raise ConfigError(f"{key}: declared by a rule but not in the config (no key {'.'.join(parts[:i + 1])!r})")
            node = node[part]
            if i < len(parts) - 1 and isinstance(node, Mapping):
                target = target.setdefault(part, {})
            else:
                target[part] = copy.deepcopy(node)
                break
    return out


def leaves(tree: Mapping, prefix: tuple = ()) -> set[tuple]:
    """Every path to a value that is not a non-empty map."""
    out = set()
    for key, value in tree.items():
        path = (*prefix, key)
        out |= leaves(value, path) if isinstance(value, Mapping) and value else {path}
    return out


class Settings(Mapping):
    """A job's config: only the keys its rule declares, and a record of what it reads.

    Reading a key that is not there is a :class:`ConfigError` naming the key and the job, so a
    job cannot depend on a value that its orchestrator does not track. :meth:`unread` lists the
    declared values the job never read (the workflow test asserts there are none).
    """

    def __init__(self, tree: Mapping, job: str, _path: tuple = (), _reads: set | None = None):
        self._tree, self._job, self._path = tree, job, _path
        self._reads = set() if _reads is None else _reads

    def __getitem__(self, key):
        if key not in self._tree:
            where = ".".join(map(str, (*self._path, key)))
            raise ConfigError(f"{self._job}: reads config key {where}, which its rule does not declare; "
                              f"add {where!r} to the rule's keys(...) in workflow/rules/")
        value, path = self._tree[key], (*self._path, key)
        if isinstance(value, Mapping) and value:
            return Settings(value, self._job, path, self._reads)
        self._reads.add(path)
        return copy.deepcopy(value)

    def __iter__(self):
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def plain(self) -> dict:
        """All of it as a plain dict (a job that shows the whole config reads every value)."""
        self._reads |= {(*self._path, *p) for p in leaves(self._tree)}
        return copy.deepcopy(dict(self._tree))

    def unread(self) -> list[str]:
        return sorted(".".join(map(str, p)) for p in leaves(self._tree) - self._reads)
