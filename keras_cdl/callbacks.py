"""Keras callbacks for CDL training: a hardness schedule and a rate logger."""

import math

import numpy as np
import tensorflow as tf

from keras_cdl import introspect
from keras_cdl import summary as summary_lib

__all__ = ["KappaSchedule", "RateLogger"]


class KappaSchedule(tf.keras.callbacks.Callback):
  """Sets every CDL quantizer's hardness `kappa = alpha q^2` each epoch.

  Start soft (small kappa: large gradients, Q_d close to the identity) and
  harden towards rounding.  Works for `hardness="kappa"` (assigns kappa) and
  `hardness="alpha"` (assigns `alpha = kappa / q^2`).

  Args:
    schedule: function `epoch -> kappa` (epoch counted from 0).
    verbose: print the new kappa each epoch.
  """

  def __init__(self, schedule, verbose=False):
    super().__init__()
    if not callable(schedule):
      raise ValueError("`schedule` must be callable (epoch -> kappa), but got "
                       f"{type(schedule).__name__}.")
    self.schedule = schedule
    self.verbose = verbose

  @classmethod
  def geometric(cls, start, end, epochs, **kwargs):
    """kappa from `start` at epoch 0 to `end` at epoch `epochs - 1`."""
    for name, value in (("start", start), ("end", end)):
      if not value > 0:
        raise ValueError(f"`{name}` must be positive, but got {value!r}.")
    if not isinstance(epochs, int) or epochs < 1:
      raise ValueError(f"`epochs` must be an integer >= 1, but got {epochs!r}.")
    ratio = 1.0 if epochs == 1 else (end / start) ** (1.0 / (epochs - 1))
    return cls(lambda epoch: start * ratio ** min(epoch, epochs - 1), **kwargs)

  def on_epoch_begin(self, epoch, logs=None):
    kappa = float(self.schedule(epoch))
    if not (kappa > 0 and math.isfinite(kappa)):
      raise ValueError(f"The schedule returned kappa={kappa!r} for epoch "
                       f"{epoch}; it must be positive and finite.")
    for record in introspect.quantized_tensors(self.model):
      record.quantizer.set_kappa(record.variables, kappa)
    if self.verbose:
      print(f"\nKappaSchedule: epoch {epoch}: kappa = {kappa:.4g}")

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs["kappa"] = float(self.schedule(epoch))


class RateLogger(tf.keras.callbacks.Callback):
  """Logs per-tensor rate statistics at the end of each epoch.

  For each quantized weight: the entropy of its stored indices (bits per
  weight) and its mean step size; for each activation: its step size.  The
  values go into `logs` as `rate/<tensor>/entropy` and `rate/<tensor>/step`
  (so `History` and `tf.keras.callbacks.TensorBoard` see them) and, with
  `log_dir`, into TensorBoard scalar summaries directly.

  Args:
    log_dir: optional TensorBoard directory.
  """

  def __init__(self, log_dir=None):
    super().__init__()
    self.log_dir = log_dir
    self._writer = None

  def on_train_begin(self, logs=None):
    if self.log_dir:
      self._writer = tf.summary.create_file_writer(self.log_dir)

  def on_epoch_end(self, epoch, logs=None):
    values = {}
    for record in introspect.quantized_tensors(self.model):
      if record.kind == "weight":
        values[f"rate/{record.name}/entropy"] = summary_lib.entropy_bits(
            record.indices())
      values[f"rate/{record.name}/step"] = float(np.mean(record.step))
    if logs is not None:
      logs.update(values)
    if self._writer is not None:
      with self._writer.as_default():
        for name, value in values.items():
          tf.summary.scalar(name, value, step=epoch)
      self._writer.flush()

  def on_train_end(self, logs=None):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
