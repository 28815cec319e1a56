"""Tests of keras_cdl.ops: the CDL CPMF, quantizers and marginal entropy.

References are independent of the code under test: NumPy for the CPMF,
autodiff of the explicit all-levels soft formula, and finite differences
(`tf.test.compute_gradient`).  Everything is small and runs in seconds.
"""

import math

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from keras_cdl import ops


# ----------------------------------------------------------------------------
# Independent references.
# ----------------------------------------------------------------------------


def np_full_cpmf(x, q, alpha, lo, hi):
  """NumPy CPMF over all of A, float64, shape x.shape + [hi - lo + 1]."""
  x = np.asarray(x, np.float64)
  q = np.broadcast_to(np.asarray(q, np.float64), x.shape)
  alpha = np.broadcast_to(np.asarray(alpha, np.float64), x.shape)
  levels = np.arange(lo, hi + 1, dtype=np.float64)
  logits = -alpha[..., None] * (x[..., None] - levels * q[..., None]) ** 2
  logits -= logits.max(axis=-1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=-1, keepdims=True)


def np_window_start(u, lo, hi, window):
  """The documented window rule: the `window` nearest levels, kept in A."""
  window = min(window, hi - lo + 1)
  return np.clip(np.ceil(u - window / 2), lo, hi - window + 1), window


def explicit_soft(x, q, alpha, lo, hi):
  """Q_d over ALL levels, written out in plain TF ops (autodiff reference)."""
  levels = tf.range(lo, hi + 1, dtype=x.dtype)
  q = tf.broadcast_to(q, tf.shape(x))[..., None]
  alpha = tf.broadcast_to(alpha, tf.shape(x))[..., None]
  p = tf.nn.softmax(-alpha * tf.square(x[..., None] - levels * q), axis=-1)
  return tf.reduce_sum(levels * q * p, axis=-1)


def random_soft_inputs(rng, lo, hi, shape, channels=None, kappa=(0.5, 4.0)):
  """theta over [lo - 2, hi + 2] steps; q and alpha per tensor or channel."""
  param_shape = () if channels is None else (channels,)
  q = rng.uniform(0.05, 0.5, size=param_shape)
  kap = rng.uniform(kappa[0], kappa[1], size=param_shape)
  alpha = kap / q ** 2
  u = rng.uniform(lo - 2, hi + 2, size=shape)
  return u * q, q, alpha


def gradient_jacobians(f, args, rel_delta=1e-7):
  """(theoretical, numeric) Jacobians of f wrt each of args.

  Like `tf.test.compute_gradient`, but the finite-difference step of each
  argument is relative to that argument's magnitude (alpha ~ 1e3 and q ~ 0.1
  need very different steps for float64 round-off to stay negligible).
  """
  theoretical, numeric = [], []
  for k, arg in enumerate(args):
    scale = float(np.max(np.abs(arg.numpy())))

    def g(s, k=k, scale=scale):
      return f(*[s * scale if m == k else a for m, a in enumerate(args)])

    t, n = tf.test.compute_gradient(g, [arg / scale],
                                    delta=rel_delta)
    theoretical.append(t[0] / scale)
    numeric.append(n[0] / scale)
  return theoretical, numeric


def max_rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)),
                                                 1e-300)


SIGNED_CASES = (
    ("signed_2bit", 2, True),
    ("signed_8bit", 8, True),
    ("unsigned_3bit", 3, False),
)


class SoftQuantizeGradientTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      *[(name + "_per_tensor", bits, signed, None)
        for name, bits, signed in SIGNED_CASES],
      *[(name + "_per_channel", bits, signed, 3)
        for name, bits, signed in SIGNED_CASES])
  def test_analytic_gradients_match_autodiff_and_finite_differences(
      self, bits, signed, channels):
    lo, hi = ops.index_range(bits, signed)
    rng = np.random.RandomState(bits + 10 * signed + (channels or 0))
    shape = (6,) if channels is None else (2, channels)
    x, q, alpha = random_soft_inputs(rng, lo, hi, shape, channels,
                                     kappa=(2.0, 6.0))
    # Smallest kappa is 2: this window drops less than 1e-10 of the mass.
    window = ops.window_for_bound(2.0, 1e-10)
    self.assertLess(ops.truncation_bound(2.0, window), 1e-10)
    self.assertLess(window, hi - lo + 1 if bits == 8 else 100)
    args = [tf.constant(v, tf.float64) for v in (x, q, alpha)]

    analytic, numeric = gradient_jacobians(
        lambda x, q, a: ops.soft_quantize(x, q, a, lo, hi, window), args)
    explicit, _ = gradient_jacobians(
        lambda x, q, a: explicit_soft(x, q, a, lo, hi), args)
    for name, a, e, n in zip(("theta", "q", "alpha"), analytic, explicit,
                             numeric):
      with self.subTest(wrt=name):
        self.assertGreater(np.max(np.abs(e)), 0.0)
        self.assertLess(max_rel_err(a, e), 1e-4)
        self.assertLess(max_rel_err(a, n), 1e-4)
        # Element-wise too, so that small entries are checked as well.
        self.assertAllClose(a, e, rtol=1e-4, atol=1e-9 * np.max(np.abs(e)))

  def test_value_matches_explicit_formula(self):
    lo, hi = ops.index_range(8, True)
    rng = np.random.RandomState(0)
    x, q, alpha = random_soft_inputs(rng, lo, hi, (50,))
    x = tf.constant(x)
    self.assertAllClose(
        ops.soft_quantize(x, q, alpha, lo, hi, 15),
        explicit_soft(x, tf.constant(q), tf.constant(alpha), lo, hi),
        rtol=0, atol=1e-12)

  def test_sample_quantize_gradient_equals_soft_quantize_gradient(self):
    lo, hi = ops.index_range(4, True)
    rng = np.random.RandomState(1)
    x, q, alpha = random_soft_inputs(rng, lo, hi, (5, 3), channels=3)
    x, q, alpha = (tf.constant(v, tf.float32) for v in (x, q, alpha))
    grads = []
    for fn in (lambda: ops.soft_quantize(x, q, alpha, lo, hi, 4),
               lambda: ops.sample_quantize(x, q, alpha, lo, hi, 4, seed=3)):
      with tf.GradientTape() as tape:
        tape.watch([x, q, alpha])
        y = fn()
        # A non-uniform upstream gradient, to exercise the chain rule.
        loss = tf.reduce_sum(
            y * tf.reshape(tf.range(15, dtype=y.dtype), [5, 3]) / 15)
      grads.append(tape.gradient(loss, [x, q, alpha]))
    for name, g_soft, g_sample in zip(("theta", "q", "alpha"), *grads):
      with self.subTest(wrt=name):
        self.assertGreater(np.max(np.abs(g_soft)), 0.0)
        self.assertAllEqual(g_sample, g_soft)

  @parameterized.named_parameters(("kappa_0.5", 0.5), ("kappa_2", 2.0),
                                  ("kappa_8", 8.0))
  def test_kappa_mode_total_q_gradient(self, kappa):
    # alpha = kappa / q^2 computed from q with TF ops: the total derivative is
    # dQ_d/dq = E[i] - 2 kappa u Var[i], u = theta / q.
    lo, hi = ops.index_range(4, True)
    rng = np.random.RandomState(int(kappa * 10))
    u = rng.uniform(lo - 1.5, hi + 1.5, size=(20,))
    q_np = rng.uniform(0.05, 0.5, size=(20,))  # one q per element
    x = tf.constant(u * q_np)
    q = tf.constant(q_np)
    window = hi - lo + 1  # all of A: no truncation (one compiled kernel)

    def total_q_gradient(fn):
      with tf.GradientTape() as tape:
        tape.watch(q)
        y = fn(x, q, kappa / (q * q))
      return tape.gradient(y, q).numpy()

    analytic = total_q_gradient(
        lambda x, q, a: ops.soft_quantize(x, q, a, lo, hi, window))
    explicit = total_q_gradient(lambda x, q, a: explicit_soft(x, q, a, lo, hi))
    p = np_full_cpmf(u, 1.0, kappa, lo, hi)
    i = np.arange(lo, hi + 1)
    mean = (p * i).sum(-1)
    var = (p * i * i).sum(-1) - mean ** 2
    formula = mean - 2 * kappa * u * var
    self.assertLess(max_rel_err(analytic, explicit), 1e-4)
    self.assertLess(max_rel_err(analytic, formula), 1e-4)
    self.assertAllClose(analytic, formula, rtol=1e-4, atol=1e-9)


class HardLimitTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("signed_float32", True, tf.float32), ("unsigned_float32", False,
                                             tf.float32),
      ("signed_float64", True, tf.float64), ("unsigned_float64", False,
                                             tf.float64))
  def test_large_alpha_is_round_and_clip(self, signed, dtype):
    lo, hi = ops.index_range(3, signed)
    rng = np.random.RandomState(7)
    # Integers and fractional parts at least 0.1 from a tie, and values
    # well beyond both ends of A (saturation).
    u = np.concatenate([
        rng.randint(lo - 5, hi + 6, size=40) + rng.uniform(-0.4, 0.4, 40),
        [lo - 1e3, lo - 3.3, lo - 0.7, hi + 0.7, hi + 2.2, hi + 1e3],
    ])
    q = tf.constant(0.37, dtype)
    alpha = 1e4 / q ** 2  # kappa = 1e4
    x = tf.constant(u, dtype) * q
    expected = ops.round_quantize(x, q, lo, hi)
    # Saturation really happens in this input.
    self.assertAllEqual(tf.reduce_min(expected), lo * q)
    self.assertAllEqual(tf.reduce_max(expected), hi * q)
    self.assertAllEqual(expected,
                        tf.constant(np.clip(np.round(u), lo, hi), dtype) * q)
    for window in (1, 2, 3, 5):
      with self.subTest(window=window):
        self.assertAllEqual(ops.soft_quantize(x, q, alpha, lo, hi, window),
                            expected)
        self.assertAllEqual(
            ops.sample_quantize(x, q, alpha, lo, hi, window, seed=1),
            expected)


class SampleQuantizeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("signed", True), ("unsigned", False))
  def test_sampled_mean_is_soft_quantize(self, signed):
    lo, hi = ops.index_range(3, signed)
    q, kappa, window, n = 0.25, 1.0, 7, 20000
    u = np.array([lo - 0.8, lo + 0.3, lo + 1.5, (lo + hi) / 2 + 0.2,
                  hi - 1.45, hi - 0.5, hi + 0.3, 0.1])
    alpha = tf.constant(kappa / q ** 2, tf.float64)
    x = tf.constant(np.tile(u * q, (n, 1)), tf.float64)
    samples = ops.sample_quantize(x, q, alpha, lo, hi, window, seed=42)
    samples = samples.numpy()
    # Every sample is on the grid.
    idx = samples / q
    self.assertAllClose(idx, np.round(idx), rtol=0, atol=1e-9)
    self.assertTrue(np.all((np.round(idx) >= lo) & (np.round(idx) <= hi)))
    q_d = ops.soft_quantize(tf.constant(u * q), q, alpha, lo, hi,
                            window).numpy()
    p = np_full_cpmf(u, 1.0, kappa, lo, hi)
    i = np.arange(lo, hi + 1)
    var = q ** 2 * ((p * i * i).sum(-1) - (p * i).sum(-1) ** 2)
    std_err = np.sqrt(var / n)
    sampled_std_err = samples.std(axis=0, ddof=1) / np.sqrt(n)
    self.assertAllClose(sampled_std_err, std_err, rtol=0.05)
    mean = samples.mean(axis=0)
    self.assertTrue(np.all(np.abs(mean - q_d) < 4 * std_err),
                    msg=f"{(mean - q_d) / std_err} standard errors")

  @parameterized.named_parameters(("window_3", 3), ("window_5", 5),
                                  ("full", 15))
  def test_fixed_uniform_gives_inverse_cdf_index(self, window):
    lo, hi = ops.index_range(4, True)
    rng = np.random.RandomState(window)
    q, kappa = 0.2, 0.7
    u = rng.uniform(lo - 2, hi + 2, size=(200,))
    uniform = rng.uniform(size=u.shape)
    got = ops.sample_quantize(tf.constant(u * q), tf.constant(q, tf.float64),
                              tf.constant(kappa / q ** 2, tf.float64), lo, hi,
                              window,
                              uniform=tf.constant(uniform))
    # NumPy inverse CDF over the window (renormalised full CPMF).
    start, w = np_window_start(u, lo, hi, window)
    p = np_full_cpmf(u, 1.0, kappa, lo, hi)
    expected = np.empty_like(u)
    for k in range(u.size):
      first = int(start[k]) - lo
      pw = p[k, first:first + w] / p[k, first:first + w].sum()
      j = int(np.searchsorted(np.cumsum(pw), uniform[k], side="left"))
      expected[k] = (start[k] + min(j, w - 1)) * q
    self.assertAllEqual(np.round(got.numpy() / q), np.round(expected / q))
    self.assertAllClose(got, expected, rtol=0, atol=1e-12)


class WindowTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("k0.5_w9", 0.5, 9), ("k1_w3", 1.0, 3), ("k1_w5", 1.0, 5),
      ("k1_w7", 1.0, 7), ("k4_w2", 4.0, 2), ("k4_w3", 4.0, 3),
      ("k16_w1", 16.0, 1), ("k16_w2", 16.0, 2))
  def test_windowed_cpmf_within_truncation_bound(self, kappa, window):
    lo, hi = ops.index_range(4, True)
    q = 0.3
    # Dense grid over the whole range including both ends and beyond, and
    # every half-integer (worst case for the window).
    u = np.concatenate([np.linspace(lo - 3, hi + 3, 801),
                        np.arange(lo - 2, hi + 2) + 0.5])
    x = tf.constant(u * q, tf.float64)
    alpha = kappa / q ** 2
    q, alpha = tf.constant(q, tf.float64), tf.constant(alpha, tf.float64)
    levels, probs = ops.cpmf(x, q, alpha, lo, hi, window)
    self.assertEqual(probs.shape, (u.size, window))
    full = ops.full_cpmf(x, q, alpha, lo, hi).numpy()
    self.assertAllClose(full, np_full_cpmf(u * q, q, alpha, lo, hi),
                        rtol=0, atol=1e-12)
    windowed = np.zeros_like(full)
    rows = np.repeat(np.arange(u.size), window)
    cols = (levels.numpy().astype(int) - lo).ravel()
    np.add.at(windowed, (rows, cols), probs.numpy().ravel())
    self.assertAllClose(windowed.sum(-1), np.ones(u.size), atol=1e-12)
    tv = 0.5 * np.abs(full - windowed).sum(-1)
    bound = ops.truncation_bound(kappa, window)
    self.assertLessEqual(tv.max(), bound)
    if bound < 0.5:
      # The bound is not loose by orders of magnitude either.  (For an even
      # window the worst case is u on a level, where the nearest level is at
      # distance 0, not 1/2, so the bound has an extra slack of exp(kappa/4).)
      slack = math.exp(kappa / 4) if window % 2 == 0 else 1.0
      self.assertGreater(tv.max(), bound / slack / 10)

  def test_window_3_kappa_4_bound_is_small_and_holds(self):
    bound = ops.truncation_bound(4.0, 3)
    self.assertLess(bound, 1e-3)
    self.assertAllClose(bound, 2 * sum(math.exp(-4 * ((1.5 + k) ** 2 - .25))
                                       for k in range(50)), rtol=1e-12)
    lo, hi = ops.index_range(8, True)
    u = np.linspace(-5, 5, 1001)
    levels, probs = ops.cpmf(tf.constant(u), 1.0, 4.0, lo, hi, 3)
    full = np_full_cpmf(u, 1.0, 4.0, lo, hi)
    kept = np.take_along_axis(full, levels.numpy().astype(int) - lo, axis=-1)
    tv = 1.0 - kept.sum(-1)
    self.assertLess(tv.max(), bound)
    self.assertGreater(tv.max(), 0.0)

  def test_window_for_bound_is_smallest(self):
    for kappa in (0.25, 1.0, 4.0, 16.0):
      for eps in (1e-2, 1e-4, 1e-8):
        window = ops.window_for_bound(kappa, eps)
        self.assertLessEqual(ops.truncation_bound(kappa, window), eps)
        if window > 1:
          self.assertGreater(ops.truncation_bound(kappa, window - 1), eps)

  def test_window_is_the_nearest_levels(self):
    lo, hi = ops.index_range(8, True)
    u = np.array([-200.0, -126.9, -3.5, -0.2, 0.0, 0.49, 0.51, 2.5, 126.6,
                  300.0])
    for window in (1, 2, 3, 4, 7):
      levels, _ = ops.cpmf(tf.constant(u), 1.0, 1.0, lo, hi, window)
      levels = levels.numpy()
      dist = np.abs(levels - u[:, None])
      for k in range(u.size):
        others = np.setdiff1d(np.arange(lo, hi + 1), levels[k])
        # Every kept level is at least as near as every dropped one.
        self.assertLessEqual(dist[k].max(), np.abs(others - u[k]).min() + 1e-9,
                             msg=f"u={u[k]} window={window}")


