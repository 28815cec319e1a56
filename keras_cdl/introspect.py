"""Finds the CDL-quantized tensors of a Keras model.

Every other part of keras_cdl that needs "all quantized tensors" (metrics,
step-size initialisation, rate weights, summary, coding, export) walks a model
through `quantized_tensors`, so there is one place that knows where tfmot's
wrappers keep their quantizers.
"""

import dataclasses
from typing import Any, Optional

import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer

from keras_cdl import quantizers as quantizers_lib

__all__ = ["QuantizedTensor", "quantized_tensors", "output_layers"]

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper
_QuantizeLayer = quantize_layer.QuantizeLayer


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """One tensor quantized by a `CDLQuantizer`.

  Attributes:
    layer: the Keras layer that owns the quantizer variables (a tfmot
      `QuantizeWrapper` or `QuantizeLayer`).
    name: `"<layer>/<attr>"` for weights, `"<layer>/output"` or
      `"<layer>/input"` for activations.
    kind: "weight", "activation" (layer output) or "input" (model input).
    quantizer: the `CDLQuantizer`.
    variables: the dict `quantizer.build` returned.
    weight: the float variable for kind "weight", else None.
    inner_layer: the wrapped Keras layer (None for the input).
  """
  layer: Any
  name: str
  kind: str
  quantizer: quantizers_lib.CDLQuantizer
  variables: dict
  weight: Optional[tf.Variable] = None
  inner_layer: Any = None

  @property
  def step(self):
    """Step size(s) as a NumPy array (scalar or per channel)."""
    return tf.exp(self.variables["log_step"]).numpy()

  @property
  def kappa(self):
    return self.quantizer.get_kappa(self.variables)

  def indices(self):
    """Inference indices of a weight, as an int32 NumPy array."""
    if self.weight is None:
      raise ValueError(f"`indices` needs a weight, but {self.name} is an "
                       f"{self.kind}.")
    return self.quantizer.indices(self.weight, self.variables).numpy()


def _weight_attr(wrapper, weight):
  for attr in getattr(wrapper.quantize_config, "weight_attrs", []):
    if getattr(wrapper.layer, attr, None) is weight:
      return attr
  return weight.name.split("/")[-1].split(":")[0]


def quantized_tensors(model):
  """Lists the model's CDL-quantized tensors in layer order.

  Args:
    model: a Keras model (or layer) containing tfmot wrappers or keras_cdl
      layers.

  Returns:
    A list of `QuantizedTensor`.
  """
  found = []
  layers = model._flatten_layers(include_self=True, recursive=True)  # pylint: disable=protected-access
  for layer in layers:
    if isinstance(layer, _QuantizeWrapper) and layer.built:
      for weight, quantizer, variables in layer._weight_vars:  # pylint: disable=protected-access
        if isinstance(quantizer, quantizers_lib.CDLQuantizer):
          attr = _weight_attr(layer, weight)
          found.append(QuantizedTensor(layer, f"{layer.name}/{attr}", "weight",
                                       quantizer, variables, weight,
                                       layer.layer))
      for quantizer in layer._output_quantizers:  # pylint: disable=protected-access
        if isinstance(quantizer, quantizers_lib.CDLQuantizer):
          found.append(QuantizedTensor(
              layer, f"{layer.name}/output", "activation", quantizer,
              layer._output_quantizer_vars, None, layer.layer))  # pylint: disable=protected-access
    elif isinstance(layer, _QuantizeLayer) and layer.built and isinstance(
        layer.quantizer, quantizers_lib.CDLQuantizer):
      found.append(QuantizedTensor(layer, f"{layer.name}/input", "input",
                                   layer.quantizer, layer.quantizer_vars))
  return found


def output_layers(model):
  """The layers producing a Functional/Sequential model's outputs, in order.

  A subclassed model (no symbolic outputs) has none.
  """
  layers = []
  for tensor in tf.nest.flatten(getattr(model, "outputs", None) or []):
    layer = getattr(tensor, "_keras_history", None)
    if layer is not None and layer.layer not in layers:
      layers.append(layer.layer)
  return layers
