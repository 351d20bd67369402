"""The experiment protocol: config schema, old shapes, run labels, flags, CLI (no runs)."""

import warnings

import pytest

from experiments import protocol

METHODS = ("bp", "cbp")
DEFAULTS = {
  "seed": 0,
  "seeds": 2,
  "tasks": 4,
  "methods": ["bp", "cbp"],
  "hparams": {
    "bp": {"step_size": 0.1},
    "cbp": {"step_size": 0.1, "replacement_rate": 1e-3, "utility": "contribution"},
  },
  "sweep": {},
}


def _experiment(**kwargs):
  own = {"checked": []}

  def validate(c):
    own["checked"].append(c["tasks"])
    protocol.runner.require(c["tasks"] > 0, "tasks must be > 0")

  exp = protocol.Experiment(
    name="toy",
    short="toy",
    title="toy",
    defaults=DEFAULTS,
    methods=METHODS,
    make_chunked=None,
    num_chunks=lambda c: c["tasks"],
    points_per_chunk="tasks",
    x_label="task",
    work_per_run_chunk=lambda c: 1,
    validate=validate,
    summary=str,
    **kwargs,
  )
  return exp, own


def test_variants_are_the_product_of_the_sweep_first_key_slowest():
  config = {
    "hparams": {"cbp": {"step_size": 1, "replacement_rate": 0.5, "utility": "u"}},
    "sweep": {"cbp": {"step_size": [1, 2], "replacement_rate": [0.1, 0.2, 0.3]}},
  }
  got = [(v["step_size"], v["replacement_rate"]) for v in protocol.variants(config, "cbp")]
  assert got == [(1, 0.1), (1, 0.2), (1, 0.3), (2, 0.1), (2, 0.2), (2, 0.3)]
  assert all(v["utility"] == "u" for v in protocol.variants(config, "cbp"))


def test_run_labels_name_swept_values_and_record_hyperparameters():
  exp, own = _experiment(run_info=lambda m, hp: {"double": 2 * hp["step_size"]})
  config = exp.make_config(sweep={"bp": {"step_size": [0.1, 0.03]}})
  runs = exp.run_labels(config)
  assert list(runs) == ["bp[lr=0.1]", "bp[lr=0.03]", "cbp"]
  assert runs["bp[lr=0.03]"] == {"method": "bp", "step_size": 0.03, "double": 0.06}
  assert runs["cbp"]["replacement_rate"] == 1e-3 and own["checked"] == [4]
  at, _ = _experiment(label=protocol.at_step_size_label)
  assert list(at.run_labels(config)) == ["bp@0.1", "bp@0.03", "cbp"]
  assert (
    protocol.at_step_size_label("cbp", {"replacement_rate": 0.5}, ["replacement_rate"]) == "cbp[rate=0.5]"
  )


@pytest.mark.parametrize(
  "over, message",
  [
    ({"methods": ["bp", "sgd"]}, "unknown method 'sgd'"),
    ({"hparams": {"bp": {"step_size": -1}}}, "hparams.bp.step_size must be a number >= 0"),
    ({"hparams": {"bp": {"step_size": "fast"}}}, "hparams.bp.step_size"),
    ({"sweep": {"cbp": {"utility": ["a"]}}}, "'utility' is not a numeric hyperparameter of cbp"),
    ({"sweep": {"cbp": {"replacement_rate": []}}}, "non-empty list of numbers"),
    ({"sweep": {"adam": {"step_size": [1]}}}, "sweep: unknown method 'adam'"),
    ({"seeds": 0}, "seeds must be a positive int"),
    ({"tasks": 0}, "tasks must be > 0"),
    ({"hparams": {"bpp": {"step_size": 1}}}, "unknown config entry"),
  ],
)
def test_bad_configs_are_refused_naming_the_entry(over, message):
  exp, _ = _experiment()
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
    exp.make_config(over)


