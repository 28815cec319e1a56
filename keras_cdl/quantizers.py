"""tfmot `Quantizer`s for CDL: they own the step size and hardness variables.

A quantizer follows tfmot's contract: `build(tensor_shape, name, layer)`
creates its variables with `layer.add_weight` and returns them as a dict,
which `__call__(inputs, training, weights)` receives.  In training it also adds
its rate to `layer` with `layer.add_loss(rate_weight * bits)` (the layer is
the one passed to `build`; one quantizer instance serves one tensor), and keeps
the bits of the last call in `last_bits` for the `bits_per_*` metrics.

Variables (per quantized tensor, named `<name>_<var>`):
* `log_step`: trainable log of the step size `q` (scalar, or `[C]` per channel);
* `kappa` (non-trainable, `hardness="kappa"`) or `log_alpha` (trainable,
  `hardness="alpha"`): the hardness; `kappa = alpha q^2`;
* `rate_weight`: non-trainable loss units per bit (`lmbda / N_weights` or
  `gamma / N_activations`, set by `keras_cdl.set_rate_weights`).
"""

import math
import threading

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from keras_cdl import ops
from keras_cdl import rate as rate_lib

__all__ = [
    "CDLQuantizer",
    "CDLWeightQuantizer",
    "CDLActivationQuantizer",
    "initial_step",
    "HARDNESS",
]

HARDNESS = ("kappa", "alpha")
_DEFAULT_STEP = 0.05


def initial_step(values, bits, signed, channel_axis=None):
  """LSQ-style step size from a tensor's statistics: `2 mean|x| / sqrt(hi)`.

  `hi` is the largest index (`2^(b-1) - 1` signed, `2^b - 1` unsigned).  With
  `channel_axis`, one step per channel.  Returns a float32 NumPy array;
  an all-zero tensor gets a small positive step.
  """
  values = np.abs(np.asarray(values, dtype=np.float64))
  _, hi = ops.index_range(bits, signed)
  if channel_axis is None:
    mean = values.mean()
  else:
    axes = tuple(a for a in range(values.ndim)
                 if a != channel_axis % values.ndim)
    mean = values.mean(axis=axes)
  step = 2.0 * mean / math.sqrt(hi)
  return np.asarray(np.where(step > 0, step, 1e-3), dtype=np.float32)


