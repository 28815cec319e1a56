r"""Cost of CDL weight quantization against a float training step.

    python benchmarks/quantizer_cost.py            # ~3-4 min on 2 cores
    python benchmarks/quantizer_cost.py --rounds=3 --kappas=4 --windows=2,3

Measures, in one process and interleaved, forward + backward time (median
over `--rounds` rounds after a warm-up call) and peak memory of:

  rcdl     keras_cdl.ops.soft_quantize (Q_d forward, analytic Q_d backward)
  cdl      keras_cdl.ops.sample_quantize (Q_p forward, analytic Q_d backward)
  H        keras_cdl.ops.marginal_entropy (the weight rate term)
  rcdl+H   both, as one quantized layer's kernel costs in a training step
           (`ops.quantize_with_entropy`: one fused op, as the quantizers
           call it when a rate term is on)

on one float32 kernel of 3136 x 1024 = 3,211,264 elements (the Dense layer of
the Fashion-MNIST convnet), 8-bit signed (A = [-127, 127]), per-tensor step
`q = exp(log_q)` and `alpha = kappa / q^2` (kappa mode, as in
keras_cdl.quantizers); gradients flow to the kernel and to `log_q`.  Each
runs as a plain `tf.function` and as `tf.function(jit_compile=True)`, for
every kappa in `--kappas` and window in `--windows`.  Side by side:

  tfmot    tfmot's 8-bit weight fake quant on the same kernel, forward +
           backward: `quant_ops.LastValueQuantize(num_bits=8,
           narrow_range=True, symmetric=True, is_training=True)` (what
           `Default8BitQuantizeScheme` uses for weights: min/max reduction,
           variable assignment, `fake_quant_with_min_max_vars` and its
           straight-through gradient).
  float    one float training step (batch 128, Adam, sparse categorical
           crossentropy) of the Fashion-MNIST convnet: Conv2D 32@5x5 same
           relu, MaxPool 2, Conv2D 64@5x5 same relu, MaxPool 2, Flatten,
           Dense 1024 relu, Dense 10 (3,274,634 weights), on random data;
           plain `tf.function` (Keras' default).  Every ratio is to this.

Timing: all functions are traced and run once first; then in each round
every configuration runs once (a quantizer row with the next kappa of
`--kappas`: kappa is a variable, so one compiled function serves them all), with a float step before every
`--float_every`-th configuration; a configuration's ratio in a round is its
time over the mean of the float steps just before and after it, and the
table gives medians over rounds.  Shared machines make absolute times noisy;
the ratios from one run are what to compare.

Peak memory: `tf.config.experimental.get_memory_info('CPU:0')` does not work
on CPU in TF 2.14 ("Allocator stats not available"), so this reads the
process's peak resident set (VmHWM, /proc/self/status) after resetting it
(`echo 5 > /proc/self/clear_refs`) and subtracts the resident set before the
call: the growth during one warm call.  The script re-executes itself with
glibc's mmap threshold pinned at 128 KiB so that freed tensors go back to the
OS and the baseline is not inflated by a malloc cache.  `--validate_memory`
re-measures a few configurations in a fresh subprocess each, as
`resource.getrusage(RUSAGE_SELF).ru_maxrss` growth over the first call after
setup (that includes tracing), for comparison.

Writes the section between `<!-- quantizer_cost:start -->` and
`<!-- quantizer_cost:end -->` of BENCHMARKS.md (creates the file if needed,
leaves everything else alone).
"""

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
  os.execve(sys.executable, [sys.executable] + sys.argv,
            {**os.environ, **_MALLOC_ENV})

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

from keras_cdl import ops
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "<!-- quantizer_cost:start -->"
END = "<!-- quantizer_cost:end -->"
KERNEL_SHAPE = (3136, 1024)
TARGET = 0.20

flags.DEFINE_list("kappas", ["1", "4", "16"], "Fixed kappa = alpha q^2 values.")
flags.DEFINE_list("windows", ["2", "3", "5", "7"], "CPMF windows.")
flags.DEFINE_list("modes", ["rcdl", "cdl"], "Quantizer modes.")
flags.DEFINE_integer("bits", 8, "Bit width of the kernel (signed).")
flags.DEFINE_integer("rounds", 6,
                     "Timed rounds (median is reported).  Each round runs "
                     "every quantizer function once, with kappa cycling "
                     "through --kappas across rounds (the graph is the same "
                     "for every kappa).")
