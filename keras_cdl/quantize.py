"""User functions: `quantize_model`, `quantize_annotate_layer`, `quantize_scope`.

```python
qmodel = keras_cdl.quantize_model(model, mode="rcdl", weight_bits=4,
                                  activation_bits=4, lmbda=0.3, gamma=0.005,
                                  calibration_data=x_train[:256])
qmodel.compile(optimizer="adam", loss=..., metrics=["accuracy"])
qmodel.fit(x, y)          # logs bits_per_weight and bits_per_activation
```

Rate weights.  The paper's objective is
`task + lambda sum_l N_l^w H_l^w + gamma sum_l N_l^x H_l^x` (total bits).
keras_cdl takes `lmbda` in loss units per bit per quantized weight and `gamma`
in loss units per bit per quantized activation element (of one sample):

```
loss = task + lmbda * (sum_l N_l^w H_l^w) / N^w + gamma * (sum_l N_l^x H_l^x) / N^x
```

with `N^w` (`N^x`) the model's quantized weight (activation) count, so one
`lmbda` means the same for a small and a large model.  The paper's lambda is
`lmbda / N^w`, and its gamma is `gamma / N^x`.
"""

import copy
import logging

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_annotate as quantize_annotate_mod

from keras_cdl import configs
from keras_cdl import introspect
from keras_cdl import model as model_lib
from keras_cdl import ops
from keras_cdl import quantizers
from keras_cdl import rate as rate_lib
from keras_cdl import scheme as scheme_lib

__all__ = [
    "quantize_model",
    "quantize_annotate_layer",
    "quantize_scope",
    "set_rate_weights",
    "initialize_step_sizes",
]

_QuantizeAnnotate = tfmot.quantization.keras.quantize_annotate_layer


def quantize_scope(*args):
  """Scope for loading keras_cdl models (`tf.keras.models.load_model`).

  Args:
    *args: extra `{name: class}` dicts, as for tfmot's `quantize_scope`.
  """
  objects = {
      "CDLQuantizer": quantizers.CDLQuantizer,
      "CDLWeightQuantizer": quantizers.CDLWeightQuantizer,
      "CDLActivationQuantizer": quantizers.CDLActivationQuantizer,
      "CDLQuantizeConfig": configs.CDLQuantizeConfig,
      "CDLModel": model_lib.CDLModel,
  }
  # keras_cdl.layers registers itself; import late to avoid a cycle.
  from keras_cdl import layers  # pylint: disable=g-import-not-at-top
  objects.update(layers.custom_objects())
  return tfmot.quantization.keras.quantize_scope(objects, *args)


def quantize_annotate_layer(layer, quantize_config=None):
  """Marks `layer` for quantization with a `CDLQuantizeConfig` of your choice.

  Use it to override `quantize_model`'s choice for one layer, e.g. 2-bit
  weights for a large Dense layer.  Layers annotated this way keep their
  config; `quantize_model` fills in the rest.
  """
  if quantize_config is not None and not isinstance(
      quantize_config, tfmot.quantization.keras.QuantizeConfig):
    raise ValueError("`quantize_config` must be a QuantizeConfig (e.g. "
                     "keras_cdl.CDLQuantizeConfig) or None, but got "
                     f"{type(quantize_config).__name__}.")
  return _QuantizeAnnotate(layer, quantize_config)


def _check_number(name, value, minimum=0.0):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not value >= minimum) or not np.isfinite(value):
    raise ValueError(
        f"`{name}` must be a finite number >= {minimum}, but got {value!r}.")
  return float(value)


def set_rate_weights(model, lmbda, gamma):
  """Sets every quantizer's `rate_weight` from `lmbda` and `gamma`.

  Weights get `lmbda / N^w`, activations `gamma / N^x` (see module docstring).
  Call again after changing either; it takes effect without recompiling.
  """
  lmbda = _check_number("lmbda", lmbda)
  gamma = _check_number("gamma", gamma)
  for name, items in model_lib.rate_bits(model).items():
    total = sum(n for _, n in items)
    coefficient = lmbda if name == "bits_per_weight" else gamma
    for record, _ in items:
      record.variables["rate_weight"].assign(coefficient / total)


