r"""Coding throughput and sizes of `keras_cdl.compress` on the reference convnet.

    python benchmarks/coding.py                     # random init, 8 and 4 bits
    python benchmarks/coding.py --train_steps=100   # also after short R-CDL training

The model is the Fashion-MNIST authors' convnet
(`keras_cdl.architectures.reference_convnet`, 3.27M weights), quantized with
`keras_cdl.quantize_model` at 8 and 4 bits (weights and activations).  For each
bit width it measures, median of `--repeats` runs after one warm-up:

  raw encode     `coding.encode_indices` of every quantized kernel's indices
                 (table building + tfc range encoder), the indices computed
                 beforehand
  raw decode     `coding.decode_indices` of those payloads (range decoder and
                 the indices' CRC32)
  compress       `keras_cdl.compress(model, path)`: indices from the model's
                 quantizers, tables, range coding, float records, the
                 architecture JSON, CRCs, the atomic file write
  decompress     `keras_cdl.decompress(path)`: read and validate the file,
                 rebuild the Keras model from its config, decode, check and
                 assign every tensor
  read (no Keras) `compress.read_model_file(path)`: decompress without the
                 Keras rebuild and assignment
  rebuild        the Keras rebuild alone (`from_config` of the stored
                 architecture under `quantize_scope`), part of decompress

Throughput is quantized weights per second; the target is compress and
decompress within 3x of the raw coder's time.  Sizes: the three sizes of
`keras_cdl.size_report` (coded payload; payload + tables + headers; whole
file) against float32, int8 and gzip -9 of the int8 indices.

With `--train_steps=N` the 4-bit model is also trained for N R-CDL steps on
Fashion-MNIST (lmbda 0.05, batch 128) and measured again, to see the codec on
a lower-entropy model.

Writes BENCHMARKS.md's `<!-- coding:start -->`...`<!-- coding:end -->` section
(only that section; the file is created if absent).
"""

import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import sections  # benchmarks/sections.py, beside this script
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import architectures
from keras_cdl import coding
from keras_cdl import compress as compress_lib
from keras_cdl import datasets
from keras_cdl import introspect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("bits", ["8", "4"], "Weight (and activation) bit widths.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
flags.DEFINE_integer("train_steps", 0,
                     "If > 0, also measure the 4-bit model after this many "
                     "R-CDL training steps on Fashion-MNIST.")
flags.DEFINE_float("lmbda", 0.05, "Rate weight for --train_steps.")
flags.DEFINE_string("markdown", os.path.join(REPO, "BENCHMARKS.md"),
                    "BENCHMARKS.md to update (coding section only).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("code_version", None,
                    "Label of the code measured (default: `git describe` of "
                    "the repository, marked dirty if it has changes).")

START, END = "<!-- coding:start -->", "<!-- coding:end -->"


def _median_time(fn, repeats):
  fn()  # Warm-up: op and function tracing, caches.
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def _kernels(model):
  return [(t.name, t.indices()) for t in introspect.quantized_tensors(model)
          if t.kind == "weight"]


def measure(label, model, repeats, tmp):
  """Times and sizes of one quantized model."""
  kernels = _kernels(model)
  count = sum(i.size for _, i in kernels)
  coded = [coding.encode_indices(i) for _, i in kernels]

  def raw_encode():
    for _, indices in kernels:
      coding.encode_indices(indices)

  def raw_decode():
    for (_, indices), (payload, table) in zip(kernels, coded):
      coding.decode_indices(payload, table, indices.shape)

  path = os.path.join(tmp, f"{label}.cdl")
  result = {
      "label": label,
      "count": count,
      "raw_encode": _median_time(raw_encode, repeats),
      "raw_decode": _median_time(raw_decode, repeats),
      "compress": _median_time(lambda: keras_cdl.compress(model, path),
                               repeats),
  }
  result["read"] = _median_time(
      lambda: compress_lib.read_model_file(path), repeats)
  header = coding.read_container(path)[0]
  result["rebuild"] = _median_time(
      lambda: compress_lib._build_model(header["model"]), repeats)  # pylint: disable=protected-access
  result["decompress"] = _median_time(lambda: keras_cdl.decompress(path),
                                      repeats)
  restored = keras_cdl.decompress(path)
  x = np.random.default_rng(0).uniform(
      0, 1, (8,) + tuple(model.input_shape[1:])).astype(np.float32)
  result["exact"] = bool(np.array_equal(model(x, training=False).numpy(),
                                        restored(x, training=False).numpy()))
  result["report"] = keras_cdl.size_report(path)
  result["file"] = os.path.getsize(path)
  tf.keras.backend.clear_session()
  return result


def train(model, steps, lmbda, seed):
  (x, y), _ = datasets.load_fashion_mnist()
  keras_cdl.set_rate_weights(model, lmbda, 0.0)
  model.compile(tf.keras.optimizers.Adam(1e-3),
                tf.keras.losses.SparseCategoricalCrossentropy(True),
                metrics=["accuracy"])
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(x))[:steps * 128]
  started = time.perf_counter()
  history = model.fit(x[order], y[order], batch_size=128, epochs=1,
                      verbose=0)
  return time.perf_counter() - started, {
      k: float(v[-1]) for k, v in history.history.items()}


def _machine():
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  return (f"{sections.machine()}; load average at the end {load} (shared "
          "machine: other jobs ran)")


def _code_version():
  if FLAGS.code_version:
    return FLAGS.code_version
  result = subprocess.run(
      ["git", "-C", REPO, "describe", "--always", "--dirty"],
      capture_output=True, text=True, check=False)
  return result.stdout.strip() or "unknown"


