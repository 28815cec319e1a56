"""Deployment forms of a CDL model: a float Keras model, a SavedModel, int8 TFLite.

A CDL model's inference (`model(x, training=False)`) is integer indices times
step sizes: every quantized kernel is `q * i` with `i = clip(round(w / q))` in
the signed narrow range, every quantized activation (ReLU outputs, the model
input) is `q * clip(round(x / q), lo, hi)`.  This module writes that function
out without tfmot:

* `inference_model(model)`: a plain Keras model computing the same function:
  kernels replaced by `q * i`, each activation quantizer by a `RoundQuantize`
  layer (`q * clip(round(x / q), lo, hi)`, the very expression the quantizer
  evaluates, so without BatchNorm folding the outputs are bitwise equal).
  A `BatchNormalization` that directly follows a quantized `Conv1D`/`Conv2D`/
  `DepthwiseConv2D`/`Dense` without activation is folded into it with the
  indices unchanged:

  ```
  s_c = gamma_c / sqrt(var_c + eps)
  w'[..., c] = (q_c s_c) i[..., c]           b'_c = s_c (b_c - mean_c) + beta_c
  ```

  so the folded kernel is still one integer index per weight times one scale
  per output channel (for a negative `gamma_c` the scale is `|q_c s_c|` and
  the channel's indices change sign).  Folding changes float rounding, so the
  folded model matches to float precision, not bitwise (a value within float
  error of a rounding boundary can move one level).  A BatchNorm that cannot
  fold (after a ReLU, or on a shared tensor) stays float.
* `to_saved_model(model, export_dir)`: that model as a SavedModel with a
  `serving_default` signature (input keys: the model's input names; output
  keys: the inference model's output names).
* `to_tflite(model, path, representative_data)`: a full-integer int8 TFLite
  model.  The converter sees the inference model with each activation
  quantizer written as `tf.quantization.fake_quant_with_min_max_vars` over
  `[0, 255 q]` (unsigned, zero point -128; after `minimum(x, hi q)` below 8
  bits) or `[-127 q, 127 q]` (signed, narrow, zero point 0; after a clip to
  `[-hi q, hi q]`, also at 8 bits, since the int8 tensor would hold -128);
  it calibrates the remaining float tensors (unfolded BatchNorm, `Add`,
  float logits) from `representative_data`.  The converter quantizes kernels
  with its own `max|w| / 127` scales, so the flatbuffer is then rewritten: every
  CDL kernel's int8 data becomes the CDL indices and its scales the CDL steps
  (per channel, folded when BatchNorm was folded), and its int32 bias is
  re-quantized to `input_scale * step`.  What is exact (checked by
  `to_tflite` and by tests/export_test.py):

  - kernels: int8 values equal the CDL indices times `2^k` and scales the
    CDL steps over `2^k` (`k = index_shift(i)`, the largest keeping
    `|i| 2^k <= 127`; `shift_indices=False`: `k = 0`), so the weights are
    exactly `i q` (float32-exact), zero points 0, for every bit width 2..8;
  - activations: every CDL step `q` is the scale of the int8 tensors carrying
    that activation, zero point -128 (unsigned: int8 = index - 128) or 0
    (signed), values within the CDL index range;
  - so each conv / dense multiplies exact CDL indices; its output is TFLite's
    integer requantization of `sum i_x i_w + round(b / (q_x q_w))`.

  What is not, unless the biases are snapped: the float model adds `b`
  where TFLite adds `round(b / g)` on the int32 grid `g = q_x q_w / 2^k`.
  A sum within `g / 2` of a rounding boundary of the next quantizer lands
  on another level, and each difference spreads to the next layers' sums:
  on the main job's 4-bit LeNet5, 0.54% of the 10000 test images got
  another top-1.  `snap_biases(model)` moves each bias onto that grid (at
  most half a grid step, a few thousandths of an output level); after it,
  TFLite's XNNPACK kernels (the Python interpreter's default; they
  requantize `(sum i_x i_w + round(b / g)) q_x q_w / q_out` with one float
  rounding) give the CDL model's int8 outputs: all 10000 test images' int8
  logits equal on that LeNet5, and 99.92% of the 8-bit test LeNet5's logits
  (tests/export_test.py; the rest one level apart, float32 sums within
  ~1e-5 of a boundary).  TFLite's builtin kernels (without the XNNPACK
  delegate, or on microcontrollers) round twice
  (`SaturatingRoundingDoublingHighMul`, then `RoundingDivideByPOT` by the
  multiplier's exponent `r`), moving the rounding threshold by up to
  `2^-(r+k+1)` of a level: storing each kernel as `i 2^k` at scale `q / 2^k`
  (`index_shift`) makes that `2^k` times smaller without changing a weight,
  but there the main job's LeNet5 still agrees on about 99% of the images.
  The logits are exact in kind: `quantize_model` quantizes a final linear
  layer's output (`output_bits`, signed 8 bits by default) and its step is
  the TFLite output scale, so both produce logits on the same int8 grid and
  break exact ties the same way.  A kernel whose input is not a CDL
  activation (after a residual `Add` or an unfolded BatchNorm, which stay
  float in the CDL model and get a calibrated int8 scale in TFLite) cannot
  be made exact: a Conv-BN-ReLU model with a residual `Add` before its
  logits agrees on 99.55% of 2000 test images with or without snapping.
  A model quantized with `output_bits=None` keeps float logits and the
  converter calibrates their int8 scale from `representative_data`.

`fake_quant_with_min_max_vars` is not used by `inference_model`: with
`min = 0, max = 255 q` it evaluates `floor(x * (1 / s) + 0.5) * s` with
`s = fl(max) / 255`, which rounds ties up (not to even) and multiplies by a
rounded reciprocal, so it can differ from `q * round(x / q)` near boundaries.

For storage (`keras_cdl.compress`): `quantized_values(model)` lists each
quantized tensor as stored (name, kind, bits, signed, step, channel axis and,
for kernels, the int32 indices), and `inference_model(model, values=...)`
builds the inference model from such values instead of the model's variables,
e.g. from indices and steps decoded from a `.cdl` file into a model rebuilt
from its architecture.
"""

import collections
import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer

from keras_cdl import introspect
from keras_cdl import ops
from keras_cdl import quantizers as quantizers_lib

__all__ = [
    "QuantizedValue",
    "ExportedKernel",
    "ExportedActivation",
    "ExportPlan",
    "RoundQuantize",
    "quantized_values",
    "export_plan",
    "inference_model",
    "run_tflite",
    "index_shift",
    "bias_grid",
    "snap_biases",
    "to_saved_model",
    "to_tflite",
    "IMPLEMENTATIONS",
    "IO_TYPES",
]

IMPLEMENTATIONS = ("round", "fake_quant")
IO_TYPES = ("float32", "int8")

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_QuantizeLayer = quantize_layer.QuantizeLayer
_FOLDABLE = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D,
             tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Dense)
_NOT_FOLDABLE = (tf.keras.layers.Conv2DTranspose,
                 tf.keras.layers.Conv1DTranspose,
                 tf.keras.layers.SeparableConv1D,
                 tf.keras.layers.SeparableConv2D)


