"""The experiment protocol: what an experiment declares, and what is shared.

An experiment file reads top to bottom as its problem: its defaults and
presets, its data or stream, its learner (a ``Learner`` per method: ``init``,
``step`` and ``probe`` of one seed, unbatched), the per-seed program
``make_chunked`` that scans the learners over the stream, its summary and
plots. It declares them in one `Experiment`; this module does the rest, the
same way for every experiment, on top of `experiments.runner`:

* configs: ``make_config`` merges overrides over the defaults, converts
  old-shape entries with a ``DeprecationWarning`` (`upgrade`) and validates
  the common keys (`validate_common`), then the experiment's own;
* the config schema (every experiment)::

      {"seed": int, "seeds": int, "methods": [name, ...],
       "hparams": {method: {"step_size": number, ...the method's own}},
       "sweep": {method: {numeric hparam: [values]}},
       ...the experiment's own entries}

  A method's variants are the Cartesian product of its swept values (first
  key slowest, `variants`), vmapped together in one program; its run label
  is the method's name, with the swept values when it has a sweep
  (`run_labels`);
* the run: the experiment's per-seed ``make_chunked(config) -> (init(key),
  chunk(carry, chunk_index, *args))`` (``args``: the data set, when the
  experiment has one) is batched over seeds, cached per config, and driven
  by `experiments.runner.run_seeds` (progress, results file, checkpoints);
  `make_train` is the same program as one pure ``train(key)``;
* the command line: presets, ``--seeds``, ``--seed``, ``--methods``,
  ``--set METHOD.HPARAM=V``, ``--sweep METHOD.HPARAM=V1,V2``, ``--data-dir``
  for experiments with data, the experiment's own `Flag` s and the runner's
  run flags (``--out``, ``--resume``, ...).

Writing an experiment::

  EXPERIMENT = protocol.Experiment(
      name="my_problem", short="mine", title="My problem, compiled and vmapped.",
      defaults=DEFAULT_CONFIG, methods=("bp", "cbp"), make_chunked=make_chunked,
      num_chunks=lambda c: c["tasks"] // c["tasks_per_chunk"],
      points_per_chunk="tasks_per_chunk", x_label="task",
      work_per_run_chunk=lambda c: c["tasks_per_chunk"] * c["steps_per_task"],
      validate=validate_config, summary=format_summary)
  (make_config, run_labels, make_train, make_batched, run_experiment, parse_args,
   config_from_args, main) = EXPERIMENT.entry_points()
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments import runner

# Short names of hyperparameters in run labels ("bp[lr=0.003]").
SHORT_NAMES = {
  "step_size": "lr",
  "weight_decay": "wd",
  "noise_scale": "noise",
  "replacement_rate": "rate",
  "maturity_threshold": "mt",
  "decay_rate": "decay",
}


def is_number(v: Any) -> bool:
  """An int or float, not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------
# The config schema: variants, run labels, validation, old shapes.
# ---------------------------------------------------------------------------


def variants(config: Mapping[str, Any], method: str) -> list[dict]:
  """The hyperparameter settings of ``method``: its ``hparams`` with every
  combination of its ``sweep`` values (first swept key varies slowest)."""
  out = [dict(config["hparams"][method])]
  for k, values in config["sweep"].get(method, {}).items():
    out = [{**hp, k: v} for hp in out for v in values]
  return out


def bracket_label(method: str, hp: Mapping[str, Any], swept: list[str]) -> str:
  """``method``, plus ``[lr=0.003,...]`` naming the swept values when there are any."""
  if not swept:
    return method
  return method + "[" + ",".join(f"{SHORT_NAMES.get(k, k)}={hp[k]:g}" for k in swept) + "]"


def at_step_size_label(method: str, hp: Mapping[str, Any], swept: list[str]) -> str:
  """``method@0.003`` when only the step size is swept, else `bracket_label`
  (permuted MNIST's labels since its first results)."""
  if swept == ["step_size"]:
    return f"{method}@{hp['step_size']:g}"
  return bracket_label(method, hp, swept)