def _rate(count, seconds):
  return f"{count / seconds / 1e6:.1f}M/s"


def markdown(results, command, date, extra):
  lines = [
      START, "## Coding throughput and sizes (benchmarks/coding.py)", "",
      f"Command: `{command}`  ",
      f"Date: {date}  ",
      f"Machine: {_machine()}; tensorflow {tf.__version__}  ",
      f"Code: {_code_version()}  ",
      "Model: `reference_convnet` (Fashion-MNIST authors' convnet), "
      "`keras_cdl.quantize_model` at the given weight and activation bits, "
      "random (Glorot) initialisation unless marked trained.  Times: median "
      "of the timed runs after a warm-up; weights/s = quantized weights per "
      "second.  raw = `coding.encode_indices` / `coding.decode_indices` on "
      "the same indices (table + range coder; decode checks the CRC32).  "
      "compress = `keras_cdl.compress` to a file; decompress = "
      "`keras_cdl.decompress` (validation, Keras rebuild from the config, "
      "decoding, checks, assignment); read = `compress.read_model_file` "
      "(decompress without the Keras rebuild); rebuild = the Keras "
      "`from_config` of the stored architecture alone, which decompress "
      "overlaps with decoding on a second thread.  exact: decompressed "
      "outputs bitwise equal to the original's.", "",
      "| model | weights | raw encode | compress | x raw | raw decode | "
      "read | rebuild | decompress | x raw | exact |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in results:
    n = r["count"]
    lines.append(
        f"| {r['label']} | {n:,d} | {r['raw_encode'] * 1e3:.0f} ms "
        f"({_rate(n, r['raw_encode'])}) | {r['compress'] * 1e3:.0f} ms "
        f"({_rate(n, r['compress'])}) | "
        f"{r['compress'] / r['raw_encode']:.2f} | "
        f"{r['raw_decode'] * 1e3:.0f} ms ({_rate(n, r['raw_decode'])}) | "
        f"{r['read'] * 1e3:.0f} ms | {r['rebuild'] * 1e3:.0f} ms | "
        f"{r['decompress'] * 1e3:.0f} ms "
        f"({_rate(n, r['decompress'])}) | "
        f"{r['decompress'] / r['raw_decode']:.2f} | {r['exact']} |")
  lines += ["", "Sizes (bytes; H = entropy of the stored indices, bits per "
            "weight):", "",
            "| model | H | coded payload | N H / 8 | payload + tables + "
            "headers | whole file | JSON | float32 | int8 | gzip -9 int8 "
            "(indices) | float32 / file |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    s = r["report"]
    h = 8 * s.entropy_bytes / s.quantized_parameters
    lines.append(
        f"| {r['label']} | {h:.3f} | {s.coded_payload_bytes:,d} | "
        f"{s.entropy_bytes:,.0f} | {s.records_bytes:,d} | {s.file_bytes:,d} "
        f"| {s.json_bytes:,d} | {s.float32_bytes:,d} | {s.int8_bytes:,d} | "
        f"{s.gzip_int8_bytes:,d} ({s.gzip_indices_bytes:,d}) | "
        f"{s.float32_bytes / s.file_bytes:.1f} |")
  verdict = []
  for r in results:
    enc = r["compress"] / r["raw_encode"]
    dec = r["decompress"] / r["raw_decode"]
    verdict.append(f"{r['label']}: compress x{enc:.2f} "
                   f"({'met' if enc <= 3 else 'missed'}), decompress "
                   f"x{dec:.2f} ({'met' if dec <= 3 else 'missed'})")
  lines += ["", "Target, compress and decompress within 3x of the raw "
            "coder: " + "; ".join(verdict) + "."]
  lines += extra
  lines.append(END)
  return "\n".join(lines) + "\n"


def write_section(path, section):
  sections.write_section(path, START, END, section)


def main(argv):
  del argv
  tf.keras.utils.set_random_seed(FLAGS.seed)
  tmp = tempfile.mkdtemp(prefix="keras_cdl_coding_")
  results, extra = [], []
  for bits in (int(b) for b in FLAGS.bits):
    tf.keras.backend.clear_session()
    model = keras_cdl.quantize_model(
        architectures.reference_convnet(), mode="rcdl", weight_bits=bits,
        activation_bits=bits)
    result = measure(f"{bits}-bit, random init", model, FLAGS.repeats, tmp)
    print({k: v for k, v in result.items() if k != "report"})
    results.append(result)
  if FLAGS.train_steps:
    tf.keras.backend.clear_session()
    model = keras_cdl.quantize_model(
        architectures.reference_convnet(), mode="rcdl", weight_bits=4,
        activation_bits=4, lmbda=FLAGS.lmbda)
    seconds, logs = train(model, FLAGS.train_steps, FLAGS.lmbda, FLAGS.seed)
    extra.append(
        f"\nTrained row: {FLAGS.train_steps} R-CDL steps (batch 128, "
        f"Adam 1e-3, lmbda {FLAGS.lmbda}, from random init) in "
        f"{seconds:.0f} s; last-step logs: "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(logs.items())) + ".")
    result = measure(f"4-bit, {FLAGS.train_steps} R-CDL steps", model,
                     FLAGS.repeats, tmp)
    print({k: v for k, v in result.items() if k != "report"})
    results.append(result)
  command = "python " + " ".join(
      [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
  date = subprocess.run(["date", "-u"], capture_output=True, text=True,
                        check=False).stdout.strip() or (
                            datetime.datetime.utcnow().isoformat() + " UTC")
  section = markdown(results, command, date, extra)
  print(section)
  write_section(FLAGS.markdown, section)


if __name__ == "__main__":
  app.run(main)
