"""Tests of keras_cdl.export: inference model, SavedModel and int8 TFLite.

Exact facts are checked with `assertAllEqual`: the inference model and the
SavedModel reproduce `model(x, training=False)` bitwise (without BatchNorm
folding), folding keeps every index, the TFLite kernels hold the CDL indices
with the CDL steps as scales, the TFLite activations have the CDL steps as
scales, and TFLite's first conv is integer arithmetic on exactly the CDL
indices.  The logits are quantized by `quantize_model` (`output_bits=8`), so
TFLite's output scale is the CDL output step.  The int32 biases at
`q_x q_w / 2^k` are not the float model's biases until `snap_biases` moves
them onto that grid, so TFLite's top-1 agreement with the CDL model is
measured on 2000 Fashion-MNIST test images, before and after snapping, and
the int8 logits are compared level by level.  The default interpreter runs
XNNPACK kernels (one float rounding); `experimental_preserve_all_tensors`
runs the builtin kernels, whose double rounding the first-conv test models.

Two models are trained once per module, each in a few seconds: LeNet5-Caffe
(one float epoch on 12000 images, `quantize_model` with 8-bit weights and
activations, a few CDL steps) and a Functional Conv-BN-ReLU model with a
residual `Add` and per-channel steps (the same recipe, R-CDL).
"""

import functools
import os
import tempfile

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import keras_cdl
from keras_cdl import architectures
from keras_cdl import datasets
from keras_cdl import export

L = tf.keras.layers
_KERNEL_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_PARITY_IMAGES = 2000


@functools.lru_cache(maxsize=None)
def fashion_mnist():
  return datasets.load_fashion_mnist()


def _loss():
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train_and_quantize(model, mode, per_channel, float_images):
  """One float epoch, `quantize_model` 8/8 bits, eight CDL steps."""
  (x_train, y_train), _ = fashion_mnist()
  model.compile(tf.keras.optimizers.Adam(2e-3), _loss())
  model.fit(x_train[:float_images], y_train[:float_images], batch_size=128,
            epochs=1, verbose=0)
  qmodel = keras_cdl.quantize_model(model, mode, 8, 8,
                                    per_channel=per_channel,
                                    calibration_data=x_train[:256])
  qmodel.compile(tf.keras.optimizers.Adam(1e-4), _loss())
  qmodel.fit(x_train[-512:], y_train[-512:], batch_size=64, epochs=1,
             verbose=0)
  return qmodel


@functools.lru_cache(maxsize=None)
def trained_lenet():
  tf.keras.utils.set_random_seed(0)
  return _train_and_quantize(architectures.lenet5_caffe(), "cdl", False,
                             12000)


def conv_bn_relu_model():
  """Conv-BN-ReLU twice (the second in a residual branch), float logits."""
  inputs = tf.keras.Input((28, 28, 1), name="image")
  x = L.Conv2D(16, 5, use_bias=False, name="c1")(inputs)
  x = L.BatchNormalization(name="bn1")(x)
  x = L.ReLU(name="r1")(x)
  x = L.MaxPooling2D(name="p1")(x)
  y = L.Conv2D(16, 3, padding="same", name="c2")(x)
  y = L.BatchNormalization(name="bn2")(y)
  y = L.ReLU(name="r2")(y)
  x = L.Add(name="add")([x, y])
  x = L.MaxPooling2D(name="p2")(x)
  x = L.Flatten(name="flat")(x)
  outputs = L.Dense(10, name="logits")(x)
  return tf.keras.Model(inputs, outputs, name="conv_bn_relu")


@functools.lru_cache(maxsize=None)
def trained_bn_model():
  tf.keras.utils.set_random_seed(1)
  return _train_and_quantize(conv_bn_relu_model(), "rcdl", True, 12000)


def mixed_layers_model():
  """DepthwiseConv2D(x2)-BN-ReLU, Conv2D-ReLU, Conv1D-BN-ReLU, Dense."""
  inputs = tf.keras.Input((12, 12, 3), name="image")
  x = L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False,
                        name="dw")(inputs)
  x = L.BatchNormalization(name="bn1")(x)
  x = L.ReLU(name="r1")(x)
  x = L.Conv2D(8, 3, activation="relu", name="c2")(x)
  x = L.Reshape((64, 8), name="seq")(x)
  x = L.Conv1D(6, 3, name="c3")(x)
  x = L.BatchNormalization(name="bn3")(x)
  x = L.ReLU(name="r3")(x)
  x = L.Flatten(name="flat")(x)
  outputs = L.Dense(5, name="logits")(x)
  model = tf.keras.Model(inputs, outputs, name="mixed")
  rng = np.random.RandomState(0)
  for name in ("bn1", "bn3"):
    layer = model.get_layer(name)
    gamma, beta, mean, var = layer.get_weights()
    gamma = rng.uniform(0.5, 2.0, gamma.shape).astype(np.float32)
    gamma[1] = -gamma[1]  # A negative scale flips the channel's indices.
    layer.set_weights([
        gamma, rng.normal(0, 0.1, beta.shape).astype(np.float32),
        rng.normal(0, 0.1, mean.shape).astype(np.float32),
        rng.uniform(0.5, 2.0, var.shape).astype(np.float32)])
  return model


