"""Tests of keras_cdl.rate: both rate terms behind the one interface."""

import numpy as np
import pytest
import tensorflow as tf

import keras_cdl
from keras_cdl import ops
from keras_cdl import rate


def _numpy_entropy(x, q, kappa, lo, hi):
  levels = np.arange(lo, hi + 1)
  logits = -kappa * (x.reshape(-1, 1) / q - levels) ** 2
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  pbar = p.mean(axis=0)
  pbar = pbar[pbar > 0]
  return float(-(pbar * np.log2(pbar)).sum())


def test_get_resolves_names_and_rejects_unknown():
  assert isinstance(rate.get("entropy", False), rate.MarginalEntropy)
  assert isinstance(rate.get("prior", True), rate.LearnedPrior)
  assert rate.get(None, False) is None
  with pytest.raises(ValueError, match=r"`rate`.*'huffman'"):
    rate.get("huffman", False)


def test_marginal_entropy_weight_total_is_n_times_h():
  rng = np.random.RandomState(0)
  x = rng.randn(6, 5).astype(np.float64) * 0.4
  q, kappa, lo, hi = 0.25, 3.0, -7, 7
  term = rate.MarginalEntropy(per_sample=False)
  bits = term(tf.constant(x), q, kappa / q**2, lo, hi, 15, term.build(
      None, "w", lo, hi))
  np.testing.assert_allclose(bits.numpy(), x.size * _numpy_entropy(
      x, q, kappa, lo, hi), rtol=1e-6)


def test_marginal_entropy_activation_total_is_per_sample_mean():
  rng = np.random.RandomState(1)
  x = np.abs(rng.randn(3, 4, 2)) * 0.5
  q, kappa, lo, hi = 0.2, 2.0, 0, 15
  term = rate.MarginalEntropy(per_sample=True)
  bits = term(tf.constant(x), q, kappa / q**2, lo, hi, 16, {})
  expected = np.mean([_numpy_entropy(s, q, kappa, lo, hi) for s in x]) * 8
  np.testing.assert_allclose(bits.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mode", ["cdl", "rcdl"])
def test_quantize_and_bits_equals_quantize_then_bits(per_sample, mode):
  rng = np.random.RandomState(2)
  x = tf.constant(np.abs(rng.randn(3, 4, 5)) * 0.5, tf.float32)
  q, alpha, lo, hi = 0.2, 50.0, 0, 15
  for term in (rate.MarginalEntropy(per_sample), rate.LearnedPrior(per_sample)):
    variables = {}
    if isinstance(term, rate.LearnedPrior):
      layer = tf.keras.layers.Layer()
      variables = term.build(layer, "x", lo, hi)
    tf.random.set_seed(3)
    value, bits = term.quantize_and_bits(x, q, alpha, lo, hi, 3, mode,
                                         variables)
    tf.random.set_seed(3)
    expected = ops.quantize(x, q, alpha, lo, hi, 3, mode, training=True)
    np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        bits.numpy(), term(x, q, alpha, lo, hi, 3, variables).numpy(),
        rtol=1e-6)


def test_learned_prior_builds_trainable_layer_weights_with_gradients():
  layer = tf.keras.layers.Layer()
  term = rate.LearnedPrior(per_sample=False)
  variables = term.build(layer, "kernel", -7, 7)
  assert set(variables) == {"prior_loc", "prior_log_scale", "prior_logits"}
  assert all(v.trainable for v in variables.values())
  assert len(layer.trainable_weights) == 3
  x = tf.constant(np.random.RandomState(2).randn(50).astype(np.float32))
  with tf.GradientTape() as tape:
    tape.watch(x)
    bits = term(x, 0.3, 1.0, -7, 7, 3, variables, training=True)
  grads = tape.gradient(bits, [x] + list(variables.values()))
  assert bits.numpy() > 0
  for g in grads:
    assert g is not None and np.all(np.isfinite(g.numpy()))


def test_learned_prior_bits_fall_when_fit_to_the_data():
  """Training the prior on concentrated values must lower their bits."""
  layer = tf.keras.layers.Layer()
  term = rate.LearnedPrior(per_sample=False)
  variables = term.build(layer, "kernel", -7, 7)
  x = tf.constant(np.zeros(200, np.float32))
  optimizer = tf.keras.optimizers.Adam(0.1)
  first = None
  for _ in range(30):
    with tf.GradientTape() as tape:
      bits = term(x, 1.0, 1.0, -7, 7, 3, variables, training=True)
    first = bits.numpy() if first is None else first
    optimizer.apply_gradients(zip(
        tape.gradient(bits, list(variables.values())),
        list(variables.values())))
  assert bits.numpy() < 0.5 * first


def test_prior_rate_trains_and_saves_with_quantize_model(tmp_path):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      tf.keras.layers.InputLayer((6,)),
      tf.keras.layers.Dense(8, activation="relu"),
      tf.keras.layers.Dense(3)])
  x = np.random.rand(32, 6).astype(np.float32)
  y = np.random.randint(0, 3, 32)
  qmodel = keras_cdl.quantize_model(model, mode="rcdl", weight_bits=4,
                                    activation_bits=4, lmbda=0.1, gamma=0.01,
                                    rate="prior", calibration_data=x)
  prior_weights = [w for w in qmodel.trainable_weights if "prior" in w.name]
  # Two kernels and one ReLU output, three parameters each.
  assert len(prior_weights) == 9
  before = [w.numpy().copy() for w in prior_weights]
  qmodel.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(True))
  history = qmodel.fit(x, y, epochs=1, batch_size=16, verbose=0)
  assert history.history["bits_per_weight"][0] > 0
  assert all(np.any(a != w.numpy()) for a, w in zip(before, prior_weights))
  path = str(tmp_path / "model.h5")
  qmodel.save(path)
  with keras_cdl.quantize_scope():
    loaded = tf.keras.models.load_model(path)
  for a, b in zip(qmodel.weights, loaded.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
