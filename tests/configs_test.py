"""Tests of keras_cdl.configs: `CDLQuantizeConfig`, the tfmot QuantizeConfig of CDL."""

from absl.testing import parameterized
import tensorflow as tf

from keras_cdl import configs
from keras_cdl import quantizers


def dense(units=3, inputs=4, **kwargs):
  layer = tf.keras.layers.Dense(units, **kwargs)
  layer.build([None, inputs])
  return layer


class ConfigSerializationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("weights_and_output", ["kernel"],
       quantizers.CDLWeightQuantizer(bits=3, per_channel=True, kappa=2.0),
       quantizers.CDLActivationQuantizer(bits=5, mode="cdl")),
      ("weights_only", ["kernel", "bias"],
       quantizers.CDLWeightQuantizer(bits=6, hardness="alpha"), None),
      ("output_only", [], None,
       quantizers.CDLActivationQuantizer(bits=2, rate=None)),
  )
  def test_get_config_from_config_round_trip(self, attrs, weight, output):
    original = configs.CDLQuantizeConfig(attrs, weight, output)
    config = original.get_config()
    restored = configs.CDLQuantizeConfig.from_config(config)
    self.assertEqual(original, restored)
    self.assertFalse(original != restored)
    self.assertEqual(restored.weight_attrs, attrs)
    self.assertEqual(restored.weight_quantizer, weight)
    self.assertEqual(restored.output_quantizer, output)
    if weight is not None:
      self.assertIsInstance(restored.weight_quantizer, type(weight))
    # Keras' own (de)serialization finds the registered class.
    keras_config = tf.keras.utils.serialize_keras_object(original)
    self.assertEqual(keras_config["registered_name"],
                     "keras_cdl>CDLQuantizeConfig")
    self.assertEqual(tf.keras.utils.deserialize_keras_object(keras_config),
                     original)

  def test_configs_differ_when_any_part_differs(self):
    base = configs.CDLQuantizeConfig(
        ["kernel"], quantizers.CDLWeightQuantizer(bits=4),
        quantizers.CDLActivationQuantizer(bits=4))
    self.assertNotEqual(base, configs.CDLQuantizeConfig(
        ["kernel"], quantizers.CDLWeightQuantizer(bits=5),
        quantizers.CDLActivationQuantizer(bits=4)))
    self.assertNotEqual(base, configs.CDLQuantizeConfig(
        ["kernel"], quantizers.CDLWeightQuantizer(bits=4), None))
    self.assertNotEqual(base, configs.CDLQuantizeConfig(
        ["kernel", "bias"], quantizers.CDLWeightQuantizer(bits=4),
        quantizers.CDLActivationQuantizer(bits=4)))
    self.assertNotEqual(base, "not a config")


class ConfigErrorTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("string", "kernel"),
      ("not_strings", ["kernel", 3]),
  )
  def test_bad_weight_attrs(self, attrs):
    with self.assertRaisesRegex(ValueError, "`weight_attrs`.*" + repr(attrs)
                                .replace("[", r"\[").replace("]", r"\]")):
      configs.CDLQuantizeConfig(attrs, quantizers.CDLWeightQuantizer())

  def test_missing_weight_quantizer(self):
    with self.assertRaisesRegex(ValueError, "`weight_quantizer`.*kernel"):
      configs.CDLQuantizeConfig(["kernel"], None)

  @parameterized.parameters("weight_quantizer", "output_quantizer")
  def test_quantizer_of_wrong_type(self, arg):
    kwargs = {"weight_attrs": ["kernel"],
              "weight_quantizer": quantizers.CDLWeightQuantizer()}
    kwargs[arg] = 3.0
    with self.assertRaisesRegex(ValueError, f"`{arg}`.*float"):
      configs.CDLQuantizeConfig(**kwargs)

  def test_set_quantize_weights_checks_count(self):
    config = configs.CDLQuantizeConfig(["kernel", "bias"],
                                       quantizers.CDLWeightQuantizer())
    layer = dense()
    with self.assertRaisesRegex(ValueError, "2 tensors.*got 1"):
      config.set_quantize_weights(layer, [layer.kernel])


class ConfigBehaviourTest(tf.test.TestCase):

  def test_each_weight_attr_gets_its_own_quantizer(self):
    template = quantizers.CDLWeightQuantizer(bits=3)
    config = configs.CDLQuantizeConfig(["kernel", "bias"], template)
    layer = dense()
    pairs = config.get_weights_and_quantizers(layer)
    self.assertLen(pairs, 2)
    (kernel, q_kernel), (bias, q_bias) = pairs
    self.assertIs(kernel, layer.kernel)
    self.assertIs(bias, layer.bias)
    self.assertIsNot(q_kernel, q_bias)
    self.assertIsNot(q_kernel, template)
    self.assertEqual(q_kernel, template)
    self.assertEqual(q_bias, template)
    # Stable across calls: the wrapper builds and later calls the same one.
    self.assertIs(config.get_weights_and_quantizers(layer)[0][1], q_kernel)

  def test_quantizers_of_two_configs_are_independent(self):
    template = quantizers.CDLWeightQuantizer()
    a = configs.CDLQuantizeConfig(["kernel"], template)
    b = configs.CDLQuantizeConfig(["kernel"], template)
    layer = dense()
    self.assertIsNot(a.get_weights_and_quantizers(layer)[0][1],
                     b.get_weights_and_quantizers(layer)[0][1])

  def test_set_quantize_weights_writes_attributes(self):
    config = configs.CDLQuantizeConfig(["kernel"],
                                       quantizers.CDLWeightQuantizer())
    layer = dense()
    replacement = tf.ones([4, 3])
    config.set_quantize_weights(layer, [replacement])
    self.assertIs(layer.kernel, replacement)

  def test_output_quantizers(self):
    output = quantizers.CDLActivationQuantizer()
    layer = dense()
    self.assertEqual(configs.CDLQuantizeConfig(
        ["kernel"], quantizers.CDLWeightQuantizer(), output)
                     .get_output_quantizers(layer), [output])
    self.assertEqual(configs.CDLQuantizeConfig(
        ["kernel"], quantizers.CDLWeightQuantizer())
                     .get_output_quantizers(layer), [])
    self.assertEqual(configs.CDLQuantizeConfig(
        [], None, output).get_activations_and_quantizers(layer), [])


if __name__ == "__main__":
  tf.test.main()
