"""Tests of keras_cdl.summary: per-tensor entropies and the size estimate.

Kernels and step sizes are set by hand, and the expected entropies are
computed here from a NumPy histogram of `clip(round(w / q))`.
"""

import math

import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import introspect
from keras_cdl import summary

L = tf.keras.layers

# Kernels with chosen indices at step 0.1 (3 bits: indices -3..3), each
# value off the rounding ties; some beyond the range (clipped to +-3).
KERNEL_1 = np.array([[0.01, 0.02, -0.11, 0.29],
                     [0.52, -0.98, 0.12, 0.0],
                     [0.09, 0.1, -0.01, 0.21]], np.float32)
KERNEL_2 = np.array([[0.0, 0.0], [0.0, 0.31], [-0.29, 0.0], [0.0, 0.01]],
                    np.float32)
STEP = 0.1


def np_entropy(values, lo, hi):
  """Entropy in bits per element of an integer array's histogram."""
  counts = np.bincount((np.asarray(values) - lo).ravel(),
                       minlength=hi - lo + 1)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def np_indices(w, step, lo, hi):
  return np.clip(np.round(w / step), lo, hi).astype(np.int64)


def tiny_model():
  """Dense -> BN -> ReLU -> Dense, quantized with hand-set kernels/steps."""
  model = tf.keras.Sequential([
      L.InputLayer((3,)),
      L.Dense(4, name="d1"),
      L.BatchNormalization(name="bn"),
      L.ReLU(name="relu"),
      L.Dense(2, name="d2"),
  ])
  qmodel = keras_cdl.quantize_model(model, weight_bits=3, activation_bits=4,
                                    hardness="kappa", kappa=4.0)
  for record in introspect.quantized_tensors(qmodel):
    if record.kind == "weight":
      record.weight.assign(KERNEL_1 if record.name == "quant_d1/kernel"
                           else KERNEL_2)
      record.quantizer.set_step(record.variables, STEP)
  return qmodel


class EntropyBitsTest(tf.test.TestCase):

  def test_known_values(self):
    self.assertEqual(summary.entropy_bits([3, 3, 3]), 0.0)
    self.assertAllClose(summary.entropy_bits([0, 1, 2, 3]), 2.0)
    self.assertAllClose(summary.entropy_bits([[0, 0], [0, 1]]),
                        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    self.assertEqual(summary.entropy_bits([]), 0.0)


class ReportTest(tf.test.TestCase):

  def test_entropies_sizes_and_counts(self):
    qmodel = tiny_model()
    rep = summary.report(qmodel)
    by_name = {t.name: t for t in rep.tensors}
    self.assertEqual(list(by_name), [
        "quantize_layer/input", "quant_d1/kernel", "quant_relu/output",
        "quant_d2/kernel", "quant_d2/output"])

    h1 = np_entropy(np_indices(KERNEL_1, STEP, -3, 3), -3, 3)
    h2 = np_entropy(np_indices(KERNEL_2, STEP, -3, 3), -3, 3)
    self.assertGreater(h1, h2)  # The hand-set kernels differ in entropy.
    self.assertAllClose(by_name["quant_d1/kernel"].entropy, h1, rtol=1e-12)
    self.assertAllClose(by_name["quant_d2/kernel"].entropy, h2, rtol=1e-12)
    self.assertEqual(by_name["quant_d1/kernel"].elements, 12)
    self.assertEqual(by_name["quant_d2/kernel"].elements, 8)
    self.assertEqual(by_name["quant_d1/kernel"].bits, 3)
    self.assertEqual(by_name["quant_relu/output"].bits, 4)
    self.assertAllClose(by_name["quant_d1/kernel"].step, STEP, rtol=1e-6)
    self.assertAllClose(by_name["quant_d1/kernel"].kappa, 4.0)
    self.assertTrue(math.isnan(by_name["quant_relu/output"].entropy))
    self.assertEqual(by_name["quant_d2/output"].bits, 8)  # The logits.

    self.assertEqual(rep.quantized_parameters, 20)
    self.assertAllClose(rep.bits_per_weight, (12 * h1 + 8 * h2) / 20)
    # Float: biases 4 + 2 and BatchNorm's gamma, beta, mean, variance 4 x 4.
    self.assertEqual(rep.float_parameters, 22)
    self.assertEqual(rep.total_parameters, 42)
    self.assertAllClose(rep.estimated_bytes,
                        (12 * h1 + 8 * h2) / 8 + 4 * 22)
    self.assertAllClose(rep.float32_bytes, 4 * 42)

  def test_entropy_follows_the_step(self):
    qmodel = tiny_model()
    record = [r for r in introspect.quantized_tensors(qmodel)
              if r.name == "quant_d1/kernel"][0]
    record.quantizer.set_step(record.variables, 10.0)  # All indices 0.
    rep = summary.report(qmodel)
    self.assertEqual(rep.tensors[1].entropy, 0.0)


class SummaryTest(tf.test.TestCase):

  def test_prints_one_line_per_quantized_tensor(self):
    qmodel = tiny_model()
    lines = []
    rep = summary.summary(qmodel, print_fn=lines.append)
    names = [r.name for r in introspect.quantized_tensors(qmodel)]
    self.assertLen(names, 5)
    for name in names:
      matching = [line for line in lines if line.split()[:1] == [name]]
      self.assertLen(matching, 1, name)
    kernel_line = [line for line in lines
                   if line.startswith("quant_d1/kernel")][0]
    fields = kernel_line.split()
    self.assertEqual(fields[1:4], ["weight", "12", "3"])
    self.assertAllClose(float(fields[4]), rep.tensors[1].entropy, atol=5e-4)
    self.assertIn(f"{rep.bits_per_weight:.3f} bits/weight", "\n".join(lines))
    self.assertIn("float parameters: 22", "\n".join(lines))
    # The tensor table, two rules, header and two totals lines.
    self.assertLen(lines, 5 + 5)
    again = summary.report(qmodel)
    self.assertEqual(rep.bits_per_weight, again.bits_per_weight)
    self.assertEqual(rep.estimated_bytes, again.estimated_bytes)


if __name__ == "__main__":
  tf.test.main()
