r"""Accuracy vs artifact size on Fashion-MNIST: CDL against TFLite and tfmot.

    python benchmarks/frontier.py                 # full run (see below)
    python benchmarks/frontier.py --quick         # smoke run
    python benchmarks/frontier.py --archs=lenet5 \
        --ablations=kappa_anneal,kappa_fixed,window3,prior

The full run's defaults are sized for 90 minutes on 2 cores: LeNet5-Caffe
with R-CDL at lmbda {0.3, 1, 3}, CDL at 1 and three ablations; the convnet
with R-CDL at {0.5, 2} and CDL at 2.  It took 78.5 minutes on 2026-12-05
(LeNet5 34 minutes, the convnet 44; BENCHMARKS.md), `--quick` 5.5
minutes.  CDL rows use the library's defaults (trainable alpha from kappa 2,
window 2, marginal entropy) unless an ablation row says otherwise.  Run
it with `PYTHONPATH` pointing at a snapshot of keras_cdl if others edit the
package meanwhile: autograph re-reads the source when it traces.

For each architecture (LeNet5-Caffe, the Fashion-MNIST authors' convnet) it
trains and measures, in one process, side by side:

  float        float32 reference (artifact: float .tflite)
  ptq_dynamic  TFLite post-training dynamic-range int8 (from `float`)
  ptq_int8     TFLite post-training full-integer int8, representative data
  qat          tfmot quantization-aware training -> TFLite int8
  prune_cluster  tfmot magnitude pruning (PolynomialDecay to --sparsity)
               then sparsity-preserving weight clustering (--clusters),
               stripped, saved as HDF5, gzipped (Deep-Compression-style peer)
  cdl, rcdl    keras_cdl CDL / R-CDL over the (lmbda, gamma) sweep, each
               stored with `keras_cdl.compress` as a .cdl file (or, when that
               module is missing, `summary.report(model).estimated_bytes`,
               labelled "estimated")

Same training budget for every method: `--epochs_<arch>` epochs in total
(LeNet5 8, convnet 5), of which the first `--pretrain_<arch>` are float
pre-training shared by every fine-tuned method (the float reference simply
keeps training float for the rest), batch 128, Adam(1e-3).  PTQ methods
reuse the float reference, so their training cost is the float cost.

Reported per method: test accuracy (TFLite rows: measured with the TFLite
interpreter on the converted file), artifact bytes (the whole file), ratio
of float32 weight bytes to artifact bytes, training seconds per epoch
(fine-tuning epochs, first epoch excluded when there are several, since it
includes tracing) and its ratio to float's, and a separate training-step
microbenchmark (float, tfmot QAT, CDL, R-CDL on the same batches, interleaved
in rotated order over `--step_rounds` rounds, median) so that step-cost
ratios come from one run on one machine.  Timings on a shared machine are
only meaningful as ratios within one run.

Writes BENCHMARKS.md's `<!-- frontier:start -->`...`<!-- frontier:end -->`
section (only that section), benchmarks/frontier.png (accuracy vs bytes, log
x axis, one line per method, one panel per architecture) and
`--output_dir`/results.json; after each architecture, so a killed run
leaves its finished part behind.  `--replot` rewrites both from results.json
without training.
"""

import datetime
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import keras_cdl
from keras_cdl import architectures
from keras_cdl import callbacks as cdl_callbacks
from keras_cdl import datasets
from keras_cdl import summary as summary_lib

try:  # Written concurrently by other agents; use them when present.
  from keras_cdl import compress as compress_lib  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  compress_lib = None

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("float", "ptq_dynamic", "ptq_int8", "qat", "prune_cluster", "cdl",
           "rcdl")
ABLATIONS = ("kappa_anneal", "kappa_fixed", "window3", "prior")

flags.DEFINE_list("archs", ["lenet5", "convnet"], "Architectures.")
flags.DEFINE_list("methods", list(METHODS), f"Subset of {METHODS}.")
flags.DEFINE_bool(
    "quick", False,
    "Smoke run: 5000 training / 2000 test images, LeNet5 3 epochs (1+2), "
    "convnet 2 epochs (1+1), R-CDL at lmbda {0.3, 3} and CDL at 3 on both, "
    "no ablations, step microbenchmark 2 rounds x 10 steps.  Explicit "
    "flags still win.")
flags.DEFINE_list("lmbdas", ["0.3", "1", "3"],
                  "R-CDL lmbda sweep (loss units per bit per weight).")
