"""Whole models in one `.cdl` file: `compress`, `decompress`, `size_report`.

`keras_cdl.coding` stores tensors; this module stores a Keras model in that
container (docs/FORMAT.md, "The model header"):

* the JSON header holds the architecture (the model's Keras config: for
  `keras_cdl.quantize_model`'s `CDLModel`, Functional with tfmot
  `QuantizeWrapperV2` layers) and the list of the model's variables, in the
  model's order, each with its name, role, dtype and shape;
* every quantized kernel becomes a quantized record: its inference indices
  `clip(round(w / q))`, range coded against the tensor's own PMF, plus the
  step size(s) `q`;
* every other floating-point variable (biases, BatchNorm, the quantizers' own
  `log_step`, `kappa`/`log_alpha`, `rate_weight`, prior parameters) becomes a
  raw float32 record; integer variables (tfmot's `optimizer_step`) go into
  the header.

```python
keras_cdl.compress(qmodel, "model.cdl")
model = keras_cdl.decompress("model.cdl")     # outputs equal qmodel's exactly
keras_cdl.print_size_report(keras_cdl.size_report("model.cdl"))
```

`keras_cdl.compress` is this module, made callable: `keras_cdl.compress(model,
path)` calls `keras_cdl.compress.compress(model, path)`, and the module's
other names stay reachable as `keras_cdl.compress.size_report` and so on.

A quantized kernel comes back as `i * q`, not as the float latent it was
trained from: inference (`training=False`) re-quantizes it to the same
indices `i` (checked when decompressing), so every output is bitwise the
original's.  Training can continue from the restored model.

Reading treats the file as untrusted: anything malformed, on the container
level (`keras_cdl.coding`) or the model level (a header that is not a model,
a tensor list that does not match the header or the architecture, an
architecture Keras cannot rebuild, indices that do not survive
re-quantization), raises `keras_cdl.FormatError` naming what is wrong.
The architecture is rebuilt in Keras' safe mode (no Lambda bytecode), and
tensors are decoded within the architecture's shapes (beyond a fixed budget
of 2**26 elements decoded while the architecture is rebuilt).
"""

import concurrent.futures
import contextlib
import dataclasses
import gzip
import json
import math
import os
import re
import sys
import types
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_cdl import coding
from keras_cdl import introspect
from keras_cdl import model as model_lib
from keras_cdl import quantize as quantize_lib
from keras_cdl.errors import FormatError

__all__ = [
    "CONTENT",
    "MODEL_FORMAT",
    "ROLES",
    "StoredVariable",
    "ModelFile",
    "TensorRow",
    "ModelSizeReport",
    "compress",
    "decompress",
    "encode_model",
    "read_model_file",
    "size_report",
    "format_size_report",
    "print_size_report",
]

# The JSON header's `content` and `model_format`: the model-level layout
# (docs/FORMAT.md, "The model header").  Bump MODEL_FORMAT for any change an
# existing reader would misread.
CONTENT = "keras_cdl.model"
MODEL_FORMAT = 1
# quantized: a CDL-quantized kernel (a quantized record);
# float: any other model parameter (a float record);
# quantizer: a quantizer's own state, log_step, kappa/log_alpha, rate_weight,
#   learned-prior parameters (a float record);
# integer: a non-float variable, e.g. tfmot's optimizer_step (in the header).
ROLES = ("quantized", "float", "quantizer", "integer")
_MODEL_CLASSES = ("CDLModel", "Functional", "Sequential")
_HEADER_KEYS = ("content", "model_format", "model", "variables")
# Integer variables live in the JSON header; keep them small.
_MAX_INTEGER_ELEMENTS = 4096
_NAME_SUFFIX = re.compile(r":\d+$")
# `decompress` decodes tensors of up to this many elements in all (256 MiB of
# int32) while the architecture is rebuilt, before it bounds their shapes.
_EARLY_DECODE_ELEMENTS = 2**26
# `decompress` creates variables of at least this many elements as zeros
# instead of running their initializers (see `_ZeroInit`).
_ZERO_INIT_ELEMENTS = 1024


# -----------------------------------------------------------------------------
# The model's variables, in a stable order with stable names.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Slot:
  """One variable of a live model."""
  name: str
  role: str
  variable: tf.Variable
  tensor: Optional[introspect.QuantizedTensor] = None  # role "quantized"
  log_step: Optional[str] = None  # role "quantized": its log_step's name


def _short_name(variable):
  return _NAME_SUFFIX.sub("", variable.name.split("/")[-1])


def _metric_variable_ids(model):
  ids = set()
  for module in model.submodules:
    if isinstance(module, tf.keras.metrics.Metric):
      ids.update(id(v) for v in module.variables)
  return ids


def _model_slots(model):
  """The model's variables as `_Slot`s: per layer in `model.layers` order,
  the layer's `weights` in order, named `<layer>/<variable>`.

  Keras names variables differently in a model built by `quantize_model` and
  in one rebuilt from its config (`conv2d/kernel:0` and `quant_conv2d/
  kernel:0`), so names are built from the layer name and the variable's last
  path component, which both share.  Repeats get `#1`, `#2`, ...
  """
  records = introspect.quantized_tensors(model)
  quantized = {id(r.weight): r for r in records if r.weight is not None}
  state = set()
  for r in records:
    state.update(id(v) for v in r.variables.values())
    rate_term = getattr(r.quantizer, "_rate_term", None)
    if rate_term is not None:
      state.update(id(v) for v in rate_term.variables)
  slots, seen, used = [], set(), {}
  for layer in model.layers:
    for variable in layer.weights:
      if id(variable) in seen:
        continue
      seen.add(id(variable))
      name = f"{layer.name}/{_short_name(variable)}"
      if name in used:
        used[name] += 1
        name = f"{name}#{used[name]}"
      else:
        used[name] = 0
      if id(variable) in quantized:
        role = "quantized"
      elif not variable.dtype.is_floating:
        role = "integer"
      elif id(variable) in state:
        role = "quantizer"
      else:
        role = "float"
      slots.append(_Slot(name, role, variable, quantized.get(id(variable))))
  names = {id(s.variable): s.name for s in slots}
  slots = [dataclasses.replace(
      s, log_step=names.get(id(s.tensor.variables["log_step"])))
           if s.tensor is not None else s for s in slots]
  missing = [v for v in model.weights if id(v) not in seen]
  if missing:  # Walking every submodule is slow: only when it matters.
    metrics = _metric_variable_ids(model)
    missing = [v.name for v in missing if id(v) not in metrics]
  if missing:
    raise ValueError(
        f"`model` has variables outside its layers, which a .cdl file cannot "
        f"map back: {missing[:5]}. Keep every variable in a layer.")
  return slots


