"""Tests of keras_cdl.quantize: `quantize_model`, annotation, scope, saving.

Which layers get quantized is checked through `keras_cdl.introspect`, step
sizes against the LSQ rule computed here in NumPy, and save/load round trips
compare inference outputs exactly.  Models and batches are tiny.
"""

import logging
import math
import os
import tempfile

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer

import keras_cdl
from keras_cdl import introspect
from keras_cdl import model as model_lib
from keras_cdl import quantizers

L = tf.keras.layers
_Wrapper = tfmot.quantization.keras.QuantizeWrapper


def residual_model():
  """Conv-ReLU, conv-BN-ReLU, residual Add, pooling and float logits."""
  inputs = tf.keras.Input((8, 8, 1), name="image")
  a = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
  b = L.Conv2D(4, 3, padding="same", name="c2")(a)
  b = L.BatchNormalization(name="bn")(b)
  b = L.ReLU(name="r")(b)
  x = L.Add(name="add")([a, b])
  x = L.MaxPooling2D(name="pool1")(x)
  x = L.Conv2D(4, 3, padding="same", activation="relu", name="c3")(x)
  x = L.MaxPooling2D(name="pool2")(x)
  x = L.Flatten(name="flat")(x)
  outputs = L.Dense(3, name="logits")(x)
  return tf.keras.Model(inputs, outputs, name="residual")


def sequential_model():
  return tf.keras.Sequential([
      L.InputLayer((6,)),
      L.Dense(5, activation="relu", name="d1"),
      L.Dense(3, name="d2"),
  ], name="seq")


def images(n=16, seed=0):
  return np.random.RandomState(seed).rand(n, 8, 8, 1).astype(np.float32)


def trained_residual_model():
  """The residual model after a few SGD steps, BN statistics updated."""
  tf.keras.utils.set_random_seed(0)
  model = residual_model()
  x = images(32)
  y = np.arange(32) % 3
  model.compile(tf.keras.optimizers.SGD(0.05),
                tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, batch_size=16, epochs=2, verbose=0)
  return model


def lsq(values, bits, signed, axis=None):
  """The LSQ rule 2 mean|x| / sqrt(hi), written out independently."""
  hi = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
  values = np.abs(np.asarray(values, np.float64))
  if axis is None:
    return 2 * values.mean() / math.sqrt(hi)
  axes = tuple(i for i in range(values.ndim) if i != axis % values.ndim)
  return 2 * values.mean(axis=axes) / math.sqrt(hi)


def by_name(model):
  return {r.name: r for r in introspect.quantized_tensors(model)}


