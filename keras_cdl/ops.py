"""Pure TensorFlow operations of Coded Deep Learning (CDL): no Keras in here.

The conditional probability mass function (CPMF) of CDL maps a real value
`theta` to a distribution over the uniform reconstruction levels `i * q`,
`i` in the index set `A = {lo, ..., hi}`:

```
P(i | theta) = exp(-alpha (theta - i q)^2) / sum_j exp(-alpha (theta - j q)^2)
```

Only `kappa = alpha q^2` shapes it: with `u = theta / q` the exponent is
`-kappa (u - i)^2`.  Two quantizers are built on it:

* the probabilistic quantizer `Q_p(theta) = i q` with `i ~ P(. | theta)`;
* the soft deterministic quantizer `Q_d(theta) = sum_i i q P(i | theta)`.

Every function here evaluates the CPMF on a *window* of the `window` levels
nearest to `u` (clipped to `A`) and renormalises, so memory is
`O(N * window)`, never `O(N * |A|)`.  All excluded levels lie at least
`window / 2` steps from `u`, and the nearest level at most `1 / 2` step, so the
probability mass lost to the window (relative, and so the total variation
between the windowed and the full CPMF) is at most

```
eps(kappa, window) = 2 * sum_{k >= 0} exp(-kappa ((window / 2 + k)^2 - 1 / 4))
```

(`truncation_bound`).  Examples: window 2, kappa 4: 0.10; window 3, kappa 4:
6.7e-4; window 5, kappa 1: 5.0e-3; window 7, kappa 1: 2.7e-5.

> E.-H. Yang and S. M. Hamidi, "Coded Deep Learning: Framework and Algorithm",
> arXiv 2501.09849, 2025.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = [
    "index_range",
    "validate_bits",
    "validate_window",
    "truncation_bound",
    "window_for_bound",
    "cpmf",
    "full_cpmf",
    "soft_quantize",
    "replica_uniform",
    "sample_quantize",
    "round_quantize",
    "quantize",
    "marginal_pmf",
    "marginal_entropy",
    "quantize_with_entropy",
    "MODES",
]

MODES = ("cdl", "rcdl")
_LN2 = math.log(2.0)


def validate_bits(bits, name="bits"):
  """Checks that `bits` is an integer from 2 to 8 and returns it."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(
        f"`{name}` must be an integer from 2 to 8, but got {bits!r}.")
  return bits


def validate_window(window, name="window"):
  """Checks that `window` is an integer of at least 1 and returns it."""
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ValueError(
        f"`{name}` must be an integer of at least 1, but got {window!r}.")
  return window


def index_range(bits, signed):
  """Returns `(lo, hi)`, the first and last index of the level set `A`.

  Signed tensors use the narrow symmetric range `[-(2^(b-1) - 1), 2^(b-1) - 1]`
  (TFLite's int8 weights for b = 8); unsigned tensors use `[0, 2^b - 1]`
  (TFLite's int8 activations with zero point -128 for b = 8).
  """
  validate_bits(bits)
  if signed:
    hi = 2 ** (bits - 1) - 1
    return -hi, hi
  return 0, 2 ** bits - 1


def truncation_bound(kappa, window):
  """Upper bound on the CPMF mass that a window of `window` levels drops.

  Returns `2 * sum_k exp(-kappa ((window/2 + k)^2 - 1/4))` as a Python float.
  """
  validate_window(window)
  if kappa <= 0:
    raise ValueError(f"`kappa` must be positive, but got {kappa!r}.")
  total = 0.0
  for k in range(10000):
    term = math.exp(-kappa * ((window / 2 + k) ** 2 - 0.25))
    total += term
    if term < 1e-30:
      break
  return min(1.0, 2.0 * total)


def window_for_bound(kappa, eps=1e-4):
  """Smallest window whose `truncation_bound(kappa, window)` is below `eps`."""
  window = 1
  while truncation_bound(kappa, window) > eps:
    window += 1
  return window


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}, but got {mode!r}.")


def _check_float(x, name="inputs"):
  x = tf.convert_to_tensor(x)
  if not x.dtype.is_floating:
    raise TypeError(
        f"`{name}` must be a floating point tensor, but got dtype {x.dtype.name}.")
  return x


