"""Subprocess jobs of tests/distribute_test.py (not a test module itself).

Strategies need a fresh process: logical CPU devices must be configured before
TensorFlow initialises, and a multi-worker cluster is one process per worker.
Each job builds the same tiny CDL model on synthetic data, runs, and writes
`<out>/<job>[-<task>].json` (numbers) and `.npz` (weights) for the test to
check:

* `mirrored`: rcdl on one device vs two logical CPUs from the same initial
  weights (SGD, same global batch); the same under `jit_compile=True` on one
  device; cdl training under `MirroredStrategy` and jit.
* `cdl_seed`: cdl under `MirroredStrategy` from a seed: per-replica and
  per-step draws, and the trained weights (run twice to check reproducibility).
* `multiworker` (one process per worker, cluster in `TF_CONFIG`): cdl draws
  per worker (and, with `--cdl_fit`, cdl training), then rcdl `fit` with
  `BackupAndRestore`; `--kill_task` makes that worker `os._exit` at
  `--kill_epoch`/`--kill_batch` (the test then restarts the cluster).

    python tests/distribute_worker.py --job=mirrored --out=/tmp/dir
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FEATURES = 6
CLASSES = 3
EXAMPLES = 64
GLOBAL_BATCH = 16
KILL_EXIT_CODE = 17


def _parse(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--job", required=True,
                      choices=["mirrored", "cdl_seed", "multiworker"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=7)
  parser.add_argument("--tag", default="")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--backup_dir", default="")
  parser.add_argument("--kill_task", type=int, default=-1)
  parser.add_argument("--kill_epoch", type=int, default=1)
  parser.add_argument("--kill_batch", type=int, default=1)
  parser.add_argument("--cdl_fit", action="store_true",
                      help="multiworker: also train the sampled model.")
  return parser.parse_args(argv)


ARGS = _parse(sys.argv[1:])

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

if ARGS.job in ("mirrored", "cdl_seed"):
  # Before anything else initialises TensorFlow's devices.
  from keras_cdl import distribute  # pylint: disable=g-import-not-at-top
  distribute.configure_cpu_devices(2)

import keras_cdl  # pylint: disable=g-import-not-at-top
from keras_cdl import distribute  # pylint: disable=g-import-not-at-top,reimported

L = tf.keras.layers
XENT = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STARTED = time.time()


def data():
  """Synthetic, learnable: labels are the argmax of a fixed linear map."""
  rng = np.random.RandomState(0)
  x = rng.rand(EXAMPLES, FEATURES).astype(np.float32)
  y = np.argmax(x @ rng.randn(FEATURES, CLASSES), axis=1).astype(np.int64)
  return x, y


def build(mode, x):
  """Float model and its CDL copy; call inside the strategy's scope."""
  float_model = tf.keras.Sequential([
      L.InputLayer((FEATURES,)),
      L.Dense(8, activation="relu", name="hidden"),
      L.Dense(CLASSES, name="logits"),
  ], name="tiny")
  # Fixed kappa and float logits: with a trainable alpha (quantize_model's
  # default) or with the 8-bit logits quantizer, SGD(0.1) amplifies float
  # summation-order differences (two replicas vs one, and XLA vs not alike)
  # to ~1e-4 and ~1e-2 after 4 steps (measured), not ~5e-7; the tolerances
  # below are for this configuration.
  return keras_cdl.quantize_model(
      float_model, mode=mode, weight_bits=4, activation_bits=4, lmbda=1.0,
      gamma=0.1, hardness="kappa", kappa=4.0, window=3, output_bits=None,
      calibration_data=x[:32])


def compile_model(model, jit=False, momentum=0.0):
  model.compile(optimizer=tf.keras.optimizers.SGD(0.1, momentum=momentum),
                loss=XENT, jit_compile=jit)
  # Creating the optimizer's variables now spares `fit` a second trace.
  model.optimizer.build(model.trainable_variables)


def arrays(model):
  return {f"{i:02d}_{v.name}": np.asarray(v.numpy())
          for i, v in enumerate(model.weights)}


def max_difference(a, b):
  return float(max(np.max(np.abs(u - v)) for u, v in zip(a, b)))


def history(h):
  return {k: [float(v) for v in values] for k, values in h.history.items()}


def replica_draws(strategy, model, x):
  """Outputs of every local replica on the same inputs, training=True, twice."""

  @tf.function
  def forward(inputs):
    return strategy.run(lambda v: model(v, training=True), args=(inputs,))

  inputs = tf.constant(x[:4])
  first = strategy.experimental_local_results(forward(inputs))
  second = strategy.experimental_local_results(forward(inputs))
  return ([np.asarray(v) for v in first], [np.asarray(v) for v in second])


def write(name, numbers, weights=None):
  numbers = dict(numbers, seconds=time.time() - STARTED)
  path = os.path.join(ARGS.out, name)
  with open(path + ".json", "w") as f:
    json.dump(numbers, f, indent=1)
  if weights is not None:
    np.savez(path + ".npz", **weights)