class SequentialTest(tf.test.TestCase):

  def test_sequential_model_is_wrapped(self):
    model = sequential_model()
    qmodel = keras_cdl.quantize_model(model, weight_bits=4,
                                      activation_bits=3)
    self.assertIsInstance(qmodel, keras_cdl.CDLModel)
    records = by_name(qmodel)
    self.assertEqual(set(records), {
        "quantize_layer/input", "quant_d1/kernel", "quant_d1/output",
        "quant_d2/kernel", "quant_d2/output"})
    self.assertEqual(records["quant_d1/kernel"].quantizer.bits, 4)
    self.assertEqual(records["quant_d1/output"].quantizer.bits, 3)
    self.assertIsInstance(records["quant_d2/kernel"].quantizer,
                          quantizers.CDLWeightQuantizer)
    self.assertAllEqual(records["quant_d1/kernel"].weight,
                        model.get_layer("d1").kernel)
    x = np.random.RandomState(0).randn(4, 6).astype(np.float32)
    self.assertEqual(qmodel(x, training=False).shape, [4, 3])

  def test_float_activations_when_activation_bits_is_none(self):
    qmodel = keras_cdl.quantize_model(sequential_model(), weight_bits=4,
                                      activation_bits=None)
    records = by_name(qmodel)
    self.assertEqual(
        set(records),
        {"quantize_layer/input", "quant_d1/kernel", "quant_d2/kernel",
         "quant_d2/output"})
    self.assertEqual(records["quantize_layer/input"].quantizer.bits, 8)

  def test_output_bits(self):
    records = by_name(keras_cdl.quantize_model(
        sequential_model(), weight_bits=4, activation_bits=3, output_bits=6))
    logits = records["quant_d2/output"].quantizer
    self.assertIsInstance(logits, quantizers.CDLActivationQuantizer)
    self.assertEqual((logits.bits, logits.signed, logits.rate),
                     (6, True, None))
    self.assertEqual((logits.mode, logits.window), ("rcdl", 2))
    records = by_name(keras_cdl.quantize_model(
        sequential_model(), weight_bits=4, activation_bits=3,
        output_bits=None))
    self.assertNotIn("quant_d2/output", records)

  def test_defaults_are_the_benchmarked_ones(self):
    # BENCHMARKS.md (frontier): R-CDL, window 2, lmbda 0.3, gamma 0.005.
    qmodel = keras_cdl.quantize_model(sequential_model())
    records = by_name(qmodel)
    for record in records.values():
      self.assertEqual((record.quantizer.mode, record.quantizer.window,
                        record.quantizer.hardness), ("rcdl", 2, "alpha"),
                       record.name)
      self.assertAllClose(record.kappa, 2.0)  # alpha q^2 at the start.
    n_weights, n_activations = 6 * 5 + 5 * 3, 5
    self.assertAllClose(
        records["quant_d1/kernel"].variables["rate_weight"], 0.3 / n_weights)
    self.assertAllClose(
        records["quant_d1/output"].variables["rate_weight"],
        0.005 / n_activations)

  def test_only_linear_outputs_of_quantized_layers_get_an_output_quantizer(
      self):
    inputs = tf.keras.Input((6,))
    h = L.Dense(5, activation="relu", name="d1")(inputs)
    probabilities = L.Dense(3, activation="softmax", name="soft")(h)
    logits = L.Dense(3, name="lin")(h)
    through_bn = L.BatchNormalization(name="bn")(L.Dense(3, name="d3")(h))
    model = tf.keras.Model(inputs, [probabilities, logits, through_bn])
    records = by_name(keras_cdl.quantize_model(model, weight_bits=4,
                                               activation_bits=4))
    self.assertIn("quant_lin/output", records)
    for name in ("quant_soft/output", "quant_d3/output", "quant_bn/output"):
      self.assertNotIn(name, records)
    # The rate metrics leave the logits out.
    qmodel = keras_cdl.quantize_model(sequential_model(), lmbda=1.0,
                                      gamma=1.0)
    activation_records = [
        r.name for r, _ in model_lib.rate_bits(qmodel)[
            "bits_per_activation"]]
    self.assertEqual(activation_records, ["quant_d1/output"])

  def test_annotated_layer_keeps_its_config(self):
    inputs = tf.keras.Input((6,))
    config = keras_cdl.CDLQuantizeConfig(
        ["kernel"], keras_cdl.CDLWeightQuantizer(bits=2, mode="cdl"))
    h = keras_cdl.quantize_annotate_layer(
        L.Dense(5, activation="relu", name="d1"), config)(inputs)
    outputs = L.Dense(3, name="d2")(h)
    qmodel = keras_cdl.quantize_model(tf.keras.Model(inputs, outputs),
                                      weight_bits=6, activation_bits=4)
    records = by_name(qmodel)
    self.assertEqual(records["quant_d1/kernel"].quantizer.bits, 2)
    self.assertEqual(records["quant_d1/kernel"].quantizer.mode, "cdl")
    self.assertNotIn("quant_d1/output", records)  # The config has none.
    self.assertEqual(records["quant_d2/kernel"].quantizer.bits, 6)
    self.assertEqual(records["quant_d2/kernel"].quantizer.mode, "rcdl")

  def test_annotate_rejects_non_config(self):
    with self.assertRaisesRegex(ValueError, "`quantize_config`.*str"):
      keras_cdl.quantize_annotate_layer(L.Dense(3), "kernel")