def _check_range(lo, hi):
  if not (isinstance(lo, int) and isinstance(hi, int)) or lo >= hi:
    raise ValueError(
        f"`lo` and `hi` must be integers with lo < hi, but got {lo!r}, {hi!r}.")


def _window_start(u, lo, hi, window):
  """First level of the `window` levels nearest to `u`, kept inside [lo, hi]."""
  window = min(window, hi - lo + 1)
  start = tf.math.ceil(u - window / 2)
  return tf.clip_by_value(start, lo, hi - window + 1), window


def _window_probabilities(u, kappa, start, window):
  """Returns ([p_0, ..., p_{w-1}], r): the CPMF at levels start + j.

  Logits are taken relative to the window's nearest level `ref`:
  `z_j - z_ref = kappa (j - ref)(2 r - j - ref) <= 0` with `r = u - start`.
  That is the log-sum-exp shift computed in closed form: `z_ref` is exactly
  0 and no other logit is positive, whatever the magnitudes of kappa and r and
  however a compiler fuses or contracts the arithmetic (a shift by a separately
  computed maximum can differ from the logit it came from by an ulp of
  `kappa r`, and exp of that overflows).
  """
  r = u - start
  ref = tf.clip_by_value(tf.round(r), 0.0, window - 1.0)
  weights = [tf.exp(tf.minimum(kappa * ((j - ref) * (2.0 * r - j - ref)), 0.0))
             for j in range(window)]
  total = weights[0]
  for e in weights[1:]:
    total = total + e
  return [e / total for e in weights], r


def _unbroadcast(grad, shape):
  """Sums `grad` down to `shape` (the inverse of broadcasting)."""
  grad_shape = tf.shape(grad)
  _, axes = tf.raw_ops.BroadcastGradientArgs(s0=grad_shape, s1=shape)
  return tf.reshape(tf.reduce_sum(grad, axis=axes), shape)


def _as_dtype(value, dtype):
  """`value` as a `dtype` tensor, without a float32 detour for Python floats."""
  if tf.is_tensor(value) or isinstance(value, tf.Variable):
    return tf.cast(value, dtype)
  return tf.constant(np.asarray(value, dtype=dtype.as_numpy_dtype))


def _compute_dtype(dtype):
  """float16 and bfloat16 are computed in float32 (their range and
  resolution cannot hold `N`, `log2` of small masses or `kappa d^2`)."""
  return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _prepare(x, q, alpha):
  x = _check_float(x)
  dtype = _compute_dtype(x.dtype)
  return tf.cast(x, dtype), _as_dtype(q, dtype), _as_dtype(alpha, dtype)


def cpmf(x, q, alpha, lo, hi, window):
  """The CPMF on the window of nearest levels.

  Args:
    x: float tensor, the values theta.
    q: step size, broadcastable to `x`, positive.
    alpha: hardness, broadcastable to `x`, positive.
    lo: first index of A.
    hi: last index of A.
    window: number of levels evaluated per element.

  Returns:
    `(levels, probs)`, both of shape `x.shape + [min(window, hi - lo + 1)]`:
    the level indices (as floats) and their renormalised probabilities.
  """
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  u = x / q
  start, window = _window_start(u, lo, hi, window)
  probs, _ = _window_probabilities(u, alpha * q * q, start, window)
  levels = tf.stack([start + j for j in range(window)], axis=-1)
  return levels, tf.stack(probs, axis=-1)


def full_cpmf(x, q, alpha, lo, hi):
  """Reference CPMF over all of A (memory O(N |A|)); for tests and tables."""
  x, q, alpha = _prepare(x, q, alpha)
  levels = tf.range(lo, hi + 1, dtype=x.dtype)
  u = (x / q)[..., None]
  kappa = (alpha * q * q)[..., None]
  return tf.nn.softmax(-kappa * tf.square(u - levels), axis=-1)


def _window_cpmf(x, q, alpha, lo, hi, window):
  """(start, [p_0, ..., p_{w-1}]): the window and its CPMF, for the forwards."""
  u = x / q
  start, window = _window_start(u, lo, hi, window)
  probs, _ = _window_probabilities(u, alpha * q * q, start, window)
  return start, probs