# -----------------------------------------------------------------------------
# Values.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantizedValue:
  """One CDL-quantized tensor as stored: indices (kernels) and step sizes.

  Attributes:
    name: the `introspect.quantized_tensors` name (`"<layer>/kernel"`,
      `"<layer>/output"`, `"<layer>/input"`).
    kind: "weight", "activation" or "input".
    bits: bit width.
    signed: narrow symmetric index range (True) or `[0, 2^b - 1]`.
    step: float32 step size `q`: a scalar, or one per channel along
      `channel_axis`.
    channel_axis: the non-negative axis of the tensor `step` runs along, or
      None for one step.
    indices: int32 indices of a kernel (None for activations).
  """
  name: str
  kind: str
  bits: int
  signed: bool
  step: np.ndarray
  channel_axis: Optional[int] = None
  indices: Optional[np.ndarray] = None

  @property
  def index_range(self):
    """`(lo, hi)`, the first and last index."""
    return ops.index_range(self.bits, self.signed)

  def dequantized(self):
    """`q * i` as float32 (kernels only)."""
    if self.indices is None:
      raise ValueError(f"`dequantized` needs indices, but {self.name} is an "
                       f"{self.kind}.")
    return _dequantize(self.indices, self.step, self.channel_axis)


def _dequantize(indices, step, channel_axis):
  step = np.asarray(step, np.float32)
  if channel_axis is not None and step.ndim:
    shape = [1] * indices.ndim
    shape[channel_axis] = -1
    step = step.reshape(shape)
  return (step * indices.astype(np.float32)).astype(np.float32)


def _value_of(record):
  """The `QuantizedValue` of an `introspect.QuantizedTensor`."""
  q = record.quantizer
  axis = None
  indices = None
  if record.kind == "weight":
    indices = record.indices().astype(np.int32)
    if q.per_channel:
      axis = q.channel_axis % indices.ndim
  step = np.asarray(record.step, np.float32)
  return QuantizedValue(record.name, record.kind, q.bits, q.signed, step, axis,
                        indices)


def quantized_values(model):
  """Lists `model`'s CDL-quantized tensors as `QuantizedValue`s, in layer order.

  Args:
    model: a model made by `keras_cdl.quantize_model` (or containing
      `keras_cdl` quantizers).

  Raises:
    ValueError: `model` is not a Keras model or has no CDL quantizers.
  """
  return [_value_of(r) for r in _records(model)]


def _records(model):
  if not isinstance(model, tf.keras.Model):
    raise ValueError("`model` must be a tf.keras.Model, but got "
                     f"{type(model).__name__}.")
  records = introspect.quantized_tensors(model)
  if not records:
    raise ValueError(
        f"`model` must contain CDL-quantized tensors, but {model.name!r} has "
        "none. Quantize it first: keras_cdl.quantize_model(model, ...).")
  return records


def _check_values(values, records):
  """`{name: QuantizedValue}` from `values`, checked against `records`."""
  if values is None:
    return {}
  if isinstance(values, dict):
    items = list(values.values())
  else:
    items = list(values)
  by_name = {}
  for value in items:
    if not isinstance(value, QuantizedValue):
      raise ValueError("`values` must hold keras_cdl.export.QuantizedValue "
                       f"objects, but got {type(value).__name__}.")
    by_name[value.name] = value
  known = {r.name: r for r in records}
  for name, value in by_name.items():
    record = known.get(name)
    if record is None:
      raise ValueError(f"`values` names {name!r}, which is not a quantized "
                       f"tensor of the model (it has {sorted(known)}).")
    q = record.quantizer
    if (value.kind, value.bits, value.signed) != (record.kind, q.bits,
                                                  q.signed):
      raise ValueError(
          f"`values[{name!r}]` has kind={value.kind}, bits={value.bits}, "
          f"signed={value.signed}, but the model's tensor has "
          f"kind={record.kind}, bits={q.bits}, signed={q.signed}.")
    step = np.asarray(value.step, np.float32)
    if not np.all(np.isfinite(step) & (step > 0)):
      raise ValueError(f"`values[{name!r}].step` must be finite and "
                       f"positive, but got {step.tolist()}.")
    if record.kind != "weight":
      if step.size != 1:
        raise ValueError(f"`values[{name!r}].step` must be a scalar for an "
                         f"{record.kind}, but got shape {step.shape}.")
      continue
    shape = tuple(record.weight.shape)
    indices = value.indices
    if indices is None or tuple(np.shape(indices)) != shape:
      raise ValueError(
          f"`values[{name!r}].indices` must have the kernel's shape {shape}, "
          f"but got {None if indices is None else np.shape(indices)}.")
    lo, hi = ops.index_range(q.bits, q.signed)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu" or indices.min() < lo or (
        indices.max() > hi):
      raise ValueError(f"`values[{name!r}].indices` must be integers in "
                       f"[{lo}, {hi}].")
    if step.size != 1 and (value.channel_axis is None or step.shape != (
        shape[value.channel_axis],)):
      raise ValueError(
          f"`values[{name!r}].step` has shape {step.shape}; per-channel "
          f"steps need `channel_axis` and one step per channel of {shape}.")
  return by_name


# -----------------------------------------------------------------------------
# The activation quantizer as a plain layer.
# -----------------------------------------------------------------------------
def _fake_quant_max(step, levels):
  """A float32 `m` whose `m / levels` (in double, as TFLite computes the
  scale of a FakeQuant range) rounds to exactly the float32 `step`."""
  step = np.float32(step)
  start = np.float32(np.float64(step) * levels)
  candidates = [start]
  for direction in (np.float32(np.inf), np.float32(-np.inf)):
    value = start
    for _ in range(4):
      value = np.nextafter(value, direction)
      candidates.append(value)
  for candidate in candidates:
    if np.float32(np.float64(candidate) / levels) == step:
      return float(candidate)
  return float(start)


