r"""Distributed CDL on this machine: the cost of the machinery, bytes per step.

    python benchmarks/distributed.py

1. Training steps per second of the reference convnet
   (`keras_cdl.architectures.reference_convnet`, `quantize_model` 4-bit
   weights and activations, R-CDL, Adam) at one global batch, under:

     default        no strategy, one process
     mirrored x1    MirroredStrategy over 1 logical CPU device
     mirrored x2    MirroredStrategy over 2 logical CPU devices
     multiworker x1 MultiWorkerMirroredStrategy, 1 worker process
     multiworker x2 MultiWorkerMirroredStrategy, 2 worker processes on
                    localhost (TF_CONFIG)

   Each configuration runs alone, in fresh processes (logical devices must be
   set before TensorFlow starts), on the same Fashion-MNIST batches;
   `--warmup` steps (tracing) are excluded and `--steps` are timed;
   `--rounds` interleaved rounds, best and median reported.  On a
   2-core machine no speed-up is expected: both cores already serve one
   replica's ops, so more replicas only add the machinery's cost (replica
   threads, all-reduce, for workers gRPC and a second process's thread pool).
2. `keras_cdl.communication_cost` of the same model after float pre-training
   and a short CDL training on a Fashion-MNIST subset: coded vs float32
   bytes per training step, weights (to the workers) and activations (at
   the layer boundaries), per tensor, for one per-replica batch.

Writes BENCHMARKS.md's `<!-- distributed:start -->`...`<!-- distributed:end -->`
section only (creating the file if absent), and `--output_dir`/results.json.
"""

import datetime
import json
import os
import subprocess
import sys
import time

import sections  # benchmarks/sections.py, beside this script
from absl import app
from absl import flags
import numpy as np
# Import TensorFlow here, not inside `main`: imported for the first time
# inside absl's `app.run`, Keras 2.14 then fails to build Sequential models
# ("Output tensors of a Sequential model must be the output of a TensorFlow
# `Layer`").  Importing it does not initialise the devices, so the children
# can still split the CPU into logical devices.
import tensorflow as tf