class FunctionalTest(tf.test.TestCase):

  def test_which_layers_are_quantized(self):
    model = residual_model()
    qmodel = keras_cdl.quantize_model(model, weight_bits=4, activation_bits=3,
                                      calibration_data=images())
    records = by_name(qmodel)
    self.assertEqual(list(records), [
        "quantize_layer/input",
        "quant_c1/kernel", "quant_c1/output",   # feeds c2 and Add: stays.
        "quant_c2/kernel",                      # linear: BN follows.
        "quant_r/output",
        "quant_c3/kernel",
        "quant_pool2/output",                   # c3's ReLU, moved past pool2.
        "quant_logits/kernel",
        "quant_logits/output",                  # signed 8 bits, no rate.
    ])
    for name in ("c1", "c2", "c3", "logits"):
      record = records[f"quant_{name}/kernel"]
      self.assertIsInstance(record.quantizer, quantizers.CDLWeightQuantizer)
      self.assertEqual(record.quantizer.bits, 4)
      self.assertIsInstance(record.weight, tf.Variable)
      self.assertEqual(record.weight.name, f"{name}/kernel:0")
      self.assertAllEqual(record.weight, model.get_layer(name).kernel)
    for name in ("quant_c1/output", "quant_r/output", "quant_pool2/output"):
      quantizer = records[name].quantizer
      self.assertIsInstance(quantizer, quantizers.CDLActivationQuantizer)
      self.assertEqual((quantizer.bits, quantizer.signed), (3, False))
      self.assertEqual(quantizer.rate, "entropy")
    # The input is quantized without a rate term (its entropy is the data's),
    # unsigned because the calibration images are non-negative.
    input_quantizer = records["quantize_layer/input"].quantizer
    self.assertIsNone(input_quantizer.rate)
    self.assertFalse(input_quantizer.signed)
    self.assertIsInstance(qmodel.get_layer("quantize_layer"),
                          quantize_layer.QuantizeLayer)

    # Left float, unwrapped: BatchNormalization, Add, pooling, Flatten.
    for name in ("bn", "add", "pool1", "flat"):
      layer = qmodel.get_layer(name)
      self.assertNotIsInstance(layer, _Wrapper, name)
    self.assertIsInstance(qmodel.get_layer("bn"), L.BatchNormalization)
    self.assertAllEqual(qmodel.get_layer("bn").moving_variance,
                        model.get_layer("bn").moving_variance)
    # The logits: signed 8 bits (whatever activation_bits is), no rate.
    logits = records["quant_logits/output"].quantizer
    self.assertEqual((logits.bits, logits.signed, logits.rate),
                     (8, True, None))

  def test_per_channel_kernel_steps(self):
    model = residual_model()
    qmodel = keras_cdl.quantize_model(model, weight_bits=4,
                                      activation_bits=4, per_channel=True)
    for name, channels in (("c1", 4), ("c2", 4), ("logits", 3)):
      record = by_name(qmodel)[f"quant_{name}/kernel"]
      self.assertEqual(record.step.shape, (channels,))
      self.assertAllClose(
          record.step, lsq(model.get_layer(name).kernel, 4, True, axis=-1),
          rtol=1e-5)


class UnsupportedLayerTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("conv_transpose",
       lambda: [L.InputLayer((4, 4, 2)), L.Conv2DTranspose(3, 2, name="up"),
                L.Flatten(), L.Dense(3)], "up", "Conv2DTranspose"),
      ("embedding",
       lambda: [L.InputLayer((5,)), L.Embedding(10, 4, name="emb"),
                L.Flatten(), L.Dense(3)], "emb", "Embedding"),
  )
  def test_warns_and_strict_raises(self, make_layers, name, class_name):
    model = tf.keras.Sequential(make_layers())
    with self.assertLogs(level=logging.WARNING) as logs:
      qmodel = keras_cdl.quantize_model(model, weight_bits=4,
                                        activation_bits=4)
    messages = [m for m in logs.output if name in m]
    self.assertLen(messages, 1)
    self.assertIn(class_name, messages[0])
    self.assertIn("quantize_annotate_layer", messages[0])
    # It stays float, with the float model's weights; the Dense is quantized.
    self.assertNotIsInstance(qmodel.get_layer(name), _Wrapper)
    self.assertAllEqual(qmodel.get_layer(name).weights[0],
                        model.get_layer(name).weights[0])
    self.assertEqual([r.name for r in introspect.quantized_tensors(qmodel)
                      if r.kind == "weight"], ["quant_dense/kernel"])

    with self.assertRaisesRegex(ValueError, f"{name}.*{class_name}.*strict"):
      keras_cdl.quantize_model(model, strict=True)


