"""CDL under `tf.distribute`: strategies, and what crosses devices per step.

A CDL model is an ordinary Keras model with `add_loss` rate terms, so it
trains under Keras' strategies: create the float model *and* call
`keras_cdl.quantize_model` inside `strategy.scope()` (the quantizers create
variables; the step-size initialisation assigns NumPy values to the mirrored
variables, which works in the scope's cross-replica context; give every
worker the same `calibration_data`), then `compile` and `fit` as usual.
Tested (tests/distribute_test.py): `MirroredStrategy` on two logical CPUs,
`MultiWorkerMirroredStrategy` with two worker processes on localhost,
`tf.keras.callbacks.BackupAndRestore` with a worker killed mid-epoch, and
`compile(..., jit_compile=True)` on one device (XLA: no host-side Python in
the train step, the rule TPUStrategy imposes).

How the rate terms combine across replicas
------------------------------------------
Every replica runs the forward pass on its shard of the global batch, so every
quantizer adds its rate, `rate_weight * bits`, to its layer's losses *per
replica* (Keras keeps the losses added inside `call` per thread, and
MirroredStrategy runs each replica in its own thread, so the replicas' terms
never mix).  Keras' `compute_loss` then treats them exactly as it treats
regularization losses (`keras/src/engine/compile_utils.py`,
`LossesContainer.__call__`): on replica `r` of `R`

```
loss_r = mean_{b in shard r} task(b) / R  +  (sum_l rate_weight_l * bits_l,r) / R
```

(the task loss is the shard mean scaled by `1/R`; the `add_loss` terms are
summed, then scaled by `1/R` by `losses_utils.scale_loss_for_distribution`),
and the optimizer all-reduces the gradients with a SUM.  So a step follows the
gradient of

```
mean_b task(b)  +  (1/R) sum_r sum_l rate_weight_l * bits_l,r .
```

* Weight rates `N_l^w H_l^w` depend only on the (mirrored) weights:
  `bits_l,r` is the same on every replica, and the average is the
  single-device value.
* Activation rates are per sample, `bits_l,r = N_l^x * mean_{b in shard r}
  H_l(b)` with one marginal PMF per sample, so shards of equal size `B/R`
  average to the global per-sample mean: `(1/R) sum_r mean_{shard r} H =
  mean_B H`, the single-device rate.  (A final partial batch split into
  unequal shards weighs its samples unequally; `drop_remainder=True` avoids
  it.)

With sampling off (`mode="rcdl"`), two replicas therefore train like one
replica with the same global batch (the test measures 1e-7..5e-7 after four
SGD steps: float summation order).  The `bits_per_weight` and
`bits_per_activation` metrics are per replica (`CDLQuantizer.last_bits` is
kept per thread) and Keras averages them like any `Mean` metric, so they equal
the single-device values too.

Sampling (`mode="cdl"`) under strategies
----------------------------------------
`keras_cdl.ops.sample_quantize` draws its uniforms with
`ops.replica_uniform`: a seeded stateful op draws a new key per call, the
replica's global id (`replica_id_in_sync_group`, which counts across workers)
is folded into it, and a stateless op draws the samples.  Every replica, on
every worker, draws its own samples, every step draws new ones, and a run is
reproducible from `tf.keras.utils.set_random_seed`.  (With plain
`tf.random.uniform`, the workers of a `MultiWorkerMirroredStrategy`, whose
graphs are identical, drew identical samples.)  The gradients are still
all-reduced, so the weights stay identical on all replicas.  A run resumed by
`BackupAndRestore` restarts the key stream (it is not checkpointed): only
`mode="rcdl"` resumes bit for bit.

Caveats (Keras 2.14, TensorFlow 2.14)
-------------------------------------
* `BackupAndRestore(save_freq="epoch")` resumes at the start of the epoch that
  was interrupted and replays it: an rcdl run then ends with exactly the
  weights of an uninterrupted one (tested).  With `save_freq=<steps>`, Keras
  resumes the step count mid-epoch but restarts that epoch's data from its
  first batch, so the batches no longer line up.
* Under `MultiWorkerMirroredStrategy` Keras' default
  `distribute_reduction_method` ("auto", meaning "sum") adds up the workers'
  step logs, so progress-bar values come out multiplied by the number of
  workers; `fit`'s epoch logs and `CDLModel.evaluate` return the metrics'
  synchronised results and are right either way.
* `jit_compile=True` under `MirroredStrategy` on logical CPU devices fails in
  XLA ("Trying to access resource ... located in device CPU:1 from device
  CPU:0") for any Keras model, CDL or not; XLA on one device works.

Communication
-------------
`communication_cost(model, batch)` measures the bytes of one training step
that would cross devices: the quantized kernels sent coded to the workers
(data parallelism with a parameter server) and the quantized activations at
each layer boundary (pipeline model parallelism), each range coded with
`keras_cdl.coding` against its own PMF, next to their float32 size.

> E.-H. Yang and S. M. Hamidi, "Coded Deep Learning: Framework and Algorithm",
> arXiv 2501.09849, 2025 (parallelism: weights and activations stay low
> entropy, so what crosses devices can be sent coded).
"""