def _fake_quant(x, step, lo, hi):
  """`q * clip(round(x / q), lo, hi)` as TFLite-convertible FakeQuant ops."""
  q = np.float32(step)
  if lo == 0:
    if hi < 255:
      x = tf.minimum(x, tf.constant(q * np.float32(hi), x.dtype))
    maximum = _fake_quant_max(q, 255)
    return tf.quantization.fake_quant_with_min_max_vars(
        x, tf.constant(0.0), tf.constant(maximum, tf.float32), num_bits=8)
  if lo != -hi:
    raise ValueError(f"Index range [{lo}, {hi}] is neither unsigned nor "
                     "symmetric.")
  # Clip even at 8 bits: TFLite's int8 tensor of a narrow-range FakeQuant
  # still holds -128, which the QUANTIZE op produces below -127.5 q.
  limit = q * np.float32(hi)
  x = tf.clip_by_value(x, tf.constant(-limit, x.dtype),
                       tf.constant(limit, x.dtype))
  maximum = _fake_quant_max(q, 127)
  return tf.quantization.fake_quant_with_min_max_vars(
      x, tf.constant(-maximum, tf.float32), tf.constant(maximum, tf.float32),
      num_bits=8, narrow_range=True)


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class RoundQuantize(tf.keras.layers.Layer):
  r"""The inference CDL quantizer of an activation: $q\,\mathrm{clip}(\mathrm{round}(x/q), lo, hi)$.

  Args:
    step: the step size `q` (positive; stored as float32).
    lo: the first index (0 for unsigned activations).
    hi: the last index.
    implementation: "round" evaluates exactly `keras_cdl.ops.round_quantize`
      (ties to even), bitwise what the CDL model computes; "fake_quant" uses
      `tf.quantization.fake_quant_with_min_max_vars` (8-bit range `[0, 255 q]`
      or narrow `[-127 q, 127 q]`, after a clip at `hi q` below 8 bits),
      which TFLite converts to int8 tensors of scale `q`; it rounds ties up
      and through a rounded reciprocal, so it can differ from "round" by one
      level next to a rounding boundary.
  """

  def __init__(self, step, lo, hi, implementation="round", **kwargs):
    super().__init__(**kwargs)
    step = np.float32(step)
    if not (np.isfinite(step) and step > 0):
      raise ValueError(f"`step` must be positive and finite, but got {step}.")
    if not (isinstance(lo, (int, np.integer)) and isinstance(
        hi, (int, np.integer)) and lo < hi):
      raise ValueError(f"`lo` and `hi` must be integers with lo < hi, but "
                       f"got lo={lo!r}, hi={hi!r}.")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, "
                       f"but got {implementation!r}.")
    self.step = float(step)
    self.lo = int(lo)
    self.hi = int(hi)
    self.implementation = implementation

  def build(self, input_shape):
    # A variable, not a constant: Grappler's constant folding rewrites
    # `x / constant` as `x * (1 / constant)`, which rounds differently.
    self.step_variable = self.add_weight(
        "step", shape=[], dtype=tf.float32, trainable=False,
        initializer=tf.keras.initializers.Constant(self.step))
    super().build(input_shape)

  def call(self, inputs):
    if self.implementation == "round":
      q = tf.cast(self.step_variable, inputs.dtype)
      return ops.round_quantize(inputs, q, self.lo, self.hi)
    return _fake_quant(inputs, self.step, self.lo, self.hi)

  def get_config(self):
    config = super().get_config()
    config.update(step=self.step, lo=self.lo, hi=self.hi,
                  implementation=self.implementation)
    return config


# -----------------------------------------------------------------------------
# The export plan: the inference model and what it holds.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportedKernel:
  """A CDL kernel as the inference model holds it: `indices * step`.

  Attributes:
    layer: the inference model's layer name (the float layer's name).
    layer_type: "conv1d", "conv2d", "depthwise", "dense" or "other".
    source: the `QuantizedValue` name it comes from.
    indices: int32 indices in the Keras kernel layout; equal to the CDL
      indices, except negated in channels a BatchNorm with `gamma < 0` was
      folded into.
    step: float32 positive step per output channel (`[C_out]`), or a scalar
      when one step serves the whole kernel.
    bias: the layer's float32 bias after folding, or None.
    folded: whether a BatchNorm was folded into it.
    kernel: the float32 kernel set in the inference model
      (`step * indices`, per output channel).
  """
  layer: str
  layer_type: str
  source: str
  indices: np.ndarray
  step: np.ndarray
  bias: Optional[np.ndarray]
  folded: bool
  kernel: np.ndarray


@dataclasses.dataclass(frozen=True)
class ExportedActivation:
  """A CDL activation quantizer as the inference model holds it.

  Attributes:
    layer: the `RoundQuantize` layer's name in the inference model.
    source: the `QuantizedValue` name it comes from.
    step: float32 step size.
    lo, hi: the index range.
  """
  layer: str
  source: str
  step: np.float32
  lo: int
  hi: int

  @property
  def signed(self):
    return self.lo < 0


@dataclasses.dataclass(frozen=True)
class ExportPlan:
  """`export_plan`'s result: the inference model and its CDL tensors."""
  model: tf.keras.Model
  kernels: list
  activations: list
  folded_batch_norms: list
  # Kernel layer name -> (the CDL model's inner layer, its folded BatchNorm
  # or None): where `snap_biases` writes.
  owners: dict = dataclasses.field(default_factory=dict)


def _layer_type(layer):
  if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
    return "depthwise"
  if isinstance(layer, _NOT_FOLDABLE):
    return "other"
  if isinstance(layer, tf.keras.layers.Conv2D):
    return "conv2d"
  if isinstance(layer, tf.keras.layers.Conv1D):
    return "conv1d"
  if isinstance(layer, tf.keras.layers.Dense):
    return "dense"
  return "other"


def _is_graph_model(model):
  return isinstance(model, tf.keras.Sequential) or getattr(
      model, "_is_graph_network", False)