def _model_class(model):
  if isinstance(model, model_lib.CDLModel):
    return "CDLModel"
  if isinstance(model, tf.keras.Sequential):
    return "Sequential"
  return "Functional"


def _strip_build_configs(config):
  """Drops the layers' `build_config` entries, recursively.

  Keras 2.14 builds a deserialized layer from its `build_config` and then
  again when the Functional model calls it; tfmot's `QuantizeLayer.build`
  does not mark itself built, so its quantizer's variables would be created
  twice.  Without `build_config`, every layer is built once, by the call.
  """
  if isinstance(config, dict):
    return {k: _strip_build_configs(v) for k, v in config.items()
            if k != "build_config"}
  if isinstance(config, list):
    return [_strip_build_configs(v) for v in config]
  return config


# -----------------------------------------------------------------------------
# Writing.
# -----------------------------------------------------------------------------
def _check_model(model):
  if not isinstance(model, tf.keras.Model):
    raise ValueError(f"`model` must be a tf.keras.Model, but got "
                     f"{type(model).__name__}.")
  if not (isinstance(model, tf.keras.Sequential) or
          getattr(model, "_is_graph_network", False)):
    raise ValueError(
        f"`model` must be a Sequential or Functional model (what "
        f"keras_cdl.quantize_model returns), but got the subclassed model "
        f"{type(model).__name__}, whose architecture has no config to store.")
  if not model.built:
    raise ValueError("`model` must be built before it is compressed.")


def _step_of(tensor):
  """`(step, channel_axis)` of a quantized kernel, as inference computes it."""
  quantizer = tensor.quantizer
  rank = tensor.weight.shape.rank
  step = np.asarray(tf.exp(tensor.variables["log_step"]).numpy(),
                    dtype=np.float32)
  if quantizer.per_channel:
    return step.reshape(-1), quantizer.channel_axis % rank
  return step.reshape(()), None


def encode_model(model, *, precision=None):
  """The `.cdl` bytes of `model`, plus what was stored.

  Args:
    model: a built Sequential or Functional Keras model, typically a
      `CDLModel` from `keras_cdl.quantize_model`.
    precision: coding-table precision in bits for every quantized tensor,
      `None` for automatic (see `keras_cdl.coding.encode_indices`).

  Returns:
    `(data, header, records, indices)`: the file's bytes, its JSON header,
    its records and a dict from record name to the stored indices
    (read-only int32 arrays, the quantizers' outputs read in place).

  Raises:
    ValueError: `model` is not a Functional/Sequential model, has variables
      outside its layers, or has a config that is not JSON.
  """
  _check_model(model)
  slots = _model_slots(model)
  config = _strip_build_configs(model.get_config())
  entries, records, indices = [], [], {}
  for slot in slots:
    variable = slot.variable
    entry = {"name": slot.name, "role": slot.role,
             "dtype": variable.dtype.name,
             "shape": [int(d) for d in variable.shape]}
    if slot.role == "integer":
      value = variable.numpy()
      if value.size > _MAX_INTEGER_ELEMENTS:
        raise ValueError(
            f"integer variable {slot.name} has {value.size} elements; at most "
            f"{_MAX_INTEGER_ELEMENTS} fit in the header.")
      entry["value"] = [int(v) for v in value.reshape(-1)]
    elif slot.role == "quantized":
      tensor = slot.tensor
      quantizer = tensor.quantizer
      step, axis = _step_of(tensor)
      # The quantizer's own indices, read in place (no `.numpy()` copy).
      index = np.asarray(quantizer.indices(tensor.weight, tensor.variables))
      records.append(coding.quantized_record(
          slot.name, index, bits=quantizer.bits, signed=quantizer.signed,
          step=step, channel_axis=axis, dtype=variable.dtype.name,
          precision=precision))
      indices[slot.name] = index
      entry["log_step"] = slot.log_step
    else:
      value = variable.numpy()
      if value.dtype == np.float64 and not np.array_equal(
          value.astype(np.float32).astype(np.float64), value, equal_nan=True):
        raise ValueError(
            f"float64 variable {slot.name} is not float32-representable; a "
            f".cdl file stores floats as float32.")
      records.append(coding.float_record(slot.name, value,
                                         dtype=variable.dtype.name))
    entries.append(entry)
  header = {
      "content": CONTENT,
      "model_format": MODEL_FORMAT,
      "model": {"class_name": _model_class(model), "config": config},
      "variables": entries,
  }
  try:
    data = coding.encode_container(header, records)
  except (TypeError, ValueError) as e:
    if isinstance(e, FormatError):
      raise
    raise ValueError(f"`model`'s config cannot be stored as JSON: {e}") from e
  return data, header, records, indices


def compress(model, path, *, precision=None):
  """Writes `model` to the `.cdl` file `path` (atomically).

  Args:
    model: a built Sequential or Functional Keras model, typically the
      `CDLModel` of `keras_cdl.quantize_model`.  Layers and variables are
      stored in the model's order; quantized kernels as range-coded indices.
    path: the file to write (a path or an open binary file).
    precision: coding-table precision for every quantized tensor, `None`
      for automatic.

  Returns:
    The number of bytes written.
  """
  return coding.write_bytes(path, encode_model(model, precision=precision)[0])