import dataclasses
import json
import os
import socket

import numpy as np
import tensorflow as tf

from keras_cdl import coding
from keras_cdl import introspect

__all__ = [
    "STRATEGIES",
    "configure_cpu_devices",
    "make_strategy",
    "is_chief",
    "free_ports",
    "local_tf_config",
    "TensorTraffic",
    "CommunicationCost",
    "communication_cost",
]

STRATEGIES = ("default", "mirrored", "multiworker")
_FLOAT32_BYTES = 4


# -----------------------------------------------------------------------------
# Strategies.
# -----------------------------------------------------------------------------
def configure_cpu_devices(count):
  """Splits the host CPU into `count` logical devices (for `MirroredStrategy`).

  Must run before TensorFlow initialises its devices (before the first op or
  strategy); calling it again with the same count is a no-op.

  Raises:
    ValueError: `count` is not a positive integer.
    RuntimeError: the devices are already initialised with another count.
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(
        f"`count` must be a positive integer, but got {count!r}.")
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == count:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError as error:
    have = len(tf.config.list_logical_devices("CPU"))
    raise RuntimeError(
        f"Cannot split the CPU into {count} logical devices: TensorFlow has "
        f"already initialised {have}. Call configure_cpu_devices before any "
        "other TensorFlow use (e.g. first thing in main, or in a fresh "
        "process).") from error


def make_strategy(name, cpu_devices=None):
  """Returns the `tf.distribute.Strategy` called `name`.

  Args:
    name: "default" (no distribution: `tf.distribute.get_strategy()`),
      "mirrored" (one replica per GPU, or per logical CPU when there is no
      GPU) or "multiworker" (`MultiWorkerMirroredStrategy`; reads the cluster
      from the `TF_CONFIG` environment variable).
    cpu_devices: for "mirrored" without GPUs, first split the CPU into this
      many logical devices (see `configure_cpu_devices`).

  Raises:
    ValueError: unknown `name`, or "multiworker" without `TF_CONFIG`.
  """
  if name not in STRATEGIES:
    raise ValueError(f"`name` must be one of {STRATEGIES}, but got {name!r}.")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "multiworker":
    if not os.environ.get("TF_CONFIG"):
      raise ValueError(
          "The 'multiworker' strategy needs the cluster in the TF_CONFIG "
          "environment variable, e.g. keras_cdl.distribute.local_tf_config("
          "ports, index) serialised with json.dumps on every worker.")
    return tf.distribute.MultiWorkerMirroredStrategy()
  if cpu_devices:
    configure_cpu_devices(cpu_devices)
  gpus = tf.config.list_logical_devices("GPU")
  devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
  return tf.distribute.MirroredStrategy(devices)


def is_chief(strategy=None):
  """True unless this process is a non-chief worker of a multi-worker cluster.

  The chief is task 0 of type "worker" when the cluster has no "chief" task.
  """
  strategy = strategy or tf.distribute.get_strategy()
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def free_ports(count):
  """`count` distinct TCP ports free on localhost right now (for tests)."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("localhost", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def local_tf_config(ports, index):
  """The `TF_CONFIG` dict of worker `index` of a cluster on localhost `ports`.

  Set it with `os.environ["TF_CONFIG"] = json.dumps(local_tf_config(...))`
  before creating the strategy.
  """
  if not 0 <= index < len(ports):
    raise ValueError(f"`index` must be in [0, {len(ports)}), but got {index}.")
  return {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
          "task": {"type": "worker", "index": int(index)}}


# -----------------------------------------------------------------------------
# Communication cost.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorTraffic:
  """The bytes one tensor takes on the wire in one training step.

  Attributes:
    name: the weight's or activation's name (`introspect` naming; the
      variable's name for float parameters).
    kind: "weight" (a quantized kernel), "float" (a parameter sent as
      float32), "activation" (a quantized layer output on the batch) or
      "input" (the quantized model input on the batch).
    count: elements.
    float32_bytes: `4 * count`.
    payload_bytes: the range-coded indices (`keras_cdl.coding`); for "float"
      the raw float32 bytes.
    table_bytes: the serialised coding table (0 for "float").
    side_bytes: what else a receiver needs to dequantize: the float32 step
      size(s) (0 for "float").
    entropy_bits: empirical entropy of the indices in bits per element (None
      for "float"); `count * entropy_bits / 8` is the ideal payload.
  """
  name: str
  kind: str
  count: int
  float32_bytes: int
  payload_bytes: int
  table_bytes: int
  side_bytes: int
  entropy_bits: float | None

  @property
  def coded_bytes(self):
    """Payload + table + step sizes: the coded message."""
    return self.payload_bytes + self.table_bytes + self.side_bytes

  @property
  def ratio(self):
    """float32 bytes / coded bytes."""
    return self.float32_bytes / max(self.coded_bytes, 1)

  @property
  def coded_bits_per_element(self):
    return 8.0 * self.coded_bytes / max(self.count, 1)


