r"""Training-step cost: float vs tfmot QAT vs CDL vs R-CDL, side by side.

    python benchmarks/step_cost.py                   # ~3 min on 2 cores
    python benchmarks/step_cost.py --archs=lenet5 --rounds=5 --no_write

For each architecture (`keras_cdl.architectures`), four models are built from
the same float weights and compiled with Adam and sparse categorical
crossentropy (with accuracy, as `fit` runs them):

  float   the Keras model itself
  qat     `tfmot.quantization.keras.quantize_model` (8-bit fake quant)
  cdl     `keras_cdl.quantize_model(mode="cdl", ...)` with `--weight_bits`,
          `--activation_bits`, `--window`, and the rate on (`--lmbda`,
          `--gamma`): sampled Q_p forward, analytic Q_d backward, the
          marginal-entropy rate terms of every weight and activation
  rcdl    the same with `mode="rcdl"` (Q_d forward and backward)

Each model's compiled Keras train function (`model.make_train_function()`,
what `fit` calls per step) is traced and warmed up first.  Then, in every
round, each model runs `--steps` steps over the same `--batches` random
batches of `--batch_size`, in a rotated order; a model's ratio in a round is
its time over the float model's time in that round, and the table gives
medians over rounds.  Two clocks: wall time, and the process's CPU time
(`time.process_time`, all threads), which is much less disturbed by other
jobs on a shared machine (a step that waits for a core costs wall time, not
CPU time) but also counts threads that spin while waiting.  Only ratios
measured side by side mean anything.

Writes the section between `<!-- step_cost:start -->` and
`<!-- step_cost:end -->` of BENCHMARKS.md (unless `--no_write`).
"""

import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras_cdl
from keras_cdl import architectures
import sections
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "<!-- step_cost:start -->"
END = "<!-- step_cost:end -->"
TARGETS = dict(vs_float=1.5, vs_qat=1.2)  # issue 6, for CDL
MODELS = ("float", "qat", "cdl", "rcdl")