def job_mirrored():
  x, y = data()
  fit = dict(x=x, y=y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
             verbose=0)
  numbers = {}
  # One replica (no strategy).
  tf.keras.utils.set_random_seed(ARGS.seed)
  single = build("rcdl", x)
  initial = single.get_weights()
  compile_model(single)
  numbers["single_history"] = history(single.fit(**fit))
  single_weights = single.get_weights()
  numbers["max_change"] = max_difference(single_weights, initial)
  # Two replicas, same initial weights, same global batch.
  strategy = distribute.make_strategy("mirrored")
  numbers["replicas"] = strategy.num_replicas_in_sync
  with strategy.scope():
    tf.keras.utils.set_random_seed(ARGS.seed)
    mirrored = build("rcdl", x)
    numbers["mirrored_variable"] = type(mirrored.weights[0]).__name__
    numbers["init_difference"] = max_difference(mirrored.get_weights(),
                                                initial)
    mirrored.set_weights(initial)
    compile_model(mirrored)
  numbers["mirrored_history"] = history(mirrored.fit(**fit))
  mirrored_weights = mirrored.get_weights()
  numbers["mirrored_difference"] = max_difference(mirrored_weights,
                                                  single_weights)
  numbers["mirrored_difference_per_weight"] = {
      v.name: float(np.max(np.abs(a - b))) for v, a, b in zip(
          mirrored.weights, mirrored_weights, single_weights)}
  # XLA (jit_compile=True): no host-side Python in the train step.
  tf.keras.utils.set_random_seed(ARGS.seed)
  jit = build("rcdl", x)
  jit.set_weights(initial)
  compile_model(jit, jit=True)
  numbers["jit_history"] = history(jit.fit(**fit))
  numbers["jit_difference"] = max_difference(jit.get_weights(),
                                             single_weights)
  tf.keras.utils.set_random_seed(ARGS.seed)
  jit_cdl = build("cdl", x)
  compile_model(jit_cdl, jit=True)
  before = jit_cdl.get_weights()
  numbers["jit_cdl_history"] = history(jit_cdl.fit(**fit))
  numbers["jit_cdl_change"] = max_difference(jit_cdl.get_weights(), before)
  numbers["jit_cdl_finite"] = bool(all(
      np.all(np.isfinite(w)) for w in jit_cdl.get_weights()))
  write("mirrored", numbers)


def job_cdl_seed():
  x, y = data()
  strategy = distribute.make_strategy("mirrored")
  tf.keras.utils.set_random_seed(ARGS.seed)
  with strategy.scope():
    model = build("cdl", x)
    compile_model(model)
  first, second = replica_draws(strategy, model, x)
  numbers = {
      "replicas": strategy.num_replicas_in_sync,
      "replica_difference": float(np.max(np.abs(first[0] - first[1]))),
      "step_difference": float(np.max(np.abs(first[0] - second[0]))),
  }
  numbers["history"] = history(model.fit(
      x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0))
  write(f"cdl_seed{ARGS.tag}", numbers, arrays(model))


class _Kill(tf.keras.callbacks.Callback):
  """Ends this worker's process abruptly at a chosen epoch and batch."""

  def __init__(self, epoch, batch):
    super().__init__()
    self.kill_epoch, self.kill_batch, self.epoch = epoch, batch, None

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if self.epoch == self.kill_epoch and batch == self.kill_batch:
      sys.stdout.flush()
      os._exit(KILL_EXIT_CODE)  # pylint: disable=protected-access


class _Epochs(tf.keras.callbacks.Callback):
  """Records the epochs this attempt runs (BackupAndRestore skips some)."""

  def __init__(self):
    super().__init__()
    self.epochs = []

  def on_epoch_begin(self, epoch, logs=None):
    self.epochs.append(epoch)


def job_multiworker():
  x, y = data()
  strategy = distribute.make_strategy("multiworker")
  task = strategy.cluster_resolver.task_id
  numbers = {"task": task, "replicas": strategy.num_replicas_in_sync,
             "chief": distribute.is_chief(strategy)}
  # Sampling: each worker's replica draws its own samples.
  tf.keras.utils.set_random_seed(ARGS.seed)
  with strategy.scope():
    sampled = build("cdl", x)
  (draw,), _ = replica_draws(strategy, sampled, x)
  numbers["draw"] = draw.tolist()
  # Written now: a worker killed later still leaves its draw.
  write(f"multiworker{ARGS.tag}-{task}-draw", {"draw": numbers["draw"]})
  weights = {}
  if ARGS.cdl_fit:
    with strategy.scope():
      compile_model(sampled)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    numbers["cdl_history"] = history(sampled.fit(dataset, epochs=1,
                                                 verbose=0))
    weights.update({f"cdl/{k}": v for k, v in arrays(sampled).items()})
  # rcdl training with backups; maybe killed.
  tf.keras.utils.set_random_seed(ARGS.seed)
  with strategy.scope():
    model = build("rcdl", x)
    compile_model(model, momentum=0.9)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  epochs = _Epochs()
  callbacks = [tf.keras.callbacks.BackupAndRestore(ARGS.backup_dir), epochs]
  if task == ARGS.kill_task:
    callbacks.append(_Kill(ARGS.kill_epoch, ARGS.kill_batch))
  h = model.fit(dataset, epochs=ARGS.epochs, callbacks=callbacks, verbose=0)
  numbers["history"] = history(h)
  numbers["epochs_run"] = epochs.epochs
  if ARGS.cdl_fit:
    # Keras 2.14 sums the workers' test-step logs ("auto" reduction);
    # CDLModel replaces them by the metrics' own (synchronised) results, so
    # evaluate() is right under either reduction.
    numbers["evaluate_auto"] = float(model.evaluate(dataset, verbose=0))
    model.distribute_reduction_method = "first"
    model.test_function = None
    numbers["evaluate_first"] = float(model.evaluate(dataset, verbose=0))
    numbers["evaluate_local"] = float(XENT(y, model(x, training=False)))
  weights.update(arrays(model))
  write(f"multiworker{ARGS.tag}-{task}", numbers, weights)


if __name__ == "__main__":
  {"mirrored": job_mirrored, "cdl_seed": job_cdl_seed,
   "multiworker": job_multiworker}[ARGS.job]()