def _model_nodes(model):
  """The model's non-input nodes, inputs before consumers."""
  nodes = []
  for depth in sorted(model._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
    nodes.extend(n for n in model._nodes_by_depth[depth] if not n.is_input)  # pylint: disable=protected-access
  return nodes


def _is_linear(layer):
  activation = getattr(layer, "activation", None)
  return activation is None or activation is tf.keras.activations.linear or (
      getattr(activation, "__name__", None) == "linear")


def _channels_last(layer):
  return getattr(layer, "data_format", "channels_last") == "channels_last"


def _batch_norm_axis_is_last(bn, rank):
  axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
  return len(axes) == 1 and axes[0] % rank == rank - 1


def _folds(model, nodes, records_by_layer):
  """`{id(wrapper): bn}` for BatchNorms that fold into the preceding kernel."""
  consumers = collections.Counter()
  for node in nodes:
    for tensor in node.keras_inputs:
      consumers[id(tensor)] += 1
  outputs = {id(t) for t in model.outputs}
  # Calls per layer in this model (tfmot reuses unwrapped layers across the
  # models it clones, so `layer._inbound_nodes` also counts other models).
  calls = collections.Counter(id(node.layer) for node in nodes)
  folds = {}
  for node in nodes:
    bn = node.layer
    if not isinstance(bn, tf.keras.layers.BatchNormalization) or calls[
        id(bn)] != 1 or len(node.keras_inputs) != 1:
      continue
    tensor = node.keras_inputs[0]
    wrapper = tensor._keras_history.layer  # pylint: disable=protected-access
    records = records_by_layer.get(id(wrapper), [])
    weights = [r for r in records if r.kind == "weight"]
    if (not isinstance(wrapper, _QuantizeWrapper) or len(weights) != 1 or
        len(records) != 1 or calls[id(wrapper)] != 1):
      continue
    inner = wrapper.layer
    if (not isinstance(inner, _FOLDABLE) or isinstance(inner, _NOT_FOLDABLE)
        or not _is_linear(inner) or not _channels_last(inner) or
        weights[0].name.split("/")[-1] not in ("kernel", "depthwise_kernel")):
      continue
    rank = tensor.shape.rank
    if rank is None or not _batch_norm_axis_is_last(bn, rank):
      continue
    if consumers[id(tensor)] != 1 or id(tensor) in outputs:
      continue
    folds[id(wrapper)] = bn
  return folds


def _batch_norm_scale_shift(bn):
  """`(s, t)` in float64 with `bn(x) = s x + t` in inference."""
  weights = {w.name.split("/")[-1].split(":")[0]: w.numpy().astype(np.float64)
             for w in bn.weights}
  mean = weights["moving_mean"]
  var = weights["moving_variance"]
  gamma = weights.get("gamma", np.ones_like(mean))
  beta = weights.get("beta", np.zeros_like(mean))
  s = gamma / np.sqrt(var + float(bn.epsilon))
  return s, beta - s * mean


def _per_output_channel(step, value_axis, kernel_shape, layer_type, name):
  """The step per output channel (float32 `[C_out]`) of a kernel's CDL step.

  Depthwise kernels `[kh, kw, C, m]` have `C * m` output channels, channel
  `c * m + j` using `[..., c, j]`.
  """
  step = np.asarray(step, np.float32)
  rank = len(kernel_shape)
  if layer_type == "depthwise":
    channels, multiplier = kernel_shape[-2], kernel_shape[-1]
    if step.ndim == 0:
      return np.full([channels * multiplier], step, np.float32)
    if value_axis == rank - 2:
      return np.repeat(step, multiplier)
    if value_axis == rank - 1:
      return np.tile(step, channels)
  else:
    if step.ndim == 0:
      return np.full([kernel_shape[-1]], step, np.float32)
    if value_axis == rank - 1:
      return step
  raise ValueError(
      f"Layer {name}: per-channel steps along kernel axis {value_axis} of "
      f"shape {tuple(kernel_shape)} are not per output channel; export needs "
      "one step per output channel (or one per tensor).")


def _channels_to_kernel(values, kernel_shape, layer_type):
  """Reshapes a per-output-channel vector to broadcast against the kernel."""
  if layer_type == "depthwise":
    return values.reshape([1] * (len(kernel_shape) - 2) + list(
        kernel_shape[-2:]))
  return values.reshape([1] * (len(kernel_shape) - 1) + [-1])


def _exported_kernel(inner, record, value, bn):
  """Kernel values for the inference layer and its `ExportedKernel`."""
  layer_type = _layer_type(inner)
  indices = value.indices.astype(np.int32)
  shape = indices.shape
  bias = None
  if getattr(inner, "use_bias", False) and getattr(inner, "bias",
                                                   None) is not None:
    bias = inner.bias.numpy().astype(np.float32)
  if bn is None:
    kernel = value.dequantized()
    step = np.asarray(value.step, np.float32)
    if step.ndim and layer_type != "other":
      step = _per_output_channel(step, value.channel_axis, shape, layer_type,
                                 inner.name)
    return kernel, ExportedKernel(inner.name, layer_type, record.name,
                                  indices, step, bias, False, kernel)
  q = _per_output_channel(value.step, value.channel_axis, shape, layer_type,
                          inner.name)
  s, t = _batch_norm_scale_shift(bn)
  folded = (q.astype(np.float64) * s).astype(np.float32)
  sign = np.where(folded < 0, -1, 1).astype(np.int32)
  step = np.abs(folded)
  indices = indices * _channels_to_kernel(sign, shape, layer_type)
  kernel = (_channels_to_kernel(step, shape, layer_type) *
            indices.astype(np.float32)).astype(np.float32)
  old_bias = np.zeros_like(t) if bias is None else bias.astype(np.float64)
  bias = (s * old_bias + t).astype(np.float32)
  return kernel, ExportedKernel(inner.name, layer_type, record.name, indices,
                                step, bias, True, kernel)


def _new_input(tensor):
  layer = tensor._keras_history.layer  # pylint: disable=protected-access
  return tf.keras.Input(shape=tensor.shape[1:], batch_size=tensor.shape[0],
                        dtype=tensor.dtype, name=layer.name)


def _map_structure(structure, table):
  flat = tf.nest.flatten(structure)
  flat = [table[id(t)] if id(t) in table else t for t in flat]
  return tf.nest.pack_sequence_as(structure, flat)


def _has_cdl(layer):
  try:
    return bool(introspect.quantized_tensors(layer))
  except AttributeError:
    return False


def _clone(layer):
  return layer.__class__.from_config(layer.get_config())


class _Builder:
  """Replays a CDL model's graph with float layers and `RoundQuantize`."""

  def __init__(self, model, values, fold_batch_norm, implementation):
    self.model = model
    self.records = _records(model)
    if not _is_graph_model(model):
      raise ValueError(
          "`model` must be a Sequential or Functional model (what "
          "keras_cdl.quantize_model returns), but got the subclassed model "
          f"{type(model).__name__}; export replays the layer graph.")
    self.values = _check_values(values, self.records)
    self.implementation = implementation
    self.by_layer = collections.defaultdict(list)
    for record in self.records:
      self.by_layer[id(record.layer)].append(record)
    self.nodes = _model_nodes(model)
    self.folds = _folds(model, self.nodes,
                        self.by_layer) if fold_batch_norm else {}
    self.folded_bns = {id(bn) for bn in self.folds.values()}
    self.layers = {}  # id(old layer) -> (new layer, quantize layer or None)
    self.pending_weights = []
    self.kernels = []
    self.activations = []
    self.owners = {}

  def value(self, record):
    return self.values.get(record.name) or _value_of(record)

  def activation_layer(self, record, name):
    value = self.value(record)
    lo, hi = ops.index_range(record.quantizer.bits, record.quantizer.signed)
    step = np.float32(np.asarray(value.step).reshape(()))
    layer = RoundQuantize(step, lo, hi, self.implementation, name=name)
    self.activations.append(ExportedActivation(name, record.name, step, lo,
                                               hi))
    return layer

  def convert(self, layer):
    """`(new_layer, quantize_layer_or_None)` for an original layer."""
    if id(layer) in self.layers:
      return self.layers[id(layer)]
    records = self.by_layer.get(id(layer), [])
    if isinstance(layer, _QuantizeLayer):
      if not records:
        raise ValueError(f"Layer {layer.name} is a tfmot QuantizeLayer "
                         "without a CDL quantizer; export supports only "
                         "keras_cdl quantizers.")
      result = (None, self.activation_layer(records[0], layer.name))
    elif isinstance(layer, _QuantizeWrapper):
      result = self.convert_wrapper(layer, records)
    else:
      if _has_cdl(layer) if isinstance(layer, tf.keras.Model) else records:
        raise ValueError(f"Layer {layer.name} ({type(layer).__name__}) holds "
                         "CDL quantizers inside a nested model; export needs "
                         "them at the top level (quantize the flat model).")
      new = _clone(layer)
      if layer.weights and id(layer) not in self.folded_bns:
        self.pending_weights.append((new, layer.get_weights()))
      result = (new, None)
    self.layers[id(layer)] = result
    return result

  def convert_wrapper(self, wrapper, records):
    inner = wrapper.layer
    for quantizer in getattr(wrapper, "_output_quantizers", []):
      if not isinstance(quantizer, quantizers_lib.CDLQuantizer):
        raise ValueError(f"Layer {wrapper.name} has a non-CDL output "
                         f"quantizer ({type(quantizer).__name__}); export "
                         "supports only keras_cdl quantizers.")
    for _, quantizer, _ in getattr(wrapper, "_weight_vars", []):
      if not isinstance(quantizer, quantizers_lib.CDLQuantizer):
        raise ValueError(f"Layer {wrapper.name} has a non-CDL weight "
                         f"quantizer ({type(quantizer).__name__}); export "
                         "supports only keras_cdl quantizers.")
    config = inner.get_config()
    bn = self.folds.get(id(wrapper))
    if bn is not None and "use_bias" in config:
      config["use_bias"] = True
    new = inner.__class__.from_config(config)
    weights = {}  # attribute name -> value
    for name in ("kernel", "depthwise_kernel", "bias"):
      variable = getattr(inner, name, None)
      if isinstance(variable, tf.Variable):
        weights[name] = variable.numpy()
    others = [w for w in inner.weights]
    for record in records:
      if record.kind != "weight":
        continue
      attr = record.name.split("/")[-1]
      kernel, exported = _exported_kernel(inner, record, self.value(record),
                                          bn)
      weights[attr] = kernel
      if exported.bias is not None:
        weights["bias"] = exported.bias
      self.kernels.append(exported)
      self.owners[exported.layer] = (inner, bn)
    self.pending_weights.append((new, (inner, weights, others)))
    outputs = [r for r in records if r.kind == "activation"]
    quant = None
    if outputs:
      quant = self.activation_layer(outputs[0], f"{inner.name}_quantize")
    return new, quant

  def set_weights(self):
    for new, weights in self.pending_weights:
      if isinstance(weights, list):
        new.set_weights(weights)
        continue
      inner, by_attr, others = weights
      values = []
      for variable in new.weights:
        attr = variable.name.split("/")[-1].split(":")[0]
        if attr in by_attr:
          values.append(by_attr[attr])
          continue
        match = [w for w in others
                 if w.name.split("/")[-1] == variable.name.split("/")[-1]]
        if len(match) != 1:
          raise ValueError(f"Cannot find weight {variable.name} of layer "
                           f"{inner.name} in the CDL model.")
        values.append(match[0].numpy())
      new.set_weights(values)

  def build(self):
    model = self.model
    table = {}
    inputs = []
    for tensor in model.inputs:
      new = _new_input(tensor)
      table[id(tensor)] = new
      inputs.append(new)
    for node in self.nodes:
      layer = node.layer
      args, kwargs = _map_structure((node.call_args, node.call_kwargs), table)
      kwargs = {k: v for k, v in kwargs.items() if k != "training"}
      if id(layer) in self.folded_bns:
        outputs = args[0]
      else:
        new, quant = self.convert(layer)
        outputs = args[0] if new is None else new(*args, **kwargs)
        if quant is not None:
          outputs = quant(outputs)
      for old, y in zip(tf.nest.flatten(node.outputs),
                        tf.nest.flatten(outputs)):
        table[id(old)] = y
    outputs = _map_structure(model.outputs, table)
    if len(outputs) == 1:
      outputs = outputs[0]
    if len(inputs) == 1:
      inputs = inputs[0]
    result = tf.keras.Model(inputs, outputs, name=f"{model.name}_inference")
    self.set_weights()
    folded = [bn.name for bn in self.folds.values()]
    return ExportPlan(result, self.kernels, self.activations, folded,
                      self.owners)


def export_plan(model, *, fold_batch_norm=True, values=None,
                implementation="round"):
  """Builds the inference model and lists the CDL tensors it holds.

  Args:
    model: a Functional or Sequential CDL model (`keras_cdl.quantize_model`).
    fold_batch_norm: fold each BatchNorm that follows a quantized kernel
      without activation into that kernel's per-channel step and bias.
    values: optional `QuantizedValue`s (a list, or a dict by name) to use
      instead of the model's own indices and steps, e.g. decoded from a
      `.cdl` file; tensors not named keep the model's values.
    implementation: "round" (exact) or "fake_quant" (for TFLite) for the
      activation quantizers; see `RoundQuantize`.

  Returns:
    An `ExportPlan`: `model` (the float Keras model), `kernels`
    (`ExportedKernel`s), `activations` (`ExportedActivation`s, the input
    first), `folded_batch_norms` (names).

  Raises:
    ValueError: `model` is not a Keras graph model, has no CDL quantizers,
      or `values` does not fit it.
  """
  if not isinstance(fold_batch_norm, bool):
    raise ValueError("`fold_batch_norm` must be a bool, but got "
                     f"{fold_batch_norm!r}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, "
                     f"but got {implementation!r}.")
  return _Builder(model, values, fold_batch_norm, implementation).build()


def inference_model(model, *, fold_batch_norm=True, values=None):
  """A plain float Keras model computing `model(x, training=False)`.

  Kernels are `q * i` (no tfmot wrappers), each CDL activation quantizer is a
  `RoundQuantize` layer, the rest (BatchNorm, pooling, `Add`, `Flatten`,
  `Dropout`, unquantized logits) is copied.  Without BatchNorm folding the
  outputs are bitwise equal to the CDL model's; a folded BatchNorm changes
  float rounding only (see the module docstring).

  Args:
    model: a Functional or Sequential CDL model (`keras_cdl.quantize_model`).
    fold_batch_norm: fold BatchNorm into the preceding quantized kernel
      (indices unchanged, one step per output channel).
    values: optional `QuantizedValue`s replacing the model's indices and steps.

  Returns:
    A `tf.keras.Model` named `<model>_inference`.
  """
  return export_plan(model, fold_batch_norm=fold_batch_norm,
                     values=values).model


# -----------------------------------------------------------------------------
# SavedModel.
# -----------------------------------------------------------------------------
def _check_path(path, name, directory_ok):
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise ValueError(f"`{name}` must be a non-empty path, but got {path!r}.")
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise ValueError(f"`{name}`: the directory {parent!r} does not exist "
                     f"(got {path!r}).")
  if directory_ok:
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f"`{name}` must be a directory, but {path!r} is a "
                       "file.")
  elif os.path.isdir(path):
    raise ValueError(f"`{name}` must be a file path, but {path!r} is a "
                     "directory.")
  return path


