"""The `keras-cdl` command: inspect and export `.cdl` model files.

    keras-cdl inspect model.cdl [--all] [--json]
    keras-cdl export model.cdl --tflite model.tflite [--saved-model DIR]
        [--representative fashion_mnist | --representative calib.npy]
        [--representative-samples 200]

`inspect` validates the whole file (container, model header, every tensor
decoded and checked) without building the Keras model, then prints one row
per tensor (name, role, shape, bits, entropy H of the stored indices in bits
per element, coded bytes, table and record-header bytes, and the ratio of
float32 to the record) and the totals: the coded payload, payload + tables +
headers, the whole file, and float32, int8 and gzip -9 of int8 for
comparison.  The quantizers' own state (step sizes, hardness, rate weights)
is summed in one row unless `--all`.  `--json` prints the same as JSON.

`export` decompresses the model (`keras_cdl.decompress`) and writes it with
`keras_cdl.export`: `--saved-model DIR` as a TensorFlow SavedModel,
`--tflite OUT` as a TFLite flatbuffer.  Full-integer TFLite conversion needs
a representative dataset, a few hundred model inputs to calibrate with:
`--representative fashion_mnist` (the default) takes the first
`--representative-samples` Fashion-MNIST training images from
`keras_cdl.datasets` (local files only, see there); a path ending in `.npy`
loads a float array of model inputs (`[N, *input_shape]`, e.g.
`np.save("calib.npy", x_train[:200])`).

Exit status: 0 on success, 1 when the file is malformed (`FormatError`),
missing or cannot be exported, 2 on bad arguments.  Errors print one line,
`keras-cdl: error: ...`, without a traceback.
"""

import argparse
import dataclasses
import json
import os
import sys

__all__ = ["main", "build_parser", "load_representative"]

_PROG = "keras-cdl"
REPRESENTATIVE_DATASETS = ("fashion_mnist",)


class UsageError(Exception):
  """Bad arguments found after parsing (e.g. a representative set's shape)."""


def build_parser():
  """The `argparse` parser of `keras-cdl`."""
  parser = argparse.ArgumentParser(
      prog=_PROG, description="Inspect and export keras_cdl .cdl model files.",
      epilog="Run `keras-cdl COMMAND --help` for a command's options.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND")
  commands.required = True
  inspect = commands.add_parser(
      "inspect", help="validate a .cdl file and print its tensors and sizes",
      description="Validate a .cdl file (every tensor decoded and checked) "
      "and print, per tensor, its shape, bits, entropy H, coded bytes and "
      "ratio to float32, then the totals.")
  inspect.add_argument("file", metavar="FILE", help="the .cdl file")
  inspect.add_argument("--all", action="store_true",
                       help="list the quantizers' state tensors one by one")
  inspect.add_argument("--json", action="store_true",
                       help="print the report as JSON instead of a table")
  export = commands.add_parser(
      "export", help="decompress a .cdl file and export it as a SavedModel "
      "and/or TFLite",
      description="Decompress a .cdl model and export it with "
      "keras_cdl.export. TFLite needs a representative dataset: "
      "`fashion_mnist` (default; local files via keras_cdl.datasets) or a "
      ".npy file of model inputs shaped [N, *input_shape].")
  export.add_argument("file", metavar="FILE", help="the .cdl file")
  export.add_argument("--tflite", metavar="OUT",
                      help="write a TFLite flatbuffer to OUT")
  export.add_argument("--saved-model", metavar="DIR",
                      help="write a TensorFlow SavedModel to DIR")
  export.add_argument(
      "--representative", default="fashion_mnist", metavar="DATA",
      help="calibration inputs for --tflite: 'fashion_mnist' (default) or a "
      "path to a .npy array of model inputs")
  export.add_argument(
      "--representative-samples", type=int, default=200, metavar="N",
      help="use at most N representative inputs (default 200)")
  return parser


def _error(message, status=1):
  print(f"{_PROG}: error: {message}", file=sys.stderr)
  return status


