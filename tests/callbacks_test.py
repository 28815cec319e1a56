"""Tests of keras_cdl.callbacks: KappaSchedule and RateLogger."""

import glob
import math
import os
import tempfile

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import callbacks
from keras_cdl import introspect
from keras_cdl import summary

L = tf.keras.layers


def tiny_quantized(hardness="kappa"):
  tf.keras.utils.set_random_seed(0)
  model = tf.keras.Sequential([
      L.InputLayer((4,)),
      L.Dense(6, activation="relu", name="d1"),
      L.Dense(2, name="d2"),
  ])
  x = np.random.RandomState(0).rand(16, 4).astype(np.float32)
  qmodel = keras_cdl.quantize_model(model, weight_bits=3, activation_bits=3,
                                    lmbda=0.01, hardness=hardness, kappa=4.0,
                                    calibration_data=x)
  qmodel.compile(tf.keras.optimizers.Adam(0.01),
                 tf.keras.losses.SparseCategoricalCrossentropy(
                     from_logits=True))
  return qmodel, x, np.arange(16) % 2


def kappas(model):
  return {r.name: float(np.mean(r.kappa))
          for r in introspect.quantized_tensors(model)}


class KappaProbe(tf.keras.callbacks.Callback):
  """Reads every quantizer's kappa right after the schedule has set it."""

  def __init__(self):
    super().__init__()
    self.seen = []

  def on_epoch_begin(self, epoch, logs=None):
    self.seen.append(kappas(self.model))


class KappaScheduleTest(tf.test.TestCase, parameterized.TestCase):

  def test_geometric_values(self):
    schedule = callbacks.KappaSchedule.geometric(0.5, 8.0, 5).schedule
    expected = [0.5, 1.0, 2.0, 4.0, 8.0]
    self.assertAllClose([schedule(e) for e in range(5)], expected)
    # Held at `end` after the last scheduled epoch.
    self.assertAllClose(schedule(9), 8.0)
    # Decreasing works too, and a single epoch is `start`.
    down = callbacks.KappaSchedule.geometric(9.0, 1.0, 3).schedule
    self.assertAllClose([down(e) for e in range(3)], [9.0, 3.0, 1.0])
    self.assertAllClose(
        callbacks.KappaSchedule.geometric(2.0, 7.0, 1).schedule(0), 2.0)

  def test_fit_assigns_kappa_to_every_quantizer(self):
    qmodel, x, y = tiny_quantized()
    probe = KappaProbe()
    history = qmodel.fit(
        x, y, batch_size=8, epochs=4, verbose=0,
        callbacks=[callbacks.KappaSchedule.geometric(1.0, 27.0, 4), probe])
    expected = [1.0, 3.0, 9.0, 27.0]
    self.assertLen(probe.seen, 4)
    for epoch, seen in enumerate(probe.seen):
      # Weights, ReLU output, logits and the input quantizer alike.
      self.assertLen(seen, 5)
      for name, kappa in seen.items():
        self.assertAllClose(kappa, expected[epoch], rtol=1e-6,
                            msg=f"{name} epoch {epoch}")
    self.assertAllClose(history.history["kappa"], expected)
    # Read back after fit: the last epoch's kappa stays.
    for kappa in kappas(qmodel).values():
      self.assertAllClose(kappa, 27.0, rtol=1e-6)

  def test_alpha_hardness_gets_alpha_equal_kappa_over_q_squared(self):
    qmodel, _, _ = tiny_quantized(hardness="alpha")
    schedule = callbacks.KappaSchedule.geometric(2.0, 0.5, 3)
    schedule.set_model(qmodel)
    schedule.on_epoch_begin(2)
    for record in introspect.quantized_tensors(qmodel):
      q = np.exp(record.variables["log_step"].numpy())
      alpha = np.exp(record.variables["log_alpha"].numpy())
      self.assertAllClose(alpha * q * q, 0.5, rtol=1e-5, msg=record.name)

  @parameterized.named_parameters(
      ("start_zero", dict(start=0.0, end=1.0, epochs=3), "`start`.*0.0"),
      ("end_negative", dict(start=1.0, end=-2.0, epochs=3), "`end`.*-2.0"),
      ("epochs_zero", dict(start=1.0, end=2.0, epochs=0), "`epochs`.*0"),
      ("epochs_float", dict(start=1.0, end=2.0, epochs=2.5), "`epochs`.*2.5"),
  )
  def test_geometric_rejects_bad_values(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      callbacks.KappaSchedule.geometric(**kwargs)

  def test_schedule_must_be_callable(self):
    with self.assertRaisesRegex(ValueError, "`schedule`.*float"):
      callbacks.KappaSchedule(4.0)

  @parameterized.parameters(0.0, -1.0, float("nan"), float("inf"))
  def test_bad_scheduled_value_raises_at_epoch_begin(self, value):
    qmodel, _, _ = tiny_quantized()
    schedule = callbacks.KappaSchedule(lambda epoch: value)
    schedule.set_model(qmodel)
    with self.assertRaisesRegex(ValueError, "kappa.*epoch 3"):
      schedule.on_epoch_begin(3)
    # Nothing was assigned.
    for kappa in kappas(qmodel).values():
      self.assertAllClose(kappa, 4.0)


class RateLoggerTest(tf.test.TestCase):

  def test_history_and_tensorboard(self):
    qmodel, x, y = tiny_quantized()
    with tempfile.TemporaryDirectory() as log_dir:
      history = qmodel.fit(x, y, batch_size=8, epochs=2, verbose=0,
                           callbacks=[callbacks.RateLogger(log_dir=log_dir)])
      events = glob.glob(os.path.join(log_dir, "events.out.tfevents*"))
      self.assertLen(events, 1)
      tags = {}
      for event in tf.compat.v1.train.summary_iterator(events[0]):
        for value in event.summary.value:
          tags.setdefault(value.tag, []).append(
              (event.step, float(tf.make_ndarray(value.tensor))))

    names = [r.name for r in introspect.quantized_tensors(qmodel)]
    weights = ["quant_d1/kernel", "quant_d2/kernel"]
    for name in names:
      self.assertLen(history.history[f"rate/{name}/step"], 2)
    for name in weights:
      values = history.history[f"rate/{name}/entropy"]
      self.assertLen(values, 2)
      for value in values:
        self.assertBetween(value, 0.0, 3.0)
    self.assertNotIn("rate/quant_d1/output/entropy", history.history)
    # The last epoch's values are those of the trained model.
    report = {t.name: t for t in summary.report(qmodel).tensors}
    for name in weights:
      self.assertAllClose(history.history[f"rate/{name}/entropy"][-1],
                          report[name].entropy)
      self.assertAllClose(history.history[f"rate/{name}/step"][-1],
                          np.mean(report[name].step), rtol=1e-6)
    # TensorBoard got the same scalars, one per epoch.
    self.assertEqual(set(tags), {k for k in history.history
                                 if k.startswith("rate/")})
    for tag, points in tags.items():
      self.assertEqual([step for step, _ in points], [0, 1], tag)
      self.assertAllClose([v for _, v in points], history.history[tag],
                          rtol=1e-6)

  def test_without_log_dir_writes_nothing(self):
    logger = callbacks.RateLogger()
    qmodel, _, _ = tiny_quantized()
    logger.set_model(qmodel)
    logger.on_train_begin()
    logs = {}
    logger.on_epoch_end(0, logs)
    logger.on_train_end()
    self.assertIn("rate/quant_d1/kernel/entropy", logs)
    self.assertTrue(all(math.isfinite(v) for v in logs.values()))


if __name__ == "__main__":
  tf.test.main()