def validate_common(c: Mapping[str, Any], methods: tuple[str, ...]) -> None:
  """Raises ValueError naming the first bad common entry: ``seed``, ``seeds``,
  ``methods``, ``hparams`` (every method's, with a numeric ``step_size >= 0``)
  and ``sweep`` (lists of numbers for numeric hyperparameters of known methods)."""
  need = runner.require
  need(
    isinstance(c["seed"], int) and not isinstance(c["seed"], bool), f"seed must be an int, got {c['seed']!r}"
  )
  runner.require_positive_ints(c, ("seeds",))
  runner.require_methods(c["methods"], methods)
  for m in c["methods"]:
    need(isinstance(c["hparams"].get(m), Mapping), f"hparams: no entry for method {m!r}")
  for m, hp in c["hparams"].items():
    need(m in methods, f"hparams: unknown method {m!r}; expected some of {methods}")
    need(
      is_number(hp.get("step_size")) and hp["step_size"] >= 0,
      f"hparams.{m}.step_size must be a number >= 0, got {hp.get('step_size')!r}",
    )
  need(isinstance(c["sweep"], Mapping), f"sweep must be a dict, got {c['sweep']!r}")
  for m, swept in c["sweep"].items():
    need(m in methods, f"sweep: unknown method {m!r}")
    hp = c["hparams"][m]
    for k, values in swept.items():
      need(
        k in hp and is_number(hp[k]),
        f"sweep.{m}: {k!r} is not a numeric hyperparameter of {m} "
        f"({[n for n, v in hp.items() if is_number(v)]})",
      )
      need(
        isinstance(values, list) and len(values) > 0 and all(map(is_number, values)),
        f"sweep.{m}.{k} must be a non-empty list of numbers, got {values!r}",
      )
      need(
        all(v >= 0 for v in values) or k != "step_size", f"sweep.{m}.step_size must be >= 0, got {values!r}"
      )