def _calibration_outputs(float_model, layer_names, data):
  """Float outputs of the named layers of `float_model` on `data`."""
  outputs, names = [], []
  for name in layer_names:
    try:
      outputs.append(float_model.get_layer(name).output)
      names.append(name)
    except (ValueError, AttributeError):
      continue
  if not outputs:
    return {}
  probe = tf.keras.Model(float_model.inputs, outputs)
  values = probe(data, training=False)
  if len(names) == 1:
    values = [values]
  return {n: np.asarray(v) for n, v in zip(names, values)}


def _range_step(values, bits):
  """Signed step covering a tensor's range: `max|x| / hi`, `hi = 2^(b-1)-1`."""
  _, hi = ops.index_range(bits, True)
  step = float(np.max(np.abs(np.asarray(values, dtype=np.float64)))) / hi
  return np.asarray(step if step > 0 else 1e-3, dtype=np.float32)


def initialize_step_sizes(model, float_model=None, calibration_data=None):
  """Sets step sizes from statistics: `q = 2 mean|x| / sqrt(hi)` (LSQ rule).

  Signed layer outputs (the logits `output_bits` quantizes) take the range
  rule `q = max|x| / hi` instead: a clipped top logit or a coarse grid near
  the top changes the predicted class, a rare large value does not cost
  resolution elsewhere.  Weights use their current values.  Activations
  and the input use the float model's outputs on `calibration_data` (one
  batch is enough); without it they keep their current step.

  Args:
    model: the quantized model.
    float_model: the float model `model` was made from (same layer names,
      without tfmot's `quant_` prefix).
    calibration_data: inputs for `float_model`.
  """
  records = introspect.quantized_tensors(model)
  stats = {}
  if float_model is not None and calibration_data is not None:
    names = [r.inner_layer.name for r in records if r.kind == "activation"]
    stats = _calibration_outputs(float_model, names, calibration_data)
    stats["<input>"] = np.asarray(tf.nest.flatten(calibration_data)[0])
  for record in records:
    q = record.quantizer
    if record.kind == "weight":
      axis = q.channel_axis if q.per_channel else None
      step = quantizers.initial_step(record.weight.numpy(), q.bits, q.signed,
                                     axis)
    else:
      key = "<input>" if record.kind == "input" else record.inner_layer.name
      if key not in stats:
        continue
      if record.kind == "activation" and q.signed:
        step = _range_step(stats[key], q.bits)
      else:
        step = quantizers.initial_step(stats[key], q.bits, q.signed)
    q.set_step(record.variables, step)


_POOLING = (tf.keras.layers.MaxPooling1D, tf.keras.layers.MaxPooling2D,
            tf.keras.layers.MaxPooling3D)


def _outputs_to_move_past_pooling(model, registry):
  """`{layer: pool}` for ReLU outputs consumed only by one max pooling layer.

  Rounding to a level is monotone, and so is Q_d (dQ_d/dtheta >= 0), so
  quantizing after `MaxPooling` gives the same values as before it (exactly
  in inference and in R-CDL) on a tensor that is pool-size times smaller; it
  is also the tensor the next layer receives, whose rate is the one to count.
  """
  moved = {}
  for layer in model.layers:
    config = registry.get_quantize_config(layer)
    if config is None or config.output_quantizer is None:
      continue
    consumers = [node.outbound_layer for node in layer.outbound_nodes]
    if len(consumers) == 1 and isinstance(consumers[0], _POOLING) and len(
        consumers[0].inbound_nodes) == 1:
      moved[layer.name] = consumers[0].name
  return moved