import keras_cdl
from keras_cdl import architectures
from keras_cdl import datasets
from keras_cdl import distribute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- distributed:start -->", "<!-- distributed:end -->"
CONFIGS = {
    # name: (label, strategy, processes, logical CPU devices per process)
    "default": ("default (no strategy)", "default", 1, 1),
    "mirrored1": ("MirroredStrategy, 1 logical CPU", "mirrored", 1, 1),
    "mirrored2": ("MirroredStrategy, 2 logical CPUs", "mirrored", 1, 2),
    "multiworker1": ("MultiWorkerMirroredStrategy, 1 worker", "multiworker",
                     1, 1),
    "multiworker2": ("MultiWorkerMirroredStrategy, 2 workers", "multiworker",
                     2, 1),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", list(CONFIGS), "Throughput configurations.")
flags.DEFINE_integer("batch_size", 64, "Global batch of the throughput runs.")
flags.DEFINE_integer("warmup", 3, "Untimed first steps (tracing).")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("rounds", 3,
                     "Runs of every configuration, interleaved; the table "
                     "shows the best and the median (load from other jobs "
                     "only ever slows a run down).")
flags.DEFINE_bool("communication", True,
                  "Measure the bytes per step (part 2).")
flags.DEFINE_integer("comm_train_examples", 4096,
                     "Fashion-MNIST images for the communication model.")
flags.DEFINE_integer("comm_float_epochs", 1, "Its float pre-training epochs.")
flags.DEFINE_integer("comm_epochs", 2, "Its CDL training epochs.")
flags.DEFINE_integer("comm_batch", 64,
                     "Per-replica batch the activations are measured on.")
flags.DEFINE_float("lmbda", 0.02, "Loss units per bit per weight.")
flags.DEFINE_float("gamma", 0.002, "Loss units per bit per activation.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", "/tmp/keras_cdl_distributed",
                    "Where results.json and the children's logs go.")
flags.DEFINE_string("markdown", os.path.join(REPO, "BENCHMARKS.md"),
                    "BENCHMARKS.md to update (distributed section only).")
# Internal: a throughput child process.
flags.DEFINE_string("child", "", "Internal: run this configuration.")
flags.DEFINE_string("child_out", "", "Internal: the child's JSON output.")


# -----------------------------------------------------------------------------
# Throughput (child processes).
# -----------------------------------------------------------------------------
def _child():
  label, strategy_name, _, devices = CONFIGS[FLAGS.child]
  del label
  if strategy_name == "mirrored":
    distribute.configure_cpu_devices(devices)

  strategy = distribute.make_strategy(strategy_name)
  tf.keras.utils.set_random_seed(FLAGS.seed)
  total = FLAGS.warmup + FLAGS.steps
  (x, y), _ = datasets.load_fashion_mnist()
  x, y = x[:total * FLAGS.batch_size], y[:total * FLAGS.batch_size]
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(
      FLAGS.batch_size, drop_remainder=True).with_options(options)
  with strategy.scope():
    model = keras_cdl.quantize_model(
        architectures.reference_convnet(), mode="rcdl", weight_bits=4,
        activation_bits=4, lmbda=FLAGS.lmbda, gamma=FLAGS.gamma,
        calibration_data=x[:256])
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)

  class Clock(tf.keras.callbacks.Callback):

    def __init__(self):
      super().__init__()
      self.times = []

    def on_train_begin(self, logs=None):
      self.times.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
      self.times.append(time.perf_counter())

  clock = Clock()
  model.fit(data, epochs=1, steps_per_epoch=total, callbacks=[clock],
            verbose=0)
  times = np.asarray(clock.times)
  timed = times[FLAGS.warmup:]
  result = {
      "config": FLAGS.child,
      "replicas": strategy.num_replicas_in_sync,
      "chief": distribute.is_chief(strategy),
      "steps_per_second": FLAGS.steps / float(timed[-1] - timed[0]),
      "step_seconds_median": float(np.median(np.diff(timed))),
      "first_step_seconds": float(times[1] - times[0]),
  }
  with open(FLAGS.child_out, "w") as f:
    json.dump(result, f)


def _flags_for_child():
  return [f"--batch_size={FLAGS.batch_size}", f"--warmup={FLAGS.warmup}",
          f"--steps={FLAGS.steps}", f"--lmbda={FLAGS.lmbda}",
          f"--gamma={FLAGS.gamma}", f"--seed={FLAGS.seed}"]


def _run_config(name):
  """Runs one configuration in fresh processes; returns the chief's result."""
  _, strategy_name, processes, _ = CONFIGS[name]
  ports = distribute.free_ports(processes)
  children = []
  for index in range(processes):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    if strategy_name == "multiworker":
      env["TF_CONFIG"] = json.dumps(distribute.local_tf_config(ports, index))
    out = os.path.join(FLAGS.output_dir, f"{name}-{index}.json")
    log = open(os.path.join(FLAGS.output_dir, f"{name}-{index}.log"), "w")  # pylint: disable=consider-using-with
    command = [sys.executable, os.path.abspath(__file__), f"--child={name}",
               f"--child_out={out}"] + _flags_for_child()
    children.append((subprocess.Popen(command, cwd=REPO, env=env,  # pylint: disable=consider-using-with
                                      stdout=log, stderr=subprocess.STDOUT),
                     out, log))
  results = []
  for popen, out, log in children:
    code = popen.wait()
    log.close()
    if code:
      raise RuntimeError(f"{name}: a child exited with {code}; see {log.name}")
    with open(out) as f:
      results.append(json.load(f))
  return next(r for r in results if r["chief"])


