"""`CDLModel`: a Keras model that reports its rate while it trains.

The rate losses themselves are ordinary `add_loss` terms of the quantized
layers, so any Keras model trains with them.  `CDLModel` adds the metrics
`bits_per_weight` and `bits_per_activation` to `fit`'s logs:

```
bits_per_weight     = sum_l N_l^w H_l^w / sum_l N_l^w
bits_per_activation = sum_l N_l^x H_l^x / sum_l N_l^x     (per sample)
```

over the quantized tensors that have a rate term, so that the training loss
is `task + lmbda * bits_per_weight + gamma * bits_per_activation`.
It works for Functional models (`CDLModel(inputs, outputs)`, what
`quantize_model` returns) and as the base class of subclassed models.
"""

import tensorflow as tf

from keras_cdl import introspect

__all__ = ["CDLModel", "RATE_METRICS", "rate_bits"]

RATE_METRICS = ("bits_per_weight", "bits_per_activation")


def _element_count(record):
  if record.kind == "weight":
    return record.weight.shape.num_elements()
  layer = record.layer
  try:
    shape = layer.output_shape if record.kind == "activation" else (
        layer.input_shape)
  except AttributeError:
    # A layer only ever called eagerly (in a subclassed model) has no nodes,
    # hence no input/output_shape; its build shape is known.
    # (tfmot's wrapper.compute_output_shape ignores its argument: ask the
    # wrapped layer.)
    shape = layer._build_input_shape  # pylint: disable=protected-access
    if record.kind == "activation":
      shape = record.inner_layer.compute_output_shape(shape)
  if isinstance(shape, list):
    shape = shape[0]
  return tf.TensorShape(shape[1:]).num_elements()


def rate_bits(model):
  """Element counts of the rate-carrying tensors, by metric name.

  Returns:
    `{"bits_per_weight": [(record, N), ...], "bits_per_activation": [...]}`
    for the quantized tensors whose quantizer has a rate term.
  """
  groups = {name: [] for name in RATE_METRICS}
  for record in introspect.quantized_tensors(model):
    if record.quantizer.rate is None:
      continue
    key = "bits_per_weight" if record.kind == "weight" else (
        "bits_per_activation")
    groups[key].append((record, _element_count(record)))
  return groups


# Keras' Functional class (`tf.keras.Sequential` derives from it).
_Functional = next(c for c in tf.keras.Sequential.__mro__
                   if c.__name__ == "Functional")
_FUNCTIONAL_CLASSES = {}


def _is_functional_init(args, kwargs):
  """Keras' test for `Model(inputs, outputs)`-style constructor arguments."""
  return (len(args) >= 2 or (len(args) == 1 and "outputs" in kwargs) or
          ("inputs" in kwargs and "outputs" in kwargs))


def _functional_class(cls):
  """`cls` with Keras' Functional among its bases (made once per class).

  Keras turns a `Model` subclass called with `(inputs, outputs)` into a
  Functional model by rewriting `__bases__` all the way up its hierarchy, so
  after one `CDLModel(inputs, outputs)` every later `class Net(CDLModel)`
  would run `Functional.__init__` and fail.  Instantiating this subclass, which
  is already Functional, leaves `CDLModel` untouched.  It keeps the name, so
  saved models name `CDLModel`.
  """
  if cls not in _FUNCTIONAL_CLASSES:
    _FUNCTIONAL_CLASSES[cls] = type(cls.__name__, (cls, _Functional),
                                    {"__module__": cls.__module__,
                                     "__doc__": cls.__doc__})
  return _FUNCTIONAL_CLASSES[cls]


class _Trackers:
  """Not trackable on purpose: see `CDLModel.__init__`."""

  def __init__(self, trackers):
    self.trackers = trackers


def _to_python(value):
  """A metric result as Keras logs hold it: a Python scalar or an array."""
  value = value.numpy() if hasattr(value, "numpy") else value
  return value.item() if getattr(value, "ndim", None) == 0 else value


@tf.keras.utils.register_keras_serializable(package="keras_cdl")
class CDLModel(tf.keras.Model):
  """A `tf.keras.Model` whose `fit` logs `bits_per_weight` and `bits_per_activation`."""

  def __new__(cls, *args, **kwargs):
    if _is_functional_init(args, kwargs) and not issubclass(cls, _Functional):
      cls = _functional_class(cls)
    return super().__new__(cls, *args, **kwargs)

  # The Functional-like signature lets Keras save and revive it as Functional.
  def __init__(self, inputs=None, outputs=None, name=None, trainable=True,
               **kwargs):
    if inputs is None and outputs is None:
      super().__init__(name=name, trainable=trainable, **kwargs)
    else:
      super().__init__(inputs=inputs, outputs=outputs, name=name,
                       trainable=trainable, **kwargs)
    # Held in a plain object so Keras does not list the trackers' state among
    # the model's weights (get_weights, HDF5); `metrics` exposes them.
    self._rate = _Trackers([tf.keras.metrics.Mean(name=n)
                            for n in RATE_METRICS])

  @property
  def rate_trackers(self):
    return self._rate.trackers

  @property
  def metrics(self):
    return super().metrics + list(self._rate.trackers)

  def train_step(self, data):
    logs = super().train_step(data)
    for tracker, (name, items) in zip(self.rate_trackers,
                                      rate_bits(self).items()):
      bits = [r.quantizer.last_bits for r, _ in items]
      if not items or any(b is None for b in bits):
        continue
      total = tf.add_n([tf.cast(b, tf.float32) for b in bits])
      tracker.update_state(total / float(sum(n for _, n in items)))
      logs[name] = tracker.result()
    return logs

  def test_step(self, data):
    logs = super().test_step(data)
    return {k: v for k, v in logs.items() if k not in RATE_METRICS}

  def _validate_and_get_metrics_result(self, logs):
    """Keras' end-of-loop swap of step logs for the metrics' own results.

    Keras (2.14) makes the swap only when the logs' keys are exactly
    `self.metrics`' names; `test_step` leaves out the rate trackers, so
    without this `evaluate` would return the last step's logs, which under
    `MultiWorkerMirroredStrategy` are summed over the workers.  Here the
    swap is made for the keys the logs have.
    """
    if isinstance(logs, dict):
      results = self.get_metrics_result()
      if set(logs) <= set(results) and set(results) - set(logs) <= set(
          RATE_METRICS):
        return {k: _to_python(results[k]) for k in logs}
    return super()._validate_and_get_metrics_result(logs)