# -----------------------------------------------------------------------------
# Reading without Keras: the container, the model header, every tensor.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class StoredVariable:
  """One model variable as stored in a `.cdl` file.

  Attributes:
    name, role, dtype, shape: from the header (see `ROLES`).
    record: its `coding.Record` (`None` for role "integer").
    value: the decoded value: int32 indices (role "quantized"), float32
      (float roles) or an integer array (role "integer").
  """
  name: str
  role: str
  dtype: str
  shape: tuple
  record: Optional[coding.Record]
  value: np.ndarray
  log_step: Optional[str] = None

  @property
  def count(self):
    return math.prod(self.shape)

  def restored(self, step=None):
    """The value the variable is restored to: `i * q` for quantized."""
    if self.role != "quantized":
      return self.value
    step = self.record.step if step is None else step
    if self.record.channel_axis is not None:
      shape = [1] * len(self.shape)
      shape[self.record.channel_axis] = -1
      step = np.reshape(step, shape)
    return np.multiply(self.value, np.asarray(step, np.float32),
                       dtype=np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFile:
  """A validated `.cdl` model file, decoded but not built into Keras.

  Attributes:
    header: the JSON header.
    variables: tuple of `StoredVariable`, in the model's variable order.
    file_bytes: the file's size.
  """
  header: dict
  variables: tuple
  file_bytes: int

  @property
  def model_class(self):
    return self.header["model"]["class_name"]

  @property
  def config(self):
    return self.header["model"]["config"]

  @property
  def records(self):
    return [v.record for v in self.variables if v.record is not None]


def _fail(message):
  raise FormatError(message)


def _check_entry(i, entry, names):
  where = f"header: variables[{i}]"
  if not isinstance(entry, dict):
    _fail(f"{where}: expected an object, found {type(entry).__name__}")
  name = entry.get("name")
  if not isinstance(name, str) or not name:
    _fail(f"{where}: name: expected a non-empty string, found {name!r}")
  where = f"{where} ({name!r})"
  if name in names:
    _fail(f"{where}: name repeats")
  names.add(name)
  role = entry.get("role")
  if role not in ROLES:
    _fail(f"{where}: role: expected one of {ROLES}, found {role!r}")
  dtype = entry.get("dtype")
  shape = entry.get("shape")
  if not isinstance(shape, list) or len(shape) > 32 or not all(
      type(d) is int and 0 <= d < 2**32 for d in shape):  # pylint: disable=unidiomatic-typecheck
    _fail(f"{where}: shape: expected a list of at most 32 dimensions, found "
          f"{shape!r}")
  allowed = {"name", "role", "dtype", "shape"}
  if role == "integer":
    allowed.add("value")
    if not isinstance(dtype, str):
      _fail(f"{where}: dtype: expected a string, found {dtype!r}")
    try:
      tf_dtype = tf.as_dtype(dtype)
    except TypeError:
      tf_dtype = None
    if tf_dtype is None or not (tf_dtype.is_integer or tf_dtype.is_bool):
      _fail(f"{where}: dtype: expected an integer dtype, found {dtype!r}")
    value = entry.get("value")
    count = math.prod(shape)
    if count > _MAX_INTEGER_ELEMENTS or not isinstance(value, list) or len(
        value) != count or not all(type(v) is int for v in value):  # pylint: disable=unidiomatic-typecheck
      _fail(f"{where}: value: expected a list of {count} integers, found "
            f"{str(value)[:80]}")
    lo, hi = (0, 1) if tf_dtype.is_bool else (tf_dtype.min, tf_dtype.max)
    if value and not lo <= min(value) <= max(value) <= hi:
      _fail(f"{where}: value: outside the range of {dtype}")
  else:
    if dtype not in coding.DTYPES:
      _fail(f"{where}: dtype: expected one of {coding.DTYPES}, found "
            f"{dtype!r}")
  if role == "quantized":
    allowed.add("log_step")
    if not isinstance(entry.get("log_step"), str):
      _fail(f"{where}: log_step: expected the name of the step variable, "
            f"found {entry.get('log_step')!r}")
  extra = set(entry) - allowed
  if extra:
    _fail(f"{where}: unknown keys {sorted(extra)}")
  return name, role, dtype, tuple(shape)


def _check_header(header):
  """Model-level checks of the JSON header; returns the variable entries."""
  content = header.get("content")
  if content != CONTENT:
    _fail(f"header: content: expected {CONTENT!r} (a keras_cdl model), "
          f"found {content!r}")
  version = header.get("model_format")
  if version != MODEL_FORMAT:
    _fail(f"header: unsupported model_format {version!r}: this reader reads "
          f"model_format {MODEL_FORMAT}")
  model = header.get("model")
  if not isinstance(model, dict) or set(model) != {"class_name", "config"}:
    _fail(f"header: model: expected an object with class_name and config, "
          f"found {str(model)[:80]}")
  if model["class_name"] not in _MODEL_CLASSES:
    _fail(f"header: model: class_name: expected one of {_MODEL_CLASSES}, "
          f"found {model['class_name']!r}")
  config = model["config"]
  if not isinstance(config, dict) or not isinstance(config.get("layers"),
                                                    list):
    _fail("header: model: config: expected a Keras model config with a "
          "'layers' list")
  entries = header.get("variables")
  if not isinstance(entries, list):
    _fail(f"header: variables: expected a list, found "
          f"{type(entries).__name__}")
  names = set()
  checked = [_check_entry(i, e, names) for i, e in enumerate(entries)]
  for i, (entry, (name, role, _, _)) in enumerate(zip(entries, checked)):
    if role == "quantized":
      step_name = entry["log_step"]
      step = next((c for c in checked if c[0] == step_name), None)
      if step is None or step[1] != "quantizer":
        _fail(f"header: variables[{i}] ({name!r}): log_step: "
              f"{step_name!r} is not a quantizer variable of this file")
  return entries, checked


def _match_record(i, entry, record):
  name, role, dtype, shape = entry
  where = f"record {i} ({record.name!r})"
  if record.name != name:
    _fail(f"{where}: expected the record of variable {name!r} here (the "
          f"header's variable order), found {record.name!r}")
  kind = "quantized" if role == "quantized" else "float"
  if record.kind != kind:
    _fail(f"{where}: kind: variable {name!r} has role {role!r}, so a "
          f"{kind} record, found a {record.kind} record")
  if record.shape != shape:
    _fail(f"{where}: shape: the header says {shape}, the record {record.shape}")
  if record.dtype != dtype:
    _fail(f"{where}: dtype: the header says {dtype!r}, the record "
          f"{record.dtype!r}")


def _check_requantization(name, indices, step, restored, lo, hi):
  """`clip(round(restored / step)) == indices` in float32, as inference does."""
  with np.errstate(all="ignore"):
    again = np.clip(np.round(restored / step), lo, hi)
  bad = np.flatnonzero(again.reshape(-1) != indices.reshape(-1))
  if bad.size:
    k = int(bad[0])
    _fail(f"tensor {name!r}: index {int(indices.reshape(-1)[k])} at flat "
          f"position {k} re-quantizes to {again.reshape(-1)[k]} with step "
          f"{step.reshape(-1)[0] if step.size == 1 else 'per channel'}: the "
          f"stored steps do not match the model's log_step")


def _level_grid(record, rank):
  """`(indices, restored)` for every level of the table in every channel.

  The levels are the table's whole span `[offset, offset + levels)`, which
  holds every index the kernel holds (at most `2**bits` levels: the record
  was validated against its index range); `restored` is `indices * step` in
  float32 exactly as `StoredVariable.restored` computes it, shaped to rank
  `rank` with the channels along the record's `channel_axis`.  Re-quantizing
  `restored` checks every `(index, channel)` pair the kernel can contain, so
  it stands in for re-quantizing the whole kernel, at the cost of `levels x
  channels` elements instead of the kernel's.  `None` when the kernel's rank
  leaves no room for the grid (a scalar or a per-channel vector).
  """
  table, axis = record.table, record.channel_axis
  levels = np.arange(table.offset, table.offset + table.num_levels,
                     dtype=np.int32)
  step = record.step
  if axis is None:
    if rank < 1:
      return None
    indices = levels.reshape([-1] + [1] * (rank - 1))
  else:
    if rank < 2:
      return None
    other = 1 if axis == 0 else 0
    shape = [1] * rank
    shape[other], shape[axis] = levels.size, step.size
    indices = np.ascontiguousarray(np.broadcast_to(
        levels.reshape([-1 if d == other else 1 for d in range(rank)]),
        shape))
    step = step.reshape([-1 if d == axis else 1 for d in range(rank)])
  with np.errstate(over="ignore"):  # An inf fails the check, as it should.
    return indices, np.multiply(indices, step, dtype=np.float32)


def _requantizes(indices, step, restored, lo, hi):
  with np.errstate(all="ignore"):
    again = np.clip(np.round(restored / step), lo, hi)
  return np.array_equal(again, indices)


def _read_bytes(source):
  if isinstance(source, (bytes, bytearray, memoryview)):
    return bytes(source)
  if hasattr(source, "read"):
    return source.read()
  with open(os.fspath(source), "rb") as f:
    return f.read()


@dataclasses.dataclass(frozen=True, eq=False)
class _Parsed:
  """A container whose header and record list passed the model-level checks."""
  header: dict
  entries: list       # the header's variable objects
  checked: list       # (name, role, dtype, shape) per entry
  records: dict       # name -> Record, for the non-integer variables
  file_bytes: int


def _parse(source):
  data = _read_bytes(source)
  header, records = coding.decode_container(data)
  entries, checked = _check_header(header)
  stored = [c for c in checked if c[1] != "integer"]
  if len(records) != len(stored):
    _fail(f"the header lists {len(stored)} stored variables "
          f"({len(checked) - len(stored)} integer ones aside), the file has "
          f"{len(records)} records")
  for i, (entry, record) in enumerate(zip(stored, records)):
    _match_record(i, entry, record)
  return _Parsed(header, entries, checked,
                 dict(zip((c[0] for c in stored), records)), len(data))


def _decode_values(parsed, positions, limits=None):
  """Decoded values of the variables at `positions`: {position: array}."""
  values = {}
  for i in positions:
    entry = parsed.entries[i]
    name, role, dtype, shape = parsed.checked[i]
    if role == "integer":
      values[i] = np.array(entry["value"], dtype=dtype).reshape(shape)
    else:
      limit = limits[i] if isinstance(limits, (list, dict)) else limits
      values[i] = coding.decode_record(parsed.records[name],
                                       max_elements=limit)
  return values


def _decode(parsed, max_elements=None, requantize=True, values=None):
  """Decodes every tensor and checks the quantized ones' steps.

  Args:
    parsed: a `_Parsed`.
    max_elements: a cap for every tensor, or a list with one per variable.
    requantize: also check in NumPy that `i * q` re-quantizes to `i`
      (`decompress` re-quantizes with the model's own quantizers instead).
    values: already decoded values by position (the rest are decoded here).
  """
  values = dict(values or {})
  values.update(_decode_values(
      parsed, [i for i in range(len(parsed.checked)) if i not in values],
      max_elements))
  variables = []
  for i, (entry, (name, role, dtype, shape)) in enumerate(
      zip(parsed.entries, parsed.checked)):
    variables.append(StoredVariable(name, role, dtype, shape,
                                    parsed.records.get(name), values[i],
                                    entry.get("log_step")))
  by_name = {v.name: v for v in variables}
  for v in variables:
    if v.role != "quantized":
      continue
    log_step = by_name[v.log_step].value
    step = v.record.step
    if log_step.size != step.size:
      _fail(f"tensor {v.name!r}: {step.size} step sizes, but its log_step "
            f"{v.log_step!r} has {log_step.size} values")
    with np.errstate(all="ignore"):
      expected = np.exp(log_step.astype(np.float64)).reshape(step.shape)
    if not np.allclose(step, expected, rtol=1e-5, atol=0):
      _fail(f"tensor {v.name!r}: step sizes {step.reshape(-1)[:4].tolist()} "
            f"are not exp(log_step) = {expected.reshape(-1)[:4].tolist()}")
    if not requantize:
      continue
    lo, hi = coding.index_range(v.record.bits, v.record.signed)
    step_b = step
    if v.record.channel_axis is not None:
      shape = [1] * len(v.shape)
      shape[v.record.channel_axis] = -1
      step_b = step.reshape(shape)
    grid = _level_grid(v.record, len(v.shape))
    if grid is not None and _requantizes(grid[0], step_b, grid[1], lo, hi):
      continue
    # The grid failed (or has no room): check the kernel itself, which
    # raises with the element's position, or passes if only an (index,
    # channel) pair the kernel does not hold failed.
    _check_requantization(v.name, v.value, step_b, v.restored(), lo, hi)
  return ModelFile(parsed.header, tuple(variables), parsed.file_bytes)


def read_model_file(source, *, max_elements=None):
  """Reads and fully validates a `.cdl` model file without building Keras.

  Checks the container (`coding.decode_container`), the model header
  (content, model_format, a known model class, a config with layers, each
  variable's name, role, dtype and shape), that the records are exactly the
  header's non-integer variables in order with matching names, kinds, shapes
  and dtypes, decodes every tensor (each checked against its CRC32), and
  checks that each quantized kernel's steps are its `exp(log_step)` and that
  `i * q` re-quantizes to `i` in float32.  Only `decompress` checks the
  architecture itself (by rebuilding it).

  Args:
    source: a path, an open binary file or the bytes.
    max_elements: optional cap on any one tensor's elements, checked before
      it is decoded (see `coding.decode_record`).

  Returns:
    A `ModelFile`.

  Raises:
    FormatError: anything is wrong; the message says what and where.
  """
  return _decode(_parse(source), max_elements)


# -----------------------------------------------------------------------------
# Rebuilding the Keras model.
# -----------------------------------------------------------------------------
def _safe_mode_scope():
  try:
    from keras.src.saving import serialization_lib  # pylint: disable=g-import-not-at-top
    return serialization_lib.SafeModeScope(True)
  except (ImportError, AttributeError):  # pragma: no cover
    return contextlib.nullcontext()


def _autograph_off():
  """Keras traces every layer once to build a Functional model; without
  autograph's source conversion that takes about half as long (0.6 s -> 0.45
  s for the 3.27M-weight convnet).  The model's own calls are unaffected."""
  try:
    from tensorflow.python.autograph.core import ag_ctx  # pylint: disable=g-import-not-at-top
    return ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED)
  except (ImportError, AttributeError):  # pragma: no cover
    return contextlib.nullcontext()