flags.DEFINE_list("archs", ["lenet5", "convnet"], "Architectures.")
flags.DEFINE_integer("weight_bits", 4, "CDL weight bits.")
flags.DEFINE_integer("activation_bits", 4, "CDL activation bits.")
flags.DEFINE_integer("window", 2, "CDL window (quantize_model's default).")
flags.DEFINE_float("lmbda", 1.0, "Weight rate weight.")
flags.DEFINE_float("gamma", 0.05, "Activation rate weight.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("batches", 8, "Distinct random batches cycled through.")
flags.DEFINE_integer("steps", 10, "Steps per model per round.")
flags.DEFINE_integer("rounds", 7, "Timed rounds (medians are reported).")
flags.DEFINE_bool("no_write", False, "Print only; leave BENCHMARKS.md alone.")
flags.DEFINE_string("output", os.path.join(REPO, "BENCHMARKS.md"),
                    "Markdown file whose step_cost section is rewritten.")


def build_models(arch, calibration):
  tf.keras.utils.set_random_seed(0)
  base = architectures.ARCHITECTURES[arch]()
  weights = base.get_weights()

  def fresh():
    model = architectures.ARCHITECTURES[arch]()
    model.set_weights(weights)
    return model

  models = {
      "float": fresh(),
      "qat": tfmot.quantization.keras.quantize_model(fresh()),
  }
  for mode in ("cdl", "rcdl"):
    models[mode] = keras_cdl.quantize_model(
        fresh(), mode=mode, weight_bits=FLAGS.weight_bits,
        activation_bits=FLAGS.activation_bits, lmbda=FLAGS.lmbda,
        gamma=FLAGS.gamma, window=FLAGS.window, calibration_data=calibration)
  for model in models.values():
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
  return models


def measure(arch):
  """Returns {clock: ({model: [seconds per step]}, {model: [ratios]})}."""
  rng = np.random.default_rng(0)
  n = FLAGS.batch_size * FLAGS.batches
  x = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  models = build_models(arch, x[:256])
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(
      FLAGS.batch_size).cache().repeat()
  runners = {}
  for name, model in models.items():
    fn = model.make_train_function()
    iterator = iter(data)
    for _ in range(2):  # trace, compile, warm up
      logs = fn(iterator)
    _ = float(logs["loss"])
    runners[name] = (fn, iterator)
  clocks = dict(wall=time.perf_counter, cpu=time.process_time)
  times = {c: {name: [] for name in models} for c in clocks}
  ratios = {c: {name: [] for name in models} for c in clocks}
  for r in range(FLAGS.rounds):
    order = list(MODELS[r % len(MODELS):] + MODELS[:r % len(MODELS)])
    this = {c: {} for c in clocks}
    for name in order:
      fn, iterator = runners[name]
      start = {c: clock() for c, clock in clocks.items()}
      for _ in range(FLAGS.steps):
        logs = fn(iterator)
      _ = float(logs["loss"])
      for c, clock in clocks.items():
        this[c][name] = (clock() - start[c]) / FLAGS.steps
    for c in clocks:
      for name in models:
        times[c][name].append(this[c][name])
        ratios[c][name].append(this[c][name] / this[c]["float"])
    print(f"{arch} round {r + 1}/{FLAGS.rounds}: " + ", ".join(
        f"{k} {1000 * v:.1f} ms ({1000 * this['cpu'][k]:.0f} CPU)"
        for k, v in this["wall"].items()), flush=True)
  return {c: (times[c], ratios[c]) for c in clocks}


def utc_date():
  return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def code_version():
  try:
    paths = ["keras_cdl/ops.py", "keras_cdl/rate.py", "keras_cdl/quantizers.py"]
    rev = subprocess.run(["git", "-C", REPO, "log", "-1", "--format=%h", "--"]
                         + paths, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--"]
                           + paths, capture_output=True, text=True,
                           check=True).stdout.strip()
    return rev + (" + uncommitted changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv):
  del argv
  tf.get_logger().setLevel("ERROR")
  wall = time.time()
  load_before = os.getloadavg()
  results = {arch: measure(arch) for arch in FLAGS.archs}
  load_after = os.getloadavg()
  med = statistics.median
  lines = [
      START, "## Training-step cost (`benchmarks/step_cost.py`)", "",
      "Command: `" + " ".join(["python", os.path.relpath(sys.argv[0], REPO)]
                              + sys.argv[1:]) + "`  ",
      f"Date: {utc_date()}  ",
      f"Machine: {sections.machine()}, TF {tf.__version__}, "
      f"tfmot {tfmot.__version__}  ",
      f"keras_cdl ops/rate/quantizers: {code_version()}  ",
      "Load average (1/5/15 min) before: "
      + "/".join(f"{v:.1f}" for v in load_before) + ", after: "
      + "/".join(f"{v:.1f}" for v in load_after)
      + " (shared machine: compare the ratios, measured side by side)  ",
      f"Run time: {time.time() - wall:.0f} s; {FLAGS.rounds} interleaved "
      f"rounds of {FLAGS.steps} steps per model, medians.", "",
      f"One Keras train-function step (Adam, batch {FLAGS.batch_size}, "
      f"random data).  CDL and R-CDL: {FLAGS.weight_bits}-bit weights, "
      f"{FLAGS.activation_bits}-bit activations, window {FLAGS.window}, "
      f"rate on (lmbda {FLAGS.lmbda:g}, gamma {FLAGS.gamma:g}), "
      "quantize_model's default hardness (trainable alpha since commit "
      "c350260, fixed kappa before); QAT: tfmot "
      f"default 8-bit.  Target (issue 6): CDL <= "
      f"{TARGETS['vs_float']}x float and <= {TARGETS['vs_qat']}x QAT.", "",
      "| arch | clock | float ms | QAT ms | CDL ms | R-CDL ms | QAT / float "
      "| CDL / float | CDL / QAT | R-CDL / float | R-CDL / QAT | CDL target |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  rows = [(arch, clock, *result[clock]) for arch, result in results.items()
          for clock in ("wall", "cpu")]
  for arch, clock, times, ratios in rows:
    t = {k: 1000 * med(v) for k, v in times.items()}
    f = {k: med(v) for k, v in ratios.items()}
    vs_qat = {k: med([a / b for a, b in zip(ratios[k], ratios["qat"])])
              for k in ("cdl", "rcdl")}
    met = (f["cdl"] <= TARGETS["vs_float"]
           and vs_qat["cdl"] <= TARGETS["vs_qat"])
    lines.append(
        f"| {arch} | {clock} | {t['float']:.1f} | {t['qat']:.1f} | {t['cdl']:.1f} | "
        f"{t['rcdl']:.1f} | {f['qat']:.2f} | {f['cdl']:.2f} | "
        f"{vs_qat['cdl']:.2f} | {f['rcdl']:.2f} | {vs_qat['rcdl']:.2f} | "
        f"{'met' if met else 'missed'} |")
  lines += ["", "Ratios are medians of per-round ratios (each round times "
            "all four models back to back, in a rotated order).", END, ""]
  body = "\n".join(lines)
  print(body)
  if not FLAGS.no_write:
    sections.write_section(FLAGS.output, START, END, body)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