def _window_moments(x, q, alpha, lo, hi, window, logs=None):
  """Central moments of the window CPMF, from unnormalised sums.

  Offsets are taken from the window's nearest level `c = start + ref`:
  `d = j - ref`, `s = u - c`, so `i = c + d` and `u - i = s - d`.  The
  weights `e_d = exp(-kappa d (d - 2 s))` (`e_0 = 1`, all <= 1) are summed
  once into `S = sum e`, `sum e d`, `sum e d^2`, `sum e d^3` and, with
  `logs` (the per-level values `L_j`, shifted by `L_ref`), `sum e L`,
  `sum e d L`, `sum e d^2 L`; each exp is evaluated once and used only inside
  these sums.  Returns a dict with `kappa`, `c`, `s`, `m1 = E[d]`,
  `var = Var[d]`, `c3 = Cov[d, d^2]` and, with `logs`, `cov_dl = Cov[d, L]`
  and `cov_d2l = Cov[d^2, L]`.  Central moments of `d` equal those of `j`
  (and of `i`); with `|s| <= 1/2` inside the range, `m1`, `var` and `c3` are
  O(1) differences of O(1) terms, so no cancellation beyond float rounding.
  """
  u = x / q
  kappa = alpha * q * q
  start, window = _window_start(u, lo, hi, window)
  r = u - start
  ref = tf.clip_by_value(tf.round(r), 0.0, window - 1.0)
  s = r - ref
  sums = None
  log_ref = None
  if logs is not None:
    # L_ref, selected without a gather: sum_j [j == ref] L_j.
    log_ref = tf.zeros_like(r)
    for j in range(window):
      log_ref += tf.where(ref == j, logs[j], tf.zeros_like(r))
  for j in range(window):
    d = j - ref
    e = tf.exp(tf.minimum(kappa * (d * (2.0 * s - d)), 0.0))
    ed = e * d
    ed2 = ed * d
    terms = [e, ed, ed2, ed2 * d]
    if logs is not None:
      log = logs[j] - log_ref
      terms += [e * log, ed * log, ed2 * log]
    sums = terms if sums is None else [t + v for t, v in zip(sums, terms)]
  inv = 1.0 / sums[0]
  m1, m2, m3 = sums[1] * inv, sums[2] * inv, sums[3] * inv
  out = dict(kappa=kappa, c=start + ref, s=s, m1=m1, var=m2 - m1 * m1,
             c3=m3 - m1 * m2)
  if logs is not None:
    mean_l = sums[4] * inv
    out["cov_dl"] = sums[5] * inv - m1 * mean_l
    out["cov_d2l"] = sums[6] * inv - m2 * mean_l
  return out


def _soft_gradient_terms(mom, q):
  """(dQ_d/dtheta, dQ_d/dq, dQ_d/dalpha) per element from `_window_moments`.

  With `a = i q`, `i = c + d`, `u - i = s - d` (see `_window_moments`):
  ```
  dQ_d/dtheta = 2 alpha Var[a]            = 2 kappa Var[d]
  dQ_d/dalpha = -Cov[a, (theta - a)^2]    = -q^3 (Cov[d, d^2] - 2 s Var[d])
  dQ_d/dq     = E[i] + 2 alpha q Cov[i, i (theta - i q)]
              = c + E[d] + 2 kappa ((s - c) Var[d] - Cov[d, d^2])
  ```
  """
  kappa, c, s, var, c3 = (mom[k] for k in ("kappa", "c", "s", "var", "c3"))
  d_theta = 2.0 * kappa * var
  d_alpha = -(q * q * q) * (c3 - 2.0 * s * var)
  d_q = c + mom["m1"] + 2.0 * kappa * ((s - c) * var - c3)
  return d_theta, d_q, d_alpha


def _entropy_gradient_terms(mom, q):
  """Per-element `-Cov[.., L]` factors of dH (see `marginal_entropy`),
  before the `1 / N` scale: (d/dtheta, d/dq, d/dalpha)."""
  kappa, c, s = mom["kappa"], mom["c"], mom["s"]
  cov_dl, cov_d2l = mom["cov_dl"], mom["cov_d2l"]
  two_kappa_over_q = 2.0 * kappa / q
  # Cov[i (u - i), L] = (s - c) Cov[d, L] - Cov[d^2, L];
  # Cov[(u - i)^2, L] = Cov[d^2, L] - 2 s Cov[d, L].
  d_theta = -two_kappa_over_q * cov_dl
  d_q = -two_kappa_over_q * ((s - c) * cov_dl - cov_d2l)
  d_alpha = q * q * (cov_d2l - 2.0 * s * cov_dl)
  return d_theta, d_q, d_alpha


