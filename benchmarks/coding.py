r"""Coding throughput and sizes of `keras_cdl.compress` on the reference convnet.

    python benchmarks/coding.py                     # random init, 8 and 4 bits
    python benchmarks/coding.py --train_steps=100   # also after short R-CDL training

The model is the Fashion-MNIST authors' convnet
(`keras_cdl.architectures.reference_convnet`, 3.27M weights), quantized with
`keras_cdl.quantize_model` at 8 and 4 bits (weights and activations).  For each
bit width it measures, median of `--repeats` rounds after one warm-up (every
measurement runs once per round, in turn, so all see the same load):

  coder alone    tensorflow-compression's range coder by itself on the same
                 int32 symbols (`create_range_encoder`,
                 `entropy_encode_channel`, `entropy_encode_finalize`; the
                 decoder counterparts), tables and input tensors built
                 beforehand: the yardstick of every ratio
  raw encode     `coding.encode_indices` of every quantized kernel's indices
                 (histogram, table, CRC32, range coder), the indices
                 computed beforehand
  raw decode     `coding.decode_indices` of those payloads (range decoder and
                 the indices' CRC32)
  indices        the model's quantizers computing the indices
                 `clip(round(w / q))` of every kernel (part of compress)
  compress       `keras_cdl.compress(model, path)`: indices from the model's
                 quantizers, tables, range coding, float records, the
                 architecture JSON, CRCs, the atomic file write
  read (no Keras) `compress.read_model_file(path)`: read, validate and decode
                 the file and check every kernel's steps, without Keras
  rebuild        the Keras rebuild alone (`from_config` of the stored
                 architecture under `quantize_scope`, variables created as
                 zeros as decompress creates them): a fixed cost of the
                 architecture, not of the weights
  decompress without rebuild  `keras_cdl.decompress(path, model=rebuilt)`:
                 everything `keras_cdl.decompress(path)` does except the
                 rebuild, into an already rebuilt model (config check, read,
                 validate, decode, check and assign every tensor)
  decompress     `keras_cdl.decompress(path)`: all of the above, the rebuild
                 overlapped with decoding on a second thread

Throughput is quantized weights per second; the target is compress and
decompress within 3x of the coder alone's time.  Sizes: the three sizes of
`keras_cdl.size_report` (coded payload; payload + tables + headers; whole
file) against float32, int8 and gzip -9 of the int8 indices.

With `--train_steps=N` the 4-bit model is also trained for N R-CDL steps on
Fashion-MNIST (lmbda 0.05, batch 128) and measured again, to see the codec on
a lower-entropy model.

Writes BENCHMARKS.md's `<!-- coding:start -->`...`<!-- coding:end -->` section
(only that section; the file is created if absent).
"""

import datetime
import importlib.metadata
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

import tensorflow_compression as tfc

import keras_cdl
from keras_cdl import architectures
from keras_cdl import coding
from keras_cdl import compress as compress_lib
from keras_cdl import datasets
from keras_cdl import introspect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_list("bits", ["8", "4"], "Weight (and activation) bit widths.")
flags.DEFINE_integer("repeats", 5, "Timed rounds per measurement (median).")
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


def _median_times(fns, repeats):
  """Median seconds of each function in `fns` (a dict), after one warm-up.

  The functions run in turn, once per round, so a change in the shared
  machine's load hits them all alike and their ratios stay meaningful.
  """
  for fn in fns.values():
    fn()  # Warm-up: op and function tracing, caches.
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      started = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - started)
  return {name: statistics.median(t) for name, t in times.items()}


def _kernels(model):
  return [t for t in introspect.quantized_tensors(model)
          if t.kind == "weight"]


def _coder_alone(kernels, coded):
  """Encode and decode functions running only tfc's range coder.

  The inputs the coder needs (its lookup table, the int32 symbols, the
  payload) are made into tensors once, here, outside the timing.
  """
  with tf.device("/cpu:0"):
    inputs = [(tf.constant(table.lookup),
               tf.constant(indices.reshape(-1) - np.int32(table.offset)),
               tf.constant(payload), indices.size)
              for indices, (payload, table) in zip(kernels, coded)
              if table.num_levels > 1]

  def encode():
    with tf.device("/cpu:0"):
      for lookup, symbols, _, _ in inputs:
        handle = tfc.create_range_encoder([], lookup)
        handle = tfc.entropy_encode_channel(handle, symbols)
        tfc.entropy_encode_finalize(handle).numpy()

  def decode():
    with tf.device("/cpu:0"):
      for lookup, _, payload, count in inputs:
        handle = tfc.create_range_decoder(payload, lookup)
        handle, symbols = tfc.entropy_decode_channel(handle, [count],
                                                     tf.int32)
        tfc.entropy_decode_finalize(handle).numpy()
        symbols.numpy()

  return encode, decode


def measure(label, model, repeats, tmp):
  """Times and sizes of one quantized model."""
  tensors = _kernels(model)
  kernels = [t.indices() for t in tensors]
  count = sum(i.size for i in kernels)
  coded = [coding.encode_indices(i) for i in kernels]
  alone_encode, alone_decode = _coder_alone(kernels, coded)

  def raw_encode():
    for indices in kernels:
      coding.encode_indices(indices)

  def raw_decode():
    for indices, (payload, table) in zip(kernels, coded):
      coding.decode_indices(payload, table, indices.shape)

  def indices():
    for t in tensors:
      t.indices()

  path = os.path.join(tmp, f"{label}.cdl")
  keras_cdl.compress(model, path)
  header = coding.read_container(path)[0]
  rebuilt = keras_cdl.decompress(path)
  result = {"label": label, "count": count}
  result.update(_median_times({
      "alone_encode": alone_encode,
      "raw_encode": raw_encode,
      "indices": indices,
      "compress": lambda: keras_cdl.compress(model, path),
      "alone_decode": alone_decode,
      "raw_decode": raw_decode,
      "read": lambda: compress_lib.read_model_file(path),
      "rebuild": lambda: compress_lib._build_model(  # pylint: disable=protected-access
          header["model"], compress_lib._ZeroInit()),  # pylint: disable=protected-access
      "restore": lambda: keras_cdl.decompress(path, model=rebuilt),
      "decompress": lambda: keras_cdl.decompress(path),
  }, repeats))
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