flags.DEFINE_integer("float_every", 4,
                     "A float step runs before every n-th configuration.")
flags.DEFINE_float("entropy_kappa", 4.0,
                   "kappa for the rate-term and combined rows (their cost "
                   "does not depend on kappa).")
flags.DEFINE_bool("validate_memory", True,
                  "Also measure a few configurations in fresh subprocesses.")
flags.DEFINE_string("output", os.path.join(REPO, "BENCHMARKS.md"),
                    "Markdown file whose quantizer_cost section is rewritten.")
flags.DEFINE_string("fresh_config", None,
                    "Internal: measure this one configuration (JSON) by "
                    "ru_maxrss growth and print the result as JSON.")


# ----------------------------------------------------------------------------
# Measured functions.
# ----------------------------------------------------------------------------


class Kernel:
  """The quantized kernel, its step and hardness, and an upstream gradient."""

  def __init__(self, bits):
    rng = tf.random.Generator.from_seed(0)
    stddev = (2.0 / sum(KERNEL_SHAPE)) ** 0.5
    self.w = tf.Variable(rng.normal(KERNEL_SHAPE, stddev=stddev), name="w")
    self.lo, self.hi = ops.index_range(bits, True)
    step = 2.0 * float(tf.reduce_mean(tf.abs(self.w))) / self.hi ** 0.5
    self.log_q = tf.Variable(np.log(step), dtype=tf.float32, name="log_q")
    self.kappa = tf.Variable(4.0, trainable=False, name="kappa")
    self.upstream = rng.normal(KERNEL_SHAPE)
    self.fq_min = tf.Variable(-6.0, trainable=False, name="min")
    self.fq_max = tf.Variable(6.0, trainable=False, name="max")

  def step_and_alpha(self):
    q = tf.exp(self.log_q)
    return q, self.kappa / (q * q)


def quantizer_fn(kernel, mode, window, jit):
  """Forward + backward of one CDL configuration on the kernel."""

  def step():
    with tf.GradientTape() as tape:
      q, alpha = kernel.step_and_alpha()
      args = (kernel.w, q, alpha, kernel.lo, kernel.hi, window)
      targets, upstream = [], []
      if mode == "rcdl+H":
        # One fused op, as keras_cdl.quantizers calls it with a rate term.
        targets.extend(ops.quantize_with_entropy(*args, "rcdl"))
        upstream.extend([kernel.upstream, tf.ones([])])
      else:
        if mode != "H":
          quantize = (ops.soft_quantize if mode.startswith("rcdl")
                      else ops.sample_quantize)
          targets.append(quantize(*args))
          upstream.append(kernel.upstream)
        if mode.endswith("H"):
          targets.append(ops.marginal_entropy(*args))
          upstream.append(tf.ones([]))
    # The upstream gradient of the quantized kernel is a fixed random tensor.
    return tape.gradient(targets, [kernel.w, kernel.log_q],
                         output_gradients=upstream)

  return tf.function(step, jit_compile=jit)


def fake_quant_fn(kernel, jit):
  """tfmot's 8-bit last-value weight fake quant, forward + backward."""

  def step():
    with tf.GradientTape() as tape:
      tape.watch(kernel.w)
      y = quant_ops.LastValueQuantize(
          kernel.w, kernel.fq_min, kernel.fq_max, per_channel=False,
          is_training=True, num_bits=8, narrow_range=True, symmetric=True)
    return tape.gradient(y, [kernel.w], output_gradients=kernel.upstream)

  return tf.function(step, jit_compile=jit)


def reference_convnet():
  return tf.keras.Sequential([
      tf.keras.layers.Conv2D(32, 5, padding="same", activation="relu",
                             input_shape=(28, 28, 1)),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(1024, activation="relu"),
      tf.keras.layers.Dense(10),
  ])