def upgrade(over: Mapping[str, Any] | None, methods: tuple[str, ...], shared: tuple[str, ...] = ()) -> dict:
  """``over`` with entries of the old config shapes moved to the schema's,
  each with a ``DeprecationWarning`` naming the new key:

  * a top-level method entry (``{"cbp": {...}}``) -> ``hparams.cbp``;
  * ``step_sizes: {m: [lr, ...]}`` -> ``hparams.m.step_size`` (one value) or
    ``sweep.m.step_size`` (several);
  * ``step_size: {m: lr}`` -> ``hparams.m.step_size``;
  * ``lr`` in a method's hyperparameters -> ``step_size``;
  * the ``shared`` top-level entries (one setting of every method, e.g.
    continual ImageNet's ``momentum``) -> ``hparams.<every method>.<entry>``.
  """
  over = copy.deepcopy(dict(over or {}))
  hparams = over.setdefault("hparams", {})

  def moved(old: str, new: str) -> None:
    warnings.warn(f"config entry {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=4)

  for m in methods:
    if isinstance(over.get(m), Mapping):
      moved(m, f"hparams.{m}")
      hparams[m] = {**over.pop(m), **hparams.get(m, {})}
  if "step_sizes" in over:
    moved("step_sizes", "hparams.METHOD.step_size or sweep.METHOD.step_size")
    for m, sizes in over.pop("step_sizes").items():
      if isinstance(sizes, (list, tuple)) and len(sizes) > 1:
        over.setdefault("sweep", {}).setdefault(m, {})["step_size"] = list(sizes)
      else:  # One value; anything else is left for the validation to name.
        one = isinstance(sizes, (list, tuple)) and len(sizes) == 1
        hparams.setdefault(m, {})["step_size"] = sizes[0] if one else sizes
  if isinstance(over.get("step_size"), Mapping):
    moved("step_size", "hparams.METHOD.step_size")
    for m, lr in over.pop("step_size").items():
      hparams.setdefault(m, {})["step_size"] = lr
  for k in shared:
    if k in over:
      moved(k, f"hparams.METHOD.{k}")
      value = over.pop(k)
      for m in methods:
        hparams.setdefault(m, {})[k] = value
  for m, hp in hparams.items():
    if isinstance(hp, dict) and "lr" in hp:
      moved(f"hparams.{m}.lr", f"hparams.{m}.step_size")
      hp["step_size"] = hp.pop("lr")
  if not hparams:
    del over["hparams"]
  return over


# ---------------------------------------------------------------------------
# Command-line flags of an experiment's own.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
  """An experiment's own command-line flag and the config entry it sets.

  ``key`` is a dotted config path: ``"steps"``, ``"hparams.cbp.replacement_rate"``,
  or ``"hparams.*.step_size"`` for every method of ``methods`` (default: all
  the experiment's). A flag whose value is a list of several numbers sweeps
  that hyperparameter instead (``sweep.METHOD.HPARAM``); a list of one sets it.
  ``kwargs`` go to ``argparse.add_argument`` (``type``, ``help``, ...); an
  on/off flag is ``action="store_const", const=VALUE`` (not given: None, unset).
  """

  name: str
  key: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  methods: tuple[str, ...] | None = None


def flag(name: str, key: str, methods: tuple[str, ...] | None = None, **kwargs: Any) -> Flag:
  """``Flag(name, key, kwargs, methods)``."""
  return Flag(name, key, kwargs, methods)


# The per-method flags that several experiments share; `method_flags` picks them
# by name. Each flag's help gets the experiment's default appended (`Experiment.parser`).
METHOD_FLAGS: dict[str, Flag] = {
  f.name: f
  for f in (
    flag("--cbp-rate", "hparams.cbp.replacement_rate", type=float, help="CBP replacement rate"),
    flag("--cbp-maturity", "hparams.cbp.maturity_threshold", type=int, help="CBP maturity threshold"),
    flag("--l2", "hparams.l2.weight_decay", type=float, help="L2 weight decay"),
    flag(
      "--snp-weight-decay",
      "hparams.snp.weight_decay",
      type=float,
      help="S&P weight decay: shrink = 1 - step_size * wd",
    ),
    flag("--snp-noise", "hparams.snp.noise_scale", type=float, help="S&P noise standard deviation"),
  )
}


def method_flags(*names: str) -> tuple[Flag, ...]:
  """The shared flags ``names`` (e.g. ``"--l2"``), from `METHOD_FLAGS`."""
  unknown = [n for n in names if n not in METHOD_FLAGS]
  if unknown:
    raise ValueError(f"unknown method flags {unknown}; known: {sorted(METHOD_FLAGS)}")
  return tuple(METHOD_FLAGS[n] for n in names)


def _help_with_default(f: Flag, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """``f.kwargs`` with ``(default X)`` appended to the help of a one-method
  hyperparameter flag, X read from ``defaults`` (so no help text restates it)."""
  path = f.key.split(".")
  help_text = f.kwargs.get("help", "")
  if (
    path[0] != "hparams" or path[1] == "*" or not help_text or "default" in help_text or "action" in f.kwargs
  ):
    return dict(f.kwargs)  # No help, a default said in words, or an on/off switch.
  value = defaults.get("hparams", {}).get(path[1], {}).get(path[2])
  if value is None:
    return dict(f.kwargs)
  shown = f"{value:g}" if isinstance(value, float) else str(value)
  return {**f.kwargs, "help": f"{help_text} (default {shown})"}


def _set_path(tree: dict, path: list[str], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _apply_flag(over: dict, f: Flag, value: Any, methods: tuple[str, ...]) -> None:
  path = f.key.split(".")
  if path[0] != "hparams":
    _set_path(over, path, value)
    return
  targets = (f.methods or methods) if path[1] == "*" else (path[1],)
  for m in targets:
    if isinstance(value, list) and len(value) > 1:
      _set_path(over, ["sweep", m, path[2]], list(value))
    else:
      _set_path(over, ["hparams", m, path[2]], value[0] if isinstance(value, list) else value)


def _dest(f: Flag) -> str:
  return f.name.lstrip("-").replace("-", "_")


# ---------------------------------------------------------------------------
# The protocol.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
  """What an experiment declares; its methods are the shared rest.

  Attributes:
    name: recorded in results files (``"experiment"``).
    short: the progress prefix, the plot's file stem and ``results/<short>``,
      the default ``--out``.
    title: the command line's description.
    defaults: the full default config (the schema above).
    methods: the method names the experiment knows.
    make_chunked: ``config -> (init(key), chunk(carry, chunk_index, *args))``,
      per seed (the config completed and validated).
    num_chunks: ``config -> `` chunks of the whole run.
    points_per_chunk: the config entry holding the metric points per chunk.
    x_label: what a point counts (``"task"``, ``"examples"``).
    work_per_run_chunk: ``config -> `` the work of one run and seed in one
      chunk (the progress line's rate; None: no rate).
    validate: the experiment's own checks (the common ones run first).
    summary: ``results -> `` a text table printed after a run.
    x_step: ``config -> `` the x of one point (default 1).
    work_label: what the progress line's rate counts.
    presets: ``{flag name: (help, overrides)}``; other flags still override.
    flags: the experiment's own `Flag` s.
    load_data: ``(config, data_dir) -> data``, passed to ``chunk`` as an
      argument (None: the experiment generates its data in the program).
    plot: ``(results, out_dir) -> None``, writing ``plots`` into ``out_dir``.
    plots: the plot files' names.
    label: ``(method, hp, swept keys) -> `` run label (`bracket_label`).
    run_info: ``(method, hp) -> `` extra entries of a run's record.
    shared_hparams: top-level entries of old configs that were one setting of
      every method (converted by `upgrade`).
    squeeze_single: run a single seed unbatched (`runner.map_leading`).
    cache_ignore: config entries that do not change the compiled program.
    add_arguments: ``parser -> None``, further flags of the experiment's own.
    overrides_from_args: ``args -> `` overrides from those flags.
    cli_data: ``(config, args) -> data`` for the command line (default
      ``load_data(config, args.data_dir)``).
    describe: ``(config, data) -> `` the line printed before a CLI run.
    command: ``(args, config, data) -> `` the exit status of something the
      experiment's own flags ask for instead of the run (e.g. ``--benchmark``),
      or None to run.
  """

  name: str
  short: str
  title: str
  defaults: Mapping[str, Any]
  methods: tuple[str, ...]
  make_chunked: Callable[..., tuple[Callable, Callable]]
  num_chunks: Callable[[Mapping[str, Any]], int]
  points_per_chunk: str
  x_label: str
  work_per_run_chunk: Callable[[Mapping[str, Any]], float] | None
  validate: Callable[[Mapping[str, Any]], None]
  summary: Callable[..., str]
  x_step: Callable[[Mapping[str, Any]], float] = lambda c: 1.0
  work_label: str = "run-steps"
  presets: Mapping[str, tuple[str, Mapping[str, Any]]] = dataclasses.field(default_factory=dict)
  flags: tuple[Flag, ...] = ()
  load_data: Callable[..., Any] | None = None
  plot: Callable[[Mapping[str, Any], Path], Any] | None = None
  plots: tuple[str, ...] = ()
  label: Callable[[str, Mapping[str, Any], list[str]], str] = bracket_label
  run_info: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] = lambda m, hp: {}
  shared_hparams: tuple[str, ...] = ()
  squeeze_single: bool = True
  cache_ignore: tuple[str, ...] = ()
  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
  overrides_from_args: Callable[[argparse.Namespace], Mapping[str, Any]] | None = None
  cli_data: Callable[[Mapping[str, Any], argparse.Namespace], Any] | None = None
  describe: Callable[[Mapping[str, Any], Any], str] | None = None
  command: Callable[[argparse.Namespace, Mapping[str, Any], Any], int | None] | None = None

  def entry_points(self) -> tuple[Callable, ...]:
    """``(make_config, run_labels, make_train, make_batched, run_experiment,
    parse_args, config_from_args, main)``: the names an experiment module exposes."""
    return (
      self.make_config,
      self.run_labels,
      self.make_train,
      self.make_batched,
      self.run_experiment,
      self.parse_args,
      self.config_from_args,
      self.main,
    )

  # --- Configs ---------------------------------------------------------------

  def make_config(self, overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> dict:
    """The defaults updated with ``overrides`` then ``kwargs``, validated.

    Nested dicts merge (``hparams={"cbp": {"replacement_rate": 1e-3}}``
    changes only that entry); ``sweep`` is replaced as a whole. Unknown keys
    raise; old-shape entries are converted (`upgrade`).
    """
    return runner.build_config(
      self.defaults,
      self._upgrade(overrides),
      self._upgrade(kwargs),
      validate=self.validate_config,
      replace=("sweep",),
    )

  def _upgrade(self, over: Mapping[str, Any] | None) -> dict:
    return upgrade(over, self.methods, self.shared_hparams)

  def validate_config(self, c: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first inconsistent entry (common, then own)."""
    validate_common(c, self.methods)
    self.validate(c)

  def run_labels(self, config: Mapping[str, Any]) -> dict[str, dict]:
    """``{label: {"method": m, **hyperparameters}}`` for every run, in config order."""
    out = {}
    for m in config["methods"]:
      swept = list(config["sweep"].get(m, {}))
      for hp in variants(config, m):
        out[self.label(m, hp, swept)] = {"method": m, **hp, **self.run_info(m, hp)}
    return out

  # --- The run ---------------------------------------------------------------

  @functools.cached_property
  def make_batched(self) -> Callable[[Mapping[str, Any]], tuple]:
    """Jitted ``init(keys)`` and ``chunk(carry, index, *args)`` over all seeds,
    cached per config (`experiments.runner.batched_per_config`)."""
    return runner.batched_per_config(
      self.make_chunked,
      make_config=self.make_config,
      num_args=int(self.load_data is not None),
      squeeze_single=self.squeeze_single,
      ignore=self.cache_ignore,
    )

  def make_train(self, config: Mapping[str, Any], data: Any = None) -> Callable:
    """A pure ``train(key) -> {label: {name: array(points,)}}`` for one seed.

    purejaxrl style: ``jax.jit(jax.vmap(make_train(config)))(seed_keys(config))``
    runs every seed of the whole run as one program. ``data`` (default:
    ``load_data``) is closed over: a constant of that program.
    """
    config = self.make_config(config)
    args = ()
    if self.load_data is not None:
      args = (self.load_data(config, None) if data is None else data,)
    return runner.whole_run(*self.make_chunked(config), self.num_chunks(config), *args)

  def run_experiment(
    self,
    config: Mapping[str, Any],
    *,
    data: Any = None,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    plot: bool = True,
    progress: bool = True,
    **run_kwargs: Any,
  ) -> runner.RunResult:
    """Runs every seed with `experiments.runner.run_seeds`.

    Writes ``out_dir/results.json`` (runner schema), ``out_dir/timing.json``
    and the plots. ``data`` (default: ``load_data(config, data_dir)``) is
    passed to every chunk. ``run_kwargs`` (``checkpoint_dir``,
    ``checkpoint_every``, ``resume``, ``on_chunk``, ``shard_seeds``) go to
    the runner.
    """
    config = self.make_config(config)
    args = ()
    if self.load_data is not None:
      args = (self.load_data(config, data_dir) if data is None else data,)
    result = runner.run_seeds(
      self.make_batched,
      config,
      args=args,
      experiment=self.name,
      name=self.short,
      num_chunks=self.num_chunks(config),
      points_per_chunk=config[self.points_per_chunk],
      x_step=self.x_step(config),
      x_label=self.x_label,
      runs=self.run_labels(config),
      work_per_run_chunk=None if self.work_per_run_chunk is None else self.work_per_run_chunk(config),
      work_label=self.work_label,
      progress=progress,
      out_dir=out_dir,
      **run_kwargs,
    )
    if plot and out_dir is not None and self.plot is not None:
      self.plot(result.results, Path(out_dir))
    return result

  # --- The command line --------------------------------------------------------

  def parser(self) -> argparse.ArgumentParser:
    """The command line: presets, common flags, the experiment's own, run flags."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{self.name}", description=self.title)
    if self.presets:
      runner.add_presets(p, **{name: text for name, (text, _) in self.presets.items()})
    d = self.defaults
    p.add_argument("--seeds", type=int, help=f"runs per method (default {d['seeds']})")
    p.add_argument("--seed", type=int, help=f"base seed (default {d['seed']})")
    p.add_argument("--methods", help=f"comma-separated, from {','.join(self.methods)}")
    if self.load_data is not None:
      p.add_argument("--data-dir", help="root of the data sets (default $CBP_JAX_DATA_DIR or ../shared/data)")
    for f in self.flags:
      p.add_argument(f.name, **_help_with_default(f, d))
    p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="METHOD.HPARAM=VALUE",
      help="set any hyperparameter, e.g. cbp.maturity_threshold=100 (repeatable)",
    )
    p.add_argument(
      "--sweep",
      action="append",
      default=[],
      metavar="METHOD.HPARAM=V1,V2,...",
      help="run one vmapped variant per value, e.g. bp.step_size=0.01,0.003 (repeatable)",
    )
    if self.add_arguments is not None:
      self.add_arguments(p)
    runner.add_run_arguments(p, out=f"results/{self.short}")
    return p

  def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
    return self.parser().parse_args(argv)

  def config_from_args(self, args: argparse.Namespace) -> dict:
    """The config a command line asks for: the preset, then the flags, then
    ``--set``, then ``--sweep`` (added to the preset's sweep)."""
    over: dict[str, Any] = {}
    for name, (_, preset) in self.presets.items():
      if getattr(args, name):
        over = self._upgrade(preset)
    over.update(runner.overrides_from_args(args, ("seeds", "seed")))
    for f in self.flags:
      value = getattr(args, _dest(f))
      if value is not None:  # A flag not given (store_const flags too: default None).
        _apply_flag(over, f, value, self.methods)
    if self.overrides_from_args is not None:
      for k, v in self.overrides_from_args(args).items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, Mapping) else v
    hparams = {**{m: {} for m in self.methods}, **self.defaults["hparams"]}
    for m, values in runner.parse_hparam_sets(args.set, hparams).items():
      if values:
        over.setdefault("hparams", {}).setdefault(m, {}).update(values)
    for text in args.sweep:
      method, name, values = runner.split_assignment(text, "--sweep", self.methods)
      over.setdefault("sweep", {}).setdefault(method, {})[name] = [
        runner.parse_number(v) for v in values.split(",") if v
      ]
    return self.make_config(over)

  def main(self, argv: list[str] | None = None) -> int:
    """Parses the command line and runs (`run_cli`); returns the exit status."""
    return self.run_cli(self.parse_args(argv))

  def run_cli(self, args: argparse.Namespace) -> int:
    """Runs the config of parsed ``args`` with `experiments.runner.run_from_cli`."""
    try:
      config = self.config_from_args(args)
      data = self.cli_data_of(config, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
      return runner.cli_error(e)
    if self.command is not None:
      status = self.command(args, config, data)
      if status is not None:
        return status
    out = Path(args.out)
    line = (
      self.describe(config, data)
      if self.describe is not None
      else f"{self.name}: {config['seeds']} seeds, runs {', '.join(self.run_labels(config))}"
    )
    print(f"{line}; results -> {out}/results.json", file=sys.stderr)
    return runner.run_from_cli(
      args, functools.partial(self.run_experiment, config, data=data), summary=self.summary, plots=self.plots
    )

  def cli_data_of(self, config: Mapping[str, Any], args: argparse.Namespace) -> Any:
    """The data set of a command line's run (None without one)."""
    if self.load_data is None:
      return None
    if self.cli_data is not None:
      return self.cli_data(config, args)
    return self.load_data(config, args.data_dir)