def _layer_classes(config):
  """Every `class_name` in a (nested) Keras config."""
  if isinstance(config, dict):
    found = [config["class_name"]] if isinstance(config.get("class_name"),
                                                 str) else []
    for value in config.values():
      found += _layer_classes(value)
    return found
  if isinstance(config, list):
    return [c for v in config for c in _layer_classes(v)]
  return []


class _ZeroInit:
  """A variable creator that starts large variables at zeros.

  Every variable of a rebuilt model is overwritten from the file, so running
  the layers' random initializers (Glorot on the 3.2M-weight convnet's
  kernels) is wasted work proportional to the weights.  Variables of at
  least `_ZERO_INIT_ELEMENTS` elements with a known shape are created by
  `tf.zeros` instead and remembered in `created`, so `decompress` can check
  each was restored.  Small ones (metric counters and such) keep their
  initializers.
  """

  def __init__(self):
    self.created = []

  def __call__(self, next_creator, **kwargs):
    shape, dtype = kwargs.get("shape"), kwargs.get("dtype")
    if (callable(kwargs.get("initial_value")) and shape is not None and
        dtype is not None):
      shape = tf.TensorShape(shape)
      if (shape.is_fully_defined() and
          shape.num_elements() >= _ZERO_INIT_ELEMENTS):
        dtype = tf.as_dtype(dtype)
        kwargs["initial_value"] = lambda: tf.zeros(shape, dtype)
        variable = next_creator(**kwargs)
        self.created.append(variable)
        return variable
    return next_creator(**kwargs)