class ArgumentErrorTest(tf.test.TestCase, parameterized.TestCase):

  def test_subclassed_model_points_to_layers(self):

    class Net(tf.keras.Model):

      def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

      def call(self, x):
        return self.dense(x)

    model = Net()
    model(tf.zeros([1, 4]))
    with self.assertRaisesRegex(ValueError, r"Net.*keras_cdl\.layers"):
      keras_cdl.quantize_model(model)

  def test_not_a_model(self):
    with self.assertRaisesRegex(ValueError, "`model`.*Dense"):
      keras_cdl.quantize_model(L.Dense(3))

  def test_unbuilt_model(self):
    model = tf.keras.Sequential([L.Dense(3)])
    with self.assertRaisesRegex(ValueError, "built"):
      keras_cdl.quantize_model(model)

  @parameterized.named_parameters(
      ("weight_bits", dict(weight_bits=1), "weight_bits", "1"),
      ("activation_bits", dict(activation_bits=9), "activation_bits", "9"),
      ("output_bits", dict(output_bits=1), "output_bits", "1"),
      ("lmbda", dict(lmbda=-1), "lmbda", "-1"),
      ("gamma_nan", dict(gamma=float("nan")), "gamma", "nan"),
      ("gamma_string", dict(gamma="0.1"), "gamma", "'0.1'"),
      ("rate", dict(rate="x"), "rate", "'x'"),
      ("mode", dict(mode="soft"), "mode", "'soft'"),
      ("kappa", dict(kappa=0.0), "kappa", "0.0"),
  )
  def test_bad_argument_names_argument_and_value(self, kwargs, arg, value):
    with self.assertRaises(ValueError) as caught:
      keras_cdl.quantize_model(sequential_model(), **kwargs)
    message = str(caught.exception)
    self.assertIn(f"`{arg}`", message)
    self.assertIn(f"got {value}", message)


class TrainedFloatModelTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = trained_residual_model()
    cls.calibration = images(16, seed=1)

  def test_step_sizes_follow_lsq_rule_and_calibration(self):
    qmodel = keras_cdl.quantize_model(self.model, weight_bits=4,
                                      activation_bits=3,
                                      calibration_data=self.calibration)
    records = by_name(qmodel)
    for name in ("c1", "c2", "c3", "logits"):
      self.assertAllClose(records[f"quant_{name}/kernel"].step,
                          lsq(self.model.get_layer(name).kernel, 4, True),
                          rtol=1e-5)
    # Activations: the float model's outputs on the calibration batch.
    for record_name, layer_name in (("quant_c1/output", "c1"),
                                    ("quant_r/output", "r"),
                                    ("quant_pool2/output", "pool2")):
      probe = tf.keras.Model(self.model.inputs,
                             self.model.get_layer(layer_name).output)
      expected = lsq(probe(self.calibration, training=False), 3, False)
      self.assertAllClose(records[record_name].step, expected, rtol=1e-5)
      self.assertNotAllClose(records[record_name].step, 0.05)  # The default.
    self.assertAllClose(records["quantize_layer/input"].step,
                        lsq(self.calibration, 3, False), rtol=1e-5)
    # Logits: the range rule max|x| / 127, so no calibration logit clips.
    logits = self.model(self.calibration, training=False).numpy()
    self.assertAllClose(records["quant_logits/output"].step,
                        np.abs(logits).max() / 127, rtol=1e-5)

  def test_weights_are_copied_from_the_float_model(self):
    qmodel = keras_cdl.quantize_model(self.model, weight_bits=4,
                                      activation_bits=4)
    records = by_name(qmodel)
    for name in ("c1", "c2", "c3", "logits"):
      self.assertAllEqual(records[f"quant_{name}/kernel"].weight,
                          self.model.get_layer(name).kernel)
      self.assertAllEqual(qmodel.get_layer(f"quant_{name}").layer.bias,
                          self.model.get_layer(name).bias)
    for variable in ("gamma", "beta", "moving_mean", "moving_variance"):
      self.assertAllEqual(getattr(qmodel.get_layer("bn"), variable),
                          getattr(self.model.get_layer("bn"), variable))

  def test_eight_bit_inference_is_close_to_float(self):
    x = images(64, seed=2)
    expected = self.model(x, training=False).numpy()
    scale = np.abs(expected).max()
    errors = {}
    for bits in (8, 4):
      qmodel = keras_cdl.quantize_model(self.model, weight_bits=bits,
                                        activation_bits=bits,
                                        calibration_data=self.calibration)
      actual = qmodel(x, training=False).numpy()
      errors[bits] = np.abs(actual - expected).max() / scale
      if bits == 8:
        agree = np.mean(actual.argmax(-1) == expected.argmax(-1))
    # Measured: 8 bits 0.10 of the largest |logit| (the LSQ step at 8 bits
    # is mean|w| / 5.6, so only about +-11 of the +-127 levels are used),
    # 4 bits 0.47; the 8-bit argmax agrees on 64 of 64 images.
    self.assertLess(errors[8], 0.2)
    self.assertLess(errors[8], errors[4] / 2)
    self.assertGreaterEqual(agree, 0.9)


class SaveLoadTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tf.keras.utils.set_random_seed(1)
    cls.x = images(16, seed=3)
    cls.qmodel = keras_cdl.quantize_model(
        residual_model(), mode="rcdl", weight_bits=4, activation_bits=4,
        lmbda=0.05, gamma=0.01, hardness="alpha", calibration_data=cls.x)
    # Give every variable (kernels, steps, alphas, rate weights, BN
    # statistics) a distinct value, so a variable restored into the wrong
    # slot shows.  Scaling keeps the signs (variances stay positive).
    rng = np.random.RandomState(4)
    for variable in cls.qmodel.weights:
      if variable.dtype.is_floating:
        variable.assign(
            variable * rng.uniform(0.8, 1.25, variable.shape) +
            (0 if "variance" in variable.name else
             rng.uniform(-0.01, 0.01, variable.shape)))
    cls.expected = cls.qmodel(cls.x, training=False).numpy()
    cls.tmp = tempfile.TemporaryDirectory()

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  @parameterized.parameters("savedmodel", "model.h5")
  def test_save_load_gives_identical_predictions(self, path):
    path = os.path.join(self.tmp.name, path)
    # Without traces the SavedModel must be revived from the layers' configs
    # (and it saves in seconds rather than tens of seconds).
    self.qmodel.save(path, **({"save_traces": False}
                              if path.endswith("savedmodel") else {}))
    with keras_cdl.quantize_scope():
      loaded = tf.keras.models.load_model(path)
    self.assertIsInstance(loaded, keras_cdl.CDLModel)
    self.assertAllEqual(loaded(self.x, training=False), self.expected)
    original = by_name(self.qmodel)
    restored = by_name(loaded)
    self.assertEqual(list(original), list(restored))
    for name, record in original.items():
      self.assertEqual(restored[name].quantizer, record.quantizer, name)
      for key, variable in record.variables.items():
        self.assertAllEqual(restored[name].variables[key], variable,
                            f"{name} {key}")
    # The loaded model still trains with its rate terms.
    loaded(self.x, training=True)
    self.assertLen(loaded.losses,
                   sum(r.quantizer.rate is not None for r in original.values()))

  def test_checkpoint_round_trip_restores_variables(self):
    prefix = tf.train.Checkpoint(model=self.qmodel).save(
        os.path.join(self.tmp.name, "ckpt"))
    # A fresh quantized model of the same architecture, different steps.
    tf.keras.utils.set_random_seed(2)
    fresh = keras_cdl.quantize_model(
        residual_model(), mode="rcdl", weight_bits=4, activation_bits=4,
        hardness="alpha")
    self.assertNotAllClose(fresh(self.x, training=False), self.expected)
    status = tf.train.Checkpoint(model=fresh).restore(prefix)
    status.assert_existing_objects_matched()
    self.assertAllEqual(fresh(self.x, training=False), self.expected)
    for a, b in zip(self.qmodel.weights, fresh.weights):
      self.assertAllEqual(a, b, a.name)


if __name__ == "__main__":
  tf.test.main()