def _soft_gradients(x, q, alpha, lo, hi, window):
  """(dQ_d/dtheta, dQ_d/dq, dQ_d/dalpha) per element, from the window."""
  return _soft_gradient_terms(_window_moments(x, q, alpha, lo, hi, window), q)


# The element-wise chains below run as XLA clusters (one fused loop instead
# of dozens of tensor-sized temporaries, and XLA's segment sum is >10x faster
# than TF's CPU kernel for few segments).  Python ints are trace-time
# constants, so each (shape, lo, hi, window) compiles once.


def _soft_index(start, probs):
  """`E[i] = start + sum_j j p_j`."""
  mean_j = probs[1] if len(probs) > 1 else tf.zeros_like(start)
  for j in range(2, len(probs)):
    mean_j = mean_j + j * probs[j]
  return start + mean_j


def _sample_index(start, probs, uniform):
  """The inverse-CDF index `start + #{j < w - 1 : U > p_0 + ... + p_j}`."""
  index = start
  cumulative = tf.zeros_like(start)
  for p in probs[:-1]:
    cumulative += p
    index += tf.cast(uniform > cumulative, start.dtype)
  return index


@tf.function(jit_compile=True)
def _soft_forward(x, q, alpha, lo, hi, window):
  start, probs = _window_cpmf(x, q, alpha, lo, hi, window)
  return q * _soft_index(start, probs)


@tf.function(jit_compile=True)
def _sample_forward(x, q, alpha, uniform, lo, hi, window):
  start, probs = _window_cpmf(x, q, alpha, lo, hi, window)
  return q * _sample_index(start, probs, uniform)


@tf.function(jit_compile=True)
def _soft_backward(dy, x, q, alpha, lo, hi, window):
  """Per-element gradients; `_quantize_with_soft_gradient` sums dq, dalpha.

  The reductions run outside XLA: on CPU they were 2.6x slower inside it.
  """
  d_theta, d_q, d_alpha = _soft_gradients(x, q, alpha, lo, hi, window)
  return dy * d_theta, dy * d_q, dy * d_alpha


def _quantize_with_soft_gradient(x, q, alpha, lo, hi, window, uniform):
  """Value `Q_d` (uniform None) or `Q_p` (inverse CDF of `uniform`).

  In both cases the gradient is the analytic gradient of `Q_d`, recomputed
  from the inputs in the backward pass.
  """

  @tf.custom_gradient
  def _op(x, q, alpha):
    if uniform is None:
      value = _soft_forward(x, q, alpha, lo, hi, window)
    else:
      value = _sample_forward(x, q, alpha, uniform, lo, hi, window)

    def grad(dy):
      d_x, d_q, d_alpha = _soft_backward(dy, x, q, alpha, lo, hi, window)
      return (d_x, _unbroadcast(d_q, tf.shape(q)),
              _unbroadcast(d_alpha, tf.shape(alpha)))

    return value, grad

  return _op(x, q, alpha)


def soft_quantize(x, q, alpha, lo, hi, window):
  """Soft deterministic quantizer `Q_d(theta) = sum_i i q P(i | theta)`.

  Its gradient is analytic (see `_soft_gradients`) and recomputed from the
  inputs in the backward pass, so nothing of size `N * window` is kept.

  Args:
    x: float tensor, the values theta.
    q: positive step size, broadcastable to `x` (scalar or per channel).
    alpha: positive hardness, broadcastable to `x`.
    lo: first index of A.
    hi: last index of A.
    window: levels evaluated per element (see module docstring for the error).

  Returns:
    `Q_d(x)`, same shape and dtype as `x`.
  """
  dtype = _check_float(x).dtype
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  return tf.cast(
      _quantize_with_soft_gradient(x, q, alpha, lo, hi, window, None), dtype)