# -----------------------------------------------------------------------------
# Communication (this process).
# -----------------------------------------------------------------------------
def _communication():

  tf.keras.utils.set_random_seed(FLAGS.seed)
  (x, y), (x_test, y_test) = datasets.load_fashion_mnist()
  x, y = x[:FLAGS.comm_train_examples], y[:FLAGS.comm_train_examples]
  x_test, y_test = x_test[:2000], y_test[:2000]
  batch = x_test[:FLAGS.comm_batch]

  def compile_model(model):
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])

  float_model = architectures.reference_convnet()
  compile_model(float_model)
  float_model.fit(x, y, batch_size=128, epochs=FLAGS.comm_float_epochs,
                  verbose=2)
  model = keras_cdl.quantize_model(
      float_model, mode="rcdl", weight_bits=4, activation_bits=4,
      lmbda=FLAGS.lmbda, gamma=FLAGS.gamma, calibration_data=x[:512])
  compile_model(model)
  before = keras_cdl.communication_cost(model, batch)
  started = time.time()
  model.fit(x, y, batch_size=128, epochs=FLAGS.comm_epochs, verbose=2)
  seconds = time.time() - started
  after = keras_cdl.communication_cost(model, batch)
  accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
  return {"before": before, "after": after, "test_accuracy": accuracy,
          "cdl_seconds": seconds,
          "float_parameters": int(np.sum([np.prod(v.shape) for v in
                                          float_model.trainable_variables]))}


# -----------------------------------------------------------------------------
# Report.
# -----------------------------------------------------------------------------
def _machine():
  return sections.machine()


def _date():
  result = subprocess.run(["date", "-u"], capture_output=True, text=True,
                          check=False)
  return result.stdout.strip() or datetime.datetime.utcnow().strftime(
      "%a %b %d %H:%M:%S UTC %Y")


def _load():
  return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def _kib(n):
  return f"{n / 1024:,.1f} KiB"


