"""Tests of keras_cdl.distribute: CDL under tf.distribute, and its traffic.

Strategy tests run in subprocesses (tests/distribute_worker.py): logical CPU
devices must be configured before TensorFlow initialises, which other test
files in this pytest process have already done, and a multi-worker cluster is
one process per worker.  A module fixture starts every job the selected tests
need at once (they are independent), so they overlap on the two cores; the
fault-tolerance restart starts when the killed cluster has ended.

What is checked, and the tolerances (measured first, then asserted with
margin; the numbers are max |difference| over all weights):

* MirroredStrategy, 2 logical CPUs, rcdl: 4 SGD steps (lr 0.1) from the same
  initial weights and the same global batch of 16 as one replica.  Measured
  1.2e-7 and 4.8e-7 (two runs) for weights that moved by 0.24: float32
  summation order only (two shard sums of 8 scaled by 1/2 vs one sum of 16,
  then the all-reduce).  Asserted: `MIRRORED_ATOL = 1e-5`.  The logged loss,
  bits_per_weight and bits_per_activation agree to 1e-6 relative.
* jit_compile=True (XLA, no host-side Python in the step) on one device,
  rcdl: same as without XLA within 4.8e-7 measured (fusion reorders float
  operations); asserted `MIRRORED_ATOL`.  cdl trains under XLA too.
* cdl sampling: replicas given the same inputs draw different samples
  (outputs differ by ~0.3), each step draws new ones, and two runs from the
  same seed train to the same weights: measured exactly equal; asserted
  `SEED_ATOL = 1e-6` (room for a reduction whose order could vary).
* MultiWorkerMirroredStrategy, 2 workers on localhost: the workers draw
  different samples, keep identical weights after cdl and rcdl training, and
  two launches from the same seed draw the same samples.
* BackupAndRestore: worker 1 exits (os._exit) in epoch 1 of 3 (0-based);
  worker 0 then fails its collective.  Restarted, both resume at epoch 1 from
  the epoch-0 backup and finish; final weights vs an uninterrupted run:
  measured exactly equal (rcdl is deterministic, and resuming at an epoch
  boundary replays the same batches).  Asserted `RESUME_ATOL = 1e-6`.
  Backups are per epoch on purpose: Keras 2.14 resumes a mid-epoch
  (`save_freq=<steps>`) backup at the right step count but restarts that
  epoch's data from its first batch, so it could not match (checked on a
  float Dense model: 0.048 off with `save_freq=2`, 0.0 with "epoch").
* MultiWorkerMirroredStrategy `evaluate()`: under Keras 2.14's default
  `distribute_reduction_method` ("auto" = sum of the workers' step logs) and
  under "first" it equals the loss computed on all the data (rtol 1e-5):
  CDLModel returns the metrics' synchronised results.

In this process: the activation rate of two half batches averages to the full
batch's (the per-replica split), the helpers, and `communication_cost` against
`keras_cdl.coding` applied directly to independently computed indices.

Runtime: about 3.7 minutes on the shared 2-core machine at load 7 to 10
(165 s of CPU in all, so under 2 minutes on an idle one).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_cdl
from keras_cdl import coding
from keras_cdl import distribute
from keras_cdl import introspect

L = tf.keras.layers
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "distribute_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_EXIT_CODE = 17  # tests/distribute_worker.py
TIMEOUT = 900  # seconds per job; the machine may be shared.
MIRRORED_ATOL = 1e-5
SEED_ATOL = 1e-6
RESUME_ATOL = 1e-6


# -----------------------------------------------------------------------------
# Subprocess jobs.
# -----------------------------------------------------------------------------
class _Process:
  """One worker process; its output goes to a log file."""

  def __init__(self, args, out, name, env=None):
    self.name = name
    self.log_path = os.path.join(out, name + ".log")
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    full_env.pop("TF_CONFIG", None)  # Only the cluster jobs get one.
    full_env.update(env or {})
    self.popen = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, WORKER, f"--out={out}"] + args, cwd=REPO,
        env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

  def wait(self, timeout=TIMEOUT):
    try:
      return self.popen.wait(timeout)
    finally:
      self._log.flush()

  def kill(self):
    if self.popen.poll() is None:
      self.popen.kill()
      self.popen.wait()

  def tail(self, lines=30):
    self._log.flush()
    with open(self.log_path) as f:
      return "".join(f.readlines()[-lines:])


class _Jobs:
  """Starts the jobs, waits for them, reads their outputs."""

  def __init__(self, out):
    self.out = out
    self.processes = {}

  def start(self, name, args, env=None):
    if name not in self.processes:
      self.processes[name] = _Process(args, self.out, name, env)
    return self.processes[name]

  def start_cluster(self, tag, args, workers=2):
    ports = distribute.free_ports(workers)
    for index in range(workers):
      config = json.dumps(distribute.local_tf_config(ports, index))
      self.start(f"multiworker{tag}-{index}",
                 ["--job=multiworker", f"--tag={tag}"] + args,
                 env={"TF_CONFIG": config})

  def wait(self, name, expect=0):
    process = self.processes[name]
    code = process.wait()
    if expect is not None:
      assert code == expect, (f"{name} exited with {code}, expected {expect}:"
                              f"\n{process.tail()}")
    return code

  def result(self, name):
    self.wait(name)
    with open(os.path.join(self.out, name + ".json")) as f:
      numbers = json.load(f)
    path = os.path.join(self.out, name + ".npz")
    weights = dict(np.load(path)) if os.path.exists(path) else None
    return numbers, weights

  def end_killed_cluster(self, grace=180):
    """Waits for the killed cluster: worker 1's exit code, worker 0's."""
    if not hasattr(self, "_killed_codes"):
      killed = self.processes["multiworkerkilled-1"].wait()
      survivor = self.processes["multiworkerkilled-0"]
      try:
        code = survivor.wait(timeout=grace)
      except subprocess.TimeoutExpired:
        survivor.kill()  # What a cluster manager would do.
        code = "killed by the test"
      self._killed_codes = (killed, code)  # pylint: disable=attribute-defined-outside-init
    return self._killed_codes

  def close(self):
    for process in self.processes.values():
      process.kill()


def _backup_dir(jobs, tag):
  return os.path.join(jobs.out, f"backup-{tag}")


def _start_mirrored(jobs):
  jobs.start("mirrored", ["--job=mirrored"])


def _start_cdl_seed(jobs):
  for tag in ("a", "b"):
    jobs.start(f"cdl_seed{tag}", ["--job=cdl_seed", f"--tag={tag}"])


def _start_reference_cluster(jobs):
  if "multiworkerref-0" not in jobs.processes:
    jobs.start_cluster("ref", ["--cdl_fit",
                               f"--backup_dir={_backup_dir(jobs, 'ref')}"])


def _start_killed_cluster(jobs):
  if "multiworkerkilled-0" not in jobs.processes:
    jobs.start_cluster("killed", ["--kill_task=1", "--kill_epoch=1",
                                  "--kill_batch=1",
                                  f"--backup_dir={_backup_dir(jobs, 'ft')}"])


_STARTERS = {
    "test_mirrored_training_matches_one_replica": [_start_mirrored],
    "test_jit_compile_trains_on_cpu": [_start_mirrored],
    "test_cdl_replicas_draw_different_samples_reproducibly": [
        _start_cdl_seed],
    "test_multiworker_trains_in_sync_with_distinct_samples": [
        _start_reference_cluster],
    "test_multiworker_draws_are_reproducible_across_launches": [
        _start_reference_cluster, _start_killed_cluster],
    "test_backup_and_restore_resumes_a_killed_worker": [
        _start_reference_cluster, _start_killed_cluster],
}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
  """Starts, at once, every job that the selected tests of this file need."""
  runner = _Jobs(str(tmp_path_factory.mktemp("distribute")))
  selected = {item.originalname for item in request.session.items
              if item.module is request.module}
  for name, starters in _STARTERS.items():
    if name in selected:
      for start in starters:
        start(runner)
  yield runner
  runner.close()


def _max_difference(a, b, prefix=""):
  keys = [k for k in a if k.startswith(prefix)]
  assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefix))
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def _assert_close_histories(a, b, rtol):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=rtol, err_msg=key)


# -----------------------------------------------------------------------------
# Strategies (subprocesses).
# -----------------------------------------------------------------------------
def test_mirrored_training_matches_one_replica(jobs):
  numbers, _ = jobs.result("mirrored")
  assert numbers["replicas"] == 2
  assert numbers["mirrored_variable"] == "MirroredVariable"
  # quantize_model inside the scope initialises the same steps as outside.
  assert numbers["init_difference"] == 0.0
  assert numbers["max_change"] > 0.05  # The weights did move.
  assert numbers["mirrored_difference"] <= MIRRORED_ATOL, numbers[
      "mirrored_difference_per_weight"]
  _assert_close_histories(numbers["single_history"],
                          numbers["mirrored_history"], rtol=1e-6)


def test_jit_compile_trains_on_cpu(jobs):
  numbers, _ = jobs.result("mirrored")
  assert numbers["jit_difference"] <= MIRRORED_ATOL
  _assert_close_histories(numbers["single_history"], numbers["jit_history"],
                          rtol=1e-6)
  assert numbers["jit_cdl_finite"]
  assert numbers["jit_cdl_change"] > 0.05
  assert np.isfinite(numbers["jit_cdl_history"]["loss"]).all()


def test_cdl_replicas_draw_different_samples_reproducibly(jobs):
  (a, weights_a), (b, weights_b) = (jobs.result("cdl_seeda"),
                                    jobs.result("cdl_seedb"))
  for numbers in (a, b):
    assert numbers["replicas"] == 2
    assert numbers["replica_difference"] > 0.01  # Same inputs, own samples.
    assert numbers["step_difference"] > 0.01  # New samples every step.
    assert np.isfinite(numbers["history"]["loss"]).all()
  assert a["replica_difference"] == b["replica_difference"]
  assert _max_difference(weights_a, weights_b) <= SEED_ATOL
  assert a["history"] == b["history"]


def test_multiworker_trains_in_sync_with_distinct_samples(jobs):
  (w0, weights0), (w1, weights1) = (jobs.result("multiworkerref-0"),
                                    jobs.result("multiworkerref-1"))
  assert (w0["replicas"], w1["replicas"]) == (2, 2)
  assert (w0["chief"], w1["chief"]) == (True, False)
  draw_difference = np.max(np.abs(np.subtract(w0["draw"], w1["draw"])))
  assert draw_difference > 0.01
  # Gradients are all-reduced: weights stay identical although samples differ.
  assert _max_difference(weights0, weights1, "cdl/") == 0.0
  assert _max_difference(weights0, weights1) == 0.0
  assert w0["epochs_run"] == [0, 1, 2]
  for numbers in (w0, w1):
    assert np.isfinite(numbers["history"]["loss"]).all()
    assert np.isfinite(numbers["cdl_history"]["loss"]).all()
  assert w0["history"]["loss"][-1] < w0["history"]["loss"][0]
  # evaluate() is the loss on all the data under Keras 2.14's default
  # reduction (which sums the two workers' step logs) and under "first".
  for numbers in (w0, w1):
    np.testing.assert_allclose(numbers["evaluate_first"],
                               numbers["evaluate_local"], rtol=1e-5)
    np.testing.assert_allclose(numbers["evaluate_auto"],
                               numbers["evaluate_local"], rtol=1e-5)


def test_multiworker_draws_are_reproducible_across_launches(jobs):
  """Two launches of the cluster with the same seed draw the same samples."""
  for index in (0, 1):
    reference = jobs.result(f"multiworkerref-{index}")[0]["draw"]
    jobs.end_killed_cluster()
    path = os.path.join(jobs.out, f"multiworkerkilled-{index}-draw.json")
    with open(path) as f:
      np.testing.assert_array_equal(json.load(f)["draw"], reference)


def test_backup_and_restore_resumes_a_killed_worker(jobs):
  # Worker 1 ends itself mid-epoch; worker 0's collectives then fail.
  killed, survivor = jobs.end_killed_cluster()
  assert killed == KILL_EXIT_CODE, jobs.processes["multiworkerkilled-1"].tail()
  assert survivor != 0, jobs.processes["multiworkerkilled-0"].tail()
  backup = _backup_dir(jobs, "ft")
  assert os.path.isdir(backup) and os.listdir(backup)
  # Restart the cluster, as a cluster manager would.
  jobs.start_cluster("restarted", [f"--backup_dir={backup}"])
  (r0, weights0), (r1, weights1) = (jobs.result("multiworkerrestarted-0"),
                                    jobs.result("multiworkerrestarted-1"))
  assert r0["epochs_run"] == r1["epochs_run"] == [1, 2]
  _, reference = jobs.result("multiworkerref-0")
  reference = {k: v for k, v in reference.items() if not k.startswith("cdl/")}
  assert _max_difference(weights0, reference) <= RESUME_ATOL
  assert _max_difference(weights1, reference) <= RESUME_ATOL
  ref_numbers, _ = jobs.result("multiworkerref-0")
  _assert_close_histories(
      {k: v[1:] for k, v in ref_numbers["history"].items()}, r0["history"],
      rtol=1e-6)


# -----------------------------------------------------------------------------
# In this process: the rate split, the helpers, communication_cost.
# -----------------------------------------------------------------------------
def _dense_model(batch):
  tf.keras.utils.set_random_seed(0)
  float_model = tf.keras.Sequential([
      L.InputLayer((6,)),
      L.Dense(16, activation="relu", name="hidden"),
      L.Dense(3, name="logits"),
  ], name="tiny")
  return keras_cdl.quantize_model(
      float_model, mode="rcdl", weight_bits=4, activation_bits=4, lmbda=1.0,
      gamma=0.1, hardness="kappa", kappa=4.0, window=3,
      calibration_data=batch)


def _batch(n=32):
  return np.random.RandomState(1).rand(n, 6).astype(np.float32)


class RateSplitTest(tf.test.TestCase):
  """Why R equal shards give the single-device rate (module docstring)."""

  def _bits(self, model, x):
    model(x, training=True)
    return {r.name: float(r.quantizer.last_bits)
            for r in introspect.quantized_tensors(model)
            if r.quantizer.last_bits is not None}

  def test_halves_average_to_the_global_rate(self):
    x = _batch(32)
    model = _dense_model(x)
    full = self._bits(model, x)
    halves = [self._bits(model, x[:16]), self._bits(model, x[16:])]
    kinds = {r.name: r.kind for r in introspect.quantized_tensors(model)}
    self.assertIn("activation", set(kinds[n] for n in full))
    for name, bits in full.items():
      if kinds[name] == "activation":
        # Per-sample rate: the mean of the halves' means is the global mean.
        self.assertAllClose(np.mean([h[name] for h in halves]), bits,
                            rtol=1e-6)
      else:
        # Weight rate: the same on every replica.
        self.assertAllClose([h[name] for h in halves], [bits, bits],
                            rtol=1e-6)


class HelpersTest(tf.test.TestCase):

  def test_default_strategy(self):
    self.assertIs(distribute.make_strategy("default"),
                  tf.distribute.get_strategy())
    self.assertTrue(distribute.is_chief())

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "`name` must be one of"):
      distribute.make_strategy("tpu")
    with self.assertRaisesRegex(ValueError, "`count` must be a positive"):
      distribute.configure_cpu_devices(0)
    with self.assertRaisesRegex(ValueError, "`index` must be in"):
      distribute.local_tf_config([1234, 1235], 2)

  def test_multiworker_needs_tf_config(self):
    old = os.environ.pop("TF_CONFIG", None)
    try:
      with self.assertRaisesRegex(ValueError, "TF_CONFIG"):
        distribute.make_strategy("multiworker")
    finally:
      if old is not None:
        os.environ["TF_CONFIG"] = old

  def test_local_cluster(self):
    ports = distribute.free_ports(3)
    self.assertLen(set(ports), 3)
    config = distribute.local_tf_config(ports, 1)
    self.assertEqual(config["cluster"]["worker"],
                     [f"localhost:{p}" for p in ports])
    self.assertEqual(config["task"], {"type": "worker", "index": 1})


class CommunicationCostTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = _batch(32)
    cls.model = _dense_model(cls.x)
    cls.records = {r.name: r for r in introspect.quantized_tensors(cls.model)}
    cls.cost = keras_cdl.communication_cost(cls.model, cls.x)

  def _coded(self, record, indices, step, axis=None):
    """Payload and table bytes straight from keras_cdl.coding."""
    payload, _ = coding.encode_indices(indices)
    sized = coding.tensor_size(coding.quantized_record(
        record.name, indices, bits=record.quantizer.bits,
        signed=record.quantizer.signed, step=step, channel_axis=axis),
                               indices)
    return len(payload), sized.table_bytes

  def test_weights_match_direct_coding(self):
    quantized = [t for t in self.cost.weights if t.kind == "weight"]
    self.assertEqual([t.name for t in quantized],
                     ["quant_hidden/kernel", "quant_logits/kernel"])
    for t in quantized:
      record = self.records[t.name]
      indices = record.indices()
      self.assertEqual(t.count, indices.size)
      self.assertEqual(t.float32_bytes, 4 * record.weight.shape.num_elements())
      payload, table = self._coded(record, indices,
                                   np.float32(record.step).reshape(()))
      self.assertEqual(t.payload_bytes, payload)
      self.assertEqual(t.table_bytes, table)
      self.assertEqual(t.side_bytes, 4)  # One float32 step.
      self.assertEqual(t.coded_bytes, payload + table + 4)
      self.assertAllClose(t.entropy_bits, coding.empirical_entropy(indices))
      self.assertLess(t.coded_bytes, t.float32_bytes)

  def test_float_parameters_are_float32(self):
    floats = [t for t in self.cost.weights if t.kind == "float"]
    names = [t.name for t in floats]
    self.assertIn("hidden/bias", names)
    self.assertIn("logits/bias", names)
    for t in floats:
      self.assertEqual(t.coded_bytes, t.float32_bytes)
      self.assertEqual(t.float32_bytes, 4 * t.count)
    # Every trainable parameter is counted once: kernels (with their steps
    # as side information) or float.
    kernel_steps = sum(np.size(r.step) for r in self.records.values()
                       if r.kind == "weight")
    trainable = sum(v.shape.num_elements()
                    for v in self.model.trainable_variables)
    self.assertEqual(sum(t.count for t in self.cost.weights) + kernel_steps,
                     trainable)

  def test_activations_match_direct_coding(self):
    by_name = {t.name: t for t in self.cost.activations}
    inp = [r for r in self.records.values() if r.kind == "input"][0]
    # Not the quantized logits: the model's output stays on the last stage.
    self.assertIn("quant_logits/output", self.records)
    self.assertEqual(sorted(by_name), ["quant_hidden/output", inp.name])
    self.assertEqual(self.cost.batch_size, 32)
    # Indices computed here independently of the model's probe.
    hidden = self.records["quant_hidden/output"]
    q_in = float(inp.step)
    input_indices = np.clip(np.round(self.x / q_in), inp.quantizer.lo,
                            inp.quantizer.hi).astype(np.int32)
    kernel = self.records["quant_hidden/kernel"]
    w = kernel.indices() * np.float32(kernel.step)
    layer = self.model.get_layer("quant_hidden").layer
    h = np.maximum(input_indices * np.float32(q_in) @ w + layer.bias.numpy(),
                   0)
    hidden_indices = np.clip(np.round(h / float(hidden.step)),
                             hidden.quantizer.lo,
                             hidden.quantizer.hi).astype(np.int32)
    for record, indices in ((inp, input_indices), (hidden, hidden_indices)):
      t = by_name[record.name]
      self.assertEqual(t.count, indices.size)
      self.assertEqual(t.float32_bytes, 4 * indices.size)
      payload, table = self._coded(record, indices,
                                   np.float32(record.step).reshape(()))
      self.assertEqual(t.payload_bytes, payload)
      self.assertEqual(t.table_bytes, table)
      self.assertEqual(t.coded_bytes, payload + table + 4)
      self.assertAllClose(t.entropy_bits, coding.empirical_entropy(indices))

  def test_totals_and_table(self):
    cost = self.cost
    self.assertEqual(cost.weight_float32_bytes,
                     sum(t.float32_bytes for t in cost.weights))
    self.assertEqual(cost.activation_coded_bytes,
                     sum(t.coded_bytes for t in cost.activations))
    self.assertEqual(cost.total_coded_bytes,
                     cost.weight_coded_bytes + cost.activation_coded_bytes)
    self.assertEqual(cost.total_float32_bytes,
                     4 * sum(t.count for t in cost.weights + cost.activations))
    text = str(cost)
    for t in cost.weights + cost.activations:
      if t.kind != "float":
        self.assertIn(t.name, text)
    self.assertIn(f"{cost.total_coded_bytes:,}", text)
    self.assertIn("step total", text)
    markdown = cost.table(markdown=True)
    self.assertTrue(markdown.startswith("| tensor |"))
    loaded = json.loads(cost.to_json())
    self.assertEqual(loaded["totals"]["total_coded_bytes"],
                     cost.total_coded_bytes)
    self.assertLen(loaded["weights"], len(cost.weights))

  def test_per_channel_steps_are_side_information(self):
    x = _batch(8)
    tf.keras.utils.set_random_seed(0)
    float_model = tf.keras.Sequential(
        [L.InputLayer((6,)), L.Dense(5, activation="relu", name="d")])
    model = keras_cdl.quantize_model(float_model, weight_bits=3,
                                     activation_bits=None, per_channel=True,
                                     quantize_input=False)
    cost = keras_cdl.communication_cost(model, x)
    (kernel,) = [t for t in cost.weights if t.kind == "weight"]
    self.assertEqual(kernel.side_bytes, 4 * 5)
    self.assertEqual(cost.activations, ())
    self.assertEqual(cost.activation_coded_bytes, 0)

  def test_model_without_cdl_tensors_is_rejected(self):
    model = tf.keras.Sequential([L.InputLayer((6,)), L.Dense(2)])
    with self.assertRaisesRegex(ValueError, "quantize_model"):
      keras_cdl.communication_cost(model, _batch(4))