class MarginalEntropyTest(tf.test.TestCase, parameterized.TestCase):

  def np_entropy(self, x, q, alpha, lo, hi, per_sample=False):
    p = np_full_cpmf(x, q, alpha, lo, hi)
    if per_sample:
      pbar = p.reshape(p.shape[0], -1, p.shape[-1]).mean(axis=1)
    else:
      pbar = p.reshape(-1, p.shape[-1]).mean(axis=0)
    safe = np.where(pbar > 0, pbar, 1.0)
    return -(pbar * np.log2(safe)).sum(-1), pbar

  @parameterized.named_parameters(("signed_k1", True, 1.0),
                                  ("unsigned_k1", False, 1.0),
                                  ("signed_k4", True, 4.0),
                                  ("unsigned_k0.3", False, 0.3))
  def test_entropy_matches_numpy(self, signed, kappa):
    lo, hi = ops.index_range(3, signed)
    rng = np.random.RandomState(3)
    q = 0.1
    x = rng.normal(scale=3 * q, size=(4, 3, 5, 2)) + (0 if signed else 2 * q)
    alpha = kappa / q ** 2
    window = hi - lo + 1  # all of A: exact
    q_t, alpha_t = tf.constant(q, tf.float64), tf.constant(alpha, tf.float64)
    for per_sample in (False, True):
      with self.subTest(per_sample=per_sample):
        expected, pbar = self.np_entropy(x, q, alpha, lo, hi, per_sample)
        got = ops.marginal_entropy(tf.constant(x), q_t, alpha_t, lo, hi, window,
                                   per_sample=per_sample)
        self.assertEqual(got.shape, (4,) if per_sample else ())
        self.assertAllClose(got, expected, rtol=1e-9, atol=1e-9)
        pmf = ops.marginal_pmf(tf.constant(x), q_t, alpha_t, lo, hi, window,
                               per_sample=per_sample)
        self.assertAllClose(pmf, pbar, rtol=0, atol=1e-12)
        self.assertAllClose(tf.reduce_sum(pmf, -1), np.ones(pbar.shape[:-1]),
                            rtol=0, atol=1e-12)

  def test_marginal_pmf_sums_to_one_with_small_window(self):
    lo, hi = ops.index_range(8, True)
    x = tf.random.stateless_normal([6, 40], seed=[1, 2])
    for per_sample in (False, True):
      pmf = ops.marginal_pmf(x, 0.05, 400.0, lo, hi, 2, per_sample=per_sample)
      self.assertAllClose(tf.reduce_sum(pmf, -1),
                          tf.ones(pmf.shape[:-1]), atol=1e-6)
      self.assertAllGreaterEqual(pmf, 0.0)

  @parameterized.named_parameters(("signed", True), ("unsigned", False))
  def test_entropy_gradient_matches_finite_differences_and_formula(self,
                                                                   signed):
    lo, hi = ops.index_range(3, signed)
    rng = np.random.RandomState(5)
    q, kappa = 0.2, 1.5
    alpha = kappa / q ** 2
    u = np.concatenate([rng.normal(0 if signed else 1.5, 1.5, size=14),
                        [lo - 0.6, hi + 0.4]])
    x = u * q
    window = ops.window_for_bound(kappa, 1e-14)
    args = [tf.constant(v, tf.float64) for v in (x, q, alpha)]
    analytic, numeric = gradient_jacobians(
        lambda x, q, a: ops.marginal_entropy(x, q, a, lo, hi, window), args)
    for name, a, n in zip(("theta", "q", "alpha"), analytic, numeric):
      with self.subTest(wrt=name):
        self.assertGreater(np.max(np.abs(n)), 0.0)
        self.assertLess(max_rel_err(a, n), 1e-4)
    # dH/dtheta_k = -(2 alpha / N) Cov_k[a, log2 Pbar(a)], in NumPy.
    p = np_full_cpmf(x, q, alpha, lo, hi)
    pbar = p.mean(axis=0)
    a_levels = np.arange(lo, hi + 1) * q
    log2_pbar = np.log2(pbar)
    cov = ((p * a_levels * log2_pbar).sum(-1)
           - (p * a_levels).sum(-1) * (p * log2_pbar).sum(-1))
    formula = -(2 * alpha / x.size) * cov
    self.assertAllClose(analytic[0].ravel(), formula, rtol=1e-6, atol=1e-12)

  def test_per_sample_entropy_gradient_matches_finite_differences(self):
    lo, hi = ops.index_range(2, False)
    rng = np.random.RandomState(8)
    q, alpha = 0.5, 6.0
    x = rng.uniform(-0.5, 2.0, size=(3, 4))
    window = ops.window_for_bound(alpha * q * q, 1e-14)
    args = [tf.constant(v, tf.float64) for v in (x, q, alpha)]
    analytic, numeric = gradient_jacobians(
        lambda x, q, a: ops.marginal_entropy(x, q, a, lo, hi, window,
                                             per_sample=True), args)
    for name, a, n in zip(("theta", "q", "alpha"), analytic, numeric):
      with self.subTest(wrt=name):
        self.assertGreater(np.max(np.abs(n)), 0.0)
        self.assertLess(max_rel_err(a, n), 1e-4)