def _build_model(model_header, zero_init=None):
  """Rebuilds the Keras model of the header (`_ZeroInit` `zero_init`)."""
  config = _strip_build_configs(model_header["config"])
  if "Lambda" in _layer_classes(config):
    _fail("header: model: the architecture has a Lambda layer; a .cdl file "
          "never runs code from the file, so Lambda layers are not supported")
  classes = {"CDLModel": model_lib.CDLModel, "Functional": tf.keras.Model,
             "Sequential": tf.keras.Sequential}
  model_class = classes[model_header["class_name"]]
  creator = (contextlib.nullcontext() if zero_init is None else
             tf.variable_creator_scope(zero_init))
  try:
    with quantize_lib.quantize_scope(), _safe_mode_scope(), creator:
      try:
        with _autograph_off():
          model = model_class.from_config(config)
      except Exception:  # pylint: disable=broad-except
        # A layer whose call needs autograph: build it the usual way.
        model = model_class.from_config(config)
  except RecursionError:
    _fail("header: model: config is nested too deeply")
  except Exception as e:  # pylint: disable=broad-except
    # The config is data from the file: whatever Keras raises on it is a
    # malformed file.
    _fail(f"header: model: Keras cannot rebuild the architecture from its "
          f"config: {type(e).__name__}: {str(e)[:300]}")
  if not model.built:
    _fail("header: model: the architecture has no inputs to build it from")
  return model


