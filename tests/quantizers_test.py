"""Tests of keras_cdl.quantizers: the tfmot `Quantizer`s of CDL.

Each quantizer is built on a bare Keras layer, as tfmot's wrappers do, so the
tests see exactly the variables, outputs and losses a wrapper would.  The
references are NumPy (round and clip) or `keras_cdl.ops` called with the
step size the test set by hand.  Tensors are tiny; the file runs in seconds.
"""

import math

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from keras_cdl import ops
from keras_cdl import quantizers

QUANTIZER_CLASSES = (quantizers.CDLQuantizer, quantizers.CDLWeightQuantizer,
                     quantizers.CDLActivationQuantizer)


class Host(tf.keras.layers.Layer):
  """A minimal tfmot-style wrapper: builds the quantizer, calls it in `call`.

  The quantizer adds its rate with `layer.add_loss`, which Keras accepts for
  eager tensors only inside the layer's own call, as in tfmot's wrappers.
  """

  def __init__(self, quantizer, shape):
    super().__init__()
    self.quantizer = quantizer
    self.qweights = quantizer.build(tf.TensorShape(shape), "w", self)

  def call(self, inputs, training=None):
    return self.quantizer(inputs, training, self.qweights)


def build(quantizer, shape):
  """Builds `quantizer` for a tensor of `shape` on a fresh host layer."""
  layer = Host(quantizer, shape)
  return layer, layer.qweights


def np_round_clip(x, q, lo, hi):
  return np.clip(np.round(np.asarray(x) / q), lo, hi) * q


class SerializationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("weight_defaults", quantizers.CDLWeightQuantizer, {}),
      ("weight_per_channel_alpha", quantizers.CDLWeightQuantizer,
       dict(bits=3, mode="cdl", hardness="alpha", kappa=2.5, window=5,
            per_channel=True, channel_axis=-2, rate=None)),
      ("activation_signed_prior", quantizers.CDLActivationQuantizer,
       dict(bits=6, signed=True, mode="rcdl", kappa=1.0, rate="prior")),
      ("base_per_sample", quantizers.CDLQuantizer,
       dict(bits=5, signed=False, per_sample_rate=True, window=4)),
  )
  def test_config_round_trip_gives_equal_quantizer_with_same_outputs(
      self, cls, kwargs):
    original = cls(**kwargs)
    restored = cls.from_config(original.get_config())
    self.assertEqual(original, restored)
    self.assertFalse(original != restored)
    for key, value in kwargs.items():
      self.assertEqual(getattr(restored, key), value, key)

    shape = [3, 4]
    host1, w1 = build(original, shape)
    host2, w2 = build(restored, shape)
    self.assertEqual(sorted(w1), sorted(w2))
    rng = np.random.RandomState(0)
    for key in w1:
      w1[key].assign(w1[key] + rng.uniform(-0.1, 0.1, w1[key].shape)
                     .astype(np.float32))
      w2[key].assign(w1[key])
    x = tf.constant(rng.randn(*shape).astype(np.float32))
    self.assertAllEqual(host1(x, training=False), host2(x, training=False))
    if original.mode == "rcdl":
      self.assertAllEqual(host1(x, training=True), host2(x, training=True))

  def test_different_configs_are_not_equal(self):
    a = quantizers.CDLWeightQuantizer(bits=4)
    self.assertNotEqual(a, quantizers.CDLWeightQuantizer(bits=5))
    self.assertTrue(a != quantizers.CDLWeightQuantizer(kappa=1.0))
    # Same arguments, different class.
    self.assertNotEqual(
        quantizers.CDLActivationQuantizer(bits=4, signed=True),
        quantizers.CDLQuantizer(bits=4, signed=True, per_sample_rate=True))

  @parameterized.parameters(*QUANTIZER_CLASSES)
  def test_keras_serialize_deserialize_round_trip(self, cls):
    original = cls(bits=3, kappa=2.0, window=4)
    config = tf.keras.utils.serialize_keras_object(original)
    self.assertEqual(config["registered_name"], f"keras_cdl>{cls.__name__}")
    # Resolved through Keras' global registry, with no custom objects given.
    restored = tf.keras.utils.deserialize_keras_object(config)
    self.assertIs(type(restored), cls)
    self.assertEqual(original, restored)

  def test_subclass_configs_hide_fixed_arguments(self):
    self.assertNotIn("signed",
                     quantizers.CDLWeightQuantizer().get_config())
    self.assertTrue(quantizers.CDLWeightQuantizer().signed)
    config = quantizers.CDLActivationQuantizer().get_config()
    for key in ("per_channel", "channel_axis", "per_sample_rate"):
      self.assertNotIn(key, config)
    self.assertFalse(quantizers.CDLActivationQuantizer().signed)
    self.assertTrue(quantizers.CDLActivationQuantizer().per_sample_rate)


class ConstructorErrorTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("bits_1", "bits", 1),
      ("bits_9", "bits", 9),
      ("bits_float", "bits", 4.0),
      ("mode", "mode", "foo"),
      ("hardness", "hardness", "beta"),
      ("kappa_zero", "kappa", 0),
      ("kappa_negative", "kappa", -1.5),
      ("window_zero", "window", 0),
      ("rate", "rate", "bar"),
  )
  def test_error_names_argument_and_value(self, arg, value):
    for cls in QUANTIZER_CLASSES:
      with self.subTest(cls=cls.__name__):
        with self.assertRaises(ValueError) as caught:
          cls(**{arg: value})
        message = str(caught.exception)
        self.assertIn(f"`{arg}`", message)
        self.assertIn(repr(value), message)

  def test_channel_axis_must_be_integer(self):
    with self.assertRaisesRegex(ValueError, "`channel_axis`.*'last'"):
      quantizers.CDLWeightQuantizer(channel_axis="last")

  def test_per_channel_needs_known_channel_size(self):
    q = quantizers.CDLWeightQuantizer(per_channel=True)
    with self.assertRaisesRegex(ValueError, "per_channel"):
      build(q, [3, None])


class InferenceTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (quantizers.CDLWeightQuantizer, 3, -3, 3),
      (quantizers.CDLActivationQuantizer, 2, 0, 3),
  )
  def test_training_false_is_round_and_clip(self, cls, bits, lo, hi):
    q = cls(bits=bits, mode="cdl")
    self.assertEqual((q.lo, q.hi), (lo, hi))
    host, w = build(q, [50])
    q.set_step(w, 0.1)
    # Values well past both ends of A, none on a rounding tie.
    x = np.random.RandomState(1).uniform(-0.6, 0.6, 50).astype(np.float32)
    expected = np_round_clip(x, np.float32(0.1), lo, hi)
    out = host(tf.constant(x), training=False)
    self.assertAllClose(out, expected, rtol=0, atol=1e-7)
    self.assertAllClose(out.numpy().min(), 0.1 * lo, rtol=1e-6)
    self.assertAllEqual(q.indices(x, w), np.clip(np.round(x / 0.1), lo, hi))
    # Inference is deterministic, even in mode "cdl".
    self.assertAllEqual(out, host(tf.constant(x), training=False))

  def test_rcdl_training_is_soft_quantize_and_cdl_is_on_grid(self):
    # Off the half-step ties, where the window placement is a coin toss.
    x = tf.constant(np.linspace(-0.35, 0.35, 29).astype(np.float32) + 0.003)
    soft = quantizers.CDLWeightQuantizer(bits=3, mode="rcdl", kappa=2.0)
    host, w = build(soft, [29])
    soft.set_step(w, 0.1)
    expected = ops.soft_quantize(x, 0.1, 2.0 / 0.01, -3, 3, 3)
    self.assertAllClose(host(x, training=True), expected, rtol=0, atol=1e-6)

    sampled = quantizers.CDLWeightQuantizer(bits=3, mode="cdl", kappa=2.0)
    host, w = build(sampled, [29])
    sampled.set_step(w, 0.1)
    out = host(x, training=True).numpy() / 0.1
    self.assertAllClose(out, np.round(out), rtol=0, atol=1e-4)
    # Sampled indices stay within the window around x / q.
    self.assertAllLessEqual(np.abs(out - x.numpy() / 0.1), 2.0)


class PerChannelTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(([6, 3], -1), ([2, 2, 3, 1], -2))
  def test_each_channel_uses_its_own_step(self, shape, channel_axis):
    q = quantizers.CDLWeightQuantizer(bits=4, per_channel=True,
                                      channel_axis=channel_axis, kappa=2.0)
    host, w = build(q, shape)
    self.assertEqual(w["log_step"].shape, [3])
    steps = np.array([0.05, 0.2, 1.0], np.float32)
    q.set_step(w, steps)
    self.assertAllClose(tf.exp(w["log_step"]), steps)

    x = np.random.RandomState(2).uniform(-2, 2, shape).astype(np.float32)
    moved = np.moveaxis(x, channel_axis, 0)
    out = np.moveaxis(host(tf.constant(x), training=False).numpy(), channel_axis, 0)
    soft = np.moveaxis(host(tf.constant(x), training=True).numpy(), channel_axis, 0)
    for c, step in enumerate(steps):
      self.assertAllClose(out[c], np_round_clip(moved[c], step, -7, 7),
                          rtol=0, atol=1e-6)
      self.assertAllClose(
          soft[c],
          ops.soft_quantize(tf.constant(moved[c]), step, 2.0 / step**2, -7,
                            7, 3), rtol=0, atol=1e-5)

  def test_per_tensor_step_is_scalar(self):
    _, w = build(quantizers.CDLWeightQuantizer(), [4, 5])
    self.assertEqual(w["log_step"].shape, [])