def _linear_output_layers(model):
  """Names of the layers whose output is a model output, without activation.

  Only those with CDL-quantized weights count (`Dense`, `Conv*`): their
  output quantizer becomes the int8 output of an exported model.
  """
  return {layer.name for layer in introspect.output_layers(model)
          if scheme_lib.weight_attrs_of(layer) is not None and
          getattr(layer, "activation", None) is not None and
          scheme_lib.activation_name(layer.activation) == "linear"}


def _is_graph_model(model):
  return isinstance(model, tf.keras.Sequential) or getattr(
      model, "_is_graph_network", False)


def _has_weights(layer):
  return bool(layer.weights)


def _float_layers_ok():
  return (tf.keras.layers.BatchNormalization, tf.keras.layers.InputLayer)


def quantize_model(model, mode="rcdl", weight_bits=8, activation_bits=8,
                   lmbda=0.3, gamma=0.005, *, hardness="alpha", kappa=2.0,
                   window=2, per_channel=False, rate="entropy",
                   quantize_input=True, output_bits=8, calibration_data=None,
                   strict=False):
  """Returns a CDL-quantized copy of a Sequential or Functional Keras model.

  The defaults are the ones benchmarks/frontier.py settled on Fashion-MNIST
  (BENCHMARKS.md): R-CDL (ahead of CDL in nine of ten pairs run), a window
  of 2 levels (the same accuracy as 3 at a 13% smaller file and a cheaper
  step), `lmbda=0.3, gamma=0.005` (LeNet5-Caffe at 4 bits: 0.3 points below
  float at 29x smaller than float32), and a trainable hardness alpha
  starting at `kappa = alpha q^2 = 2`: 0.2 points above a kappa annealed
  2 -> 32 by `keras_cdl.callbacks.KappaSchedule` at the same size, with no
  schedule to set, and 3 points above a kappa fixed at 2.

  Args:
    model: a built `tf.keras.Sequential` or Functional model, float or
      trained.  Subclassed models: use `keras_cdl.layers` instead.
    mode: "rcdl" (relaxed: soft forward and backward) or "cdl" (sampled
      forward, soft backward).
    weight_bits: bits of the kernels' indices, 2 to 8.
    activation_bits: bits of ReLU outputs, 2 to 8, or None for float
      activations.
    lmbda: loss units per bit per quantized weight (>= 0).
    gamma: loss units per bit per quantized activation element (>= 0).
    hardness: "alpha" (trainable, per tensor) or "kappa" (fixed,
      schedulable with `KappaSchedule`).
    kappa: (initial) `alpha q^2`.
    window: CPMF levels evaluated per element.  2, the two nearest levels,
      drops about `exp(-2 kappa)` of the mass for a value midway between
      levels and up to about `exp(-kappa)` for one on a level (0.14 at
      kappa 2, 0.018 at 4; the window renormalises, so the soft value leans
      towards the kept neighbour by at most that fraction of a step).
    per_channel: one step size per output channel of each kernel.
    rate: "entropy" (the paper's marginal entropy) or "prior" (learned tfc
      prior).
    quantize_input: also quantize the model input (8 bits when
      `activation_bits` is None), unsigned if `calibration_data` is
      non-negative, else signed.
    output_bits: bits of the model's linear outputs (the logits of a final
      `Dense`/`Conv` without activation), signed and rate-free, 2 to 8; None
      leaves them float.  As in tfmot's default scheme, quantizing them makes
      `model(x, training=False)` compute the int8 logits an integer
      deployment computes (`keras_cdl.export.to_tflite` uses this step as
      the output scale), so both take the same top-1 even on near ties.
    calibration_data: a batch of inputs for the activation step sizes.
    strict: raise instead of warning on a layer with weights that CDL does
      not support.

  Returns:
    A `keras_cdl.CDLModel` with the rate losses attached.

  Raises:
    ValueError: on a subclassed or unbuilt model, or bad arguments.
  """
  if not isinstance(model, tf.keras.Model):
    raise ValueError("`model` must be a tf.keras.Model, but got "
                     f"{type(model).__name__}.")
  if not _is_graph_model(model):
    raise ValueError(
        "`model` must be a Sequential or Functional model, but got the "
        f"subclassed model {type(model).__name__}. Build subclassed models "
        "from keras_cdl.layers (QuantDense, QuantConv2D, QuantReLU) and "
        "derive them from keras_cdl.CDLModel instead.")
  if not model.built:
    raise ValueError("`model` must be built (call it or `model.build`) "
                     "before quantize_model.")
  ops.validate_bits(weight_bits, "weight_bits")
  if activation_bits is not None:
    ops.validate_bits(activation_bits, "activation_bits")
  if output_bits is not None:
    ops.validate_bits(output_bits, "output_bits")
  lmbda = _check_number("lmbda", lmbda)
  gamma = _check_number("gamma", gamma)
  if rate not in rate_lib.RATES:
    raise ValueError(f"`rate` must be one of {rate_lib.RATES}, but got "
                     f"{rate!r}.")

  common = dict(mode=mode, hardness=hardness, kappa=kappa, window=window)
  weight_quantizer = quantizers.CDLWeightQuantizer(
      bits=weight_bits, per_channel=per_channel, rate=rate, **common)
  activation_quantizer = None
  if activation_bits is not None:
    activation_quantizer = quantizers.CDLActivationQuantizer(
        bits=activation_bits, rate=rate, **common)
  input_quantizer = None
  if quantize_input:
    signed = True
    if calibration_data is not None:
      signed = bool(np.min(tf.nest.flatten(calibration_data)[0]) < 0)
    input_quantizer = quantizers.CDLActivationQuantizer(
        bits=activation_bits or 8, signed=signed, rate=None, **common)
  scheme = scheme_lib.CDLQuantizeScheme(weight_quantizer, activation_quantizer,
                                        input_quantizer)
  registry = scheme.get_quantize_registry()

  moved = _outputs_to_move_past_pooling(model, registry)
  output_quantizer = None
  if output_bits is not None:
    output_quantizer = quantizers.CDLActivationQuantizer(
        bits=output_bits, signed=True, rate=None, **common)
  linear_outputs = _linear_output_layers(model)

  def annotate(layer):
    if isinstance(layer, quantize_annotate_mod.QuantizeAnnotate):
      return layer
    config = registry.get_quantize_config(layer)
    if layer.name in moved:
      config = configs.CDLQuantizeConfig(
          config.weight_attrs, config.weight_quantizer, None)
      if not config.weight_attrs:
        config = None
    elif layer.name in moved.values():
      config = configs.CDLQuantizeConfig(
          [], None, copy.deepcopy(activation_quantizer))
    elif (config is not None and output_quantizer is not None and
          layer.name in linear_outputs and config.output_quantizer is None):
      config = configs.CDLQuantizeConfig(
          config.weight_attrs, config.weight_quantizer,
          copy.deepcopy(output_quantizer))
    if config is not None:
      return _QuantizeAnnotate(layer, config)
    if _has_weights(layer) and not isinstance(layer, _float_layers_ok()):
      message = (f"Layer {layer.name} ({type(layer).__name__}) has weights but "
                 "CDL does not support it; it stays float. Annotate it with "
                 "keras_cdl.quantize_annotate_layer(layer, "
                 "keras_cdl.CDLQuantizeConfig(...)) to quantize it.")
      if strict:
        raise ValueError(message + " (strict=True)")
      logging.warning(message)
    return layer.__class__.from_config(layer.get_config())

  with quantize_scope():
    annotated = tf.keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    quantized = tfmot.quantization.keras.quantize_apply(annotated,
                                                        scheme=scheme)
  result = model_lib.CDLModel(inputs=quantized.inputs,
                              outputs=quantized.outputs, name=model.name)
  initialize_step_sizes(result, model, calibration_data)
  set_rate_weights(result, lmbda, gamma)
  return result