def _inner_weights_first(wrapper):
  """Puts a built wrapped layer's weights before the quantizer's.

  tfmot's `QuantizeWrapperV2.build` lists the inner layer's weights before
  building it, so a wrapper rebuilt from config (HDF5 loading) would order
  its trainable weights differently from the one saved, whenever a quantizer
  adds a trainable variable.  Fixing the order here makes both the same.
  """
  inner = getattr(wrapper, "layer", None)
  if inner is None or not inner.built:
    return
  own = wrapper._trainable_weights  # pylint: disable=protected-access
  first = [w for w in inner.trainable_weights]
  rest = [w for w in own if all(w is not f for f in first)]
  own[:] = first + rest


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class CDLQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
  """CDL quantizer of one tensor (see `CDLWeightQuantizer`, `CDLActivationQuantizer`).

  Args:
    bits: bit width, 2 to 8.
    signed: True for the narrow symmetric index range, False for `[0, 2^b-1]`.
    mode: "cdl" (sampled forward, soft backward) or "rcdl" (soft both ways).
    hardness: "kappa" (fixed `kappa = alpha q^2`, changeable by a schedule) or
      "alpha" (trainable alpha, initialised to `kappa / q^2`).
    kappa: initial (or fixed) `alpha q^2`, positive.
    window: levels evaluated per element (`ops.truncation_bound` gives the
      probability mass this drops).
    per_channel: one step size per channel of `channel_axis`.
    channel_axis: the channel axis when `per_channel`.
    rate: "entropy" (marginal-PMF entropy), "prior" (learned tfc prior) or
      None (no rate term).
    per_sample_rate: rate per sample averaged over the batch (activations)
      instead of per tensor (weights).
  """

  def __init__(self, bits=8, signed=True, mode="rcdl", hardness="kappa",
               kappa=4.0, window=3, per_channel=False, channel_axis=-1,
               rate="entropy", per_sample_rate=False):
    self.bits = ops.validate_bits(bits)
    self.signed = bool(signed)
    if mode not in ops.MODES:
      raise ValueError(f"`mode` must be one of {ops.MODES}, but got {mode!r}.")
    self.mode = mode
    if hardness not in HARDNESS:
      raise ValueError(
          f"`hardness` must be one of {HARDNESS}, but got {hardness!r}.")
    self.hardness = hardness
    if not isinstance(kappa, (int, float)) or not kappa > 0:
      raise ValueError(f"`kappa` must be a positive number, but got {kappa!r}.")
    self.kappa = float(kappa)
    self.window = ops.validate_window(window)
    self.per_channel = bool(per_channel)
    if not isinstance(channel_axis, int):
      raise ValueError(
          f"`channel_axis` must be an integer, but got {channel_axis!r}.")
    self.channel_axis = channel_axis
    if rate is not None and rate not in rate_lib.RATES:
      raise ValueError(
          f"`rate` must be one of {rate_lib.RATES} or None, but got {rate!r}.")
    self.rate = rate
    self.per_sample_rate = bool(per_sample_rate)
    self.lo, self.hi = ops.index_range(self.bits, self.signed)
    self.last_bits = None
    self._layer = None
    self._rate_term = None

  # tfmot contract ----------------------------------------------------------

  def build(self, tensor_shape, name, layer):
    shape = tf.TensorShape(tensor_shape)
    if self.per_channel:
      if shape.rank is None or shape[self.channel_axis] is None:
        raise ValueError(
            f"`per_channel` needs a known size on `channel_axis` "
            f"{self.channel_axis}, but the tensor shape is {shape}.")
      step_shape = [shape[self.channel_axis]]
    else:
      step_shape = []
    weights = {
        "log_step": layer.add_weight(
            f"{name}_log_step", shape=step_shape,
            initializer=tf.keras.initializers.Constant(
                math.log(_DEFAULT_STEP)),
            trainable=True),
        "rate_weight": layer.add_weight(
            f"{name}_rate_weight", shape=[],
            initializer=tf.keras.initializers.Zeros(), trainable=False),
    }
    if self.hardness == "kappa":
      weights["kappa"] = layer.add_weight(
          f"{name}_kappa", shape=[],
          initializer=tf.keras.initializers.Constant(self.kappa),
          trainable=False)
    else:
      weights["log_alpha"] = layer.add_weight(
          f"{name}_log_alpha", shape=step_shape,
          initializer=tf.keras.initializers.Constant(
              math.log(self.kappa / _DEFAULT_STEP**2)),
          trainable=True)
    self._rate_term = rate_lib.get(self.rate, self.per_sample_rate)
    if self._rate_term is not None:
      weights.update(self._rate_term.build(layer, name, self.lo, self.hi))
    _inner_weights_first(layer)
    self._layer = layer
    return weights

  def __call__(self, inputs, training, weights, **kwargs):
    q, alpha = self.step_and_alpha(weights, inputs.dtype, inputs.shape.rank)
    self.last_bits = None
    if not (training and self._rate_term is not None):
      return ops.quantize(inputs, q, alpha, self.lo, self.hi, self.window,
                          self.mode, training)
    # One call for both: the entropy term shares the quantizer's window.
    outputs, bits = self._rate_term.quantize_and_bits(
        inputs, q, alpha, self.lo, self.hi, self.window, self.mode, weights)
    self.last_bits = bits
    self._layer.add_loss(tf.cast(weights["rate_weight"], bits.dtype) * bits)
    return outputs

  def get_config(self):
    return {
        "bits": self.bits,
        "signed": self.signed,
        "mode": self.mode,
        "hardness": self.hardness,
        "kappa": self.kappa,
        "window": self.window,
        "per_channel": self.per_channel,
        "channel_axis": self.channel_axis,
        "rate": self.rate,
        "per_sample_rate": self.per_sample_rate,
    }

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  def __eq__(self, other):
    return type(self) is type(other) and self.get_config() == other.get_config()

  def __ne__(self, other):
    return not self == other

  @property
  def last_bits(self):
    """The bits of this thread's last training call (None outside training).

    Kept per thread: `MirroredStrategy` traces each replica in its own
    thread, and each replica's metrics must read its own bits.
    """
    return self.__dict__.setdefault("_last_bits", {}).get(
        threading.get_ident())

  @last_bits.setter
  def last_bits(self, value):
    self.__dict__.setdefault("_last_bits", {})[threading.get_ident()] = value

  # Helpers used by keras_cdl ------------------------------------------------

  def _broadcastable(self, value, rank):
    """Reshapes a per-channel vector so it broadcasts on `channel_axis`."""
    if not self.per_channel or rank is None:
      return value
    axis = self.channel_axis % rank
    return tf.reshape(value, [-1] + [1] * (rank - 1 - axis))

  def step_and_alpha(self, weights, dtype, rank):
    """Returns `(q, alpha)` shaped to broadcast against a rank-`rank` input."""
    q = self._broadcastable(tf.exp(tf.cast(weights["log_step"], dtype)), rank)
    if self.hardness == "kappa":
      alpha = tf.cast(weights["kappa"], dtype) / (q * q)
    else:
      alpha = self._broadcastable(
          tf.exp(tf.cast(weights["log_alpha"], dtype)), rank)
    return q, alpha

  def set_step(self, weights, step):
    """Assigns step size(s) `step`; in alpha mode also resets alpha to kappa/q^2."""
    step = np.asarray(step, dtype=np.float32)
    if np.any(~np.isfinite(step)) or np.any(step <= 0):
      raise ValueError(f"`step` must be positive and finite, but got {step}.")
    log_step = weights["log_step"]
    if self.hardness == "alpha":
      # kappa = alpha q^2 (per channel) with the step *before* it changes.
      kappa = np.exp(weights["log_alpha"].numpy() + 2 * log_step.numpy())
    log_step.assign(np.broadcast_to(np.log(step), log_step.shape))
    if self.hardness == "alpha":
      weights["log_alpha"].assign(
          np.broadcast_to(np.log(kappa / step**2), log_step.shape))

  def get_kappa(self, weights):
    """Current `kappa = alpha q^2` (mean over channels in per-channel alpha mode)."""
    if self.hardness == "kappa":
      return weights["kappa"].numpy()
    q = np.exp(weights["log_step"].numpy())
    return float(np.mean(np.exp(weights["log_alpha"].numpy()) * q * q))

  def set_kappa(self, weights, kappa):
    """Sets the hardness to `kappa` (in alpha mode: alpha = kappa / q^2)."""
    if not kappa > 0:
      raise ValueError(f"`kappa` must be positive, but got {kappa!r}.")
    if self.hardness == "kappa":
      weights["kappa"].assign(kappa)
    else:
      q = np.exp(weights["log_step"].numpy())
      weights["log_alpha"].assign(np.log(kappa / q**2).astype(np.float32))

  def indices(self, inputs, weights):
    """Inference indices `clip(round(x / q), lo, hi)` as int32."""
    inputs = tf.convert_to_tensor(inputs)
    q, _ = self.step_and_alpha(weights, inputs.dtype, inputs.shape.rank)
    return tf.cast(tf.clip_by_value(tf.round(inputs / q), self.lo, self.hi),
                   tf.int32)


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class CDLWeightQuantizer(CDLQuantizer):
  """CDL quantizer for a kernel: signed narrow range, rate per tensor.

  Same arguments as `CDLQuantizer`, without `signed` and `per_sample_rate`.
  With `per_channel=True` there is one step size per output channel
  (`channel_axis=-1` for Dense and Conv kernels).
  """

  def __init__(self, bits=8, mode="rcdl", hardness="kappa", kappa=4.0,
               window=3, per_channel=False, channel_axis=-1, rate="entropy"):
    super().__init__(bits=bits, signed=True, mode=mode, hardness=hardness,
                     kappa=kappa, window=window, per_channel=per_channel,
                     channel_axis=channel_axis, rate=rate,
                     per_sample_rate=False)

  def get_config(self):
    config = super().get_config()
    del config["signed"], config["per_sample_rate"]
    return config


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class CDLActivationQuantizer(CDLQuantizer):
  """CDL quantizer for activations: per-tensor step, rate per sample.

  Unsigned (`[0, 2^b - 1]`, for ReLU outputs) unless `signed=True`.  The
  model input is quantized with `rate=None`: its entropy is the data's.
  """

  def __init__(self, bits=8, signed=False, mode="rcdl", hardness="kappa",
               kappa=4.0, window=3, rate="entropy"):
    super().__init__(bits=bits, signed=signed, mode=mode, hardness=hardness,
                     kappa=kappa, window=window, per_channel=False,
                     channel_axis=-1, rate=rate, per_sample_rate=True)

  def get_config(self):
    config = super().get_config()
    for key in ("per_channel", "channel_axis", "per_sample_rate"):
      del config[key]
    return config