def signed_images(n=64, seed=0):
  return np.random.RandomState(seed).normal(0, 1, (n, 12, 12, 3)).astype(
      np.float32)


@functools.lru_cache(maxsize=None)
def mixed_model(bits):
  """`mixed_layers_model` quantized (untrained) with signed input."""
  tf.keras.utils.set_random_seed(2)
  return keras_cdl.quantize_model(mixed_layers_model(), "rcdl", bits, bits,
                                  per_channel=True,
                                  calibration_data=signed_images())


@functools.lru_cache(maxsize=None)
def snapped(name):
  """`(model, moves)`: a copy of a trained model after `snap_biases`."""
  model = trained_lenet() if name == "lenet" else trained_bn_model()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.cdl")
    keras_cdl.compress(model, path)
    copy = keras_cdl.decompress(path)
  return copy, export.snap_biases(copy)


def model_of(name):
  """The trained model `name` names ("lenet", "bn", "lenet_snapped", ...)."""
  if name.endswith("_snapped"):
    return snapped(name[:-len("_snapped")])[0]
  return trained_lenet() if name == "lenet" else trained_bn_model()


@functools.lru_cache(maxsize=None)
def tflite_of(name, bits=8):
  """`(bytes, plan)` of one of the models above."""
  (x_train, _), _ = fashion_mnist()
  if name == "mixed":
    model, data = mixed_model(bits), signed_images(32, seed=1)
  else:
    model = model_of(name)
    data = x_train[-300:]
  return export.to_tflite(model, None, data), export.export_plan(model)


def run_tflite(tflite_bytes, x):
  interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
  detail = interpreter.get_input_details()[0]
  interpreter.resize_tensor_input(detail["index"], x.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(detail["index"], x)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def kernel_ops(tflite_bytes):
  """`[(op name, input detail, weight detail, int8 weights)]` in order."""
  interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
  interpreter.allocate_tensors()
  details = {d["index"]: d for d in interpreter.get_tensor_details()}
  found = []
  for op in interpreter._get_ops_details():  # pylint: disable=protected-access
    if op["op_name"] in _KERNEL_OPS:
      weights = details[op["inputs"][1]]
      found.append((op["op_name"], details[op["inputs"][0]], weights,
                    interpreter.get_tensor(weights["index"])))
  return found


def tflite_layout(kernel, layer_type):
  """A Keras kernel in TFLite's layout (written out independently of export)."""
  if layer_type == "conv2d":
    return np.transpose(kernel, (3, 0, 1, 2))
  if layer_type == "conv1d":
    return np.transpose(kernel, (2, 0, 1))[:, None]
  if layer_type == "depthwise":
    return kernel.reshape((1,) + kernel.shape[:2] + (-1,))
  return np.transpose(kernel)


def tflite_requantize(acc, multiplier):
  """TFLite's `MultiplyByQuantizedMultiplier` (pip build: two roundings).

  `QuantizeMultiplier` writes `multiplier = m 2^e` with a 31-bit `m`; the
  product is rounded to an integer (`SaturatingRoundingDoublingHighMul`),
  then divided by `2^-e` rounding half up (`RoundingDivideByPOT`).
  """
  mantissa, exponent = np.frexp(np.asarray(multiplier, np.float64))
  fixed = np.round(mantissa * 2.0**31).astype(np.int64)
  exponent = np.where(fixed == 2**31, exponent + 1, exponent)
  fixed = np.where(fixed == 2**31, fixed // 2, fixed)
  left, right = np.maximum(exponent, 0), np.maximum(-exponent, 0)
  product = (acc.astype(np.int64) << left) * fixed
  nudged = product + np.where(product >= 0, 2**30, 1 - 2**30)
  high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))
  mask = (np.int64(1) << right) - 1
  threshold = (mask >> 1) + (high < 0)
  return (high >> right) + ((high & mask) > threshold)


def top1_agreement(a, b):
  return float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))