def replica_uniform(shape, dtype=tf.float32, seed=None):
  """U(0, 1) samples that differ per `tf.distribute` replica, from the seeds.

  A seeded stateful op draws a new key `[2]` on every call (the same stream
  on every worker, whose graphs are identical, and reproducible from
  `tf.random.set_seed`); the replica's global id (`replica_id_in_sync_group`,
  which counts across workers) is folded into the key, and a stateless op
  draws the samples.  Plain `tf.random.uniform` gives every worker of a
  `MultiWorkerMirroredStrategy` the same samples.  XLA-compatible.
  """
  key = tf.random.uniform([2], minval=-2**31, maxval=2**31 - 1,
                          dtype=tf.int32, seed=seed)
  context = tf.distribute.get_replica_context()
  if context is not None and context.num_replicas_in_sync > 1:
    key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(context.replica_id_in_sync_group, tf.int32))
  return tf.random.stateless_uniform(shape, seed=key, dtype=dtype)


def sample_quantize(x, q, alpha, lo, hi, window, uniform=None, seed=None):
  """Probabilistic quantizer `Q_p` with the gradient of `Q_d` (CDL mode).

  The index is drawn by inverse CDF over the window with one uniform number
  per element: `i = start + #{j < w - 1 : U > P(start) + ... + P(start + j)}`.
  `E[Q_p(theta)] = Q_d(theta)`.

  Args:
    x, q, alpha, lo, hi, window: as in `soft_quantize`.
    uniform: optional tensor of U(0, 1) samples shaped like `x` (for tests);
      drawn by `replica_uniform(tf.shape(x), seed=seed)` when None: distinct
      on every `tf.distribute` replica and worker, reproducible from the
      seeds.
    seed: op seed for the draw.

  Returns:
    A sample of `Q_p(x)`, same shape and dtype as `x`.
  """
  dtype = _check_float(x).dtype
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  if uniform is None:
    uniform = replica_uniform(tf.shape(x), dtype=x.dtype, seed=seed)
  uniform = tf.cast(uniform, x.dtype)
  return tf.cast(
      _quantize_with_soft_gradient(x, q, alpha, lo, hi, window, uniform),
      dtype)


def round_quantize(x, q, lo, hi):
  """Inference quantizer: the most probable level, `clip(round(x / q)) q`.

  Ties round half to even (`tf.round`).  No gradient flows.
  """
  dtype = _check_float(x).dtype
  _check_range(lo, hi)
  x, q, _ = _prepare(x, q, 1.0)
  return tf.cast(q * tf.clip_by_value(tf.round(x / q), lo, hi), dtype)


def quantize(x, q, alpha, lo, hi, window, mode, training, uniform=None,
             seed=None):
  """The CDL quantizer with Keras `training` semantics.

  * `training=False`: nearest level (`round_quantize`), deterministic.
  * `training=True`, `mode="rcdl"`: `Q_d` forward and backward (relaxed CDL).
  * `training=True`, `mode="cdl"`: sampled `Q_p` forward, `Q_d` backward.
  """
  _check_mode(mode)
  if not training:
    return round_quantize(x, q, lo, hi)
  if mode == "rcdl":
    return soft_quantize(x, q, alpha, lo, hi, window)
  return sample_quantize(x, q, alpha, lo, hi, window, uniform, seed)


def _window_bins(x, q, alpha, lo, hi, window, per_sample):
  """Per window offset j: CPMF values p_j and their histogram bins, shaped like x.

  Bins count levels from `lo`; with `per_sample` sample b's bins are offset by
  `b * |A|` so one segment sum gives every sample's histogram.
  """
  u = x / q
  kappa = alpha * q * q
  start, window = _window_start(u, lo, hi, window)
  probs, r = _window_probabilities(u, kappa, start, window)
  num_levels = hi - lo + 1
  base = tf.cast(start, tf.int32) - lo
  if per_sample:
    batch = tf.shape(x)[0]
    rows = tf.reshape(tf.range(batch), [-1] + [1] * (x.shape.rank - 1))
    base = base + rows * num_levels
    num_segments = batch * num_levels
  else:
    num_segments = num_levels
  bins = [base + j for j in range(window)]
  return probs, bins, num_segments, num_levels, kappa, start, r


def _histogram(probs, bins, num_segments):
  """`sum_j` segment sums of p_j into bins_j.

  One segment sum per window level: concatenating them first was 2.6x slower
  under XLA (benchmarks/quantizer_cost.py, window 3).
  """
  total = tf.math.unsorted_segment_sum(tf.reshape(probs[0], [-1]),
                                       tf.reshape(bins[0], [-1]), num_segments)
  for p, b in zip(probs[1:], bins[1:]):
    total += tf.math.unsorted_segment_sum(tf.reshape(p, [-1]),
                                          tf.reshape(b, [-1]), num_segments)
  return total