def _float_layer_name(model, name):
  """The name of output layer `name` before tfmot wrapped it."""
  layer = model.get_layer(name)
  return layer.layer.name if isinstance(layer, _QuantizeWrapper) else name


def to_saved_model(model, export_dir, *, fold_batch_norm=True):
  """Saves `inference_model(model)` as a SavedModel with `serving_default`.

  The signature takes the model's inputs under their input layer names and
  returns `{output name: tensor}`, named after the float model's output
  layers (tfmot's `quant_` wrappers unwrapped: `logits`, not `quant_logits`).

  Args:
    model: a Functional or Sequential CDL model.
    export_dir: the SavedModel directory (created if needed).
    fold_batch_norm: as for `inference_model`.

  Returns:
    The inference model that was saved.
  """
  export_dir = _check_path(export_dir, "export_dir", directory_ok=True)
  infer = inference_model(model, fold_batch_norm=fold_batch_norm)
  specs = [tf.TensorSpec([None] + list(t.shape[1:]), t.dtype,
                         name=name)
           for t, name in zip(infer.inputs, infer.input_names)]
  output_names = [_float_layer_name(model, name) for name in model.output_names]

  @tf.function(input_signature=specs)
  def serve(*inputs):
    outputs = infer(inputs[0] if len(inputs) == 1 else list(inputs),
                    training=False)
    return dict(zip(output_names, tf.nest.flatten(outputs)))

  module = tf.Module()
  module.model = infer
  module.serve = serve
  tf.saved_model.save(module, export_dir,
                      signatures={"serving_default": serve})
  return infer


