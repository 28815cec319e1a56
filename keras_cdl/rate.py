"""Rate terms: differentiable estimates of the bits a quantized tensor costs.

All rate terms share one interface, `RateTerm`:

```
variables = rate_term.build(layer, name)      # Keras weights, possibly none
bits = rate_term(x, q, alpha, lo, hi, window, variables, training=True)
```

returns the total bits of `x`'s indices: for a weight (`per_sample=False`)
`N * H` over the whole tensor; for an activation (`per_sample=True`) the bits
of one sample, `N_sample * H_b`, averaged over the batch.

* `MarginalEntropy` is the paper's term: `H` is the entropy of the marginal
  PMF `Pbar(i) = (1/N) sum_k P(i | theta_k)` (`ops.marginal_entropy`).
* `LearnedPrior` replaces `H` with the bits of `u = theta / q` under a
  tensorflow-compression `ContinuousBatchedEntropyModel` whose prior (a
  `NoisyLogisticMixture` with `COMPONENTS` components) is learned jointly, as
  in EPR.  Its parameters are Keras weights of the quantized layer, so they
  train, checkpoint and save with it.
"""

import abc

import numpy as np
import tensorflow as tf
import tensorflow_compression as tfc

from keras_cdl import ops

__all__ = ["RateTerm", "MarginalEntropy", "LearnedPrior", "get", "RATES"]

RATES = ("entropy", "prior")


class RateTerm(tf.Module, metaclass=abc.ABCMeta):
  """Interface: total bits of a quantized tensor, differentiable."""

  def __init__(self, per_sample, name=None):
    super().__init__(name=name)
    self.per_sample = bool(per_sample)

  def _total(self, bits_per_element, x):
    """Turns bits per element (scalar or per sample) into total bits."""
    if self.per_sample:
      count = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
      return count * tf.reduce_mean(bits_per_element)
    return tf.cast(tf.size(x), x.dtype) * bits_per_element

  def build(self, layer, name, lo, hi):
    """Creates the term's variables on `layer`; returns them as a dict."""
    del layer, name, lo, hi
    return {}

  @abc.abstractmethod
  def __call__(self, x, q, alpha, lo, hi, window, variables, training=True):
    """Returns the total bits (scalar tensor)."""

  def quantize_and_bits(self, x, q, alpha, lo, hi, window, mode, variables):
    """Training-mode `ops.quantize(x, ...)` and `self(x, ...)`, as a pair.

    Terms that can share work with the quantizer override this.
    """
    value = ops.quantize(x, q, alpha, lo, hi, window, mode, training=True)
    return value, self(x, q, alpha, lo, hi, window, variables, training=True)


class MarginalEntropy(RateTerm):
  """`N * H(Pbar)`: the marginal-PMF entropy of the CDL paper (bits)."""

  def __call__(self, x, q, alpha, lo, hi, window, variables, training=True):
    del variables, training  # No parameters; same estimate in both phases.
    entropy = ops.marginal_entropy(x, q, alpha, lo, hi, window,
                                   per_sample=self.per_sample)
    return self._total(entropy, x)

  def quantize_and_bits(self, x, q, alpha, lo, hi, window, mode, variables):
    """One fused op (`ops.quantize_with_entropy`): the window CPMF is
    evaluated once per pass for both the quantized value and the entropy."""
    del variables
    value, entropy = ops.quantize_with_entropy(
        x, q, alpha, lo, hi, window, mode, per_sample=self.per_sample)
    return value, self._total(entropy, x)


class LearnedPrior(RateTerm):
  """Bits of `theta / q` under a learned tensorflow-compression prior.

  The prior is a mixture of `COMPONENTS` logistics convolved with unit
  uniform noise (`tfc.NoisyLogisticMixture`); its locations, log scales and
  mixture logits are created by `build` as trainable weights of the layer.
  Training (`training=True`) uses the entropy model's additive-noise upper
  bound on the bits; otherwise the information content of the rounded values.
  """

  COMPONENTS = 3

  def build(self, layer, name, lo, hi):
    locations = np.linspace(lo, hi, self.COMPONENTS + 2)[1:-1]
    if lo < 0:
      locations = np.linspace(-2.0, 2.0, self.COMPONENTS)
    init = tf.keras.initializers.Constant
    return {
        "prior_loc": layer.add_weight(
            f"{name}_prior_loc", shape=[self.COMPONENTS],
            initializer=init(locations.astype(np.float32)), trainable=True),
        "prior_log_scale": layer.add_weight(
            f"{name}_prior_log_scale", shape=[self.COMPONENTS],
            initializer=init(0.0), trainable=True),
        "prior_logits": layer.add_weight(
            f"{name}_prior_logits", shape=[self.COMPONENTS],
            initializer=init(0.0), trainable=True),
    }

  def __call__(self, x, q, alpha, lo, hi, window, variables, training=True):
    del alpha, window
    u = tf.clip_by_value(x / tf.cast(q, x.dtype), lo, hi)
    prior = tfc.NoisyLogisticMixture(
        loc=tf.cast(variables["prior_loc"], u.dtype),
        scale=tf.exp(tf.cast(variables["prior_log_scale"], u.dtype)),
        weight=tf.nn.softmax(tf.cast(variables["prior_logits"], u.dtype)))
    rank = u.shape.rank
    coding_rank = rank - 1 if self.per_sample else rank
    model = tfc.ContinuousBatchedEntropyModel(
        prior, coding_rank=coding_rank, compression=False)
    _, bits = model(u, training=training)
    if self.per_sample:
      return tf.reduce_mean(bits)
    return bits


def get(identifier, per_sample):
  """Returns the rate term for `identifier` ("entropy", "prior" or None)."""
  if identifier is None:
    return None
  if identifier == "entropy":
    return MarginalEntropy(per_sample)
  if identifier == "prior":
    return LearnedPrior(per_sample)
  raise ValueError(
      f"`rate` must be one of {RATES} or None, but got {identifier!r}.")