def _pmf_from_sums(sums, per_sample, num_levels):
  if per_sample:
    sums = tf.reshape(sums, [-1, num_levels])
  return sums / tf.reduce_sum(sums, axis=-1, keepdims=True)


def _entropy_from_pmf(pmf):
  """Returns (H, log2 Pbar flattened)."""
  log2_pmf = tf.math.log(tf.maximum(pmf, tf.constant(1e-30, pmf.dtype))) / _LN2
  entropy = -tf.reduce_sum(tf.math.multiply_no_nan(log2_pmf, pmf), axis=-1)
  return entropy, tf.reshape(log2_pmf, [-1])


@tf.function(jit_compile=True)
def _marginal_pmf(x, q, alpha, lo, hi, window, per_sample):
  probs, bins, num_segments, num_levels, _, _, _ = _window_bins(
      x, q, alpha, lo, hi, window, per_sample)
  return _pmf_from_sums(_histogram(probs, bins, num_segments), per_sample,
                        num_levels)


@tf.function(jit_compile=True)
def _entropy_forward(x, q, alpha, lo, hi, window, per_sample):
  """Returns (H, log2 Pbar flattened)."""
  return _entropy_from_pmf(
      _marginal_pmf(x, q, alpha, lo, hi, window, per_sample))


def _per_element_scale(dy, x, per_sample):
  """`dy / N` broadcast per element (per sample: `dy[b] / N_sample`)."""
  if per_sample:
    count = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    return tf.reshape(dy, [-1] + [1] * (x.shape.rank - 1)) / count
  return dy / tf.cast(tf.size(x), x.dtype)


def _window_logs(x, q, log2_pmf, lo, hi, window, per_sample):
  """`log2 Pbar` at each element's window levels: a list of `window` tensors."""
  start, window = _window_start(x / q, lo, hi, window)
  base = tf.cast(start, tf.int32) - lo
  if per_sample:
    rows = tf.reshape(tf.range(tf.shape(x)[0]),
                      [-1] + [1] * (x.shape.rank - 1))
    base = base + rows * (hi - lo + 1)
  return [tf.gather(log2_pmf, base + j) for j in range(window)]


@tf.function(jit_compile=True)
def _entropy_backward(dy, x, q, alpha, log2_pmf, lo, hi, window, per_sample):
  """Analytic gradient of H (see `marginal_entropy`)."""
  logs = _window_logs(x, q, log2_pmf, lo, hi, window, per_sample)
  mom = _window_moments(x, q, alpha, lo, hi, window, logs)
  scale = _per_element_scale(dy, x, per_sample)
  d_theta, d_q, d_alpha = _entropy_gradient_terms(mom, q)
  return (d_theta * scale, _unbroadcast(d_q * scale, tf.shape(q)),
          _unbroadcast(d_alpha * scale, tf.shape(alpha)))


def marginal_pmf(x, q, alpha, lo, hi, window, per_sample=False):
  """The marginal PMF `Pbar(i) = (1/N) sum_k P(i | theta_k)` (no gradient).

  Returns a `[hi - lo + 1]` vector (or `[batch, hi - lo + 1]` with
  `per_sample=True`, averaging over all axes but the first).
  """
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  return tf.stop_gradient(
      _marginal_pmf(x, q, alpha, lo, hi, window, bool(per_sample)))


def marginal_entropy(x, q, alpha, lo, hi, window, per_sample=False):
  """Entropy `H = -sum_i Pbar(i) log2 Pbar(i)` in bits per element.

  Differentiable in `x`, `q` and `alpha` with no histogram and no
  straight-through trick.  Because `sum_i dPbar(i) = 0`,
  `dH = -sum_i dPbar(i) log2 Pbar(i) = -(1/N) sum_k sum_i dP(i|theta_k) L(i)`
  with `L = log2 Pbar`, and the CPMF's own derivatives give, per element
  (`i = start + j`, `r = u - start`, `kappa = alpha q^2`):

  ```
  dH/dtheta_k = -(2 kappa / (q N)) Cov_k[j, L]       (= -(2 alpha / N) Cov_k[a, L])
  dH/dq       = -(2 kappa / (q N)) sum_k Cov_k[(start + j)(r - j), L]
  dH/dalpha   =  (q^2 / N)         sum_k Cov_k[(r - j)^2, L]
  ```

  so the gradient needs only a gather of `L` at each element's window: the
  histogram itself is never differentiated.

  Returns:
    A scalar (or a `[batch]` vector with `per_sample=True`).
  """
  dtype = _check_float(x).dtype
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  per_sample = bool(per_sample)

  @tf.custom_gradient
  def _op(x, q, alpha):
    entropy, log2_pmf = _entropy_forward(x, q, alpha, lo, hi, window,
                                         per_sample)

    def grad(dy):
      return _entropy_backward(dy, x, q, alpha, log2_pmf, lo, hi, window,
                               per_sample)

    return entropy, grad

  return tf.cast(_op(x, q, alpha), dtype)