def _sum(items, key):
  return sum(getattr(t, key) for t in items)


@dataclasses.dataclass(frozen=True)
class CommunicationCost:
  """Bytes crossing devices in one training step, per tensor and in total.

  Attributes:
    weights: `TensorTraffic` of the parameters a parameter server sends each
      worker: quantized kernels coded, the rest as float32.
    activations: `TensorTraffic` of the quantized activations at the layer
      boundaries (what a pipeline stage sends the next), measured on `batch`.
    batch_size: the batch the activations were measured on.
  """
  weights: tuple
  activations: tuple
  batch_size: int

  @property
  def weight_float32_bytes(self):
    return _sum(self.weights, "float32_bytes")

  @property
  def weight_coded_bytes(self):
    return _sum(self.weights, "coded_bytes")

  @property
  def activation_float32_bytes(self):
    return _sum(self.activations, "float32_bytes")

  @property
  def activation_coded_bytes(self):
    return _sum(self.activations, "coded_bytes")

  @property
  def total_float32_bytes(self):
    return self.weight_float32_bytes + self.activation_float32_bytes

  @property
  def total_coded_bytes(self):
    return self.weight_coded_bytes + self.activation_coded_bytes

  def as_dict(self):
    """A JSON-serialisable dict: per tensor and the totals."""
    def rows(items):
      return [dict(dataclasses.asdict(t), coded_bytes=t.coded_bytes)
              for t in items]
    totals = {k: getattr(self, k) for k in (
        "weight_float32_bytes", "weight_coded_bytes",
        "activation_float32_bytes", "activation_coded_bytes",
        "total_float32_bytes", "total_coded_bytes")}
    return {"batch_size": self.batch_size, "weights": rows(self.weights),
            "activations": rows(self.activations), "totals": totals}

  def to_json(self, **kwargs):
    return json.dumps(self.as_dict(), **kwargs)

  def table(self, markdown=False):
    """The per-tensor table with subtotals, as text (or a Markdown table)."""
    head = ("tensor", "kind", "elements", "float32 B", "coded B", "payload B",
            "table B", "x smaller", "bits/elem", "H bits")

    def row(t):
      entropy = "" if t.entropy_bits is None else f"{t.entropy_bits:.3f}"
      return (t.name, t.kind, f"{t.count:,}", f"{t.float32_bytes:,}",
              f"{t.coded_bytes:,}", f"{t.payload_bytes:,}",
              f"{t.table_bytes:,}", f"{t.ratio:.1f}",
              f"{t.coded_bits_per_element:.3f}", entropy)

    def total(label, items):
      f32, coded = _sum(items, "float32_bytes"), _sum(items, "coded_bytes")
      count = _sum(items, "count")
      return (label, "", f"{count:,}", f"{f32:,}", f"{coded:,}",
              f"{_sum(items, 'payload_bytes'):,}",
              f"{_sum(items, 'table_bytes'):,}",
              f"{f32 / max(coded, 1):.1f}",
              f"{8.0 * coded / max(count, 1):.3f}", "")

    quantized = [t for t in self.weights if t.kind == "weight"]
    floats = [t for t in self.weights if t.kind != "weight"]
    body = [row(t) for t in quantized]
    if floats:
      body.append(total(f"float parameters ({len(floats)} tensors)", floats))
    body.append(total("weights total", self.weights))
    body += [row(t) for t in self.activations]
    body.append(total(f"activations total (batch {self.batch_size})",
                      self.activations))
    body.append(total("step total", self.weights + self.activations))
    if markdown:
      lines = ["| " + " | ".join(head) + " |",
               "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
      lines += ["| " + " | ".join(r) + " |" for r in body]
      return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(fmt(head))
    lines = [fmt(head), rule]
    for r in body:
      if r[1] == "" and r[0].startswith(("weights total", "activations total",
                                         "step total")):
        lines += [rule, fmt(r)]
      else:
        lines.append(fmt(r))
    return "\n".join(lines)

  def __str__(self):
    return self.table()


def _coded_traffic(name, kind, indices, quantizer, step, channel_axis):
  """Range codes `indices` as a quantized record and measures it."""
  record = coding.quantized_record(
      name, indices, bits=quantizer.bits, signed=quantizer.signed, step=step,
      channel_axis=channel_axis)
  size = coding.tensor_size(record, indices)
  count = int(np.size(indices))
  return TensorTraffic(
      name=name, kind=kind, count=count,
      float32_bytes=_FLOAT32_BYTES * count,
      payload_bytes=size.payload_bytes, table_bytes=size.table_bytes,
      side_bytes=_FLOAT32_BYTES * int(np.size(step)),
      entropy_bits=coding.empirical_entropy(indices))


def _weight_traffic(model, records):
  weights = []
  covered = set()
  for record in records:
    if record.kind != "weight":
      continue
    q = record.quantizer
    step = np.asarray(record.step, dtype=np.float32)
    axis = q.channel_axis if q.per_channel else None
    if axis is None:
      step = step.reshape(())
    weights.append(_coded_traffic(record.name, "weight", record.indices(), q,
                                  step, axis))
    covered.add(id(record.weight))
    # The kernel's step travels as its side information.
    covered.add(id(record.variables["log_step"]))
  for variable in model.trainable_variables:
    if id(variable) in covered:
      continue
    count = int(variable.shape.num_elements())
    weights.append(TensorTraffic(
        name=variable.name.split(":")[0], kind="float", count=count,
        float32_bytes=_FLOAT32_BYTES * count,
        payload_bytes=_FLOAT32_BYTES * count, table_bytes=0, side_bytes=0,
        entropy_bits=None))
  return weights


def _activation_traffic(model, records, batch):
  # The model's outputs (quantized logits) stay on the last stage.
  outputs = {id(layer) for layer in introspect.output_layers(model)}
  records = [r for r in records if r.kind == "input" or (
      r.kind == "activation" and id(r.layer) not in outputs)]
  if not records:
    return [], int(np.shape(tf.nest.flatten(batch)[0])[0])
  if not getattr(model, "_is_graph_network", False):
    raise ValueError(
        "`communication_cost` measures activations on the layer outputs of a "
        "Functional or Sequential model (what keras_cdl.quantize_model "
        f"returns), but got the subclassed model {type(model).__name__}.")
  outputs = []
  for record in records:
    output = record.layer.output
    if isinstance(output, (list, tuple)):
      output = output[0]
    outputs.append(output)
  probe = tf.keras.Model(model.inputs, outputs)
  values = probe(batch, training=False)
  if len(records) == 1:
    values = [values]
  traffic = []
  batch_size = None
  for record, value in zip(records, values):
    q = record.quantizer
    value = np.asarray(value, dtype=np.float64)
    batch_size = value.shape[0]
    step = float(np.asarray(record.step).reshape(-1)[0])
    # Inference outputs are exactly i * q: dividing by q and rounding
    # recovers the indices i.
    indices = np.clip(np.round(value / step), q.lo, q.hi).astype(np.int32)
    traffic.append(_coded_traffic(record.name, record.kind, indices, q,
                                  np.float32(step), None))
  return traffic, batch_size


def communication_cost(model, batch):
  """Bytes that would cross devices in one training step of a CDL model.

  Weights (data parallelism with a parameter server sending the model to the
  workers every step): each quantized kernel's inference indices
  `clip(round(w / q))` are range coded against their own PMF with
  `keras_cdl.coding` (payload + coding table + float32 step sizes); every
  other trainable parameter (biases, BatchNorm, activation step sizes) is
  counted as float32.  Section 7 of the method counts weights this way: a
  worker that runs the inference or sampled (CDL) forward pass needs only the
  indices and steps; the soft (R-CDL) forward pass and the gradients need the
  latent float weights, which are not claimed compressible.

  Activations (pipeline model parallelism: a stage sends its output to the
  next): the quantized tensors at each layer boundary where CDL quantizes
  (the model input and every quantized ReLU output; not the model's own
  outputs, which stay on the last stage) are evaluated on the real
  `batch` in inference mode, their indices range coded as one tensor per
  boundary against the batch's own PMF, next to their float32 size.

  Args:
    model: a Functional or Sequential CDL model (`keras_cdl.quantize_model`).
      Weights also work for subclassed models without quantized activations.
    batch: a batch of model inputs (a NumPy array or tensor, or what the model
      accepts); pass a per-replica batch for per-device traffic.

  Returns:
    A `CommunicationCost` (print it, or `.table()`, for the table).

  Raises:
    ValueError: the model has no CDL-quantized tensor, or its activations
      cannot be probed.
  """
  records = introspect.quantized_tensors(model)
  if not records:
    raise ValueError(
        "`model` has no CDL-quantized tensor; quantize it with "
        "keras_cdl.quantize_model first.")
  weights = _weight_traffic(model, records)
  activations, batch_size = _activation_traffic(model, records, batch)
  return CommunicationCost(weights=tuple(weights),
                           activations=tuple(activations),
                           batch_size=int(batch_size))