class InferenceModelTest(tf.test.TestCase, parameterized.TestCase):

  def test_lenet_inference_model_is_bitwise_the_cdl_model(self):
    model = trained_lenet()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:_PARITY_IMAGES]
    infer = export.inference_model(model)
    self.assertAllEqual(infer(x), model(x, training=False))
    self.assertAllEqual(tf.function(infer)(x), model(x, training=False))

  def test_inference_model_has_no_tfmot_layers(self):
    infer = export.inference_model(trained_bn_model())
    names = {type(layer).__name__ for layer in infer.layers}
    self.assertNoCommonElements(
        names, {"QuantizeWrapperV2", "QuantizeLayer", "BatchNormalization"})
    self.assertIn("RoundQuantize", names)

  def test_unfolded_bn_model_is_bitwise_the_cdl_model(self):
    model = trained_bn_model()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:500]
    infer = export.inference_model(model, fold_batch_norm=False)
    self.assertIn("BatchNormalization",
                  {type(layer).__name__ for layer in infer.layers})
    self.assertAllEqual(infer(x), model(x, training=False))

  def test_folded_bn_model_matches_to_float_precision(self):
    model = trained_bn_model()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:_PARITY_IMAGES]
    reference = model(x, training=False).numpy()
    folded = export.inference_model(model)(x).numpy()
    # Folding changes float rounding only: an activation within float error
    # of a level boundary may move one level, so compare per image, in
    # steps of the (quantized) logits.
    step = export.export_plan(model).activations[-1].step
    levels = np.round((folded - reference) / step)
    self.assertAllClose(folded - reference, levels * step, atol=1e-5)
    equal = np.all(levels == 0, axis=-1)
    print(f"\nfolded BN: {equal.mean():.4f} of images with equal logits, "
          f"max level difference {np.abs(levels).max():.0f}")
    self.assertGreaterEqual(equal.mean(), 0.97)
    self.assertAllLessEqual(np.abs(levels), 2)
    self.assertGreaterEqual(top1_agreement(folded, reference), 0.998)

  def test_folding_keeps_every_index(self):
    for model in (trained_bn_model(), mixed_model(8), mixed_model(4)):
      plan = export.export_plan(model)
      values = {v.name: v for v in export.quantized_values(model)}
      folded = [k for k in plan.kernels if k.folded]
      self.assertLen(folded, 2)
      self.assertLen(plan.folded_batch_norms, 2)
      for kernel in plan.kernels:
        source = values[kernel.source].indices
        channels = kernel.indices.shape[-1] * (
            kernel.indices.shape[-2] if kernel.layer_type == "depthwise" else 1)
        step = np.broadcast_to(kernel.step, [channels])
        # [..., output channel] views (depthwise: channel c * m + j).
        out = kernel.indices.reshape(-1, channels)
        src = source.reshape(-1, channels)
        with self.subTest(model=model.name, layer=kernel.layer):
          # Each output channel holds its CDL indices, negated where a
          # BatchNorm gamma is negative, times one positive step.
          self.assertTrue(np.all(step > 0))
          same = np.all(out == src, axis=0)
          negated = np.all(out == -src, axis=0)
          self.assertTrue(np.all(same | negated))
          if not kernel.folded:
            self.assertTrue(np.all(same))
          self.assertAllEqual(
              kernel.kernel.reshape(-1, channels),
              (step * out.astype(np.float32)).astype(np.float32))
          if kernel.layer in ("dw", "c3"):  # gamma[1] < 0 flips channel 1.
            self.assertAllEqual(out[:, 1], -src[:, 1])
            self.assertAllEqual(out[:, 0], src[:, 0])

  def test_mixed_layers_are_exact_without_folding(self):
    for bits in (4, 8):
      model = mixed_model(bits)
      x = signed_images(16, seed=3)
      infer = export.inference_model(model, fold_batch_norm=False)
      self.assertAllEqual(infer(x), model(x, training=False))
      folded = export.inference_model(model)(x)
      self.assertAllClose(folded, model(x, training=False), rtol=0,
                          atol=1e-4)

  def test_values_round_trip_and_override(self):
    model = trained_lenet()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:64]
    values = export.quantized_values(model)
    self.assertEqual([v.kind for v in values],
                     ["input", "weight", "activation", "weight", "activation",
                      "weight", "activation", "weight", "activation"])
    for value in values:
      self.assertEqual(value.indices is None, value.kind != "weight")
    reference = model(x, training=False)
    self.assertAllEqual(export.inference_model(model, values=values)(x),
                        reference)
    # Zero the logits layer's indices: its outputs become its bias, on the
    # logits' grid.
    last = [v for v in values if v.kind == "weight"][-1]
    zeroed = export.QuantizedValue(last.name, last.kind, last.bits,
                                   last.signed, last.step, last.channel_axis,
                                   np.zeros_like(last.indices))
    logits = export.inference_model(model, values=[zeroed])(x)
    bias = model.layers[-1].layer.bias.numpy()
    step = values[-1].step
    self.assertEqual(values[-1].name, "quant_dense_1/output")
    expected = np.clip(np.round(bias / step), -127, 127) * step
    self.assertAllEqual(logits, np.broadcast_to(expected, logits.shape))

  def test_round_quantize_is_the_quantizer_and_serializes(self):
    layer = export.RoundQuantize(0.1, 0, 15, name="q")
    x = tf.constant([-1.0, 0.04, 0.05, 0.25, 0.35, 1.49, 2.0])
    self.assertAllEqual(
        layer(x), keras_cdl.ops.round_quantize(x, np.float32(0.1), 0, 15))
    clone = export.RoundQuantize.from_config(layer.get_config())
    self.assertAllEqual(clone(x), layer(x))
    self.assertEqual(clone.get_config()["step"], np.float32(0.1))

  def test_fake_quant_rounds_ties_up_so_inference_uses_round(self):
    # Why `inference_model` does not use fake_quant_with_min_max_vars: on a
    # tie it rounds up, CDL (tf.round) to even.
    q = np.float32(0.5)
    x = tf.constant([1.25, 0.75])  # 2.5 q and 1.5 q
    fake = export.RoundQuantize(q, 0, 255, implementation="fake_quant")
    exact = export.RoundQuantize(q, 0, 255)
    self.assertAllEqual(fake(x), [1.5, 1.0])
    self.assertAllEqual(exact(x), [1.0, 1.0])