class FusedQuantizeEntropyTest(tf.test.TestCase, parameterized.TestCase):
  """`quantize_with_entropy` equals `quantize` + `marginal_entropy`."""

  def unfused_and_fused(self, x, q, alpha, lo, hi, window, mode, per_sample,
                        uniform, use=("value", "entropy")):
    """[value, entropy, d/dx, d/dq, d/dalpha] from both paths."""
    rng = np.random.RandomState(11)
    upstream = tf.constant(rng.normal(size=x.shape), x.dtype)
    results = []
    for fused in (False, True):
      with tf.GradientTape() as tape:
        tape.watch([x, q, alpha])
        if fused:
          value, entropy = ops.quantize_with_entropy(
              x, q, alpha, lo, hi, window, mode, per_sample=per_sample,
              uniform=uniform)
        else:
          value = ops.quantize(x, q, alpha, lo, hi, window, mode,
                               training=True, uniform=uniform)
          entropy = ops.marginal_entropy(x, q, alpha, lo, hi, window,
                                         per_sample=per_sample)
        targets = []
        if "value" in use:
          targets.append(tf.reduce_sum(value * upstream))
        if "entropy" in use:
          weights = tf.cast(tf.range(1, 1 + tf.size(entropy)), x.dtype)
          targets.append(tf.reduce_sum(entropy * weights))
        loss = tf.add_n(targets)
      results.append([value, entropy] + tape.gradient(loss, [x, q, alpha]))
    return results

  @parameterized.product(mode=("cdl", "rcdl"), per_sample=(False, True),
                         window=(1, 2, 3, 5), signed=(True, False))
  def test_fused_equals_unfused(self, mode, per_sample, window, signed):
    lo, hi = ops.index_range(3, signed)
    rng = np.random.RandomState(window)
    u = rng.uniform(lo - 2, hi + 2, size=(4, 3, 5))
    u[0, 0, :3] = [lo - 40.0, hi + 40.0, 0.5 * (lo + hi) + 0.5]
    q = tf.constant([0.1, 0.2, 0.15, 0.3, 0.25], tf.float64)  # per channel
    x = tf.constant(u, tf.float64) * q
    alpha = tf.constant(3.0, tf.float64) / (q * q)
    uniform = tf.constant(rng.uniform(size=u.shape), tf.float64)
    unfused, fused = self.unfused_and_fused(x, q, alpha, lo, hi, window, mode,
                                            per_sample, uniform)
    names = ("value", "entropy", "d_theta", "d_q", "d_alpha")
    for name, a, b in zip(names, unfused, fused):
      with self.subTest(output=name):
        self.assertAllClose(a, b, rtol=1e-10, atol=1e-12)

  @parameterized.parameters("cdl", "rcdl")
  def test_window_wider_than_the_level_set(self, mode):
    lo, hi = ops.index_range(2, False)  # 4 levels, window 7
    rng = np.random.RandomState(9)
    x = tf.constant(rng.uniform(-0.5, 2.5, size=(5, 6)), tf.float64)
    q, alpha = tf.constant(0.5, tf.float64), tf.constant(6.0, tf.float64)
    uniform = tf.constant(rng.uniform(size=(5, 6)), tf.float64)
    for per_sample in (False, True):
      unfused, fused = self.unfused_and_fused(x, q, alpha, lo, hi, 7, mode,
                                              per_sample, uniform)
      for a, b in zip(unfused, fused):
        self.assertAllClose(a, b, rtol=1e-10, atol=1e-12)

  @parameterized.named_parameters(("value_only", ("value",)),
                                  ("entropy_only", ("entropy",)))
  def test_one_output_used_gives_that_outputs_gradient(self, use):
    lo, hi = ops.index_range(4, False)
    rng = np.random.RandomState(2)
    x = tf.constant(rng.uniform(-0.2, 2.0, size=(3, 40)), tf.float64)
    q, alpha = tf.constant(0.1, tf.float64), tf.constant(400.0, tf.float64)
    unfused, fused = self.unfused_and_fused(x, q, alpha, lo, hi, 3, "rcdl",
                                            True, None, use)
    for a, b in zip(unfused[2:], fused[2:]):
      self.assertAllClose(a, b, rtol=1e-10, atol=1e-12)

  def test_fused_gradient_matches_finite_differences(self):
    lo, hi = ops.index_range(3, True)
    rng = np.random.RandomState(4)
    q, kappa = 0.2, 1.5
    alpha = kappa / q ** 2
    x = np.concatenate([rng.normal(0, 1.5, size=10), [lo - 0.6, hi + 0.4]]) * q
    window = ops.window_for_bound(kappa, 1e-14)
    weights = tf.constant(rng.normal(size=x.shape), tf.float64)

    def f(x, q, a):
      value, entropy = ops.quantize_with_entropy(x, q, a, lo, hi, window,
                                                 "rcdl")
      return tf.reduce_sum(value * weights) + 3.0 * entropy

    args = [tf.constant(v, tf.float64) for v in (x, q, alpha)]
    analytic, numeric = gradient_jacobians(f, args)
    for name, a, n in zip(("theta", "q", "alpha"), analytic, numeric):
      with self.subTest(wrt=name):
        self.assertGreater(np.max(np.abs(n)), 0.0)
        self.assertLess(max_rel_err(a, n), 1e-4)

  def test_float32_matches_unfused_and_keeps_dtype(self):
    lo, hi = ops.index_range(8, True)
    x = tf.random.stateless_normal([64, 50], seed=[3, 4]) * 0.05
    q, alpha = tf.constant(0.004), tf.constant(4.0 / 0.004 ** 2)
    unfused, fused = self.unfused_and_fused(x, q, alpha, lo, hi, 3, "rcdl",
                                            False, None)
    self.assertEqual(fused[0].dtype, tf.float32)
    self.assertEqual(fused[1].dtype, tf.float32)
    for a, b in zip(unfused, fused):
      self.assertAllClose(a, b, rtol=2e-5, atol=1e-6 * np.max(np.abs(a)))

  def test_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "`mode`"):
      ops.quantize_with_entropy(tf.zeros([2]), 0.1, 1.0, -1, 1, 3, "ste")


class FinitenessTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("signed_8bit", 8, True),
                                  ("unsigned_2bit", 2, False))
  def test_values_and_gradients_finite_at_extremes(self, bits, signed):
    lo, hi = ops.index_range(bits, signed)
    x = tf.constant([-1e6, -3.0, -0.5, 0.0, 1e-7, 0.4, 2.5, 1e3, 1e6],
                    tf.float32)
    failures = []
    for alpha_v in (1e-3, 1.0, 1e6):
      for q_v in (1e-6, 1e-2, 1.0, 1e3):
        q = tf.constant(q_v, tf.float32)
        alpha = tf.constant(alpha_v, tf.float32)
        fns = {
            "soft_quantize":
                lambda: ops.soft_quantize(x, q, alpha, lo, hi, 3),
            "sample_quantize":
                lambda: ops.sample_quantize(x, q, alpha, lo, hi, 3, seed=0),
            "marginal_entropy":
                lambda: ops.marginal_entropy(x, q, alpha, lo, hi, 3),
        }
        for name, fn in fns.items():
          with tf.GradientTape() as tape:
            tape.watch([x, q, alpha])
            y = fn()
          grads = tape.gradient(y, [x, q, alpha])
          for label, t in [("value", y)] + list(
              zip(("d_theta", "d_q", "d_alpha"), grads)):
            if t is None or not np.all(np.isfinite(t.numpy())):
              failures.append(f"{name} {label} alpha={alpha_v} q={q_v}: "
                              f"{None if t is None else t.numpy()}")
    self.assertEmpty(failures, "\n".join(failures))

  def test_float16_marginal_entropy_is_finite_and_accurate(self):
    # Under a mixed_float16 policy, activations (and so the activation rate
    # term) arrive as float16.  Regression (fixed in 3c8ff2f): the 1e-30
    # floor under log2 underflowed to 0 in float16, so a window level with
    # Pbar = 0 gave 0 * log2(0) = NaN, and the count sum (= N) overflows
    # float16 for N > 65504; float16 must be computed in float32.
    x32 = tf.constant(np.linspace(-3.0, 3.0, 64), tf.float32)
    expected = ops.marginal_entropy(x32, 1.0, 4.0, -127, 127, 5)
    x16 = tf.cast(x32, tf.float16)
    with tf.GradientTape() as tape:
      tape.watch(x16)
      h16 = ops.marginal_entropy(x16, 1.0, 4.0, -127, 127, 5)
    grad = tape.gradient(h16, x16)
    self.assertTrue(np.isfinite(h16.numpy()), msg=f"H = {h16.numpy()}")
    self.assertTrue(np.all(np.isfinite(grad.numpy())))
    self.assertAllClose(tf.cast(h16, tf.float32), expected, atol=1e-2)
    # More elements than float16 can count.
    big = tf.cast(tf.linspace(-3.0, 3.0, 70000), tf.float16)
    self.assertAllClose(
        tf.cast(ops.marginal_entropy(big, 1.0, 4.0, -127, 127, 3), tf.float32),
        ops.marginal_entropy(tf.cast(big, tf.float32), 1.0, 4.0, -127, 127, 3),
        atol=1e-2)