def float_step_fn(jit):
  """One Adam step of the reference convnet on a random batch of 128."""
  model = reference_convnet()
  optimizer = tf.keras.optimizers.Adam(1e-3)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  images = tf.random.stateless_uniform([128, 28, 28, 1], seed=[1, 2])
  labels = tf.random.stateless_uniform([128], seed=[3, 4], maxval=10,
                                       dtype=tf.int32)

  def step():
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(images, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return [loss]

  fn = tf.function(step, jit_compile=jit)
  fn.num_weights = model.count_params()
  return fn


def run(fn, kernel=None, kappa=None):
  """Runs one call to completion; returns seconds."""
  if kernel is not None and kappa is not None:
    kernel.kappa.assign(kappa)
  start = time.perf_counter()
  outputs = fn()
  # Eager execution on CPU is synchronous, so the outputs are ready; reading
  # the scalars makes that explicit.
  _ = [t.numpy() for t in outputs if t.shape.rank == 0]
  return time.perf_counter() - start


# ----------------------------------------------------------------------------
# Memory.
# ----------------------------------------------------------------------------


def _status_kib(key):
  text = open("/proc/self/status", encoding="ascii").read()
  return int(re.search(key + r":\s+(\d+) kB", text).group(1))


def peak_growth_mb(call):
  """Peak RSS growth (MB) during `call()`, via clear_refs + VmHWM."""
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")
  before = _status_kib("VmRSS")
  call()
  return (_status_kib("VmHWM") - before) / 1024.0


def build(config, kernel):
  kind = config["kind"]
  if kind == "cdl":
    return quantizer_fn(kernel, config["mode"], config["window"],
                        config["jit"])
  if kind == "tfmot":
    return fake_quant_fn(kernel, config["jit"])
  return float_step_fn(config["jit"])


def fresh_measurement(config):
  """In a fresh process: ru_maxrss growth over the first call after setup."""
  kernel = Kernel(config.get("bits", 8))
  if config.get("kappa") is not None:
    kernel.kappa.assign(config["kappa"])
  fn = build(config, kernel)
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  before = _status_kib("VmHWM")
  run(fn)
  after = _status_kib("VmHWM")
  print(json.dumps({"fresh_mb": (after - before) / 1024.0,
                    "ru_maxrss_mb": maxrss,
                    "hwm_before_mb": before / 1024.0}))


def fresh_subprocess(config):
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       "--fresh_config=" + json.dumps(config)],
      capture_output=True, text=True, check=True,
      env={**os.environ, **_MALLOC_ENV})
  return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def machine():
  cpu = "unknown"
  try:
    for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
          f"{cpu}, {mem_gib:.1f} GiB RAM, {platform.platform()}, "
          f"Python {platform.python_version()}, TF {tf.__version__}")