class SavedModelTest(tf.test.TestCase):

  def test_serving_default_is_bitwise_the_cdl_model(self):
    model = trained_lenet()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:_PARITY_IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
      export.to_saved_model(model, os.path.join(tmp, "sm"))
      loaded = tf.saved_model.load(os.path.join(tmp, "sm"))
      serve = loaded.signatures["serving_default"]
      _, inputs = serve.structured_input_signature
      self.assertEqual(list(inputs), model.input_names)
      outputs = serve(**{model.input_names[0]: tf.constant(x)})
      self.assertLen(outputs, 1)
      self.assertAllEqual(list(outputs.values())[0],
                          model(x, training=False))

  def test_saved_bn_model_without_folding_is_bitwise(self):
    model = trained_bn_model()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:256]
    with tempfile.TemporaryDirectory() as tmp:
      export.to_saved_model(model, tmp, fold_batch_norm=False)
      serve = tf.saved_model.load(tmp).signatures["serving_default"]
      outputs = serve(image=tf.constant(x))
      self.assertEqual(list(outputs), ["logits"])  # The float layer's name.
      self.assertAllEqual(outputs["logits"], model(x, training=False))


class TFLiteTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(("lenet", 8), ("bn", 8), ("mixed", 8),
                            ("mixed", 4))
  def test_weights_are_cdl_indices_and_scales_cdl_steps(self, name, bits):
    tflite_bytes, plan = tflite_of(name, bits)
    ops = kernel_ops(tflite_bytes)
    self.assertLen(ops, len(plan.kernels))
    for kernel in plan.kernels:
      with self.subTest(layer=kernel.layer):
        matches = [op for op in ops if f"/{kernel.layer}/" in op[2]["name"]]
        self.assertLen(matches, 1)
        _, _, weights, values = matches[0]
        params = weights["quantization_parameters"]
        self.assertEqual(weights["dtype"], np.int8)
        # Stored as i 2^k at scale q / 2^k, k the int8 headroom: exactly the
        # weights i q.
        top = np.abs(kernel.indices).max()
        shift = export.index_shift(kernel.indices)
        self.assertLessEqual(top * 2**shift, 127)
        self.assertGreater(top * 2**(shift + 1), 127)
        if bits == 4:
          self.assertGreaterEqual(shift, 4)  # |i| <= 7.
        indices = tflite_layout(kernel.indices, kernel.layer_type)
        self.assertAllEqual(values, indices * 2**shift)
        step = np.broadcast_to(kernel.step, params["scales"].shape)
        scales = params["scales"].astype(np.float32)
        self.assertAllEqual(scales,
                            (step / np.float32(2**shift)).astype(np.float32))
        shape = [1] * values.ndim
        shape[params["quantized_dimension"]] = -1
        self.assertAllEqual(  # The same weights, exactly.
            values.astype(np.float32) * scales.reshape(shape),
            indices.astype(np.float32) * step.astype(np.float32).reshape(
                shape))
        self.assertAllEqual(params["zero_points"], np.zeros_like(step))
        if not kernel.folded:
          # Unfolded, the indices are the stored CDL indices themselves.
          source = {v.name: v for v in export.quantized_values(
              trained_lenet() if name == "lenet" else trained_bn_model()
              if name == "bn" else mixed_model(bits))}[kernel.source]
          self.assertAllEqual(kernel.indices, source.indices)
          self.assertAllEqual(np.broadcast_to(source.step, step.shape), step)

  def test_unshifted_weights_are_the_indices_themselves(self):
    model = mixed_model(4)
    tflite_bytes = export.to_tflite(model, None, signed_images(16),
                                    shift_indices=False)
    plan = export.export_plan(model)
    for kernel, (_, _, weights, values) in zip(plan.kernels,
                                                kernel_ops(tflite_bytes)):
      self.assertAllEqual(values,
                          tflite_layout(kernel.indices, kernel.layer_type))
      self.assertAllEqual(
          weights["quantization_parameters"]["scales"].astype(np.float32),
          np.broadcast_to(kernel.step,
                          weights["quantization_parameters"]["scales"].shape))

  def test_index_shift(self):
    self.assertEqual(export.index_shift(np.array([0, 7, -7])), 4)
    self.assertEqual(export.index_shift(np.array([-8, 1])), 3)
    self.assertEqual(export.index_shift(np.array([127])), 0)
    self.assertEqual(export.index_shift(np.array([64])), 0)
    self.assertEqual(export.index_shift(np.array([63])), 1)
    self.assertEqual(export.index_shift(np.zeros(3, np.int32)), 0)

  def test_lenet_activation_scales_are_cdl_steps(self):
    tflite_bytes, plan = tflite_of("lenet")
    ops = kernel_ops(tflite_bytes)
    # Each conv / dense reads the previous CDL activation (the input, two
    # pooled ReLU outputs, the dense ReLU output): scale q, zero point -128.
    # The fifth activation is the logits (signed: zero point 0), checked by
    # the top-1 agreement tests.
    self.assertEqual([op[0] for op in ops], ["CONV_2D", "CONV_2D",
                                             "FULLY_CONNECTED",
                                             "FULLY_CONNECTED"])
    self.assertLen(plan.activations, 5)
    self.assertEqual(plan.activations[-1].lo, -127)
    for (_, source, _, _), activation in zip(ops, plan.activations):
      with self.subTest(activation=activation.source):
        params = source["quantization_parameters"]
        self.assertEqual(source["dtype"], np.int8)
        self.assertAllEqual(params["scales"], [activation.step])
        self.assertAllEqual(params["zero_points"], [-128])

  def test_lenet_first_conv_is_integer_arithmetic_on_cdl_indices(self):
    tflite_bytes, plan = tflite_of("lenet")
    model = trained_lenet()
    _, (x_test, _) = fashion_mnist()
    x = x_test[:100]
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes,
                                      experimental_preserve_all_tensors=True)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    conv = [op for op in interpreter._get_ops_details()  # pylint: disable=protected-access
            if op["op_name"] == "CONV_2D"][0]
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    tensors = [details[i] for i in list(conv["inputs"]) + list(conv["outputs"])]
    inputs, weights, bias, outputs = [
        interpreter.get_tensor(d["index"]).astype(np.int64) for d in tensors]
    scales = [d["quantization_parameters"]["scales"] for d in tensors]
    # The input indices are the CDL input indices.
    q_in = plan.activations[0].step
    self.assertAllEqual(inputs + 128, np.clip(np.round(x / q_in), 0, 255))
    # The output is TFLite's requantization of an exact integer sum.
    acc = tf.nn.conv2d(inputs.astype(np.float64) + 128,
                       np.transpose(weights, (1, 2, 3, 0)).astype(np.float64),
                       1, "VALID").numpy().astype(np.int64) + bias
    multiplier = (np.float64(scales[0][0]) * scales[1].astype(np.float64) /
                  np.float64(scales[3][0]))
    expected = np.clip(tflite_requantize(acc, multiplier), 0, 255) - 128
    self.assertAllEqual(outputs, expected)
    # ... which differs by one level from the float CDL model in a few
    # percent of elements (bias rounding, double rounding).
    first = [layer for layer in model.layers
             if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)][0]
    conv_float = tf.keras.Model(model.inputs, first.output)
    cdl = np.clip(np.round(conv_float(x, training=False).numpy() /
                           plan.activations[1].step), 0, 255)
    differ = np.abs(outputs + 128 - cdl)
    self.assertLessEqual(differ.max(), 1)
    print(f"\nLeNet conv1: {differ.mean():.2%} of TFLite activation indices "
          "differ by one from the CDL model's")
    self.assertLess(differ.mean(), 0.05)

  @parameterized.parameters(4, 8)
  def test_signed_input_and_low_bit_activations(self, bits):
    tflite_bytes, plan = tflite_of("mixed", bits)
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes,
                                      experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    hi = 2**(bits - 1) - 1
    # Standard deviation hi * q: about a third is beyond the largest level.
    x = signed_images(1, seed=4) * np.float32(hi * plan.activations[0].step)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details()  # pylint: disable=protected-access
           if op["op_name"] in _KERNEL_OPS]
    self.assertEqual([op["op_name"] for op in ops],
                     ["DEPTHWISE_CONV_2D", "CONV_2D", "CONV_2D",
                      "FULLY_CONNECTED"])
    # The kernels read the CDL activations: the signed input (zero point 0,
    # indices in the narrow range) and three unsigned ReLU outputs (zero
    # point -128, indices in [0, 2^b - 1]), each with its CDL step as scale.
    for op, activation in zip(ops, plan.activations):
      with self.subTest(activation=activation.source):
        detail = details[op["inputs"][0]]
        params = detail["quantization_parameters"]
        values = interpreter.get_tensor(detail["index"]).astype(int)
        self.assertAllEqual(params["scales"], [activation.step])
        if activation.signed:
          self.assertAllEqual(params["zero_points"], [0])
          self.assertAllInRange(values, -hi, hi)
          self.assertIn(hi, np.abs(values))  # The clip was needed.
        else:
          self.assertAllEqual(params["zero_points"], [-128])
          self.assertAllInRange(values + 128, 0, 2**bits - 1)

  def _parity(self, name):
    """`(agreement, logit level differences, margins in steps, disagree)`."""
    tflite_bytes, plan = tflite_of(name)
    model = model_of(name)
    _, (x_test, _) = fashion_mnist()
    x = x_test[:_PARITY_IMAGES]
    reference = model(x, training=False).numpy()
    lite = export.run_tflite(tflite_bytes, x, batch_size=512)
    self.assertAllClose(lite, run_tflite(tflite_bytes, x))
    # The TFLite output scale is the CDL logits step, and the CDL logits are
    # on that grid.
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
    last = interpreter._get_ops_details()[-1]  # pylint: disable=protected-access
    self.assertEqual(last["op_name"], "DEQUANTIZE")
    logits = [d for d in interpreter.get_tensor_details()
              if d["index"] == last["inputs"][0]][0]
    scale = logits["quantization_parameters"]["scales"][0]
    self.assertEqual(logits["quantization_parameters"]["zero_points"][0], 0)
    self.assertEqual(scale, plan.activations[-1].step)
    levels = reference / scale
    self.assertAllClose(levels, np.round(levels), atol=1e-4)
    differences = np.round(lite / scale) - np.round(levels)
    agreement = top1_agreement(lite, reference)
    top_two = np.sort(np.round(levels), -1)
    margins = top_two[:, -1] - top_two[:, -2]
    disagree = np.argmax(lite, -1) != np.argmax(reference, -1)
    print(f"\n{name}: TFLite top-1 agreement {agreement:.4f} on {len(x)} "
          f"images; int8 logits equal {np.mean(differences == 0):.4f}, "
          f"max level difference {np.abs(differences).max():.0f}; margins of "
          f"the disagreeing images (steps): {margins[disagree]}")
    return agreement, differences, margins, disagree

  def test_lenet_top1_agreement(self):
    agreement, differences, margins, disagree = self._parity("lenet")
    # Measured: 0.9980 (4 images, top two CDL logits within one step); 95%
    # of the int8 logits equal, the rest one level apart.
    self.assertGreaterEqual(agreement, 0.995)
    self.assertGreaterEqual(np.mean(differences == 0), 0.85)
    self.assertAllLessEqual(np.abs(differences), 1)
    self.assertAllLessEqual(margins[disagree], 1)

  def test_bn_model_top1_agreement(self):
    agreement, differences, margins, disagree = self._parity("bn")
    # Measured: 0.9955 (0.9935 before the kernels' int8 headroom shift).
    # This briefly trained model's logits span only +-2.5, so its step is
    # 0.02 and near ties are common; 80% of the int8 logits equal, a few two
    # levels apart (folded BatchNorm adds its float rounding to the integer
    # arithmetic's).
    self.assertGreaterEqual(agreement, 0.99)
    self.assertGreaterEqual(np.mean(differences == 0), 0.7)
    self.assertAllLessEqual(np.abs(differences), 3)
    self.assertAllLessEqual(margins[disagree], 2)

  def test_snapped_lenet_is_the_tflite_model(self):
    agreement, differences, _, _ = self._parity("lenet_snapped")
    # Measured: top-1 1.0000; 16 of the 20000 int8 logits one level apart
    # (float32 sums of 800 8-bit products within ~1e-5 of a boundary),
    # against 5% before `snap_biases`.  The default interpreter's XNNPACK
    # kernels requantize with one float rounding.
    self.assertGreaterEqual(agreement, 0.999)
    self.assertGreaterEqual(np.mean(differences == 0), 0.998)
    self.assertAllLessEqual(np.abs(differences), 1)

  def test_builtin_kernels(self):
    tflite_bytes, _ = tflite_of("lenet_snapped")
    _, (x_test, _) = fashion_mnist()
    x = x_test[:200]
    interpreter = tf.lite.Interpreter(
        model_content=tflite_bytes,
        experimental_op_resolver_type=(
            tf.lite.experimental.OpResolverType
            .BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    expected = interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"])
    builtin = export.run_tflite(tflite_bytes, x, batch_size=64,
                                kernels="builtin")
    self.assertAllEqual(builtin, expected)
    # The two runtimes requantize differently (one rounding or two): some
    # int8 logits differ.
    self.assertFalse(np.array_equal(builtin, export.run_tflite(tflite_bytes,
                                                               x)))

  def test_snapped_bn_model_top1_agreement(self):
    agreement, differences, margins, disagree = self._parity("bn_snapped")
    # Measured: 0.9955, as without snapping: the logits read the residual
    # `Add`, which is float in the CDL model and calibrated int8 in TFLite,
    # so `snap_biases` leaves that layer alone (only c1 and c2 move).
    self.assertGreaterEqual(agreement, 0.99)
    self.assertAllLessEqual(np.abs(differences), 3)
    self.assertAllLessEqual(margins[disagree], 2)

  def _assert_tflite_biases_are(self, tflite_bytes, plan, moves):
    """The int32 bias times its scale is the (folded) Keras bias."""
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = [op for op in interpreter._get_ops_details()  # pylint: disable=protected-access
           if op["op_name"] in _KERNEL_OPS]
    # The converter keeps the graph's order of the kernels.
    self.assertLen(ops, len(plan.kernels))
    for op, kernel in zip(ops, plan.kernels):
      if kernel.layer not in moves:
        continue
      with self.subTest(layer=kernel.layer):
        if len(op["inputs"]) < 3 or op["inputs"][2] < 0:
          # The converter drops an all-zero bias.
          self.assertAllEqual(kernel.bias, np.zeros_like(kernel.bias))
          continue
        bias = details[op["inputs"][2]]
        scale = bias["quantization_parameters"]["scales"].astype(np.float64)
        stored = interpreter.get_tensor(bias["index"]) * scale
        self.assertAllClose(stored, kernel.bias, rtol=1e-6,
                            atol=1e-3 * scale.max())

  def test_snapped_biases_are_the_tflite_biases(self):
    for name in ("lenet", "bn"):
      model, moves = snapped(name)
      tflite_bytes, plan = tflite_of(name + "_snapped")
      # Every kernel reading a CDL activation moved by at most half a step.
      expected = {"lenet": ["conv2d", "conv2d_1", "dense", "dense_1"],
                  "bn": ["c1", "c2"]}[name]
      self.assertCountEqual(moves, expected)
      self.assertAllInRange(list(moves.values()), 0.0, 0.5)
      self._assert_tflite_biases_are(tflite_bytes, plan, moves)
      # Snapping twice changes nothing more.
      again = export.snap_biases(model)
      self.assertAllInRange(list(again.values()), 0.0, 0.01)

  @parameterized.parameters(True, False)
  def test_snapping_folded_batch_norms(self, center):
    # Depthwise and Conv1D kernels with folded BatchNorms (one with a
    # negative gamma), written through beta or, without one, the moving mean.
    tf.keras.utils.set_random_seed(3)
    float_model = mixed_layers_model()
    if not center:
      config = float_model.get_config()
      for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
          layer["config"]["center"] = False
      weights = {l.name: l.get_weights() for l in float_model.layers}
      float_model = tf.keras.Model.from_config(config)
      for layer in float_model.layers:
        values = weights[layer.name]
        if isinstance(layer, L.BatchNormalization):
          values = [values[0]] + values[2:]
        layer.set_weights(values)
    model = keras_cdl.quantize_model(float_model, "rcdl", 4, 4,
                                     per_channel=True,
                                     calibration_data=signed_images())
    moves = export.snap_biases(model)
    self.assertCountEqual(moves, ["dw", "c2", "c3", "logits"])
    self.assertAllInRange(list(moves.values()), 0.0, 0.5)
    tflite_bytes = export.to_tflite(model, None, signed_images(16, seed=1))
    plan = export.export_plan(model)
    self._assert_tflite_biases_are(tflite_bytes, plan, moves)

  def test_int8_io_and_the_written_file(self):
    model = mixed_model(8)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.tflite")
      tflite_bytes = export.to_tflite(model, path, signed_images(16),
                                      io_type="int8")
      with open(path, "rb") as f:
        self.assertEqual(f.read(), tflite_bytes)
    interpreter = tf.lite.Interpreter(model_content=tflite_bytes)
    detail = interpreter.get_input_details()[0]
    # The int8 input is the CDL input index itself (signed: zero point 0).
    self.assertEqual(detail["dtype"], np.int8)
    step = export.export_plan(model).activations[0].step
    self.assertAllEqual(detail["quantization_parameters"]["scales"], [step])
    self.assertAllEqual(detail["quantization_parameters"]["zero_points"], [0])
    self.assertEqual(interpreter.get_output_details()[0]["dtype"], np.int8)


class ErrorTest(tf.test.TestCase):

  def test_model_without_cdl_quantizers(self):
    model = architectures.lenet5_caffe()
    for fn in (export.inference_model, export.quantized_values):
      with self.assertRaisesRegex(ValueError, "`model` must contain CDL"):
        fn(model)
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(ValueError, "`model` must contain CDL"):
        export.to_saved_model(model, tmp)
      with self.assertRaisesRegex(ValueError, "`model` must contain CDL"):
        export.to_tflite(model, os.path.join(tmp, "m.tflite"),
                         np.zeros((1, 28, 28, 1), np.float32))

  def test_not_a_model(self):
    with self.assertRaisesRegex(ValueError, "`model` must be a tf.keras.Model"):
      export.inference_model(L.Dense(3))

  def test_bad_paths(self):
    model = mixed_model(8)
    data = signed_images(4)
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(ValueError, "`path`: the directory"):
        export.to_tflite(model, os.path.join(tmp, "missing", "m.tflite"),
                         data)
      with self.assertRaisesRegex(ValueError, "`path` must be a file path"):
        export.to_tflite(model, tmp, data)
      with self.assertRaisesRegex(ValueError, "`path` must be a non-empty"):
        export.to_tflite(model, "", data)
      a_file = os.path.join(tmp, "file")
      with open(a_file, "w") as f:
        f.write("x")
      with self.assertRaisesRegex(ValueError, "`export_dir` must be a "
                                  "directory"):
        export.to_saved_model(model, a_file)
      with self.assertRaisesRegex(ValueError, "`export_dir`: the directory"):
        export.to_saved_model(model, os.path.join(tmp, "no", "sm"))

  def test_bad_arguments(self):
    model = mixed_model(8)
    data = signed_images(4)
    with self.assertRaisesRegex(ValueError, "`io_type` must be one of"):
      export.to_tflite(model, None, data, io_type="uint8")
    with self.assertRaisesRegex(ValueError, "`representative_data` must be a "
                                "batch of inputs of shape"):
      export.to_tflite(model, None, np.zeros((4, 28, 28, 1), np.float32))
    with self.assertRaisesRegex(ValueError, "at least one sample"):
      export.to_tflite(model, None, np.zeros((0, 12, 12, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "`fold_batch_norm` must be a "
                                "bool"):
      export.inference_model(model, fold_batch_norm="yes")
    with self.assertRaisesRegex(ValueError, "`implementation` must be one"):
      export.export_plan(model, implementation="lut")
    with self.assertRaisesRegex(ValueError, "`step` must be positive"):
      export.RoundQuantize(0.0, 0, 15)
    with self.assertRaisesRegex(ValueError, "`shift_indices` must be a bool.*"
                                "'no'"):
      export.to_tflite(model, None, data, shift_indices="no")
    weights = [w.numpy() for w in model.weights]
    with self.assertRaisesRegex(ValueError, "`shift_indices` must be a bool.*"
                                "1"):
      export.snap_biases(model, shift_indices=1)
    with self.assertRaisesRegex(ValueError, "`fold_batch_norm` must be a "
                                "bool"):
      export.snap_biases(model, fold_batch_norm=None)
    # A rejected call changes nothing.
    for before, after in zip(weights, model.weights):
      self.assertAllEqual(before, after.numpy())

  def test_run_tflite_bad_arguments(self):
    tflite_bytes, _ = tflite_of("mixed")
    x = signed_images(4)
    with self.assertRaisesRegex(ValueError, "`batch_size` must be a positive "
                                "integer, but got 0"):
      export.run_tflite(tflite_bytes, x, batch_size=0)
    with self.assertRaisesRegex(ValueError, "`x` must be a batch of at least "
                                "one sample.*0, 12, 12, 3"):
      export.run_tflite(tflite_bytes, x[:0])
    with self.assertRaisesRegex(ValueError, "`x` must have the model's input "
                                "dtype float32, but got float64"):
      export.run_tflite(tflite_bytes, x.astype(np.float64))
    with self.assertRaisesRegex(ValueError, "`kernels` must be one of.*'xla'"):
      export.run_tflite(tflite_bytes, x, kernels="xla")
    # Batches of 3 (the last one short) give the same outputs as one batch.
    self.assertAllEqual(export.run_tflite(tflite_bytes, x, batch_size=3),
                        run_tflite(tflite_bytes, x))

  def test_bad_values(self):
    model = mixed_model(8)
    values = export.quantized_values(model)
    kernel = [v for v in values if v.kind == "weight"][0]
    with self.assertRaisesRegex(ValueError, "which is not a quantized tensor"):
      export.inference_model(model, values=[export.QuantizedValue(
          "nope/kernel", "weight", 8, True, np.float32(1))])
    with self.assertRaisesRegex(ValueError, "must have the kernel's shape"):
      export.inference_model(model, values=[export.QuantizedValue(
          kernel.name, "weight", 8, True, kernel.step, kernel.channel_axis,
          kernel.indices[:1])])
    with self.assertRaisesRegex(ValueError, r"must be integers in \[-127"):
      export.inference_model(model, values=[export.QuantizedValue(
          kernel.name, "weight", 8, True, kernel.step, kernel.channel_axis,
          kernel.indices * 0 + 200)])
    with self.assertRaisesRegex(ValueError, "has kind=weight, bits=4"):
      export.inference_model(model, values=[export.QuantizedValue(
          kernel.name, "weight", 4, True, kernel.step, kernel.channel_axis,
          kernel.indices)])
    with self.assertRaisesRegex(ValueError, "QuantizedValue objects"):
      export.inference_model(model, values=[(kernel.indices, kernel.step)])

  def test_subclassed_model(self):

    class Net(keras_cdl.CDLModel):

      def __init__(self):
        super().__init__()
        self.dense = keras_cdl.layers.QuantDense(3)

      def call(self, x, training=None):
        return self.dense(x, training=training)

    net = Net()
    net(np.zeros((1, 4), np.float32))
    with self.assertRaisesRegex(ValueError, "Sequential or Functional"):
      export.inference_model(net)


if __name__ == "__main__":
  tf.test.main()