def test_old_config_shapes_are_converted_with_a_deprecation_warning():
  exp, _ = _experiment(shared_hparams=("momentum",))
  defaults = {**DEFAULTS, "hparams": {m: {**hp, "momentum": 0.0} for m, hp in DEFAULTS["hparams"].items()}}
  exp = protocol.Experiment(**{**exp.__dict__, "defaults": defaults})
  with pytest.warns(DeprecationWarning) as record:
    c = exp.make_config(
      {"step_sizes": {"bp": [0.5, 0.25], "cbp": [0.2]}, "cbp": {"replacement_rate": 0.5}, "momentum": 0.9}
    )
  messages = " ".join(str(w.message) for w in record)
  assert "'hparams.cbp'" in messages and "sweep.METHOD.step_size" in messages
  assert "hparams.METHOD.momentum" in messages
  assert c["sweep"] == {"bp": {"step_size": [0.5, 0.25]}}
  assert c["hparams"]["cbp"]["step_size"] == 0.2 and c["hparams"]["cbp"]["replacement_rate"] == 0.5
  assert c["hparams"]["bp"]["momentum"] == 0.9 == c["hparams"]["cbp"]["momentum"]
  with pytest.warns(DeprecationWarning) as record:
    c = exp.make_config(hparams={"bp": {"lr": 0.7}}, step_size={"cbp": 0.3})
  messages = " ".join(str(w.message) for w in record)
  assert "'hparams.bp.step_size'" in messages and "'hparams.METHOD.step_size'" in messages
  assert (c["hparams"]["bp"]["step_size"], c["hparams"]["cbp"]["step_size"]) == (0.7, 0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The schema's own shape converts nothing.
    exp.make_config(hparams={"bp": {"step_size": 0.3}}, sweep={"cbp": {"step_size": [1, 2]}})


def test_command_line_flags_set_and_sweep_the_config():
  exp, _ = _experiment(
    presets={"big": ("many tasks", {"tasks": 40, "sweep": {"cbp": {"step_size": [1, 2]}}})},
    flags=(
      protocol.flag("--tasks", "tasks", type=int),
      protocol.flag("--lr", "hparams.*.step_size", type=lambda s: [float(v) for v in s.split(",")]),
      protocol.flag("--rate", "hparams.cbp.replacement_rate", type=float),
    ),
  )
  args = exp.parse_args(
    [
      "--big",
      "--rate",
      "0.25",
      "--set",
      "cbp.utility=weight",
      "--methods",
      "cbp",
      "--sweep",
      "cbp.replacement_rate=0.1,0.2",
      "--seeds",
      "3",
    ]
  )
  c = exp.config_from_args(args)
  assert (c["tasks"], c["seeds"], c["methods"]) == (40, 3, ["cbp"])
  assert c["hparams"]["cbp"]["replacement_rate"] == 0.25 and c["hparams"]["cbp"]["utility"] == "weight"
  assert c["sweep"] == {"cbp": {"step_size": [1, 2], "replacement_rate": [0.1, 0.2]}}
  c = exp.config_from_args(exp.parse_args(["--lr", "0.5", "--tasks", "2"]))
  assert c["hparams"]["bp"]["step_size"] == 0.5 == c["hparams"]["cbp"]["step_size"] and c["tasks"] == 2
  c = exp.config_from_args(exp.parse_args(["--lr", "0.5,0.25"]))
  assert c["sweep"] == {"bp": {"step_size": [0.5, 0.25]}, "cbp": {"step_size": [0.5, 0.25]}}
  with pytest.raises(ValueError, match="cbp has no hyperparameter 'rate'"):
    exp.config_from_args(exp.parse_args(["--set", "cbp.rate=1"]))
  assert exp.main(["--tasks", "0"]) == 2  # A bad config is a CLI error, before any work.


def test_shared_method_flags_set_the_config_and_show_the_experiments_default():
  exp, _ = _experiment(
    flags=(
      *protocol.method_flags("--cbp-rate"),
      protocol.flag("--util", "hparams.cbp.utility", help="utility, default: contribution"),
      protocol.flag("--lr", "hparams.*.step_size", type=float, help="every method's step size"),
    )
  )
  c = exp.config_from_args(exp.parse_args(["--cbp-rate", "0.25"]))
  assert c["hparams"]["cbp"]["replacement_rate"] == 0.25
  helps = {a.dest: a.help for a in exp.parser()._actions}
  assert helps["cbp_rate"] == "CBP replacement rate (default 0.001)"  # DEFAULTS' 1e-3, not the flag's text.
  assert helps["util"] == "utility, default: contribution"  # A default said in words is kept as is.
  assert helps["lr"] == "every method's step size"  # Several methods: no single default to show.
  with pytest.raises(ValueError, match=r"unknown method flags \['--cbp-rat'\]"):
    protocol.method_flags("--cbp-rat")


def test_a_command_of_the_experiments_own_runs_instead_of_the_run(capsys):
  def add(p):
    p.add_argument("--hello", action="store_true")

  def hello(args, config, data):
    if not args.hello:
      return None
    print(f"hello from {config['tasks']} tasks")
    return 0

  exp, _ = _experiment(add_arguments=add, command=hello, flags=(protocol.flag("--tasks", "tasks", type=int),))
  assert exp.main(["--hello", "--tasks", "7"]) == 0
  assert capsys.readouterr().out == "hello from 7 tasks\n"
  assert exp.main(["--hello", "--tasks", "0"]) == 2  # The config is checked first.