flags.DEFINE_list("cdl_lmbdas", ["1"],
                  "CDL lmbda sweep (empty: --lmbdas); one point by default, "
                  "R-CDL's companion for the CDL vs R-CDL comparison.")
flags.DEFINE_list("lmbdas_convnet", ["0.5", "2"],
                  "R-CDL lmbda sweep for the convnet (empty: --lmbdas); "
                  "fewer points than LeNet5's because a convnet CDL epoch "
                  "costs ~3x LeNet5's.")
flags.DEFINE_list("cdl_lmbdas_convnet", ["2"],
                  "CDL lmbda sweep for the convnet (empty: --cdl_lmbdas).")
flags.DEFINE_list("gammas", ["0.005"],
                  "gamma sweep (loss units per bit per activation).")
flags.DEFINE_list("ablations", ["kappa_anneal", "window3", "kappa_fixed"],
                  f"Extra R-CDL/CDL runs at --default_lmbda/--default_gamma, "
                  f"one change each from the library's defaults (trainable "
                  f"alpha from kappa 2, window 2, marginal-entropy rate): "
                  f"{ABLATIONS}.  kappa_anneal: hardness='kappa' annealed "
                  "--kappa -> --final_kappa by KappaSchedule; kappa_fixed: "
                  "hardness='kappa' fixed at --kappa; window3: window=3; "
                  "prior: rate='prior' (tfc's learned prior; ~3x a CDL "
                  "step, so not in the default list).")
flags.DEFINE_list("ablation_archs", ["lenet5"],
                  "Architectures the ablations run on.")
flags.DEFINE_enum("ablation_mode", "rcdl", ["cdl", "rcdl"],
                  "Mode of the ablation runs.")
flags.DEFINE_float("default_lmbda", 0.3, "lmbda of the ablation runs.")
flags.DEFINE_float("default_gamma", 0.005, "gamma of the ablation runs.")
flags.DEFINE_integer("weight_bits", 4, "CDL weight bits.")
flags.DEFINE_integer("activation_bits", 4, "CDL activation bits.")
flags.DEFINE_float("kappa", 2.0, "Initial CDL hardness (kappa = alpha q^2).")
flags.DEFINE_float("final_kappa", 32.0,
                   "Final hardness of the kappa_anneal ablation (geometric).")
flags.DEFINE_integer("window", 2, "CDL window.")
flags.DEFINE_integer("epochs_lenet5", 8, "LeNet5 total epochs.")
flags.DEFINE_integer("pretrain_lenet5", 3, "LeNet5 float pre-training epochs.")
flags.DEFINE_integer("epochs_convnet", 5, "Convnet total epochs.")
flags.DEFINE_integer("pretrain_convnet", 2, "Convnet float pre-training epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_float("sparsity", 0.9, "Final pruning sparsity.")
flags.DEFINE_integer("clusters", 16, "Weight clusters.")
flags.DEFINE_integer("train_examples", 0, "Training images (0: all 60000).")
flags.DEFINE_integer("test_examples", 0, "Test images (0: all 10000).")
flags.DEFINE_integer("step_rounds", 3, "Step microbenchmark rounds.")
flags.DEFINE_integer("step_count", 20, "Timed steps per round and method.")
flags.DEFINE_bool("step_benchmark", True, "Run the step microbenchmark.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", "/tmp/keras_cdl_frontier",
                    "Artifacts and results.json.")
flags.DEFINE_string("markdown", os.path.join(REPO, "BENCHMARKS.md"),
                    "BENCHMARKS.md to update (frontier section only).")
flags.DEFINE_string("plot", os.path.join(REPO, "benchmarks", "frontier.png"),
                    "Plot file.")
flags.DEFINE_string("notes", None,
                    "With --replot: a text file whose content becomes the "
                    "section's 'Reading' paragraph.")
flags.DEFINE_list("merge", [],
                  "With --replot: results.json files whose architectures are "
                  "merged (in order) into --output_dir's results.json first, "
                  "e.g. from architectures or extra sweep points run as "
                  "separate processes (their rows replace rows with the same "
                  "label, their float rows are dropped).")
flags.DEFINE_bool("replot", False,
                  "Only rewrite the markdown and plot from results.json.")

_QUICK = dict(train_examples=5000, test_examples=2000, epochs_lenet5=3,
              pretrain_lenet5=1, epochs_convnet=2, pretrain_convnet=1,
              lmbdas=["0.3", "3"], cdl_lmbdas=["3"],
              lmbdas_convnet=["0.3", "3"], cdl_lmbdas_convnet=["3"],
              ablations=[], step_rounds=2, step_count=10)
TARGETS = {
    "lenet5": dict(accuracy=0.909, coded_bytes=10 * 1024, float_drop=0.01,
                   ratio=300.0),
    "convnet": dict(accuracy=0.915, coded_bytes=58 * 1024),
}
STEP_TARGETS = dict(vs_float=1.5, vs_qat=1.2)


def _apply_quick():
  """Applies --quick's cuts (explicit flags win); returns the effective ones."""
  if not FLAGS.quick:
    return []
  cut = []
  for name, value in _QUICK.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value
    value = FLAGS[name].value
    cut.append(f"{name}={','.join(value) if isinstance(value, list) else value}")
  return cut


# --------------------------------------------------------------------------
# Training helpers.


class EpochTimer(tf.keras.callbacks.Callback):
  """Wall seconds of each epoch."""

  def __init__(self):
    super().__init__()
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self._start = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def _per_epoch(seconds):
  """Mean epoch seconds, without the first (tracing) epoch if possible."""
  if not seconds:
    return float("nan")
  return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def _compile(model):
  model.compile(
      optimizer=tf.keras.optimizers.Adam(FLAGS.learning_rate),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])


