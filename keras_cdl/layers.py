"""CDL layers for subclassed models: `QuantDense`, `QuantConv2D`, `QuantReLU`.

Each is a tfmot `QuantizeWrapperV2` around the float Keras layer with a
`CDLQuantizeConfig`, so it behaves exactly like the layers `quantize_model`
produces (same quantizers, same rate losses, same export), but is constructed
with the float layer's own arguments plus the quantizers:

```python
class Net(keras_cdl.CDLModel):
  def __init__(self):
    super().__init__()
    self.conv = keras_cdl.layers.QuantConv2D(8, 3, activation="relu")
    self.flat = tf.keras.layers.Flatten()
    self.out = keras_cdl.layers.QuantDense(10)
  def call(self, x, training=None):
    return self.out(self.flat(self.conv(x, training=training)),
                    training=training)
```

Set the rate weights once the model is built: `keras_cdl.set_rate_weights`.
"""

import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from keras_cdl import configs
from keras_cdl import quantizers
from keras_cdl import scheme

__all__ = ["QuantDense", "QuantConv2D", "QuantReLU", "custom_objects"]


class _QuantLayer(quantize_wrapper.QuantizeWrapperV2):
  """A QuantizeWrapperV2 built from float-layer arguments (base class)."""

  _float_class = None

  def __init__(self, *layer_args, weight_quantizer=None,
               output_quantizer="auto", name=None, trainable=True, dtype=None,
               **layer_kwargs):
    # Positional arguments are the float layer's (`QuantDense(10)`).
    # The wrapper's `trainable` is the inner layer's: set it there.
    layer = self._float_class(*layer_args, trainable=trainable,  # pylint: disable=not-callable
                              **layer_kwargs)
    found = scheme.weight_attrs_of(layer)
    attrs, channel_axis = found if found else ([], -1)
    if attrs and weight_quantizer is None:
      weight_quantizer = quantizers.CDLWeightQuantizer(
          channel_axis=channel_axis)
    if attrs and isinstance(weight_quantizer, dict):
      weight_quantizer = tf.keras.utils.deserialize_keras_object(
          weight_quantizer, module_objects=vars(quantizers))
    if output_quantizer == "auto":
      output_quantizer = (quantizers.CDLActivationQuantizer()
                          if scheme.quantizes_output(layer) else None)
    config = configs.CDLQuantizeConfig(attrs, weight_quantizer,
                                       output_quantizer)
    self._layer_kwargs = layer_kwargs
    kwargs = {"trainable": trainable}
    if name is not None:
      kwargs["name"] = name
    if dtype is not None:
      kwargs["dtype"] = dtype
    super().__init__(layer, config, name_prefix="quant_", **kwargs)

  def get_config(self):
    base = tf.keras.layers.Layer.get_config(self)
    layer_config = self.layer.get_config()
    layer_config.pop("name", None)
    layer_config.pop("trainable", None)
    layer_config.pop("dtype", None)
    config = self.quantize_config.get_config()
    return {**base, **layer_config,
            "weight_quantizer": config["weight_quantizer"],
            "output_quantizer": config["output_quantizer"]}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class QuantDense(_QuantLayer):
  """`tf.keras.layers.Dense` with a CDL kernel (and ReLU output) quantizer."""
  _float_class = tf.keras.layers.Dense


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class QuantConv2D(_QuantLayer):
  """`tf.keras.layers.Conv2D` with a CDL kernel (and ReLU output) quantizer."""
  _float_class = tf.keras.layers.Conv2D


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class QuantReLU(_QuantLayer):
  """`tf.keras.layers.ReLU` whose output is CDL quantized."""
  _float_class = tf.keras.layers.ReLU


def custom_objects():
  """`{name: class}` of this module's layers, for `quantize_scope`."""
  return {c.__name__: c for c in (QuantDense, QuantConv2D, QuantReLU)}