def _tfc_version():
  try:
    return importlib.metadata.version("tensorflow-compression")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _rate(count, seconds):
  return f"{count / seconds / 1e6:.1f}M/s"


def _cell(r, key, base=None):
  """`"<ms> ms (<rate>)"`, plus ` x<ratio>` against `r[base]`."""
  n, t = r["count"], r[key]
  cell = f"{t * 1e3:.0f} ms ({_rate(n, t)})"
  if base:
    cell += f" x{t / r[base]:.2f}"
  return cell


def _verdict(ratio):
  return f"x{ratio:.2f}, {'met' if ratio <= 3 else 'missed'}"


def markdown(results, command, date, extra):
  lines = [
      START, "## Coding throughput and sizes (benchmarks/coding.py)", "",
      f"Command: `{command}`  ",
      f"Date: {date}  ",
      f"Machine: {_machine()}; tensorflow {tf.__version__}, "
      f"tensorflow-compression {_tfc_version()}  ",
      f"Code: {_code_version()}  ",
      "Model: `reference_convnet` (Fashion-MNIST authors' convnet), "
      "`keras_cdl.quantize_model` at the given weight and activation bits, "
      "random (Glorot) initialisation unless marked trained.  Times: median "
      "of the timed rounds after a warm-up, every measurement once per round "
      "in turn (so they share the load); weights/s = quantized weights per "
      "second; xN = time over the coder alone's.  coder alone = "
      "tensorflow-compression's range coder by itself (create, "
      "`entropy_encode_channel` / `entropy_decode_channel`, finalize) on the "
      "same symbols, tables and input tensors prepared beforehand.  raw = "
      "`coding.encode_indices` / `coding.decode_indices` (histogram, table, "
      "CRC32 of the indices, range coder).  indices = the model's quantizers "
      "computing every kernel's `clip(round(w / q))` (part of compress).  "
      "compress = `keras_cdl.compress` to a file.  read = "
      "`compress.read_model_file` (validate, decode, check steps; no Keras).  "
      "rebuild = the Keras `from_config` of the stored architecture alone, a "
      "fixed cost of the architecture (tfmot wrappers traced once), not of "
      "the weights.  decompress w/o rebuild = `keras_cdl.decompress` into an "
      "already rebuilt model (read, validate, decode, check, assign).  "
      "decompress = `keras_cdl.decompress` (rebuild overlapped with "
      "decoding on a second thread).  exact: decompressed outputs bitwise "
      "equal to the original's.", "",
      "Encoding:", "",
      "| model | weights | coder alone | raw encode | compress | of which "
      "indices |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
        f"| {r['label']} | {r['count']:,d} | {_cell(r, 'alone_encode')} | "
        f"{_cell(r, 'raw_encode', 'alone_encode')} | "
        f"{_cell(r, 'compress', 'alone_encode')} | "
        f"{r['indices'] * 1e3:.0f} ms |")
  lines += [
      "", "Decoding:", "",
      "| model | coder alone | raw decode | read (no Keras) | decompress "
      "w/o rebuild | rebuild | decompress | exact |",
      "|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in results:
    lines.append(
        f"| {r['label']} | {_cell(r, 'alone_decode')} | "
        f"{_cell(r, 'raw_decode', 'alone_decode')} | "
        f"{_cell(r, 'read', 'alone_decode')} | "
        f"{_cell(r, 'restore', 'alone_decode')} | "
        f"{r['rebuild'] * 1e3:.0f} ms | "
        f"{_cell(r, 'decompress', 'alone_decode')} | {r['exact']} |")
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
    verdict.append(
        f"{r['label']}: compress "
        f"{_verdict(r['compress'] / r['alone_encode'])}; decompress without "
        f"the rebuild {_verdict(r['restore'] / r['alone_decode'])}; "
        f"decompress with it {_verdict(r['decompress'] / r['alone_decode'])}")
  lines += ["", "Target, compress and decompress within 3x of the coder "
            "alone: " + "; ".join(verdict) + "."]
  parts = []
  for r in results:
    parts.append(
        f"{r['label']}: rebuild {r['rebuild'] * 1e3:.0f} ms + without it "
        f"{r['restore'] * 1e3:.0f} ms = "
        f"{(r['rebuild'] + r['restore']) * 1e3:.0f} ms against "
        f"{r['decompress'] * 1e3:.0f} ms")
  lines += ["", "Where decompress's time goes (it rebuilds the model while "
            "a second thread decodes: with a core free that hides the "
            "decoding, but on this loaded 2-core machine the two slow each "
            "other down, so decompress can take longer than rebuild and the "
            "rest in turn): " + "; ".join(parts) + "."]
  lines += extra
  lines.append(END)
  return "\n".join(lines) + "\n"


def _print(result):
  print({k: (round(v * 1e3, 1) if isinstance(v, float) else v)
         for k, v in result.items() if k != "report"})


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
    _print(result)
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
    _print(result)
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