def _fit(model, data, epochs, callbacks=()):
  timer = EpochTimer()
  (x, y) = data
  if epochs > 0:
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=epochs, verbose=2,
              callbacks=[timer, *callbacks])
  return timer.seconds


def _fresh(arch, weights):
  model = architectures.ARCHITECTURES[arch]()
  model.set_weights(weights)
  return model


def _accuracy(model, test):
  _, accuracy = model.evaluate(test[0], test[1], batch_size=512, verbose=0)
  return float(accuracy)


# --------------------------------------------------------------------------
# TFLite.


def _tflite_accuracy(content, test, batch=250):
  """Top-1 accuracy of a .tflite flatbuffer, run by the TFLite interpreter."""
  interpreter = tf.lite.Interpreter(model_content=content)
  inp = interpreter.get_input_details()[0]
  interpreter.resize_tensor_input(inp["index"], [batch, *test[0].shape[1:]])
  interpreter.allocate_tensors()
  inp = interpreter.get_input_details()[0]
  out = interpreter.get_output_details()[0]
  correct = 0
  n = (len(test[0]) // batch) * batch
  for start in range(0, n, batch):
    x = test[0][start:start + batch]
    if inp["dtype"] != np.float32:
      scale, zero = inp["quantization"]
      x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    logits = interpreter.get_tensor(out["index"])
    correct += int((logits.argmax(-1) == test[1][start:start + batch]).sum())
  return correct / n


def _convert(model, kind, representative=None):
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  if kind != "float":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if kind == "int8":
    def gen():
      for i in range(0, len(representative), 32):
        yield [representative[i:i + 32]]
    converter.representative_dataset = gen
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
  return converter.convert()


def _write(path, content):
  with open(path, "wb") as f:
    f.write(content)
  return os.path.getsize(path)


# --------------------------------------------------------------------------
# Methods.  Each returns a result dict (or a list of them).


def _row(arch, method, label, accuracy, artifact_bytes, artifact, epoch_s,
         **extra):
  return dict(arch=arch, method=method, label=label, accuracy=accuracy,
              bytes=artifact_bytes, artifact=artifact, epoch_s=epoch_s,
              **extra)


def run_qat(arch, weights, train, test, epochs, out):
  model = tfmot.quantization.keras.quantize_model(_fresh(arch, weights))
  _compile(model)
  seconds = _fit(model, train, epochs)
  content = _convert(model, "qat")
  path = os.path.join(out, f"{arch}_qat.tflite")
  size = _write(path, content)
  return _row(arch, "qat", "tfmot QAT -> TFLite int8",
              _tflite_accuracy(content, test), size, "tflite",
              _per_epoch(seconds), keras_accuracy=_accuracy(model, test))


def run_prune_cluster(arch, weights, train, test, epochs, out):
  prune_epochs = max(1, (epochs + 1) // 2)
  cluster_epochs = max(0, epochs - prune_epochs)
  steps = int(np.ceil(len(train[0]) / FLAGS.batch_size))
  schedule = tfmot.sparsity.keras.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=FLAGS.sparsity, begin_step=0,
      end_step=max(1, int(steps * max(prune_epochs - 0.5, 0.5))),
      frequency=max(1, min(100, steps // 4)))
  model = tfmot.sparsity.keras.prune_low_magnitude(
      _fresh(arch, weights), pruning_schedule=schedule)
  _compile(model)
  seconds = _fit(model, train, prune_epochs,
                 [tfmot.sparsity.keras.UpdatePruningStep()])
  model = tfmot.sparsity.keras.strip_pruning(model)
  cluster = tfmot.clustering.keras
  model = cluster.cluster_weights(
      model, number_of_clusters=FLAGS.clusters,
      cluster_centroids_init=cluster.CentroidInitialization.KMEANS_PLUS_PLUS,
      preserve_sparsity=True)
  _compile(model)
  seconds += _fit(model, train, cluster_epochs)
  model = cluster.strip_clustering(model)
  _compile(model)
  accuracy = _accuracy(model, test)
  h5 = os.path.join(out, f"{arch}_prune_cluster.h5")
  model.save(h5, include_optimizer=False)
  with open(h5, "rb") as f_in, gzip.open(h5 + ".gz", "wb", 9) as f_out:
    shutil.copyfileobj(f_in, f_out)
  kernels = [w for w in model.get_weights() if w.ndim > 1]
  sparsity = float(sum((k == 0).sum() for k in kernels) /
                   sum(k.size for k in kernels))
  return _row(arch, "prune_cluster",
              f"tfmot prune {FLAGS.sparsity:.0%} + {FLAGS.clusters} clusters, "
              "h5.gz", accuracy, os.path.getsize(h5 + ".gz"), "h5.gz",
              _per_epoch(seconds), sparsity=sparsity,
              prune_epochs=prune_epochs, cluster_epochs=cluster_epochs)


def _cdl_size(model, path):
  """(bytes, artifact kind, coded-weights bytes or None, details)."""
  rep = summary_lib.report(model)
  details = dict(bits_per_weight=rep.bits_per_weight,
                 estimated_bytes=rep.estimated_bytes)
  compress = getattr(keras_cdl, "compress", None)
  if not callable(compress) and compress_lib is not None:
    compress = getattr(compress_lib, "compress", None)
  if callable(compress):
    compress(model, path)
    size = os.path.getsize(path)
    coded = None
    try:  # payload + tables of the quantized kernels, from the file itself
      sizes = compress_lib.size_report(path)
      quantized = [t for t in sizes.tensors if t.role == "quantized"]
      coded = float(sum(t.payload_bytes + t.table_bytes for t in quantized))
      details.update(coded_payload_bytes=sizes.coded_payload_bytes,
                     records_bytes=sizes.records_bytes,
                     gzip_int8_bytes=getattr(sizes, "gzip_int8_bytes", None))
    except Exception as e:  # pylint: disable=broad-except
      details["size_report_error"] = f"{type(e).__name__}: {e}"[:300]
    return size, "cdl", coded, details
  return rep.estimated_bytes, "estimated", None, details


def run_cdl(arch, weights, train, test, epochs, out, mode, lmbda, gamma,
            calibration, tag="", hardness="alpha", rate="entropy",
            window=None, anneal=False):
  window = window or FLAGS.window
  model = keras_cdl.quantize_model(
      _fresh(arch, weights), mode=mode, weight_bits=FLAGS.weight_bits,
      activation_bits=FLAGS.activation_bits, lmbda=lmbda, gamma=gamma,
      hardness=hardness, kappa=FLAGS.kappa, window=window, rate=rate,
      calibration_data=calibration)
  _compile(model)
  callbacks = []
  if anneal and hardness == "kappa":
    callbacks.append(cdl_callbacks.KappaSchedule.geometric(
        FLAGS.kappa, FLAGS.final_kappa, max(epochs, 1)))
  seconds = _fit(model, train, epochs, callbacks)
  accuracy = _accuracy(model, test)
  name = f"{arch}_{mode}{tag}_l{lmbda:g}_g{gamma:g}"
  size, kind, coded, details = _cdl_size(model, os.path.join(out, name + ".cdl"))
  label = {"cdl": "CDL", "rcdl": "R-CDL"}[mode]
  return _row(arch, mode + tag, f"{label}{tag} lmbda={lmbda:g} gamma={gamma:g}",
              accuracy, size, kind, _per_epoch(seconds), lmbda=lmbda,
              gamma=gamma, coded_bytes=coded, **details)


# --------------------------------------------------------------------------
# Step microbenchmark.


def step_benchmark(arch, weights, train, calibration):
  """Median seconds per training step of float, QAT, CDL and R-CDL."""
  builders = {
      "float": lambda: _fresh(arch, weights),
      "qat": lambda: tfmot.quantization.keras.quantize_model(
          _fresh(arch, weights)),
  }
  for mode in ("cdl", "rcdl"):
    builders[mode] = (lambda mode=mode: keras_cdl.quantize_model(
        _fresh(arch, weights), mode=mode, weight_bits=FLAGS.weight_bits,
        activation_bits=FLAGS.activation_bits, lmbda=FLAGS.default_lmbda,
        gamma=FLAGS.default_gamma, hardness="alpha", kappa=FLAGS.kappa,
        window=FLAGS.window, calibration_data=calibration))
  # Whole `fit` epochs over the same `step_count` batches (the compiled
  # train function is reused across calls), not `train_on_batch`, whose
  # per-call Python overhead would dilute the ratios.
  n = FLAGS.batch_size * FLAGS.step_count
  x, y = train[0][:n], train[1][:n]
  models = {}
  for name, build in builders.items():
    model = build()
    _compile(model)
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0)  # trace
    models[name] = model
  times = {name: [] for name in models}
  names = list(models)
  for round_ in range(FLAGS.step_rounds):
    # Rotated order, so no model always takes the same place in a round.
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      model = models[name]
      start = time.perf_counter()
      model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0)
      times[name].append((time.perf_counter() - start) / FLAGS.step_count)
  return {name: float(statistics.median(t)) for name, t in times.items()}


# --------------------------------------------------------------------------
# One architecture.


def _sweep(arch, mode):
  """The lmbda values `mode` ("cdl" or "rcdl") runs at on `arch`."""
  rcdl = FLAGS.lmbdas
  if arch == "convnet" and FLAGS.lmbdas_convnet:
    rcdl = FLAGS.lmbdas_convnet
  if mode == "rcdl":
    return rcdl
  cdl = FLAGS.cdl_lmbdas or rcdl
  if arch == "convnet" and FLAGS.cdl_lmbdas_convnet:
    cdl = FLAGS.cdl_lmbdas_convnet
  return cdl


def run_arch(arch, train, test, results, save):
  out = os.path.join(FLAGS.output_dir, arch)
  os.makedirs(out, exist_ok=True)
  total = FLAGS[f"epochs_{arch}"].value
  pre = min(FLAGS[f"pretrain_{arch}"].value, total)
  fine = total - pre
  calibration = train[0][:512]
  methods = set(FLAGS.methods)
  rows = []
  entry = dict(arch=arch, epochs=total, pretrain=pre, rows=rows)
  results["archs"][arch] = entry

  tf.keras.utils.set_random_seed(FLAGS.seed)
  model = architectures.ARCHITECTURES[arch]()
  _compile(model)
  float_weights_bytes = 4 * model.count_params()
  entry["float32_weight_bytes"] = float_weights_bytes
  seconds = _fit(model, train, pre)
  pretrained = model.get_weights()
  seconds += _fit(model, train, fine)
  float_epoch = _per_epoch(seconds)
  content = _convert(model, "float")
  size = _write(os.path.join(out, f"{arch}_float.tflite"), content)
  rows.append(_row(arch, "float", "float32", _accuracy(model, test), size,
                   "tflite", float_epoch))
  save()
  if "ptq_dynamic" in methods:
    content = _convert(model, "dynamic")
    size = _write(os.path.join(out, f"{arch}_ptq_dynamic.tflite"), content)
    rows.append(_row(arch, "ptq_dynamic", "TFLite PTQ dynamic range",
                     _tflite_accuracy(content, test), size, "tflite",
                     float_epoch))
  if "ptq_int8" in methods:
    content = _convert(model, "int8", train[0][:512])
    size = _write(os.path.join(out, f"{arch}_ptq_int8.tflite"), content)
    rows.append(_row(arch, "ptq_int8", "TFLite PTQ full int8",
                     _tflite_accuracy(content, test), size, "tflite",
                     float_epoch))
  save()
  if "qat" in methods:
    rows.append(run_qat(arch, pretrained, train, test, fine, out))
    save()
  if "prune_cluster" in methods:
    rows.append(run_prune_cluster(arch, pretrained, train, test, fine, out))
    save()
  for mode in ("rcdl", "cdl"):
    if mode not in methods:
      continue
    sweep = _sweep(arch, mode)
    for lmbda in map(float, sweep):
      for gamma in map(float, FLAGS.gammas):
        rows.append(run_cdl(arch, pretrained, train, test, fine, out, mode,
                            lmbda, gamma, calibration))
        save()
  ablation = dict(
      kappa_anneal=dict(tag="+annealed_kappa", hardness="kappa", anneal=True),
      kappa_fixed=dict(tag="+fixed_kappa", hardness="kappa"),
      window3=dict(tag="+window3", window=3),
      prior=dict(tag="+prior", rate="prior"))
  for name in FLAGS.ablations if arch in FLAGS.ablation_archs else ():
    try:
      rows.append(run_cdl(arch, pretrained, train, test, fine, out,
                          FLAGS.ablation_mode, FLAGS.default_lmbda,
                          FLAGS.default_gamma, calibration,
                          **ablation[name]))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(_row(arch, FLAGS.ablation_mode + ablation[name]["tag"],
                       f"ablation {name} FAILED: {type(e).__name__}: {e}"[:300],
                       float("nan"), float("nan"), "failed", float("nan")))
    save()
  if FLAGS.step_benchmark:
    entry["step_s"] = step_benchmark(arch, pretrained, train, calibration)
  save()


# --------------------------------------------------------------------------
# Report.


def _fmt_bytes(n):
  if n is None or not np.isfinite(n):
    return "n/a"
  return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def _targets(arch, entry):
  rows = entry["rows"]
  floats = [r for r in rows if r["method"] == "float"]
  cdl = [r for r in rows if r["method"] in ("cdl", "rcdl")
         and np.isfinite(r["accuracy"])]
  lines = []
  if not floats or not cdl or arch not in TARGETS:
    return lines
  target = TARGETS[arch]
  wbytes = entry["float32_weight_bytes"]

  def coded(r):  # payload + tables if compress reports it, else the file
    return r.get("coded_bytes") or r["bytes"]

  kind = "estimated" if cdl[0]["artifact"] == "estimated" else (
      "payload+tables" if cdl[0].get("coded_bytes") else "whole .cdl file")
  fits = [r for r in cdl if coded(r) <= target["coded_bytes"]]
  best = max(fits, key=lambda r: r["accuracy"]) if fits else min(
      cdl, key=coded)
  met = bool(fits) and best["accuracy"] >= target["accuracy"]
  lines.append(
      f"- {arch}: >= {target['accuracy']:.1%} with <= "
      f"{target['coded_bytes'] / 1024:.0f} KB coded weights: "
      f"**{'met' if met else 'missed'}**: best run within the size "
      f"({kind}) is {best['label']}: {best['accuracy']:.2%} at "
      f"{_fmt_bytes(coded(best))}" +
      ("" if fits else " (no run fits; smallest shown)") +
      (f" ({(best['accuracy'] - target['accuracy']) * 100:+.2f} points)"))
  if "ratio" in target:
    facc = floats[0]["accuracy"]
    ok = [r for r in cdl if wbytes / r["bytes"] >= target["ratio"]]
    if ok:
      best = max(ok, key=lambda r: r["accuracy"])
      drop = facc - best["accuracy"]
      met = drop <= target["float_drop"]
      lines.append(
          f"- {arch}: <= {target['float_drop'] * 100:.0f} point below float "
          f"at >= {target['ratio']:.0f}x: **{'met' if met else 'missed'}**: "
          f"{best['label']} is {drop * 100:.2f} points below float "
          f"({best['accuracy']:.2%} vs {facc:.2%}) at "
          f"{wbytes / best['bytes']:.0f}x")
    else:
      best = max(cdl, key=lambda r: wbytes / r["bytes"])
      lines.append(
          f"- {arch}: <= {target['float_drop'] * 100:.0f} point below float "
          f"at >= {target['ratio']:.0f}x: **missed**: largest ratio reached "
          f"is {wbytes / best['bytes']:.0f}x ({best['label']}, "
          f"{(facc - best['accuracy']) * 100:.2f} points below float)")
  step = entry.get("step_s")
  if step:
    for mode in ("cdl", "rcdl"):
      vf = step[mode] / step["float"]
      vq = step[mode] / step["qat"]
      met = vf <= STEP_TARGETS["vs_float"] and vq <= STEP_TARGETS["vs_qat"]
      lines.append(
          f"- {arch}: {mode.upper()} step <= {STEP_TARGETS['vs_float']}x "
          f"float and <= {STEP_TARGETS['vs_qat']}x QAT: "
          f"**{'met' if met else 'missed'}**: {vf:.2f}x float, {vq:.2f}x QAT")
  return lines


def markdown(results):
  lines = ["<!-- frontier:start -->", "## Accuracy vs size frontier "
           "(benchmarks/frontier.py)", ""]
  lines.append(f"Command: `{results['command']}`  ")
  lines.append(f"Date: {results['date']}  ")
  lines.append(f"Machine: {results['machine']}  ")
  if results.get("library"):
    lines.append(f"keras_cdl: {results['library']}  ")
  if results.get("cut"):
    lines.append(f"Quick mode (`--quick`), what it cuts: "
                 f"{', '.join(results['cut'])} (full run: 60000/10000 "
                 "images, LeNet5 8 epochs (3 float + 5), convnet 5 (2 + 3), "
                 f"lmbda in {{{', '.join(FLAGS['lmbdas'].default)}}} "
                 f"(convnet {{{', '.join(FLAGS['lmbdas_convnet'].default)}}}"
                 "), gamma 0.002, step microbenchmark 3 rounds x 20 steps).  ")
  estimated = any(r["artifact"] == "estimated"
                  for e in results["archs"].values() for r in e["rows"])
  lines.append(
      "Artifact = the whole file: .tflite, gzipped HDF5, or .cdl "
      "(`keras_cdl.compress`)" + (
          "; `estimated` = `summary.report(model).estimated_bytes` (ideal "
          "index entropy + float32 for the rest), NOT a file: "
          "`keras_cdl.compress` was not available" if estimated else "") +
      ".  TFLite accuracies are the interpreter's on the converted file; "
      "ptq_int8 has int8 input and output.  ratio = float32 weight bytes / "
      "artifact bytes.  bits/w: entropy of the stored CDL indices.  "
      "s/epoch: mean fine-tuning epoch, the first (tracing) epoch excluded "
      "when there are several (PTQ rows: the float cost); x float: its ratio "
      "to float's.  Timings on a shared 2-core machine: compare ratios "
      "within one run only; the step microbenchmark below is the cleaner "
      "cost measure.")
  lines.append("")
  for arch, entry in results["archs"].items():
    rows = entry["rows"]
    if not rows:
      continue
    wbytes = entry["float32_weight_bytes"]
    fl = [r for r in rows if r["method"] == "float"]
    fepoch = fl[0]["epoch_s"] if fl else float("nan")
    lines.append(f"### {arch}: {entry['epochs']} epochs "
                 f"({entry['pretrain']} float + "
                 f"{entry['epochs'] - entry['pretrain']} fine-tuning); "
                 f"float32 weights {_fmt_bytes(wbytes)}")
    lines.append("")
    lines.append("| method | test acc | artifact | bytes | ratio | bits/w "
                 "| s/epoch | x float |")
    lines.append("|---|---|---|---|---|---|---|---|")
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: order.get(r["method"].split("+")[0],
                                                  len(order))):
      bpw = r.get("bits_per_weight")
      acc = r["accuracy"]
      lines.append(
          f"| {r['label']} | {acc:.2%} | {r['artifact']} | "
          f"{_fmt_bytes(r['bytes'])} | "
          f"{wbytes / r['bytes']:.1f}x | "
          f"{'' if bpw is None else f'{bpw:.3f}'} | {r['epoch_s']:.1f} | "
          f"{r['epoch_s'] / fepoch:.2f} |" if np.isfinite(acc) else
          f"| {r['label']} | failed | | | | | | |")
    step = entry.get("step_s")
    if step:
      lines.append("")
      lines.append("Training step (median of interleaved rounds, batch "
                   f"{FLAGS.batch_size}): " + ", ".join(
                       f"{k} {v * 1000:.1f} ms" for k, v in step.items()) +
                   "; CDL/float {:.2f}x, CDL/QAT {:.2f}x, R-CDL/float {:.2f}x,"
                   " R-CDL/QAT {:.2f}x.".format(
                       step["cdl"] / step["float"], step["cdl"] / step["qat"],
                       step["rcdl"] / step["float"],
                       step["rcdl"] / step["qat"]))
    lines.append("")
  target_lines = []
  for arch, entry in results["archs"].items():
    target_lines += _targets(arch, entry)
  if target_lines:
    lines.append("### Targets (as stated; the benchmark is not tuned to "
                 "them)")
    lines.append("")
    lines += target_lines
    lines.append("")
  if results.get("notes"):
    lines.append("### Reading")
    lines.append("")
    lines.append(results["notes"])
    lines.append("")
  lines.append("![accuracy vs artifact bytes](benchmarks/frontier.png)")
  lines.append("<!-- frontier:end -->")
  return "\n".join(lines) + "\n"


def write_markdown(results, path):
  section = markdown(results)
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  pattern = re.compile(r"<!-- frontier:start -->.*?<!-- frontier:end -->\n?",
                       re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
  else:
    if not text:
      text = "# Benchmarks\n\n"
    text = text.rstrip("\n") + "\n\n" + section
  with open(path, "w") as f:
    f.write(text)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  archs = [a for a, e in results["archs"].items() if e["rows"]]
  if not archs:
    return
  fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.8),
                           squeeze=False)
  for ax, arch in zip(axes[0], archs):
    rows = [r for r in results["archs"][arch]["rows"]
            if np.isfinite(r["accuracy"])]
    groups = {}
    for r in rows:
      groups.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab20").colors
    markers = "os^vDPX*"
    names = list(METHODS) + sorted(set(groups) - set(METHODS))
    for method, group in groups.items():
      group = sorted(group, key=lambda r: r["bytes"])
      est = any(r["artifact"] == "estimated" for r in group)
      i = names.index(method)
      marker = markers[i % len(markers)] if "+" in method else "o"
      ax.plot([r["bytes"] for r in group], [r["accuracy"] * 100 for r in group],
              marker + ("-" if len(group) > 1 else ""),
              color=colors[(2 * i) % 20 + (i * 2 // 20) % 2],
              label=method + (" (estimated bytes)" if est else ""))
    ax.axvline(results["archs"][arch]["float32_weight_bytes"], color="gray",
               ls=":", lw=1, label="float32 weight bytes")
    ax.set_xscale("log")
    ax.set_xlabel("artifact bytes (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(arch)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Fashion-MNIST: accuracy vs artifact size"
               + (" (--quick)" if results.get("cut") else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  results_path = os.path.join(FLAGS.output_dir, "results.json")
  if FLAGS.replot:
    with open(results_path) as f:
      results = json.load(f)
    for other in FLAGS.merge:
      with open(other) as f:
        other = json.load(f)
      for arch, entry in other["archs"].items():
        if arch not in results["archs"]:
          results["archs"][arch] = entry
          continue
        # Rows of `other` (but its float reference) replace rows with the
        # same label here and add the others.
        mine = results["archs"][arch]
        rows = [r for r in entry["rows"] if r["method"] != "float"]
        labels = {r["label"] for r in rows}
        mine["rows"] = [r for r in mine["rows"] if r["label"] not in labels]
        mine["rows"] += rows
        if entry.get("step_s"):
          mine["step_s"] = entry["step_s"]
      results["command"] += " ; " + other["command"]
    if FLAGS.notes:
      with open(FLAGS.notes) as f:
        results["notes"] = f.read().strip()
      with open(results_path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    write_markdown(results, FLAGS.markdown)
    plot(results, FLAGS.plot)
    return
  cut = _apply_quick()
  unknown = set(FLAGS.methods) - set(METHODS)
  unknown |= set(FLAGS.ablations) - set(ABLATIONS)
  if unknown:
    raise app.UsageError(f"Unknown methods/ablations: {sorted(unknown)}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
  if FLAGS.train_examples:
    x_train, y_train = (x_train[:FLAGS.train_examples],
                        y_train[:FLAGS.train_examples])
  if FLAGS.test_examples:
    x_test, y_test = x_test[:FLAGS.test_examples], y_test[:FLAGS.test_examples]
  results = dict(
      command="python benchmarks/frontier.py " + " ".join(sys.argv[1:]),
      date=datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      machine=(f"{platform.machine()}, {os.cpu_count()} cores, "
               f"{platform.processor() or platform.platform()}, "
               f"tensorflow {tf.__version__}, tfmot {tfmot.__version__}"
               "; shared with other jobs during the run"),
      cut=cut, archs={},
      library=os.path.dirname(keras_cdl.__file__) + (
          f" (commit {os.environ['KERAS_CDL_COMMIT']})"
          if os.environ.get("KERAS_CDL_COMMIT") else ""),
      compress=("keras_cdl.compress" if compress_lib is not None or
                hasattr(keras_cdl, "compress") else "estimated"))

  def save():
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1, default=float)
    write_markdown(results, FLAGS.markdown)
    plot(results, FLAGS.plot)

  started = time.time()
  for arch in FLAGS.archs:
    run_arch(arch, (x_train, y_train), (x_test, y_test), results, save)
    results["archs"][arch]["wall_s"] = time.time() - started
    save()
  print(markdown(results))


if __name__ == "__main__":
  app.run(main)