def _check_architecture(slots, parsed):
  """The rebuilt model's variables must be the file's, one for one."""
  if len(slots) != len(parsed.checked):
    _fail(f"architecture and tensors differ: the rebuilt model has "
          f"{len(slots)} variables, the file {len(parsed.checked)}")
  for i, (slot, (name, role, dtype, shape)) in enumerate(
      zip(slots, parsed.checked)):
    where = f"variables[{i}] ({name!r})"
    if slot.name != name:
      _fail(f"{where}: the rebuilt model's variable {i} is {slot.name!r}")
    if slot.role != role:
      _fail(f"{where}: role: the architecture makes it {slot.role!r}, the "
            f"file says {role!r}")
    if tuple(slot.variable.shape) != shape:
      _fail(f"{where}: shape: the architecture says "
            f"{tuple(slot.variable.shape)}, the file {shape}")
    if slot.variable.dtype.name != dtype:
      _fail(f"{where}: dtype: the architecture says "
            f"{slot.variable.dtype.name}, the file {dtype}")
    if role == "quantized":
      quantizer = slot.tensor.quantizer
      record = parsed.records[name]
      axis = (quantizer.channel_axis % len(shape)
              if quantizer.per_channel else None)
      want = (quantizer.bits, quantizer.signed, axis)
      got = (record.bits, record.signed, record.channel_axis)
      if got != want:
        _fail(f"{where}: (bits, signed, channel_axis) = {got}, but the "
              f"architecture's quantizer has {want}")
      if slot.log_step != parsed.entries[i]["log_step"]:
        _fail(f"{where}: log_step: the architecture's is {slot.log_step!r}, "
              f"the file's {parsed.entries[i]['log_step']!r}")


def _requantized_by_model(slot, var):
  """Whether the model's quantizer re-quantizes `i * q` to `i`.

  Runs the quantizer on `_level_grid`'s every (index, channel) pair rather
  than on the kernel: the quantizer is elementwise given its steps, so this
  covers every element of the kernel.  `False` when the grid fails or has
  no room; the caller then checks the kernel itself.
  """
  grid = _level_grid(var.record, len(var.shape))
  if grid is None:
    return False
  indices, restored = grid
  again = slot.tensor.quantizer.indices(
      tf.cast(restored, slot.variable.dtype), slot.tensor.variables)
  return np.array_equal(again.numpy(), indices)


def _restore(slots, model_file):
  """Assigns the stored values to the model's variables, checking each."""
  for slot, var in zip(slots, model_file.variables):
    if var.role != "quantized":
      slot.variable.assign(tf.cast(var.value, slot.variable.dtype))
  for slot, var in zip(slots, model_file.variables):
    if var.role == "quantized":
      slot.variable.assign(tf.cast(var.restored(), slot.variable.dtype))
      if _requantized_by_model(slot, var):
        continue
      # Re-quantize the kernel itself: fails with the element's position,
      # or passes if only a pair the kernel does not hold failed.
      again = slot.tensor.indices()
      if not np.array_equal(again, var.value):
        k = int(np.flatnonzero(again.reshape(-1) != var.value.reshape(-1))[0])
        _fail(f"tensor {var.name!r}: the restored kernel re-quantizes to "
              f"index {int(again.reshape(-1)[k])} instead of "
              f"{int(var.value.reshape(-1)[k])} at flat position {k}")


def decompress(source, *, model=None):
  """Rebuilds the Keras model stored by `compress`, or restores into `model`.

  The container and the model header are checked first, then the
  architecture is rebuilt (under `quantize_scope`, in Keras' safe mode) and
  its variables compared with the file's (names, roles, shapes, dtypes, each
  quantizer's bits, signedness and channel axis).  Tensors are decoded
  meanwhile, on a second thread, up to 2**26 elements in all (bounded by the
  header's shapes); the rest only after that check, each capped at the
  element count the architecture gives it.  Variables of 1024 elements or
  more are created as zeros (their initializers would only be overwritten).
  Each quantized kernel is restored as `i * q`, and its own quantizer
  re-quantizes every (index, channel) pair of the table's span to check it
  gives back `i` (the whole kernel, if that fails).

  Rebuilding the architecture is a fixed cost of Keras (about 0.2 s for
  the 3.27M-weight reference convnet, more than decoding its indices takes):
  to load many files of one architecture, or to restore the weights of a
  model already built, pass it as `model` (like Keras' `load_weights`).  Its
  config must be the stored one (layer names included: build it from the
  same config, e.g. an earlier `decompress` of such a file); the variables
  are then checked and restored the same way.

  Args:
    source: a `.cdl` path, an open binary file or the bytes.
    model: optional built Keras model with the stored architecture to
      restore into, instead of rebuilding it.

  Returns:
    The model (a `CDLModel` for `quantize_model`'s models; `model` itself
    when given), not compiled.  Its inference outputs (`training=False`)
    equal the compressed model's bitwise; quantized kernels hold `i * q`.

  Raises:
    FormatError: the file is malformed, on the container or the model level;
      the message names what is wrong.
    ValueError: `model` is not a Keras model, or its architecture is not
      the stored one (nothing is restored then).
  """
  if model is not None and not isinstance(model, tf.keras.Model):
    raise ValueError(f"`model` must be a tf.keras.Model or None, but got "
                     f"{type(model).__name__}.")
  return _decompress(source, model)


def _check_same_architecture(model, model_header):
  """Raises ValueError unless `model` has the stored class and config."""
  stored = (model_header["class_name"], model_header["config"])
  found = (_model_class(model), _strip_build_configs(model.get_config()))
  if json.dumps(stored, sort_keys=True, default=str) != json.dumps(
      found, sort_keys=True, default=str):
    raise ValueError(
        f"`model` must have the architecture stored in the file (a "
        f"{stored[0]} model with the stored config), but got a {found[0]} "
        f"model (layers {[layer.name for layer in model.layers]}) whose "
        "config differs.")