class HardnessTest(tf.test.TestCase, parameterized.TestCase):

  def test_alpha_hardness_creates_trainable_log_alpha(self):
    q = quantizers.CDLWeightQuantizer(hardness="alpha", kappa=2.0)
    layer, w = build(q, [4, 3])
    self.assertNotIn("kappa", w)
    self.assertIn("log_alpha", w)
    trainable = {id(v) for v in layer.trainable_weights}
    self.assertIn(id(w["log_alpha"]), trainable)
    self.assertIn(id(w["log_step"]), trainable)
    self.assertNotIn(id(w["rate_weight"]), trainable)
    self.assertAllClose(q.get_kappa(w), 2.0, rtol=1e-5)

  def test_kappa_hardness_variable_is_not_trainable(self):
    q = quantizers.CDLWeightQuantizer(kappa=3.0)
    layer, w = build(q, [4, 3])
    self.assertNotIn("log_alpha", w)
    self.assertNotIn(id(w["kappa"]), {id(v) for v in layer.trainable_weights})
    self.assertAllClose(q.get_kappa(w), 3.0)

  @parameterized.parameters(False, True)
  def test_set_step_keeps_kappa_in_alpha_mode(self, per_channel):
    q = quantizers.CDLWeightQuantizer(hardness="alpha", kappa=1.5,
                                      per_channel=per_channel)
    _, w = build(q, [4, 3])
    q.set_step(w, [0.3, 0.3, 0.3] if per_channel else 0.3)
    self.assertAllClose(q.get_kappa(w), 1.5, rtol=1e-5)
    q_value, alpha = q.step_and_alpha(w, tf.float32, 2)
    self.assertAllClose(alpha * q_value**2,
                        np.full(q_value.shape, 1.5), rtol=1e-5)
    self.assertAllClose(q_value, np.full(q_value.shape, 0.3), rtol=1e-6)

  def test_set_step_keeps_each_channels_kappa(self):
    q = quantizers.CDLWeightQuantizer(hardness="alpha", per_channel=True)
    _, w = build(q, [4, 3])
    q.set_step(w, [0.1, 0.2, 0.4])
    kappas = np.array([0.5, 2.0, 8.0])
    w["log_alpha"].assign(np.log(kappas / np.array([0.1, 0.2, 0.4])**2))
    q.set_step(w, [0.3, 0.05, 1.0])
    q_value, alpha = q.step_and_alpha(w, tf.float32, 1)
    self.assertAllClose(q_value, [0.3, 0.05, 1.0], rtol=1e-6)
    self.assertAllClose(alpha * q_value**2, kappas, rtol=1e-5)

  @parameterized.parameters("kappa", "alpha")
  def test_set_kappa_get_kappa_round_trip(self, hardness):
    q = quantizers.CDLWeightQuantizer(hardness=hardness, kappa=4.0)
    _, w = build(q, [4, 3])
    q.set_step(w, 0.07)
    for kappa in (0.5, 2.0, 16.0):
      q.set_kappa(w, kappa)
      self.assertAllClose(q.get_kappa(w), kappa, rtol=1e-5)
      # The CPMF sees kappa = alpha q^2 whichever variable stores it.
      q_value, alpha = q.step_and_alpha(w, tf.float32, 2)
      self.assertAllClose(alpha * q_value**2, kappa, rtol=1e-5)
    # The step is untouched by set_kappa.
    self.assertAllClose(tf.exp(w["log_step"]), 0.07, rtol=1e-6)

  @parameterized.parameters(0.0, -1.0)
  def test_set_kappa_rejects_non_positive(self, kappa):
    q = quantizers.CDLWeightQuantizer()
    _, w = build(q, [2])
    with self.assertRaisesRegex(ValueError, "`kappa`"):
      q.set_kappa(w, kappa)

  @parameterized.parameters(0.0, -0.1, float("nan"), float("inf"))
  def test_set_step_rejects_bad_steps(self, step):
    q = quantizers.CDLWeightQuantizer()
    _, w = build(q, [2])
    with self.assertRaisesRegex(ValueError, "`step`"):
      q.set_step(w, step)


class RateLossTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("cdl", "rcdl")
  def test_weight_rate_adds_one_loss_rate_weight_times_bits(self, mode):
    q = quantizers.CDLWeightQuantizer(bits=4, mode=mode, kappa=2.0)
    layer, w = build(q, [5, 4])
    q.set_step(w, 0.1)
    w["rate_weight"].assign(0.25)
    x = tf.constant(np.random.RandomState(3).randn(5, 4).astype(np.float32)
                    * 0.3)
    layer(x, training=True)
    self.assertLen(layer.losses, 1)
    self.assertIsNotNone(q.last_bits)
    self.assertAllClose(layer.losses[0], 0.25 * q.last_bits, rtol=1e-6)
    # The bits are N * H of the marginal PMF, over the whole kernel.
    entropy = ops.marginal_entropy(x, 0.1, 2.0 / 0.01, -7, 7, 3)
    self.assertAllClose(q.last_bits, 20 * entropy, rtol=1e-5)
    self.assertGreater(float(q.last_bits), 0.0)

    layer(x, training=False)
    self.assertIsNone(q.last_bits)
    self.assertEmpty(layer.losses)

  def test_activation_rate_is_per_sample_average(self):
    q = quantizers.CDLActivationQuantizer(bits=3, kappa=2.0)
    layer, w = build(q, [None, 6])
    q.set_step(w, 0.2)
    w["rate_weight"].assign(0.5)
    x = tf.constant(np.abs(np.random.RandomState(4).randn(4, 6))
                    .astype(np.float32))
    layer(x, training=True)
    self.assertLen(layer.losses, 1)
    per_sample = ops.marginal_entropy(x, 0.2, 2.0 / 0.04, 0, 7, 3,
                                      per_sample=True)
    self.assertAllClose(q.last_bits, 6 * np.mean(per_sample), rtol=1e-5)
    self.assertAllClose(layer.losses[0], 0.5 * q.last_bits, rtol=1e-6)

  def test_rate_none_adds_no_loss(self):
    q = quantizers.CDLActivationQuantizer(rate=None)
    layer, w = build(q, [3])
    layer(tf.constant([0.1, 0.2, 0.3]), training=True)
    self.assertEmpty(layer.losses)
    self.assertIsNone(q.last_bits)

  def test_rate_loss_gradient_reaches_step_size(self):
    q = quantizers.CDLWeightQuantizer(bits=4, kappa=2.0)
    layer, w = build(q, [8])
    w["rate_weight"].assign(1.0)
    x = tf.constant(np.linspace(-0.2, 0.2, 8).astype(np.float32))
    with tf.GradientTape() as tape:
      layer(x, training=True)
      loss = tf.add_n(layer.losses)
    grad = tape.gradient(loss, w["log_step"])
    self.assertIsNotNone(grad)
    self.assertTrue(math.isfinite(float(grad)))
    self.assertNotEqual(float(grad), 0.0)


  @parameterized.parameters(("rcdl", "entropy"), ("rcdl", "prior"),
                            ("cdl", "entropy"))
  def test_rate_on_output_and_gradients_match_separate_ops(self, mode, rate):
    """With a rate, the output and loss gradients equal ops.quantize plus
    the rate term called separately (the entropy term takes a fused op)."""
    q = quantizers.CDLWeightQuantizer(bits=4, mode=mode, kappa=2.0,
                                      rate=rate)
    layer, w = build(q, [6, 5])
    q.set_step(w, 0.1)
    w["rate_weight"].assign(0.5)
    x = tf.constant(np.random.RandomState(6).randn(6, 5) * 0.3, tf.float32)
    upstream = tf.constant(np.random.RandomState(7).randn(6, 5), tf.float32)
    results = []
    for separate in (False, True):
      tf.random.set_seed(1)
      with tf.GradientTape() as tape:
        tape.watch(x)
        if separate:
          step, alpha = q.step_and_alpha(w, x.dtype, 2)
          y = ops.quantize(x, step, alpha, -7, 7, 3, mode, training=True)
          bits = q._rate_term(x, step, alpha, -7, 7, 3, w)  # pylint: disable=protected-access
          loss = 0.5 * bits
        else:
          y = layer(x, training=True)
          loss = tf.add_n(layer.losses)
        total = tf.reduce_sum(y * upstream) + loss
      results.append([y, loss] + tape.gradient(
          total, [x] + layer.trainable_weights))
    for a, b in zip(*results):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)

class InitialStepTest(tf.test.TestCase):

  def test_lsq_rule_per_tensor_and_per_channel(self):
    w = np.random.RandomState(5).randn(4, 3).astype(np.float32)
    self.assertAllClose(quantizers.initial_step(w, 4, True),
                        2 * np.abs(w).mean() / math.sqrt(7), rtol=1e-6)
    self.assertAllClose(quantizers.initial_step(w, 4, False),
                        2 * np.abs(w).mean() / math.sqrt(15), rtol=1e-6)
    self.assertAllClose(quantizers.initial_step(w, 3, True, channel_axis=-1),
                        2 * np.abs(w).mean(axis=0) / math.sqrt(3), rtol=1e-6)

  def test_all_zero_tensor_gets_positive_step(self):
    step = quantizers.initial_step(np.zeros([3, 2]), 4, True)
    self.assertGreater(float(step), 0.0)


if __name__ == "__main__":
  tf.test.main()