def load_representative(spec, input_shape, samples):
  """Calibration inputs for TFLite as a float32 array `[N, *input_shape]`.

  Args:
    spec: "fashion_mnist", or a path to a `.npy` file.
    input_shape: the model's input shape without the batch axis.
    samples: at most this many inputs.

  Raises:
    UsageError: unknown spec, or data that does not fit the model.
    OSError: the file or dataset cannot be read.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if samples < 1:
    raise UsageError(f"--representative-samples must be at least 1, got "
                     f"{samples}")
  if spec == "fashion_mnist":
    from keras_cdl import datasets  # pylint: disable=g-import-not-at-top
    (x, _), _ = datasets.load_fashion_mnist()
    data = x[:samples]
  elif spec.endswith(".npy"):
    try:
      data = np.load(spec, allow_pickle=False)
    except ValueError as e:
      raise UsageError(f"--representative {spec}: not a plain .npy array: "
                       f"{e}") from None
    if data.dtype.kind not in "fiu":
      raise UsageError(f"--representative {spec}: expected a numeric array, "
                       f"found dtype {data.dtype}")
    data = data[:samples]
  else:
    raise UsageError(
        f"--representative must be one of {REPRESENTATIVE_DATASETS} or a "
        f"path ending in .npy, got {spec!r}")
  data = np.asarray(data, dtype=np.float32)
  expected = tuple(input_shape)
  if data.ndim != len(expected) + 1 or any(
      e is not None and e != d for e, d in zip(expected, data.shape[1:])):
    raise UsageError(
        f"--representative {spec}: inputs of shape {data.shape[1:]} do not "
        f"fit the model's input shape {expected}")
  if not len(data):
    raise UsageError(f"--representative {spec}: no inputs")
  return data


def _report_json(report, model_file):
  rows = [dict(dataclasses.asdict(t), record_bytes=t.record_bytes,
               entropy_bytes=t.entropy_bytes, ratio=t.ratio)
          for t in report.tensors]
  totals = {key: getattr(report, key) for key in (
      "coded_payload_bytes", "table_bytes", "record_header_bytes",
      "float_payload_bytes", "records_bytes", "json_bytes",
      "container_bytes", "file_bytes", "entropy_bytes",
      "quantized_parameters", "float_parameters", "bits_per_weight",
      "float32_bytes", "int8_bytes", "gzip_indices_bytes",
      "gzip_int8_bytes")}
  return json.dumps({"model_class": model_file.model_class,
                     "model_name": model_file.config.get("name"),
                     "tensors": rows, "totals": totals}, indent=1)


def _inspect(args):
  from keras_cdl import compress as compress_lib  # pylint: disable=g-import-not-at-top
  model_file = compress_lib.read_model_file(args.file)
  report = compress_lib.size_report(model_file)
  if args.json:
    print(_report_json(report, model_file))
    return 0
  quantized = [v for v in model_file.variables if v.role == "quantized"]
  print(f"{args.file}: {model_file.model_class} "
        f"{model_file.config.get('name')!r}, {len(model_file.variables)} "
        f"variables ({len(quantized)} quantized), "
        f"{model_file.file_bytes:,d} bytes")
  compress_lib.print_size_report(report, all_tensors=args.all)
  return 0


def _dir_bytes(path):
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _export(args):
  if not args.tflite and not args.saved_model:
    raise UsageError("export: give --tflite OUT and/or --saved-model DIR")
  if args.representative_samples < 1:
    raise UsageError(f"--representative-samples must be at least 1, got "
                     f"{args.representative_samples}")
  import keras_cdl  # pylint: disable=g-import-not-at-top
  try:
    from keras_cdl import export as export_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return _error(f"keras_cdl.export is not available: {e}")
  model = keras_cdl.decompress(args.file)
  print(f"{args.file}: decompressed {model.name!r} "
        f"({os.path.getsize(args.file):,d} bytes)")
  if args.saved_model:
    export_lib.to_saved_model(model, args.saved_model)
    print(f"SavedModel: {args.saved_model} "
          f"({_dir_bytes(args.saved_model):,d} bytes)")
  if args.tflite:
    data = load_representative(args.representative, model.input_shape[1:],
                               args.representative_samples)
    export_lib.to_tflite(model, args.tflite, data)
    print(f"TFLite: {args.tflite} ({os.path.getsize(args.tflite):,d} bytes; "
          f"{len(data)} representative inputs from {args.representative})")
  return 0


def main(argv=None):
  """Runs `keras-cdl`; returns the exit status (argparse exits 2 itself)."""
  args = build_parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from keras_cdl.errors import FormatError  # pylint: disable=g-import-not-at-top
  try:
    if args.command == "inspect":
      return _inspect(args)
    return _export(args)
  except FormatError as e:
    return _error(f"{args.file}: malformed .cdl file: {e}")
  except UsageError as e:
    return _error(str(e), status=2)
  except (OSError, FileNotFoundError) as e:
    return _error(f"{e.filename or args.file}: {e.strerror or e}")


if __name__ == "__main__":
  sys.exit(main())