@tf.function(jit_compile=True)
def _fused_forward(x, q, alpha, uniform, lo, hi, window, per_sample):
  """Q_d (uniform None) or Q_p, and (H, log2 Pbar), from one window."""
  probs, bins, num_segments, num_levels, _, start, _ = _window_bins(
      x, q, alpha, lo, hi, window, per_sample)
  if uniform is None:
    value = q * _soft_index(start, probs)
  else:
    value = q * _sample_index(start, probs, uniform)
  entropy, log2_pmf = _entropy_from_pmf(_pmf_from_sums(
      _histogram(probs, bins, num_segments), per_sample, num_levels))
  return value, entropy, log2_pmf


@tf.function(jit_compile=True)
def _fused_backward(dy, dh, x, q, alpha, log2_pmf, lo, hi, window,
                    per_sample):
  """Per-element gradients of `dy . Q_d + dh . H`; dq and dalpha unsummed."""
  logs = _window_logs(x, q, log2_pmf, lo, hi, window, per_sample)
  mom = _window_moments(x, q, alpha, lo, hi, window, logs)
  q_theta, q_q, q_alpha = _soft_gradient_terms(mom, q)
  h_theta, h_q, h_alpha = _entropy_gradient_terms(mom, q)
  scale = _per_element_scale(dh, x, per_sample)
  return (dy * q_theta + scale * h_theta, dy * q_q + scale * h_q,
          dy * q_alpha + scale * h_alpha)


def quantize_with_entropy(x, q, alpha, lo, hi, window, mode,
                          per_sample=False, uniform=None, seed=None):
  """Training-mode `quantize` and `marginal_entropy` of one tensor, fused.

  Equal (up to float rounding) to
  `(quantize(x, q, alpha, lo, hi, window, mode, training=True, uniform,
  seed), marginal_entropy(x, q, alpha, lo, hi, window, per_sample))`, with
  the same analytic gradients, but the window CPMF is evaluated once in the
  forward pass (for the value and the histogram) and once in the backward
  pass (for both gradients), instead of twice each, and dq and dalpha are
  reduced once.

  Returns:
    `(value, entropy)`: the quantized tensor (dtype of `x`) and H (a scalar,
    or `[batch]` with `per_sample=True`).
  """
  _check_mode(mode)
  dtype = _check_float(x).dtype
  x, q, alpha = _prepare(x, q, alpha)
  _check_range(lo, hi)
  validate_window(window)
  per_sample = bool(per_sample)
  if mode == "cdl":
    if uniform is None:
      uniform = replica_uniform(tf.shape(x), dtype=x.dtype, seed=seed)
    uniform = tf.cast(uniform, x.dtype)
  else:
    uniform = None

  @tf.custom_gradient
  def _op(x, q, alpha):
    value, entropy, log2_pmf = _fused_forward(x, q, alpha, uniform, lo, hi,
                                              window, per_sample)

    def grad(dy, dh):
      dy = tf.zeros_like(value) if dy is None else dy
      dh = tf.zeros_like(entropy) if dh is None else dh
      d_x, d_q, d_alpha = _fused_backward(dy, dh, x, q, alpha, log2_pmf, lo,
                                          hi, window, per_sample)
      return (d_x, _unbroadcast(d_q, tf.shape(q)),
              _unbroadcast(d_alpha, tf.shape(alpha)))

    return (value, entropy), grad

  value, entropy = _op(x, q, alpha)
  return tf.cast(value, dtype), tf.cast(entropy, dtype)