# -----------------------------------------------------------------------------
# TFLite.
# -----------------------------------------------------------------------------
def _representative_dataset(data, model):
  """The converter's `representative_dataset` callable for `data`."""
  if callable(data):
    return data
  arrays = data if isinstance(data, (list, tuple)) else [data]
  arrays = [np.asarray(a, dtype=t.dtype.as_numpy_dtype)
            for a, t in zip(arrays, model.inputs)]
  if len(arrays) != len(model.inputs):
    raise ValueError(f"`representative_data` must hold {len(model.inputs)} "
                     f"arrays (one per model input), but got {len(arrays)}.")
  count = None
  for array, tensor in zip(arrays, model.inputs):
    expected = tuple(tensor.shape[1:])
    if array.ndim != len(expected) + 1 or any(
        e is not None and e != a for e, a in zip(expected, array.shape[1:])):
      raise ValueError(
          f"`representative_data` must be a batch of inputs of shape "
          f"(N,) + {expected}, but got shape {array.shape}.")
    if count is not None and array.shape[0] != count:
      raise ValueError("`representative_data` arrays must have the same "
                       "number of samples.")
    count = array.shape[0]
  if not count:
    raise ValueError("`representative_data` must hold at least one sample.")

  def generate():
    for i in range(count):
      yield [a[i:i + 1] for a in arrays]

  return generate


_CONV_2D = 3
_DEPTHWISE_CONV_2D = 4
_FULLY_CONNECTED = 9
_KERNEL_OPS = {_CONV_2D: ("conv2d", "conv1d"),
               _DEPTHWISE_CONV_2D: ("depthwise",),
               _FULLY_CONNECTED: ("dense",)}


def _tflite_layout(kernel, layer_type):
  """A Keras kernel in TFLite's weight layout."""
  if layer_type == "conv2d":  # [kh, kw, in, out] -> [out, kh, kw, in]
    return np.transpose(kernel, (3, 0, 1, 2))
  if layer_type == "conv1d":  # [k, in, out] -> [out, 1, k, in]
    return np.transpose(kernel, (2, 0, 1))[:, None]
  if layer_type == "depthwise":  # [kh, kw, c, m] -> [1, kh, kw, c * m]
    return kernel.reshape((1,) + kernel.shape[:2] + (-1,))
  if layer_type == "dense":  # [in, out] -> [out, in]
    return np.transpose(kernel)
  raise ValueError(f"No TFLite layout for {layer_type}.")


def _tflite_axis(layer_type):
  return 3 if layer_type == "depthwise" else 0


def _buffer_users(subgraphs):
  users = collections.Counter()
  for subgraph in subgraphs:
    for tensor in subgraph.tensors:
      users[tensor.buffer] += 1
  return users


def _set_data(fb_model, tensor, array, users, schema):
  """Writes `array`'s bytes as `tensor`'s buffer (a new one if shared)."""
  data = np.frombuffer(np.ascontiguousarray(
      array, dtype=array.dtype.newbyteorder("<")).tobytes(), np.uint8)
  if users[tensor.buffer] > 1:
    buffer = schema.BufferT()
    fb_model.buffers.append(buffer)
    users[tensor.buffer] -= 1
    tensor.buffer = len(fb_model.buffers) - 1
    users[tensor.buffer] += 1
  fb_model.buffers[tensor.buffer].data = data


def _quantization(scale, axis, schema):
  params = schema.QuantizationParametersT()
  params.scale = [float(s) for s in np.atleast_1d(scale)]
  params.zeroPoint = [0] * len(params.scale)
  params.quantizedDimension = int(axis)
  return params


def _int8_values(fb_model, tensor):
  data = fb_model.buffers[tensor.buffer].data
  if data is None:
    return None
  return np.frombuffer(np.asarray(data, np.uint8).tobytes(),
                       np.int8).reshape(tensor.shape)


def _dequantized_weights(fb_model, tensor):
  values = _int8_values(fb_model, tensor)
  if values is None or tensor.quantization is None or (
      tensor.quantization.scale is None):
    return None
  scale = np.asarray(tensor.quantization.scale, np.float64)
  if scale.size > 1:
    shape = [1] * values.ndim
    shape[tensor.quantization.quantizedDimension] = -1
    scale = scale.reshape(shape)
  return values * scale, float(np.max(scale))


def index_shift(indices):
  """Largest `k >= 0` with `max|i| 2^k <= 127`: the kernel's int8 headroom.

  `to_tflite` stores `i 2^k` with scale `q / 2^k` (the same weights, exactly:
  powers of two scale float32 without rounding).  TFLite requantizes a
  conv/dense output by `M = q_x q_w / q_out = M_0 2^-r` in two roundings,
  first to `2^-r` of an output level; dividing `q_w` by `2^k` adds `k` to
  `r`, so that first rounding is `2^k` times finer.  (4-bit kernels, `|i| <=
  7`, get `k = 4`; a LeNet5 at 4-bit input and weights had `r = 2`: 8% of its
  first conv's output indices differed from the CDL model's, 0.6% with the
  shift.)
  """
  top = int(np.max(np.abs(indices), initial=0))
  if top == 0:
    return 0
  return max(0, int(np.floor(np.log2(127.0 / top))))


def _stored_scale(indices, step, shift_indices):
  """`(k, q / 2^k)`: the index shift and the scale `to_tflite` stores."""
  shift = index_shift(indices) if shift_indices else 0
  return shift, np.asarray(step, np.float32) / np.float32(2**shift)


def bias_grid(input_step, step):
  """TFLite's int32 bias scale of a kernel: `float32(input_step * step)`.

  `step` is the kernel's scale as stored (`q / 2^k`, one per channel or
  one); the bias is stored as `round(b / grid)` at this scale.
  """
  return (np.float64(np.float32(input_step)) *
          np.asarray(step, np.float32).astype(np.float64)).astype(np.float32)


# Layers whose int8 output keeps its input's scale and zero point, so a
# kernel behind them reads the CDL step of the quantizer before them.
_SAME_SCALE = (tf.keras.layers.Flatten, tf.keras.layers.Reshape,
               tf.keras.layers.Dropout, tf.keras.layers.MaxPooling1D,
               tf.keras.layers.MaxPooling2D, tf.keras.layers.MaxPooling3D,
               tf.keras.layers.ZeroPadding1D, tf.keras.layers.ZeroPadding2D,
               tf.keras.layers.Cropping1D, tf.keras.layers.Cropping2D,
               tf.keras.layers.Permute)


def _input_step(model, name):
  """The CDL step of kernel layer `name`'s input in inference `model`, or None.

  None when the input is not a CDL activation (behind only `_SAME_SCALE`
  layers): the converter then calibrates the input's scale itself.
  """
  layer = model.get_layer(name)
  while True:
    nodes = layer._inbound_nodes  # pylint: disable=protected-access
    if len(nodes) != 1 or len(tf.nest.flatten(nodes[0].input_tensors)) != 1:
      return None
    layer = tf.nest.flatten(nodes[0].input_tensors)[0]._keras_history.layer  # pylint: disable=protected-access
    if isinstance(layer, RoundQuantize):
      return np.float32(layer.step)
    if not isinstance(layer, _SAME_SCALE):
      return None