def _decompress(source, model=None):
  """`decompress`; with `model`, restores into that model instead of a
  rebuilt one (benchmarks/coding.py's decompress without the rebuild).
  Everything else, the checks included, is the same."""
  parsed = _parse(source)
  # Decode while Keras rebuilds the architecture (the range decoder runs
  # without the GIL), but only up to a fixed budget of elements bounded by
  # the header's shapes: what the architecture has not vouched for yet must
  # not cost much memory if the file is hostile.  The rest is decoded after
  # the architecture check, capped by the architecture's shapes.
  early, budget = [], _EARLY_DECODE_ELEMENTS
  for i, (_, role, _, shape) in enumerate(parsed.checked):
    if role != "integer" and math.prod(shape) <= budget:
      early.append(i)
      budget -= math.prod(shape)
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    decoding = pool.submit(_decode_values, parsed, early)
    zero_init = _ZeroInit()
    if model is None:
      model = _build_model(parsed.header["model"], zero_init)
    else:
      _check_same_architecture(model, parsed.header["model"])
    try:
      slots = _model_slots(model)
    except ValueError as e:
      _fail(f"header: model: {e}")
    _check_architecture(slots, parsed)
    values = decoding.result()
  model_file = _decode(parsed, [s.variable.shape.num_elements()
                                for s in slots], requantize=False,
                       values=values)
  _restore(slots, model_file)
  restored = {id(s.variable) for s in slots}
  if any(id(v) not in restored for v in zero_init.created):
    raise AssertionError(  # A bug, not a bad file.
        f"variables created as zeros but not restored: "
        f"{[v.name for v in zero_init.created if id(v) not in restored]}")
  return model


# -----------------------------------------------------------------------------
# Sizes.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorRow:
  """The stored size of one model variable.

  Attributes:
    name, role, shape, count: the variable.
    bits: quantized: the bit width; else None.
    entropy: quantized: `H`, the empirical entropy of the stored indices in
      bits per element; else None.
    payload_bytes: the range-coded indices, or the raw float32.
    table_bytes: the coding table (0 for floats).
    header_bytes: the rest of the record (framing, name, shape, steps, ...).
  """
  name: str
  role: str
  shape: tuple
  count: int
  bits: Optional[int]
  entropy: Optional[float]
  payload_bytes: int
  table_bytes: int
  header_bytes: int

  @property
  def record_bytes(self):
    return self.payload_bytes + self.table_bytes + self.header_bytes

  @property
  def entropy_bytes(self):
    """`N * H / 8`, the ideal size of the indices; None for floats."""
    return None if self.entropy is None else self.count * self.entropy / 8

  @property
  def float32_bytes(self):
    return 4 * self.count

  @property
  def ratio(self):
    """float32 bytes over this record's bytes (compression factor)."""
    return self.float32_bytes / max(self.record_bytes, 1)


@dataclasses.dataclass(frozen=True)
class ModelSizeReport:
  """Sizes of a compressed model, three ways and against three baselines.

  The three sizes (docs/cdl-method.md section 6):
  * `coded_payload_bytes`: the range-coded indices of the quantized kernels;
  * `records_bytes`: payload + tables + headers: every record of the file
    (quantized and float tensors, with their tables and record headers);
  * `file_bytes`: the whole file: records plus the container's preamble,
    the JSON header (architecture and variable list) and the CRCs.

  The baselines count the model's parameters (quantized kernels plus float
  parameters; the quantizers' own state and integer bookkeeping excluded):
  * `float32_bytes`: 4 bytes per parameter;
  * `int8_bytes`: 1 byte per quantized weight plus 4 per float parameter;
  * `gzip_int8_bytes`: `gzip -9` of the int8 indices of all quantized
    kernels, concatenated in file order (`gzip_indices_bytes`), plus 4 bytes
    per float parameter.

  Attributes:
    tensors: tuple of `TensorRow`, in file order (integer variables aside).
    container_bytes: preamble, JSON header and CRCs.
    json_bytes: the JSON header alone (part of `container_bytes`).
    file_bytes: the whole file.
    gzip_indices_bytes: `gzip -9` of the int8 index bytes.
  """
  tensors: tuple
  container_bytes: int
  json_bytes: int
  file_bytes: int
  gzip_indices_bytes: int

  def _rows(self, *roles):
    return [t for t in self.tensors if t.role in roles]

  @property
  def coded_payload_bytes(self):
    return sum(t.payload_bytes for t in self._rows("quantized"))

  @property
  def table_bytes(self):
    return sum(t.table_bytes for t in self.tensors)

  @property
  def float_payload_bytes(self):
    return sum(t.payload_bytes for t in self._rows("float", "quantizer"))

  @property
  def record_header_bytes(self):
    return sum(t.header_bytes for t in self.tensors)

  @property
  def records_bytes(self):
    return sum(t.record_bytes for t in self.tensors)

  @property
  def entropy_bytes(self):
    """Sum of `N * H / 8` over the quantized kernels."""
    return float(sum(t.entropy_bytes for t in self._rows("quantized")))

  @property
  def quantized_parameters(self):
    return sum(t.count for t in self._rows("quantized"))

  @property
  def float_parameters(self):
    return sum(t.count for t in self._rows("float"))

  @property
  def parameters(self):
    return self.quantized_parameters + self.float_parameters

  @property
  def bits_per_weight(self):
    """Coded payload bits per quantized weight."""
    return 8 * self.coded_payload_bytes / max(self.quantized_parameters, 1)

  @property
  def float32_bytes(self):
    return 4 * self.parameters

  @property
  def int8_bytes(self):
    return self.quantized_parameters + 4 * self.float_parameters

  @property
  def gzip_int8_bytes(self):
    return self.gzip_indices_bytes + 4 * self.float_parameters


