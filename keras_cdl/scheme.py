"""The CDL `QuantizeScheme`: which layers are quantized, and how.

Quantized (weights with `CDLWeightQuantizer`):
* `Dense`, `Conv1D`, `Conv2D`: `kernel` (per-channel on the last axis);
* `DepthwiseConv2D`: `depthwise_kernel` (per-channel on axis -2).
Their outputs are quantized with `CDLActivationQuantizer` (unsigned) when the
fused activation is ReLU or ReLU6; `ReLU` layers (plain or with max 6) and
`Activation("relu" | "relu6")` layers get an output quantizer only.  The model
input gets a `QuantizeLayer` with a rate-free activation quantizer.

Left in float: `BatchNormalization`, pooling, `Add`/`Concatenate`, reshapes,
`Dropout`, and any output that is not a ReLU.  (`quantize_model` adds a signed
8-bit output quantizer to a final `Dense`/`Conv` without activation: the
logits; see its `output_bits`.)
(`quantize_model` moves the quantizer of a ReLU output that only feeds a max
pooling layer to the pooling's output: the same values, on a smaller tensor.)
"""

import copy

import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layout_transform
from tensorflow_model_optimization.python.core.quantization.keras import quantize_registry
from tensorflow_model_optimization.python.core.quantization.keras import quantize_scheme
from tensorflow_model_optimization.python.core.quantization.keras import utils as quantize_utils
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import model_transformer
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import transforms

from keras_cdl import configs
from keras_cdl import quantizers

__all__ = [
    "CDLQuantizeRegistry",
    "CDLQuantizeLayoutTransform",
    "CDLQuantizeScheme",
    "weight_attrs_of",
    "quantizes_output",
    "activation_name",
]

_KERNEL_LAYERS = (tf.keras.layers.Dense, tf.keras.layers.Conv1D,
                  tf.keras.layers.Conv2D)
_RELU_NAMES = ("relu", "relu6")


def weight_attrs_of(layer):
  """`(weight_attrs, channel_axis)` CDL quantizes for `layer`, or None."""
  if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
    return ["depthwise_kernel"], -2
  if isinstance(layer, _KERNEL_LAYERS) and not isinstance(
      layer, (tf.keras.layers.Conv2DTranspose, tf.keras.layers.SeparableConv2D,
              tf.keras.layers.Conv1DTranspose, tf.keras.layers.SeparableConv1D)):
    return ["kernel"], -1
  return None


def activation_name(activation):
  """The serialized name of a Keras activation function, or None."""
  try:
    return tf.keras.activations.serialize(activation)
  except ValueError:
    return None


def quantizes_output(layer):
  """True when the layer's output is a ReLU/ReLU6 output CDL quantizes."""
  if isinstance(layer, tf.keras.layers.ReLU):
    max_value = None if layer.max_value is None else float(layer.max_value)
    return (max_value in (None, 6.0) and float(layer.negative_slope) == 0.0
            and float(layer.threshold) == 0.0)
  activation = getattr(layer, "activation", None)
  if activation is None:
    return False
  return activation_name(activation) in _RELU_NAMES


class CDLQuantizeRegistry(quantize_registry.QuantizeRegistry):
  """Gives each supported layer a fresh `CDLQuantizeConfig`.

  Args:
    weight_quantizer: template `CDLWeightQuantizer` (copied per layer; its
      `channel_axis` is set per layer type).
    activation_quantizer: template `CDLActivationQuantizer` for ReLU outputs,
      or None to leave activations in float.
  """

  def __init__(self, weight_quantizer, activation_quantizer):
    self.weight_quantizer = weight_quantizer
    self.activation_quantizer = activation_quantizer

  def supports(self, layer):
    return self.get_quantize_config(layer) is not None

  def get_quantize_config(self, layer):
    found = weight_attrs_of(layer)
    output = None
    if self.activation_quantizer is not None and quantizes_output(layer):
      output = copy.deepcopy(self.activation_quantizer)
    if found is None:
      if output is None or not isinstance(
          layer, (tf.keras.layers.ReLU, tf.keras.layers.Activation)):
        return None
      return configs.CDLQuantizeConfig([], None, output)
    attrs, channel_axis = found
    config = self.weight_quantizer.get_config()
    config["channel_axis"] = channel_axis
    weight = type(self.weight_quantizer).from_config(config)
    return configs.CDLQuantizeConfig(attrs, weight, output)


class _InputLayerQuantize(transforms.Transform):
  """InputLayer => InputLayer -> QuantizeLayer(CDL input quantizer)."""

  def __init__(self, input_quantizer):
    self.input_quantizer = input_quantizer

  def pattern(self):
    return transforms.LayerPattern("InputLayer")

  def replacement(self, match_layer):
    layer = quantize_layer.QuantizeLayer(copy.deepcopy(self.input_quantizer))
    layer_config = quantize_utils.serialize_layer(layer,
                                                  use_legacy_format=True)
    layer_config["name"] = layer.name
    return transforms.LayerNode(layer_config, input_layers=[match_layer])

  def custom_objects(self):
    return {
        "QuantizeLayer": quantize_layer.QuantizeLayer,
        "CDLActivationQuantizer": quantizers.CDLActivationQuantizer,
    }


class CDLQuantizeLayoutTransform(
    quantize_layout_transform.QuantizeLayoutTransform):
  """Only inserts the input quantizer; the graph is otherwise unchanged.

  BatchNormalization is not folded during training (its statistics stay
  float); export folds it into per-channel scales without touching indices.
  """

  def __init__(self, input_quantizer):
    self.input_quantizer = input_quantizer

  def apply(self, model, layer_quantize_map):
    if self.input_quantizer is None:
      return model, layer_quantize_map
    return model_transformer.ModelTransformer(
        model, [_InputLayerQuantize(self.input_quantizer)],
        set(layer_quantize_map.keys()), layer_quantize_map).transform()


class CDLQuantizeScheme(quantize_scheme.QuantizeScheme):
  """`QuantizeScheme` for `tfmot.quantization.keras.quantize_apply`."""

  def __init__(self, weight_quantizer=None, activation_quantizer=None,
               input_quantizer=None):
    self.weight_quantizer = weight_quantizer or (
        quantizers.CDLWeightQuantizer())
    self.activation_quantizer = activation_quantizer
    self.input_quantizer = input_quantizer

  def get_layout_transformer(self):
    return CDLQuantizeLayoutTransform(self.input_quantizer)

  def get_quantize_registry(self):
    return CDLQuantizeRegistry(self.weight_quantizer, self.activation_quantizer)