def snap_biases(model, *, fold_batch_norm=True, shift_indices=True):
  """Moves each quantized kernel's bias onto TFLite's int32 bias grid, in place.

  TFLite adds `round(b / g)` to the integer sum `sum i_x i_w`, with the grid
  `g = q_x q_w / 2^k` (`bias_grid`; `k = index_shift(i)` with
  `shift_indices`), then requantizes.  The CDL model adds `b` itself, so a
  sum within `|b - g round(b / g)| <= g / 2` of a rounding boundary of the
  next quantizer lands on another level than TFLite's.  This sets

      b <- g round(b / g)

  (for a BatchNorm that `to_tflite` folds into the kernel: its `beta`, or
  the kernel's bias, or its moving mean, so that the folded bias is
  `g round(b' / g)`), after which `model(x, training=False)` adds exactly
  the bias TFLite stores.  The move is at most half a grid step, a few
  thousandths of an output level for 4-bit kernels (`g / q_out` is
  `q_x q_w / q_out / 2^k`).  With TFLite's XNNPACK kernels (the Python
  interpreter's default), which requantize with one float rounding, the
  int8 outputs then equal the CDL model's except where float rounding puts
  a sum within ~1e-6 of a level's boundary.

  Call it when training is done, before `keras_cdl.compress` and
  `to_tflite` (with the same `fold_batch_norm` and `shift_indices`), so the
  `.cdl` file, the TFLite model and `model` compute one function.  Further
  training moves the biases off the grid again.

  Args:
    model: a Functional or Sequential CDL model (`keras_cdl.quantize_model`).
    fold_batch_norm: as in `to_tflite`.
    shift_indices: as in `to_tflite`.

  Returns:
    `{layer name: largest move in grid steps}` for each bias it set; kernels
    whose input is not a CDL activation (its scale is calibrated by the
    converter) or that have no bias are left out.
  """
  if not isinstance(shift_indices, bool):
    raise ValueError(f"`shift_indices` must be a bool, but got "
                     f"{shift_indices!r}.")
  plan = export_plan(model, fold_batch_norm=fold_batch_norm)
  moved = {}
  for kernel in plan.kernels:
    input_step = _input_step(plan.model, kernel.layer)
    inner, bn = plan.owners[kernel.layer]
    if input_step is None or kernel.bias is None:
      continue
    _, step = _stored_scale(kernel.indices, kernel.step, shift_indices)
    grid = bias_grid(input_step, step).astype(np.float64)
    bias = kernel.bias.astype(np.float64)
    delta = np.round(bias / grid) * grid - bias
    if bn is None:
      _add(inner.bias, delta)
    elif bn.center:
      _add(bn.beta, delta)
    else:
      scale, _ = _batch_norm_scale_shift(bn)
      # A channel with scale 0 has the folded bias 0 (no beta): on the grid.
      per_scale = np.divide(delta, scale, out=np.zeros_like(delta),
                            where=scale != 0)
      if getattr(inner, "bias", None) is not None:
        _add(inner.bias, per_scale)
      else:
        _add(bn.moving_mean, -per_scale)
    moved[kernel.layer] = float(np.max(np.abs(delta / grid), initial=0.0))
  return moved


def _add(variable, delta):
  value = variable.numpy().astype(np.float64) + np.broadcast_to(
      delta, variable.shape)
  variable.assign(value.astype(variable.dtype.as_numpy_dtype))


def _rewrite_kernels(tflite_bytes, kernels, shift_indices=True):
  """Writes the CDL indices, steps and re-quantized biases into the flatbuffer."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.python import schema_util  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top

  fb_model = flatbuffer_utils.convert_bytearray_to_object(
      bytearray(tflite_bytes))
  users = _buffer_users(fb_model.subgraphs)
  todo = {id(k): k for k in kernels}
  for subgraph in fb_model.subgraphs:
    for op in subgraph.operators:
      code = schema_util.get_builtin_code_from_operator_code(
          fb_model.operatorCodes[op.opcodeIndex])
      if code not in _KERNEL_OPS or len(op.inputs) < 2:
        continue
      weights = subgraph.tensors[op.inputs[1]]
      found = _dequantized_weights(fb_model, weights)
      if found is None:
        continue
      dequantized, max_scale = found
      best, best_error = None, None
      for kernel in todo.values():
        if kernel.layer_type not in _KERNEL_OPS[code]:
          continue
        expected = _tflite_layout(kernel.kernel, kernel.layer_type)
        if expected.shape != dequantized.shape:
          continue
        error = float(np.max(np.abs(dequantized - expected))) / max_scale
        if error <= 0.5 + 1e-3 and (best is None or error < best_error):
          best, best_error = kernel, error
      if best is None:
        continue
      del todo[id(best)]
      _write_kernel(fb_model, subgraph, op, best, users, schema,
                    shift_indices)
  if todo:
    names = sorted(k.layer for k in todo.values())
    raise RuntimeError(
        f"to_tflite: the converted model has no weight tensor matching the "
        f"CDL kernel(s) of {names}: the converter changed them (e.g. fused a "
        "following BatchNorm or scale that keras_cdl could not fold), so "
        "their int8 weights cannot be the CDL indices.")
  return flatbuffer_utils.convert_object_to_bytearray(fb_model)


def _write_kernel(fb_model, subgraph, op, kernel, users, schema,
                  shift_indices):
  weights = subgraph.tensors[op.inputs[1]]
  indices = _tflite_layout(kernel.indices, kernel.layer_type)
  if np.abs(indices).max(initial=0) > 127:
    raise RuntimeError(f"to_tflite: {kernel.layer} has indices beyond int8.")
  axis = _tflite_axis(kernel.layer_type)
  shift, step = _stored_scale(indices, kernel.step, shift_indices)
  indices = indices.astype(np.int32) * (1 << shift)
  channels = indices.shape[axis]
  old_scales = np.asarray(weights.quantization.scale, np.float32)
  if step.ndim == 0 and old_scales.size == channels:
    step = np.full([channels], step, np.float32)
  _set_data(fb_model, weights, indices.astype(np.int8), users, schema)
  weights.quantization = _quantization(step, axis, schema)
  if len(op.inputs) < 3 or op.inputs[2] < 0:
    return
  bias = subgraph.tensors[op.inputs[2]]
  source = subgraph.tensors[op.inputs[0]]
  input_scale = np.float32(source.quantization.scale[0])
  old = np.frombuffer(np.asarray(fb_model.buffers[bias.buffer].data,
                                 np.uint8).tobytes(), "<i4").astype(np.float64)
  old_float = old * np.asarray(bias.quantization.scale, np.float64)
  float_bias = kernel.bias
  if float_bias is None or float_bias.shape != old_float.shape or np.any(
      np.abs(float_bias - old_float) > np.asarray(
          bias.quantization.scale, np.float64) * 1.01 + 1e-12):
    float_bias = old_float  # Something was fused into the bias: keep it.
  # One bias scale per weight scale: TFLite reads a per-tensor weight's
  # bias scale from its single-scale parameters (a per-channel bias scale
  # there reads as 0 and fails `scale_diff / output_scale <= 0.02`).
  bias_scale = bias_grid(input_scale, step)
  quantized = np.round(np.asarray(float_bias, np.float64) /
                       np.broadcast_to(bias_scale, old_float.shape))
  if np.any(np.abs(quantized) > 2**31 - 1):
    raise RuntimeError(f"to_tflite: the bias of {kernel.layer} overflows "
                       "int32 at scale input_scale * step.")
  _set_data(fb_model, bias, quantized.astype("<i4"), users, schema)
  bias.quantization = _quantization(bias_scale, 0, schema)


def _check_activation_scales(tflite_bytes, activations):
  """Raises unless each CDL step is some int8 tensor's (scale, zero point)."""
  interpreter = tf.lite.Interpreter(model_content=bytes(tflite_bytes))
  found = set()
  for detail in interpreter.get_tensor_details():
    params = detail["quantization_parameters"]
    if detail["dtype"] == np.int8 and len(params["scales"]) == 1:
      found.add((np.float32(params["scales"][0]),
                 int(params["zero_points"][0])))
  missing = [a.source for a in activations
             if (np.float32(a.step), 0 if a.signed else -128) not in found]
  if missing:
    raise RuntimeError(
        "to_tflite: the converter did not give the CDL step sizes of "
        f"{missing} to any int8 tensor; the TFLite activations would not be "
        "the CDL levels.")