def _int8_bytes(indices):
  return np.asarray(indices).astype(np.int16).astype(np.uint8).tobytes()


def _gzip9(chunks):
  return len(gzip.compress(b"".join(chunks), compresslevel=9, mtime=0))


def _report(header, records, indices, roles, shapes, file_bytes):
  sizes = coding.container_sizes(header, records, indices)
  rows = []
  for size, record in zip(sizes.tensors, records):
    entropy = None
    if record.kind == "quantized":
      entropy = coding.empirical_entropy(indices[record.name])
    rows.append(TensorRow(
        name=record.name, role=roles[record.name], shape=shapes[record.name],
        count=size.count, bits=record.bits, entropy=entropy,
        payload_bytes=size.payload_bytes, table_bytes=size.table_bytes,
        header_bytes=size.header_bytes))
  gz = _gzip9([_int8_bytes(indices[r.name]) for r in records
               if r.kind == "quantized"])
  json_bytes = sizes.container_bytes - 32
  return ModelSizeReport(tuple(rows), sizes.container_bytes, json_bytes,
                         file_bytes, gz)


def size_report(source):
  """The `ModelSizeReport` of a model or of a `.cdl` file.

  Args:
    source: a Keras model (compressed in memory, nothing written), a
      `.cdl` path, open binary file or bytes, or a `ModelFile`.
  """
  if isinstance(source, tf.keras.Model):
    data, header, records, indices = encode_model(source)
    file_bytes = len(data)
  else:
    model_file = source if isinstance(source, ModelFile) else (
        read_model_file(source))
    header, records = model_file.header, model_file.records
    indices = {v.name: v.value for v in model_file.variables
               if v.role == "quantized"}
    file_bytes = model_file.file_bytes
  roles = {e["name"]: e["role"] for e in header["variables"]}
  shapes = {e["name"]: tuple(e["shape"]) for e in header["variables"]}
  report = _report(header, records, indices, roles, shapes, file_bytes)
  if report.container_bytes + report.records_bytes != file_bytes:
    raise AssertionError(  # A bug, not a bad file.
        f"size accounting: {report.container_bytes} + "
        f"{report.records_bytes} != {file_bytes}")
  return report


def _kib(n):
  return f"{n:,.0f} B ({n / 1024:,.1f} KiB)"


def format_size_report(report, all_tensors=False):
  """The report as text: a per-tensor table, then the totals.

  Args:
    report: a `ModelSizeReport`.
    all_tensors: also list the quantizers' state variables one by one
      (otherwise summarised in one line).
  """
  head = (f"{'tensor':40s} {'role':9s} {'shape':>16s} {'bits':>4s} "
          f"{'H':>6s} {'coded B':>10s} {'table':>6s} {'hdr':>4s} "
          f"{'x f32':>7s}")
  lines = [head, "-" * len(head)]
  hidden = []
  for t in report.tensors:
    if t.role == "quantizer" and not all_tensors:
      hidden.append(t)
      continue
    bits = "f32" if t.bits is None else str(t.bits)
    entropy = "" if t.entropy is None else f"{t.entropy:6.3f}"
    shape = "x".join(str(d) for d in t.shape) or "scalar"
    lines.append(f"{t.name[:40]:40s} {t.role:9s} {shape:>16s} {bits:>4s} "
                 f"{entropy:>6s} {t.payload_bytes:10,d} {t.table_bytes:6,d} "
                 f"{t.header_bytes:4d} {t.ratio:7.1f}")
  if hidden:
    lines.append(
        f"{'(quantizer state: ' + str(len(hidden)) + ' tensors)':40s} "
        f"{'quantizer':9s} {sum(t.count for t in hidden):>16,d} {'f32':>4s} "
        f"{'':>6s} {sum(t.payload_bytes for t in hidden):10,d} "
        f"{0:6d} {sum(t.header_bytes for t in hidden):4d}")
  lines.append("-" * len(head))
  excess = (report.coded_payload_bytes / report.entropy_bytes - 1) * 100 if (
      report.entropy_bytes) else 0.0
  lines += [
      f"quantized weights: {report.quantized_parameters:,d} at "
      f"{report.bits_per_weight:.3f} bits/weight; float parameters: "
      f"{report.float_parameters:,d}",
      f"coded payload (range-coded indices): {_kib(report.coded_payload_bytes)}"
      f"; N*H/8 = {report.entropy_bytes:,.0f} B ({excess:+.2f}%)",
      f"payload + tables + headers (all tensors, floats included): "
      f"{_kib(report.records_bytes)}; tables {report.table_bytes:,d} B, "
      f"record headers {report.record_header_bytes:,d} B, float payloads "
      f"{report.float_payload_bytes:,d} B",
      f"whole file: {_kib(report.file_bytes)}; "
      f"JSON header (architecture) {report.json_bytes:,d} B",
  ]
  for label, size in (("float32", report.float32_bytes),
                      ("int8 (+ float32 rest)", report.int8_bytes),
                      ("gzip -9 of int8 (+ float32 rest)",
                       report.gzip_int8_bytes)):
    lines.append(f"{label + ':':33s} {_kib(size)}; / whole file = "
                 f"{size / max(report.file_bytes, 1):.2f}")
  lines.append(f"(gzip -9 of the int8 indices alone: "
               f"{report.gzip_indices_bytes:,d} B vs coded payload "
               f"{report.coded_payload_bytes:,d} B)")
  return "\n".join(lines)


def print_size_report(report, print_fn=print, all_tensors=False):
  """Prints `format_size_report(report)` line by line; returns `report`."""
  for line in format_size_report(report, all_tensors).split("\n"):
    print_fn(line)
  return report


class _CallableModule(types.ModuleType):
  """This module's type: calling the module calls `compress`.

  So `keras_cdl.compress(model, path)` and `keras_cdl.compress.size_report`
  both work, without the function shadowing the module.
  """

  def __call__(self, model, path, **kwargs):
    return compress(model, path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