def section(throughput, comm, meta):
  lines = [START, "## Distributed training (benchmarks/distributed.py)", "",
           f"Command: `{meta['command']}`  ",
           f"Date: {meta['date']}  ",
           f"Machine: {meta['machine']}; tensorflow {meta['tf']}; load "
           f"average (1, 5, 15 min) {meta['load_before']} at the start, "
           f"{meta['load_after']} at the end (a shared machine: other jobs "
           "ran; compare within this run only)", ""]
  if throughput:
    base = throughput.get("default", next(iter(throughput.values())))
    lines += [
        f"### Training steps per second: reference convnet, R-CDL, 4-bit "
        f"weights and activations, Adam, global batch {FLAGS.batch_size}",
        "",
        f"Each configuration alone, in fresh processes; {FLAGS.warmup} "
        f"warm-up steps (tracing) excluded, {FLAGS.steps} timed; "
        f"{FLAGS.rounds} interleaved rounds: best (and median) steps/s, "
        "the best run's median step and first step.  No "
        "speed-up is expected on 2 cores: one replica's ops already use both, "
        "so extra replicas only add the machinery's cost.", "",
        "| configuration | processes | replicas | steps/s best (median) | "
        "best vs default | median step (s) | first step incl. tracing (s) |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in throughput.items():
      label, _, processes, _ = CONFIGS[name]
      lines.append(
          f"| {label} | {processes} | {r['replicas']} | "
          f"{r['steps_per_second']:.2f} "
          f"({r['median_steps_per_second']:.2f}) | "
          f"{r['steps_per_second'] / base['steps_per_second']:.2f}x | "
          f"{r['step_seconds_median']:.2f} | {r['first_step_seconds']:.1f} |")
    pairs = [(label, throughput[two]["steps_per_second"] /
              throughput[one]["steps_per_second"])
             for label, one, two in (("MirroredStrategy", "mirrored1",
                                      "mirrored2"),
                                     ("MultiWorkerMirroredStrategy",
                                      "multiworker1", "multiworker2"))
             if one in throughput and two in throughput]
    if pairs:
      lines += ["", "Two replicas vs one: " + "; ".join(
          f"{label} {ratio:.2f}x" for label, ratio in pairs) +
                " of the step rate (best runs): the same two cores do the "
                "same work per global batch, plus each step's all-reduce of "
                "the 3.27M gradients (a ring over gRPC between workers) and "
                "the replica threads or the second process."]
    lines.append("")
  if comm:
    before, after = comm["before"], comm["after"]
    lines += [
        "### Bytes per training step: reference convnet, 4-bit weights and "
        "activations",
        "",
        f"Float pre-training {FLAGS.comm_float_epochs} epoch(s), then R-CDL "
        f"{FLAGS.comm_epochs} epoch(s) (lmbda {FLAGS.lmbda}, gamma "
        f"{FLAGS.gamma}) on {FLAGS.comm_train_examples} Fashion-MNIST images "
        f"(test accuracy {comm['test_accuracy']:.2%} on 2000 test images).  "
        "`keras_cdl.communication_cost(model, batch)` on a per-replica batch "
        f"of {after.batch_size} test images: weights = what a parameter "
        "server sends each worker per step (quantized kernels range coded "
        "against their own PMF with `keras_cdl.coding`: payload + table + "
        "float32 steps; biases and other float parameters as float32); "
        "activations = the quantized tensors at the layer boundaries (what "
        "a pipeline stage sends the next), range coded per tensor, vs "
        "float32.  Gradients are not claimed compressible and are not "
        "counted.", "",
        "| | weights coded | weights float32 | x | activations coded | "
        "activations float32 | x |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for label, cost in (("after quantize_model (float-trained)", before),
                        (f"after {FLAGS.comm_epochs} R-CDL epoch(s)", after)):
      lines.append(
          f"| {label} | {_kib(cost.weight_coded_bytes)} | "
          f"{_kib(cost.weight_float32_bytes)} | "
          f"{cost.weight_float32_bytes / cost.weight_coded_bytes:.1f} | "
          f"{_kib(cost.activation_coded_bytes)} | "
          f"{_kib(cost.activation_float32_bytes)} | "
          f"{cost.activation_float32_bytes / cost.activation_coded_bytes:.1f}"
          " |")
    lines += ["", f"Per tensor, after R-CDL (bytes; `x smaller` = float32 / "
              "coded; `H bits` = empirical entropy of the indices):", "",
              after.table(markdown=True), ""]
  lines.append(END)
  return "\n".join(lines) + "\n"


def write_section(path, text_section):
  sections.write_section(path, START, END, text_section)


def main(argv):
  del argv
  if FLAGS.child:
    _child()
    return
  for name in FLAGS.configs:
    if name not in CONFIGS:
      raise ValueError(f"--configs: unknown {name!r}; one of {list(CONFIGS)}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  meta = {"command": " ".join(["python benchmarks/distributed.py"] +
                              sys.argv[1:]),
          "date": _date(), "machine": _machine(), "load_before": _load()}
  runs = {name: [] for name in FLAGS.configs}
  for round_index in range(FLAGS.rounds):
    for name in FLAGS.configs:
      started = time.time()
      runs[name].append(_run_config(name))
      print(f"round {round_index}: {CONFIGS[name][0]}: "
            f"{runs[name][-1]['steps_per_second']:.3f} steps/s "
            f"({time.time() - started:.0f} s)", flush=True)
  throughput = {}
  for name, results in runs.items():
    rates = [r["steps_per_second"] for r in results]
    best = max(results, key=lambda r: r["steps_per_second"])
    throughput[name] = dict(best, rates=rates,
                            median_steps_per_second=float(np.median(rates)))
  comm = _communication() if FLAGS.communication else None
  meta.update(load_after=_load(), tf=tf.__version__)
  if comm:
    print(comm["after"].table())
  results = {"meta": meta, "throughput": throughput}
  if comm:
    results["communication"] = {
        k: (v.as_dict() if hasattr(v, "as_dict") else v)
        for k, v in comm.items()}
  with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  write_section(FLAGS.markdown, section(throughput, comm, meta))
  print(f"wrote the distributed section of {FLAGS.markdown}")


if __name__ == "__main__":
  app.run(main)