def to_tflite(model, path, representative_data, *, io_type="float32",
              fold_batch_norm=True, shift_indices=True):
  """Writes a full-integer int8 TFLite model whose weights are the CDL indices.

  See the module docstring for what is exact.  The input is quantized with
  the CDL input step: with `io_type="int8"` the model takes the int8 input
  index minus 128 (unsigned input quantizer, zero point -128) or the index
  (signed) and returns int8 logits (at the CDL output step when
  `quantize_model` quantized them, else at a calibrated scale); with
  `io_type="float32"` (the default) it takes and returns float32, and the
  interpreter quantizes the input itself (rounding ties away from zero).

  Args:
    model: a Functional or Sequential CDL model.
    path: where to write the `.tflite` file (its directory must exist), or
      None to only return the bytes.
    representative_data: a batch of inputs (an array, or a list of arrays for
      several inputs) or the converter's generator callable; calibrates the
      tensors CDL leaves in float (unfolded BatchNorm, `Add`, float logits).
      A few hundred samples are plenty.
    io_type: "float32" or "int8" model input and output.
    fold_batch_norm: fold BatchNorm into the preceding kernel (required for
      exact weights when a BatchNorm directly follows a quantized kernel:
      unfolded, the converter folds it itself with its own scales).
    shift_indices: store each kernel as `i 2^k` at scale `q / 2^k`, `k =
      index_shift(i)` (the same weights exactly; TFLite's requantization
      rounds finer); False stores the indices `i` at scale `q` themselves.

  Call `snap_biases(model)` (same `fold_batch_norm` and `shift_indices`)
  first if the file should compute exactly what `model(x, training=False)`
  computes; `to_tflite` itself leaves `model` unchanged.

  Returns:
    The TFLite flatbuffer as bytes.

  Raises:
    ValueError: bad arguments, or a model `inference_model` cannot export.
    RuntimeError: the converter produced a model in which the CDL weights or
      steps could not be set exactly.
  """
  if path is not None:
    path = _check_path(path, "path", directory_ok=False)
  if io_type not in IO_TYPES:
    raise ValueError(f"`io_type` must be one of {IO_TYPES}, but got "
                     f"{io_type!r}.")
  if not isinstance(shift_indices, bool):
    raise ValueError(f"`shift_indices` must be a bool, but got "
                     f"{shift_indices!r}.")
  plan = export_plan(model, fold_batch_norm=fold_batch_norm,
                     implementation="fake_quant")
  unsupported = [k.layer for k in plan.kernels if k.layer_type == "other"]
  if unsupported:
    raise ValueError(f"to_tflite supports CDL kernels of Conv1D, Conv2D, "
                     f"DepthwiseConv2D and Dense layers, not {unsupported}.")
  dataset = _representative_dataset(representative_data, plan.model)
  converter = tf.lite.TFLiteConverter.from_keras_model(plan.model)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = dataset
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  dtype = tf.int8 if io_type == "int8" else tf.float32
  converter.inference_input_type = dtype
  converter.inference_output_type = dtype
  tflite_bytes = _rewrite_kernels(converter.convert(), plan.kernels,
                                  shift_indices)
  _check_activation_scales(tflite_bytes, plan.activations)
  if path is not None:
    with open(path, "wb") as f:
      f.write(tflite_bytes)
  return bytes(tflite_bytes)


KERNELS = ("default", "builtin")


def run_tflite(tflite, x, *, batch_size=1000, kernels="default"):
  """Runs a single-input TFLite model on `x` in batches; returns its output.

  Args:
    tflite: the flatbuffer (bytes) or the path of a `.tflite` file.
    x: a NumPy array of inputs in the model's input dtype, batch first.
    batch_size: images per `invoke`.
    kernels: "default" (the Python interpreter's default: XNNPACK kernels
      where they apply, one float rounding per requantization) or "builtin"
      (`OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`: TFLite's own
      optimized kernels, fixed-point requantization with two roundings, as
      on devices without XNNPACK).

  Returns:
    The concatenated output of the model's first output, as a NumPy array.
  """
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, int) or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive integer, but got "
                     f"{batch_size!r}.")
  if kernels not in KERNELS:
    raise ValueError(f"`kernels` must be one of {KERNELS}, but got "
                     f"{kernels!r}.")
  resolver = tf.lite.experimental.OpResolverType
  options = {} if kernels == "default" else dict(
      experimental_op_resolver_type=(
          resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
  if isinstance(tflite, (bytes, bytearray)):
    interpreter = tf.lite.Interpreter(model_content=bytes(tflite), **options)
  else:
    interpreter = tf.lite.Interpreter(model_path=os.fspath(tflite), **options)
  x = np.asarray(x)
  if x.ndim == 0 or len(x) == 0:
    raise ValueError(f"`x` must be a batch of at least one sample, but got "
                     f"shape {x.shape}.")
  inputs = interpreter.get_input_details()
  if len(inputs) != 1:
    raise ValueError(f"run_tflite takes single-input models, but the model "
                     f"has {len(inputs)} inputs.")
  index = inputs[0]["index"]
  if x.dtype != inputs[0]["dtype"]:
    raise ValueError(f"`x` must have the model's input dtype "
                     f"{np.dtype(inputs[0]['dtype']).name}, but got "
                     f"{x.dtype.name}.")
  outputs, shape = [], None
  for start in range(0, len(x), batch_size):
    batch = x[start:start + batch_size]
    if batch.shape != shape:
      interpreter.resize_tensor_input(index, batch.shape)
      interpreter.allocate_tensors()
      shape = batch.shape
    interpreter.set_tensor(index, batch)
    interpreter.invoke()
    outputs.append(interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"]).copy())
  return np.concatenate(outputs)