class DtypeTest(tf.test.TestCase):

  def test_python_scalar_parameters_keep_float64_precision(self):
    # Regression (fixed in 3c8ff2f): `tf.cast(0.1, tf.float64)` first makes
    # a float32 tensor, so Python-float q and alpha were rounded to float32
    # and float64 results carried a 1.5e-8 relative error (q = 0.1 became
    # 0.10000000149).
    x = tf.constant([0.3, -0.7, 1.2], tf.float64)
    q64 = tf.constant(0.1, tf.float64)
    a64 = tf.constant(250.0 / 3.0, tf.float64)  # not exact in float32
    expected_round = np.clip(np.round(x.numpy() / 0.1), -7, 7) * 0.1
    self.assertAllClose(ops.round_quantize(x, q64, -7, 7), expected_round,
                        rtol=1e-15, atol=0)
    self.assertAllClose(ops.round_quantize(x, 0.1, -7, 7), expected_round,
                        rtol=1e-15, atol=0)
    self.assertAllClose(ops.soft_quantize(x, 0.1, 250.0 / 3.0, -7, 7, 3),
                        ops.soft_quantize(x, q64, a64, -7, 7, 3),
                        rtol=1e-15, atol=0)

  def test_float32_inputs_give_float32_outputs(self):
    x = tf.constant([0.3, -0.7], tf.float32)
    self.assertEqual(ops.soft_quantize(x, 0.1, 100.0, -7, 7, 3).dtype,
                     tf.float32)
    self.assertEqual(ops.sample_quantize(x, 0.1, 100.0, -7, 7, 3).dtype,
                     tf.float32)
    self.assertEqual(ops.marginal_entropy(x, 0.1, 100.0, -7, 7, 3).dtype,
                     tf.float32)


class ArgumentValidationTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(0, 1, 9, 16, -3)
  def test_bits_out_of_range(self, bits):
    pattern = rf"`bits`.*2 to 8.*got {bits}\b"
    with self.assertRaisesRegex(ValueError, pattern):
      ops.validate_bits(bits)
    with self.assertRaisesRegex(ValueError, pattern):
      ops.index_range(bits, True)
    with self.assertRaisesRegex(ValueError, pattern):
      ops.index_range(bits, False)

  def test_bits_not_an_integer(self):
    for bits in (4.0, True, "8"):
      with self.assertRaisesRegex(ValueError, rf"`bits`.*integer.*{bits!r}"):
        ops.validate_bits(bits)

  def test_valid_bits(self):
    self.assertEqual(ops.index_range(8, True), (-127, 127))
    self.assertEqual(ops.index_range(8, False), (0, 255))
    self.assertEqual(ops.index_range(2, True), (-1, 1))
    self.assertEqual(ops.index_range(2, False), (0, 3))

  @parameterized.parameters(0, -2)
  def test_window_below_one(self, window):
    pattern = rf"`window`.*at least 1.*got {window}\b"
    x = tf.constant([0.1, 0.2])
    calls = {
        "validate_window": lambda: ops.validate_window(window),
        "truncation_bound": lambda: ops.truncation_bound(1.0, window),
        "cpmf": lambda: ops.cpmf(x, 0.1, 100.0, -7, 7, window),
        "soft_quantize": lambda: ops.soft_quantize(x, 0.1, 100.0, -7, 7,
                                                   window),
        "sample_quantize": lambda: ops.sample_quantize(x, 0.1, 100.0, -7, 7,
                                                       window),
        "marginal_entropy": lambda: ops.marginal_entropy(x, 0.1, 100.0, -7, 7,
                                                         window),
    }
    for name, call in calls.items():
      with self.subTest(fn=name):
        with self.assertRaisesRegex(ValueError, pattern):
          call()

  def test_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, r"`mode`.*one of.*'ste'"):
      ops.quantize(tf.constant([0.1]), 0.1, 100.0, -7, 7, 3, mode="ste",
                   training=True)
    # The mode is checked even when it would not be used.
    with self.assertRaisesRegex(ValueError, r"`mode`.*one of.*'CDL'"):
      ops.quantize(tf.constant([0.1]), 0.1, 100.0, -7, 7, 3, mode="CDL",
                   training=False)

  def test_integer_input(self):
    x = tf.constant([1, 2, 3])
    calls = {
        "soft_quantize": lambda: ops.soft_quantize(x, 1.0, 1.0, -7, 7, 3),
        "sample_quantize": lambda: ops.sample_quantize(x, 1.0, 1.0, -7, 7, 3),
        "round_quantize": lambda: ops.round_quantize(x, 1.0, -7, 7),
        "cpmf": lambda: ops.cpmf(x, 1.0, 1.0, -7, 7, 3),
        "marginal_entropy": lambda: ops.marginal_entropy(x, 1.0, 1.0, -7, 7,
                                                         3),
        "quantize": lambda: ops.quantize(x, 1.0, 1.0, -7, 7, 3, "rcdl", True),
    }
    for name, call in calls.items():
      with self.subTest(fn=name):
        with self.assertRaisesRegex(TypeError, r"`inputs`.*floating.*int32"):
          call()

  def test_kappa_not_positive(self):
    with self.assertRaisesRegex(ValueError, r"`kappa`.*positive.*-1"):
      ops.truncation_bound(-1.0, 3)

  def test_bad_index_range(self):
    with self.assertRaisesRegex(ValueError, r"`lo` and `hi`.*lo < hi.*3, 3"):
      ops.soft_quantize(tf.constant([0.1]), 0.1, 1.0, 3, 3, 2)


class QuantizeModesTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.lo, self.hi = ops.index_range(4, True)
    rng = np.random.RandomState(11)
    self.q = np.array([0.1, 0.25, 0.05], np.float32)
    self.x = tf.constant(
        rng.uniform(self.lo - 2, self.hi + 2, (6, 3)) * self.q, tf.float32)
    self.alpha = 2.0 / self.q ** 2

  @parameterized.parameters("cdl", "rcdl")
  def test_inference_is_round(self, mode):
    got = ops.quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3, mode,
                       training=False)
    self.assertAllEqual(got,
                        ops.round_quantize(self.x, self.q, self.lo, self.hi))
    expected = np.clip(np.round(self.x.numpy() / self.q), self.lo,
                       self.hi) * self.q
    self.assertAllClose(got, expected, rtol=1e-6, atol=0)

  def test_rcdl_training_is_soft_quantize(self):
    got = ops.quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3,
                       "rcdl", training=True)
    self.assertAllEqual(
        got, ops.soft_quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3))
    # And it is not simply rounding.
    self.assertNotAllClose(
        got, ops.round_quantize(self.x, self.q, self.lo, self.hi))

  def test_cdl_training_is_on_the_grid(self):
    got = ops.quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3, "cdl",
                       training=True, seed=5).numpy()
    idx = got / self.q
    self.assertAllClose(idx, np.round(idx), rtol=0, atol=1e-4)
    self.assertTrue(np.all(np.round(idx) >= self.lo))
    self.assertTrue(np.all(np.round(idx) <= self.hi))
    uniform = tf.random.stateless_uniform(self.x.shape, seed=[4, 4])
    self.assertAllEqual(
        ops.quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3, "cdl",
                     training=True, uniform=uniform),
        ops.sample_quantize(self.x, self.q, self.alpha, self.lo, self.hi, 3,
                            uniform=uniform))

  def test_cdl_training_is_random(self):
    x = tf.fill([1000], 0.5 * 0.1)  # halfway between two levels
    got = ops.quantize(x, 0.1, 1000.0, -7, 7, 3, "cdl", training=True,
                       seed=1).numpy()
    self.assertLen(np.unique(np.round(got / 0.1)), 2)


class EagerVsFunctionTest(tf.test.TestCase):

  def test_same_results_in_tf_function(self):
    lo, hi = ops.index_range(4, True)
    rng = np.random.RandomState(2)
    x = tf.constant(rng.uniform(-1.0, 1.0, (5, 3)), tf.float32)
    q = tf.constant([0.1, 0.2, 0.15], tf.float32)
    alpha = tf.constant(1.5, tf.float32) / (q * q)
    uniform = tf.constant(rng.uniform(size=(5, 3)), tf.float32)

    def run(x, q, alpha, uniform):
      with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, q, alpha])
        outs = {
            "soft": ops.soft_quantize(x, q, alpha, lo, hi, 3),
            "sample": ops.sample_quantize(x, q, alpha, lo, hi, 3,
                                          uniform=uniform),
            "round": ops.round_quantize(x, q, lo, hi),
            "entropy": ops.marginal_entropy(x, q, alpha, lo, hi, 3),
            "cpmf": ops.cpmf(x, q, alpha, lo, hi, 3)[1],
        }
        loss = tf.add_n([tf.reduce_sum(v) for v in outs.values()])
      grads = tape.gradient(loss, [x, q, alpha])
      del tape
      return outs, grads

    eager_outs, eager_grads = run(x, q, alpha, uniform)
    fn_outs, fn_grads = tf.function(run)(x, q, alpha, uniform)
    for key, value in eager_outs.items():
      self.assertAllClose(fn_outs[key], value, rtol=1e-5, atol=1e-6, msg=key)
    self.assertAllEqual(fn_outs["sample"], eager_outs["sample"])
    self.assertAllEqual(fn_outs["round"], eager_outs["round"])
    for a, b in zip(fn_grads, eager_grads):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)

  def test_same_results_in_jit_compiled_function(self):
    lo, hi = ops.index_range(4, True)
    rng = np.random.RandomState(3)
    x = tf.constant(rng.uniform(-1.0, 1.0, (5, 3)), tf.float32)
    q = tf.constant([0.1, 0.2, 0.15], tf.float32)
    alpha = tf.constant(1.5, tf.float32) / (q * q)
    uniform = tf.constant(rng.uniform(size=(5, 3)), tf.float32)

    def run(x, q, alpha, uniform):
      with tf.GradientTape() as tape:
        tape.watch([x, q, alpha])
        soft = ops.soft_quantize(x, q, alpha, lo, hi, 3)
        sample = ops.sample_quantize(x, q, alpha, lo, hi, 3, uniform=uniform)
        loss = tf.reduce_sum(soft * x) + tf.reduce_sum(sample)
      return soft, sample, tape.gradient(loss, [x, q, alpha])

    eager = run(x, q, alpha, uniform)
    jitted = tf.function(run, jit_compile=True)(x, q, alpha, uniform)
    self.assertAllClose(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
    self.assertAllEqual(jitted[1], eager[1])
    for a, b in zip(jitted[2], eager[2]):
      self.assertAllClose(a, b, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  tf.test.main()
