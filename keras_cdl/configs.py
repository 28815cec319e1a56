"""The tfmot `QuantizeConfig` of CDL: which tensors of a layer are quantized.

`CDLQuantizeConfig(weight_attrs, weight_quantizer, output_quantizer)`:
* each attribute in `weight_attrs` (e.g. `"kernel"`) is quantized with its own
  copy of `weight_quantizer` and written back with `setattr`, as tfmot's
  default 8-bit scheme does;
* the layer's output (after its fused activation) is quantized with
  `output_quantizer` when given, e.g. for ReLU/ReLU6 outputs.
"""

import copy

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from keras_cdl import quantizers as quantizers_lib

__all__ = ["CDLQuantizeConfig"]

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer


def _serialize(quantizer):
  return None if quantizer is None else (
      tf.keras.utils.serialize_keras_object(quantizer))


def _deserialize(config):
  if config is None or isinstance(config, _Quantizer):
    return config
  return tf.keras.utils.deserialize_keras_object(
      config, module_objects=vars(quantizers_lib))


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class CDLQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
  """Quantizes a layer's weights in `weight_attrs` and, optionally, its output.

  Args:
    weight_attrs: names of the layer's weight attributes to quantize.
    weight_quantizer: a `CDLWeightQuantizer` (or its config), or None.
    output_quantizer: a `CDLActivationQuantizer` (or its config), or None.
  """

  def __init__(self, weight_attrs=(), weight_quantizer=None,
               output_quantizer=None):
    if isinstance(weight_attrs, str) or not all(
        isinstance(a, str) for a in weight_attrs):
      raise ValueError("`weight_attrs` must be a list of attribute names, "
                       f"but got {weight_attrs!r}.")
    self.weight_attrs = list(weight_attrs)
    self.weight_quantizer = _deserialize(weight_quantizer)
    self.output_quantizer = _deserialize(output_quantizer)
    for arg, value in (("weight_quantizer", self.weight_quantizer),
                       ("output_quantizer", self.output_quantizer)):
      if value is not None and not isinstance(value, _Quantizer):
        raise ValueError(f"`{arg}` must be a tfmot Quantizer or None, "
                         f"but got {type(value).__name__}.")
    if self.weight_attrs and self.weight_quantizer is None:
      raise ValueError("`weight_quantizer` is required when `weight_attrs` "
                       f"is not empty, but got None for {self.weight_attrs}.")
    # One quantizer instance per tensor: each owns its variables and layer.
    self._weight_quantizers = {
        attr: copy.deepcopy(self.weight_quantizer) for attr in self.weight_attrs
    }

  def get_weights_and_quantizers(self, layer):
    return [(getattr(layer, attr), self._weight_quantizers[attr])
            for attr in self.weight_attrs]

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    if len(quantize_weights) != len(self.weight_attrs):
      raise ValueError(
          f"`quantize_weights` must hold {len(self.weight_attrs)} tensors "
          f"({self.weight_attrs}), but got {len(quantize_weights)}.")
    for attr, weight in zip(self.weight_attrs, quantize_weights):
      setattr(layer, attr, weight)

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    return [self.output_quantizer] if self.output_quantizer else []

  def get_config(self):
    return {
        "weight_attrs": list(self.weight_attrs),
        "weight_quantizer": _serialize(self.weight_quantizer),
        "output_quantizer": _serialize(self.output_quantizer),
    }

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  def __eq__(self, other):
    return (isinstance(other, CDLQuantizeConfig) and
            self.weight_attrs == other.weight_attrs and
            self.weight_quantizer == other.weight_quantizer and
            self.output_quantizer == other.output_quantizer)

  def __ne__(self, other):
    return not self == other