def code_version():
  """The git revision of keras_cdl/ops.py (and whether it is modified)."""
  try:
    rev = subprocess.run(
        ["git", "-C", REPO, "log", "-1", "--format=%h", "--",
         "keras_cdl/ops.py"], capture_output=True, text=True,
        check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", REPO, "status", "--porcelain", "--",
         "keras_cdl/ops.py"], capture_output=True, text=True,
        check=True).stdout.strip()
    return rev + (" + uncommitted changes" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def utc_date():
  try:
    return subprocess.run(["date", "-u"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return datetime.datetime.utcnow().strftime("%a %b %d %H:%M:%S UTC %Y")


def write_section(path, body):
  section = f"{START}\n{body.rstrip()}\n{END}"
  text = ""
  if os.path.exists(path):
    text = open(path, encoding="utf-8").read()
  if START in text and END in text:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    text = head + section + tail
  else:
    if not text:
      text = "# Benchmarks\n"
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def fmt_ms(seconds):
  return f"{1000 * seconds:.0f}" if seconds >= 0.0995 else f"{1000 * seconds:.1f}"


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def main(argv):
  del argv
  if FLAGS.fresh_config:
    fresh_measurement(json.loads(FLAGS.fresh_config))
    return
  tf.get_logger().setLevel("ERROR")  # one trace per function is intended
  wall = time.time()
  load_before = os.getloadavg()
  kappas = [float(k) for k in FLAGS.kappas]
  windows = [int(w) for w in FLAGS.windows]
  kernel = Kernel(FLAGS.bits)
  kernel4 = Kernel(4) if FLAGS.bits != 4 else None

  # Functions by key, the kernel each uses, and the timed items.
  fns, kernels = {}, {}
  items = []
  for jit in (False, True):
    for mode in FLAGS.modes:
      for window in windows:
        key = ("cdl", mode, window, jit, FLAGS.bits)
        fns[key] = quantizer_fn(kernel, mode, window, jit)
        kernels[key] = kernel
        items.append(dict(key=key, kappa=kappas, kernel=kernel))
    for window in windows:
      key = ("cdl", "H", window, jit, FLAGS.bits)
      fns[key] = quantizer_fn(kernel, "H", window, jit)
      kernels[key] = kernel
      items.append(dict(key=key, kappa=FLAGS.entropy_kappa, kernel=kernel))
    for window in (sorted({min(windows), 3} & set(windows)) if jit else []):
      key = ("cdl", "rcdl+H", window, jit, FLAGS.bits)
      fns[key] = quantizer_fn(kernel, "rcdl+H", window, jit)
      kernels[key] = kernel
      items.append(dict(key=key, kappa=FLAGS.entropy_kappa, kernel=kernel))
    if kernel4 is not None:
      key = ("cdl", "rcdl", 3, jit, 4)
      fns[key] = quantizer_fn(kernel4, "rcdl", 3, jit)
      kernels[key] = kernel4
      items.append(dict(key=key, kappa=FLAGS.entropy_kappa, kernel=kernel4))
    key = ("tfmot", jit)
    fns[key] = fake_quant_fn(kernel, jit)
    items.append(dict(key=key, kappa=None, kernel=None))
  float_fn = float_step_fn(False)
  float_jit = float_step_fn(True)
  items.append(dict(key=("float", True), kappa=None, kernel=None))
  fns[("float", True)] = float_jit
  fns[("float", False)] = float_fn

  # Trace, compile and warm up everything; then measure memory.
  print(f"tracing {len(fns)} functions ...", flush=True)
  t0 = time.time()
  for key, fn in fns.items():
    run(fn, kernels.get(key), FLAGS.entropy_kappa if key in kernels else None)
  print(f"  done in {time.time() - t0:.0f} s", flush=True)
  memory = {}
  memory[("float", False)] = peak_growth_mb(lambda: run(float_fn))

  # Interleaved timing rounds; memory is read during the first one.
  samples = []  # (item index, kappa, seconds, ratio)
  float_times = []
  for r in range(FLAGS.rounds):
    t0 = time.time()
    last_float = run(float_fn)
    float_times.append(last_float)
    pending = []
    for i, item in enumerate(items):
      if i and i % FLAGS.float_every == 0:
        now = run(float_fn)
        float_times.append(now)
        for j, kappa, t in pending:
          samples.append((j, kappa, t, t / (0.5 * (last_float + now))))
        pending, last_float = [], now
      kappa = item["kappa"]
      if isinstance(kappa, list):
        kappa = kappa[(r + i) % len(kappa)]
      call = lambda item=item, kappa=kappa: run(fns[item["key"]],
                                               item["kernel"], kappa)
      if r == 0:
        times = []
        memory[item["key"]] = peak_growth_mb(lambda: times.append(call()))
        t = times[0]
      else:
        t = call()
      pending.append((i, kappa, t))
    now = run(float_fn)
    float_times.append(now)
    for j, kappa, t in pending:
      samples.append((j, kappa, t, t / (0.5 * (last_float + now))))
    print(f"round {r + 1}/{FLAGS.rounds}: {time.time() - t0:.0f} s", flush=True)

  float_ms = statistics.median(float_times)

  def median_of(i, kappa=None, field=2):
    values = [s[field] for s in samples
              if s[0] == i and (kappa is None or s[1] == kappa)]
    return statistics.median(values) if values else float("nan")

  med = {i: median_of(i) for i in range(len(items))}
  rat = {i: median_of(i, field=3) for i in range(len(items))}

  # Fresh-subprocess memory cross-check.
  fresh = {}
  if FLAGS.validate_memory:
    checks = [
        ("rcdl, window 3, jit", dict(kind="cdl", mode="rcdl", window=3,
                                     jit=True, kappa=4.0)),
        ("rcdl, window 3, plain", dict(kind="cdl", mode="rcdl", window=3,
                                       jit=False, kappa=4.0)),
        ("float step, plain", dict(kind="float", jit=False)),
    ]
    for label, config in checks:
      if config.get("window", 3) in windows or config["kind"] != "cdl":
        try:
          fresh[label] = fresh_subprocess(config)
          print(label, fresh[label], flush=True)
        except (subprocess.CalledProcessError, ValueError, IndexError) as e:
          print(f"fresh measurement of {label} failed: {e}", flush=True)
  load_after = os.getloadavg()

  # ---------------------------------------------------------------- report
  kernel_mb = np.prod(KERNEL_SHAPE) * 4 / 2**20

  def meets(ratio):
    return "yes" if ratio <= TARGET else "no"

  lines = ["## Quantizer cost (`benchmarks/quantizer_cost.py`)", ""]
  lines += [
      "Command: `" + " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO)]
                              + sys.argv[1:]) + "`  ",
      f"Date: {utc_date()}  ",
      f"Machine: {machine()}  ",
      f"keras_cdl/ops.py: {code_version()}  ",
      f"Load average (1/5/15 min) before: "
      f"{'/'.join(f'{x:.1f}' for x in load_before)}, after: "
      f"{'/'.join(f'{x:.1f}' for x in load_after)} (the machine is shared; "
      f"compare ratios, not absolute times)  ",
      f"Run time: {time.time() - wall:.0f} s, {FLAGS.rounds} interleaved "
      f"rounds, medians.",
      "",
      f"Kernel: float32 {KERNEL_SHAPE[0]} x {KERNEL_SHAPE[1]} "
      f"= {np.prod(KERNEL_SHAPE):,} elements ({kernel_mb:.1f} MiB), "
      f"{FLAGS.bits}-bit signed (A = [{kernel.lo}, {kernel.hi}]), per-tensor "
      f"q, alpha = kappa / q^2; forward + backward (gradients to the kernel "
      f"and log q).  Target: quantizer forward + backward <= "
      f"{TARGET:.0%} of one float training step.  keras_cdl.ops runs its "
      f"element-wise kernels as XLA clusters itself, so 'jit no' means the "
      f"surrounding step is a plain tf.function (ops' own clusters still "
      f"compile); 'jit yes' compiles the whole step with "
      f"jit_compile=True.",
      "",
      "**References**",
      "",
      "| step | ms | ratio to float step | peak RSS growth (MB) |",
      "|---|---:|---:|---:|",
      f"| float training step, convnet ({float_fn.num_weights:,} weights), "
      f"batch 128, Adam, plain tf.function | {fmt_ms(float_ms)} | 1.00 | "
      f"{memory[('float', False)]:.0f} |",
  ]
  index = {item["key"]: i for i, item in enumerate(items)}
  i = index[("float", True)]
  lines.append(f"| float training step, same, jit_compile=True | "
               f"{fmt_ms(med[i])} | {rat[i]:.2f} | "
               f"{memory[('float', True)]:.0f} |")
  for jit in (False, True):
    i = index[("tfmot", jit)]
    lines.append(
        f"| tfmot 8-bit LastValueQuantize fwd+bwd on the kernel, "
        f"{'jit' if jit else 'plain'} | {fmt_ms(med[i])} | {rat[i]:.2f} | "
        f"{memory[('tfmot', jit)]:.0f} |")

  lines += [
      "",
      "**CDL weight quantizer, forward + backward.** One function per row "
      "(kappa is a variable: the graph, and so the cost, does not depend on "
      "it; only the truncation error does).  Per kappa: ms (ratio to the "
      "float step) [truncation bound `ops.truncation_bound(kappa, window)`]; "
      "the median and the 20% verdict are over all of the row's rounds.",
      "",
      "| mode | window | jit | " + " | ".join(
          f"kappa {k:g}" for k in kappas)
      + " | median ms | median ratio | peak RSS growth MB (x kernel) "
      "| meets 20%? |",
      "|---|---:|---|" + "---:|" * len(kappas) + "---:|---:|---:|---|",
  ]
  best = None
  for mode in FLAGS.modes:
    for jit in (False, True):
      for window in windows:
        key = ("cdl", mode, window, jit, FLAGS.bits)
        i = index[key]
        cells = []
        for k in kappas:
          cells.append(f"{fmt_ms(median_of(i, k))} "
                       f"({median_of(i, k, 3):.2f}) "
                       f"[{ops.truncation_bound(k, window):.0e}]")
        if best is None or rat[i] < best[0]:
          best = (rat[i], mode, window, jit)
        mem = memory[key]
        lines.append(
            f"| {mode} | {window} | {'yes' if jit else 'no'} | "
            + " | ".join(cells)
            + f" | {fmt_ms(med[i])} | {rat[i]:.2f} | {mem:.0f} "
            f"({mem / kernel_mb:.1f}x) | {meets(rat[i])} |")

  lines += [
      "",
      f"**Rate term and combined cost** (kappa {FLAGS.entropy_kappa:g}; "
      f"`H` = marginal_entropy forward + backward, `rcdl+H` = "
      f"quantize_with_entropy (soft_quantize and marginal_entropy fused), as "
      f"a quantized layer's kernel costs in R-CDL training with a rate "
      f"term)",
      "",
      "| term | window | jit | ms | ratio to float step | peak RSS growth MB "
      "(x kernel) | meets 20%? |",
      "|---|---:|---|---:|---:|---:|---|",
  ]
  for mode in ("H", "rcdl+H"):
    for jit in (False, True):
      for window in windows:
        key = ("cdl", mode, window, jit, FLAGS.bits)
        if key not in index:
          continue
        i = index[key]
        mem = memory[key]
        lines.append(
            f"| {mode} | {window} | {'yes' if jit else 'no'} | "
            f"{fmt_ms(med[i])} | {rat[i]:.2f} | {mem:.0f} "
            f"({mem / kernel_mb:.1f}x) | {meets(rat[i])} |")

  if kernel4 is not None:
    lines += [
        "",
        f"**Memory vs bit width** (rcdl, window 3, kappa "
        f"{FLAGS.entropy_kappa:g}): the window, not 2^bits, sets the memory",
        "",
        "| bits | levels | jit | ms | peak RSS growth MB |",
        "|---:|---:|---|---:|---:|",
    ]
    for jit in (False, True):
      for bits in (4, FLAGS.bits):
        key = ("cdl", "rcdl", 3, jit, bits)
        i = index.get(key)
        if i is None:
          continue
        lo, hi = ops.index_range(bits, True)
        lines.append(f"| {bits} | {hi - lo + 1} | {'yes' if jit else 'no'} | "
                     f"{fmt_ms(med[i])} | {memory[key]:.0f} |")

  lines += [
      "",
      "Peak memory: `tf.config.experimental.get_memory_info('CPU:0')` raises "
      "on CPU in TF 2.14, so the numbers are the growth of the process's "
      "peak resident set (VmHWM after `echo 5 > /proc/self/clear_refs`) over "
      "the resident set before one warm call, with glibc's mmap threshold "
      "pinned at 128 KiB (freed tensors return to the OS).  It includes the "
      "gradient outputs (one kernel-sized tensor).",
  ]
  if fresh:
    lines.append(
        "Cross-check in a fresh subprocess per configuration (VmHWM growth "
        "over the first call after setup, which also traces and compiles): "
        + "; ".join(f"{k}: {v['fresh_mb']:.0f} MB" for k, v in fresh.items())
        + ".  `resource.getrusage(RUSAGE_SELF).ru_maxrss` cannot be used "
        "for this: Linux carries the parent's resident set at fork over into "
        "the child's ru_maxrss (here "
        + ", ".join(f"{v['ru_maxrss_mb']:.0f}" for v in fresh.values())
        + " MB in the children, against a VmHWM of "
        + ", ".join(f"{v['hwm_before_mb']:.0f}" for v in fresh.values())
        + " MB), so it hides any growth smaller than the parent.")
  if best is not None:
    ratio, mode, window, jit = best
    lines.append(
        f"Fastest quantizer configuration: {mode}, window {window}, "
        f"{'jit' if jit else 'plain'}: {ratio:.2f} of a float step "
        f"({'meets' if ratio <= TARGET else 'misses'} the 20% target).")
  body = "\n".join(lines)
  print(body)
  write_section(FLAGS.output, body)
  print(f"wrote {FLAGS.output} in {time.time() - wall:.0f} s total")


if __name__ == "__main__":
  app.run(main)
