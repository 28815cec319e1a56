"""Tests of keras_cdl.layers: QuantDense, QuantConv2D, QuantReLU.

They must take the float layers' arguments (positionally, too), serialize,
and train inside a subclassed `keras_cdl.CDLModel` with the rate metrics.
"""

import inspect
import os
import tempfile

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import introspect
from keras_cdl import layers
from keras_cdl import quantizers

L = tf.keras.layers
PAIRS = ((layers.QuantDense, L.Dense, (3,), [None, 4]),
         (layers.QuantConv2D, L.Conv2D, (2, 3), [None, 5, 5, 2]),
         (layers.QuantReLU, L.ReLU, (), [None, 4]))

# Non-default values for every constructor argument of the float layers.
NON_DEFAULTS = {
    L.Dense: dict(
        units=5, activation="relu", use_bias=False, kernel_initializer="ones",
        bias_initializer="ones", kernel_regularizer="l2",
        bias_regularizer="l1", activity_regularizer="l2",
        kernel_constraint="non_neg", bias_constraint="unit_norm"),
    L.Conv2D: dict(
        filters=4, kernel_size=(3, 2), strides=(2, 1), padding="same",
        data_format="channels_last", dilation_rate=(1, 1), groups=2,
        activation="relu6", use_bias=False, kernel_initializer="ones",
        bias_initializer="ones", kernel_regularizer="l2",
        bias_regularizer="l1", activity_regularizer="l2",
        kernel_constraint="non_neg", bias_constraint="unit_norm"),
    L.ReLU: dict(max_value=6.0, negative_slope=0.0, threshold=0.0),
}


def float_args(float_class):
  """Names of the float layer's own constructor arguments."""
  return [p for p in inspect.signature(float_class.__init__).parameters
          if p not in ("self", "kwargs")]


def comparable(config):
  config = dict(config)
  for key in ("name", "trainable", "dtype"):
    config.pop(key, None)
  return config


class SignatureTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*PAIRS)
  def test_every_float_argument_is_accepted_and_forwarded(
      self, quant_class, float_class, _, __):
    kwargs = NON_DEFAULTS[float_class]
    # The table covers the float layer's whole signature.
    self.assertEqual(set(kwargs), set(float_args(float_class)))
    quant = quant_class(**kwargs)
    expected = float_class(**kwargs)
    self.assertIsInstance(quant.layer, float_class)
    self.assertEqual(comparable(quant.layer.get_config()),
                     comparable(expected.get_config()))
    # And the quantized layer's own config carries them at the top level.
    config = quant.get_config()
    for key in float_args(float_class):
      self.assertIn(key, config)

  @parameterized.parameters(*PAIRS)
  def test_positional_arguments_are_the_float_layers(
      self, quant_class, float_class, args, _):
    quant = quant_class(*args)
    self.assertEqual(comparable(quant.layer.get_config()),
                     comparable(float_class(*args).get_config()))

  @parameterized.parameters(*PAIRS)
  def test_quantizer_arguments_do_not_shadow_float_arguments(
      self, quant_class, float_class, _, __):
    del quant_class
    own = {"weight_quantizer", "output_quantizer"}
    self.assertEmpty(own & set(float_args(float_class)))

  def test_name_trainable_dtype(self):
    layer = layers.QuantDense(3, name="head", trainable=False,
                              dtype="float64")
    self.assertEqual(layer.name, "head")
    self.assertFalse(layer.trainable)
    self.assertEqual(layer.dtype, "float64")
    self.assertEqual(layers.QuantDense(3).name[:len("quant_")], "quant_")


class QuantizerChoiceTest(tf.test.TestCase):

  def test_default_quantizers(self):
    dense = layers.QuantDense(3)
    self.assertEqual(dense.quantize_config.weight_attrs, ["kernel"])
    self.assertIsInstance(dense.quantize_config.weight_quantizer,
                          quantizers.CDLWeightQuantizer)
    self.assertIsNone(dense.quantize_config.output_quantizer)
    relu_dense = layers.QuantDense(3, activation="relu")
    self.assertIsInstance(relu_dense.quantize_config.output_quantizer,
                          quantizers.CDLActivationQuantizer)
    relu = layers.QuantReLU()
    self.assertEqual(relu.quantize_config.weight_attrs, [])
    self.assertIsInstance(relu.quantize_config.output_quantizer,
                          quantizers.CDLActivationQuantizer)
    # A leaky ReLU is not a ReLU output CDL quantizes.
    self.assertIsNone(
        layers.QuantReLU(negative_slope=0.1).quantize_config.output_quantizer)

  def test_given_quantizers_are_used(self):
    weight = quantizers.CDLWeightQuantizer(bits=3, per_channel=True)
    output = quantizers.CDLActivationQuantizer(bits=2)
    layer = layers.QuantConv2D(4, 3, activation="relu",
                               weight_quantizer=weight,
                               output_quantizer=output)
    self.assertEqual(layer.quantize_config.weight_quantizer, weight)
    self.assertEqual(layer.quantize_config.output_quantizer, output)
    self.assertIsNone(layers.QuantDense(
        3, activation="relu", output_quantizer=None)
                      .quantize_config.output_quantizer)


class SerializationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*PAIRS)
  def test_get_config_from_config_round_trip(self, quant_class, float_class,
                                             _, input_shape):
    kwargs = dict(NON_DEFAULTS[float_class])
    if float_class is L.Conv2D:
      kwargs["kernel_initializer"] = "glorot_uniform"
    elif float_class is L.Dense:
      kwargs["kernel_initializer"] = "glorot_uniform"
    if float_class is not L.ReLU:
      kwargs["weight_quantizer"] = quantizers.CDLWeightQuantizer(
          bits=3, per_channel=True, kappa=2.0)
    kwargs["output_quantizer"] = quantizers.CDLActivationQuantizer(bits=5)
    original = quant_class(name="q", **kwargs)
    config = original.get_config()
    restored = quant_class.from_config(config)
    self.assertEqual(restored.get_config(), config)
    self.assertEqual(restored.name, "q")
    self.assertEqual(restored.quantize_config, original.quantize_config)

    # Same variables -> same outputs, in inference and in R-CDL training.
    x = tf.constant(np.random.RandomState(0).rand(
        2, *input_shape[1:]).astype(np.float32))
    original(x)
    restored(x)
    self.assertLen(restored.weights, len(original.weights))
    restored.set_weights(original.get_weights())
    self.assertAllEqual(original(x, training=False),
                        restored(x, training=False))
    self.assertAllEqual(original(x, training=True),
                        restored(x, training=True))

  @parameterized.parameters(*PAIRS)
  def test_keras_serialization_uses_registered_name(self, quant_class, *_):
    layer = quant_class(*PAIRS[[p[0] for p in PAIRS].index(quant_class)][2])
    config = tf.keras.utils.serialize_keras_object(layer)
    self.assertEqual(config["registered_name"],
                     f"keras_cdl>{quant_class.__name__}")
    restored = tf.keras.utils.deserialize_keras_object(config)
    self.assertIsInstance(restored, quant_class)
    self.assertEqual(restored.get_config(), layer.get_config())


class Net(keras_cdl.CDLModel):
  """The module docstring's example, with a QuantReLU."""

  def __init__(self):
    super().__init__()
    self.conv = layers.QuantConv2D(4, 3, name="conv")
    self.relu = layers.QuantReLU(name="relu")
    self.flat = L.Flatten()
    self.hidden = layers.QuantDense(8, activation="relu", name="hidden")
    self.out = layers.QuantDense(2, name="out")

  def call(self, x, training=None):
    x = self.relu(self.conv(x, training=training), training=training)
    x = self.hidden(self.flat(x), training=training)
    return self.out(x, training=training)


def blobs(n=64, seed=0):
  """Two classes of 6x6 images: bright top half vs bright bottom half."""
  rng = np.random.RandomState(seed)
  y = np.arange(n) % 2
  x = rng.rand(n, 6, 6, 1).astype(np.float32) * 0.3
  x[y == 0, :3] += 0.7
  x[y == 1, 3:] += 0.7
  return x, y


class SubclassedModelTest(tf.test.TestCase):

  def test_quantized_tensors_of_a_subclassed_model(self):
    model = Net()
    model(tf.zeros([1, 6, 6, 1]))
    records = {r.name: r for r in introspect.quantized_tensors(model)}
    self.assertEqual(set(records), {
        "conv/kernel", "relu/output", "hidden/kernel", "hidden/output",
        "out/kernel"})
    self.assertEqual(records["relu/output"].kind, "activation")
    # Element counts come from build shapes: the layers were only called
    # eagerly, so they have no Keras nodes (no input/output_shape).
    counts = {name: [(r.name, n) for r, n in items]
              for name, items in keras_cdl.model.rate_bits(model).items()}
    self.assertEqual(counts, {
        "bits_per_weight": [("conv/kernel", 3 * 3 * 4), ("hidden/kernel",
                                                         64 * 8),
                            ("out/kernel", 8 * 2)],
        "bits_per_activation": [("relu/output", 4 * 4 * 4),
                                ("hidden/output", 8)],
    })
    keras_cdl.set_rate_weights(model, 0.5, 0.1)
    self.assertAllClose(records["relu/output"].variables["rate_weight"],
                        0.1 / 72)
    self.assertAllClose(records["out/kernel"].variables["rate_weight"],
                        0.5 / (36 + 512 + 16))

  def test_trains_with_rate_and_logs_bits(self):
    tf.keras.utils.set_random_seed(0)
    model = Net()
    x, y = blobs()
    model(x[:1])
    keras_cdl.initialize_step_sizes(model)
    keras_cdl.set_rate_weights(model, 0.01, 0.001)
    model(x, training=True)
    self.assertLen(model.losses, 5)  # 3 kernels + 2 ReLU outputs.
    model.compile(tf.keras.optimizers.Adam(0.01),
                  tf.keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    loss = history.history["loss"]
    self.assertLess(loss[-1], 0.7 * loss[0], loss)
    self.assertLen(history.history["bits_per_weight"], 6)
    self.assertLen(history.history["bits_per_activation"], 6)
    self.assertBetween(history.history["bits_per_weight"][-1], 0.0, 8.0)
    accuracy = np.mean(np.argmax(model(x, training=False), -1) == y)
    self.assertGreaterEqual(accuracy, 0.9)

  def test_checkpoint_round_trip(self):
    tf.keras.utils.set_random_seed(1)
    x, _ = blobs(4)
    model = Net()
    model(x)
    keras_cdl.initialize_step_sizes(model)
    for variable in model.weights:
      if variable.dtype.is_floating:
        variable.assign(variable + 0.01)
    expected = model(x, training=False)
    with tempfile.TemporaryDirectory() as tmp:
      prefix = tf.train.Checkpoint(model=model).save(
          os.path.join(tmp, "ckpt"))
      fresh = Net()
      fresh(x)
      tf.train.Checkpoint(model=fresh).restore(
          prefix).assert_existing_objects_matched()
    self.assertAllEqual(fresh(x, training=False), expected)


if __name__ == "__main__":
  tf.test.main()
