"""`keras_cdl.summary(model)`: per-tensor bits, entropy, step size and size.

Entropies here are of the *stored* (inference) indices, `clip(round(x/q))`:
`H = -sum_i p_i log2 p_i` with `p` the indices' histogram.  `N H / 8` bytes is
what an ideal i.i.d. entropy coder needs for a tensor's indices (the range
coder of `keras_cdl.compress` gets within a few bytes of it, plus its table).
"""

import dataclasses
from typing import List

import numpy as np

from keras_cdl import introspect

__all__ = ["TensorReport", "ModelReport", "report", "summary", "entropy_bits"]


def entropy_bits(indices):
  """Empirical entropy of an integer array, in bits per element."""
  indices = np.asarray(indices).ravel()
  if indices.size == 0:
    return 0.0
  _, counts = np.unique(indices, return_counts=True)
  p = counts / indices.size
  return float(-(p * np.log2(p)).sum())


@dataclasses.dataclass
class TensorReport:
  name: str
  kind: str
  elements: int
  bits: int
  entropy: float          # bits per element of the stored indices
  step: np.ndarray
  kappa: float

  @property
  def coded_bytes(self):
    return self.elements * self.entropy / 8.0


@dataclasses.dataclass
class ModelReport:
  tensors: List[TensorReport]
  float_parameters: int   # parameters stored as float32 (not quantized)
  total_parameters: int

  @property
  def weights(self):
    return [t for t in self.tensors if t.kind == "weight"]

  @property
  def quantized_parameters(self):
    return sum(t.elements for t in self.weights)

  @property
  def bits_per_weight(self):
    n = self.quantized_parameters
    return sum(t.elements * t.entropy for t in self.weights) / max(n, 1)

  @property
  def estimated_bytes(self):
    """Ideal coded bytes of the indices plus float32 for the rest."""
    return (sum(t.coded_bytes for t in self.weights) +
            4.0 * self.float_parameters)

  @property
  def float32_bytes(self):
    return 4.0 * self.total_parameters


def _model_parameters(model, records):
  """(float parameters not quantized, all parameters) of the float model."""
  quantizer_vars = {id(v) for r in records for v in r.variables.values()}
  quantized = {id(r.weight) for r in records if r.weight is not None}
  total = 0
  floats = 0
  seen = set()
  for v in model.weights:
    if id(v) in seen or id(v) in quantizer_vars or "optimizer_step" in v.name:
      continue
    seen.add(id(v))
    total += v.shape.num_elements()
    if id(v) not in quantized:
      floats += v.shape.num_elements()
  return floats, total


def report(model):
  """Returns a `ModelReport` of a CDL-quantized model."""
  records = introspect.quantized_tensors(model)
  tensors = []
  for r in records:
    q = r.quantizer
    if r.kind == "weight":
      elements = r.weight.shape.num_elements()
      entropy = entropy_bits(r.indices())
    else:
      elements, entropy = 0, float("nan")
    tensors.append(TensorReport(r.name, r.kind, elements, q.bits, entropy,
                                r.step, float(np.mean(r.kappa))))
  floats, total = _model_parameters(model, records)
  return ModelReport(tensors, floats, total)


def summary(model, print_fn=print):
  """Prints a per-tensor table and the model's estimated coded size.

  Columns: tensor, kind, elements, bit width, entropy H (bits per element
  of the stored indices; weights only), mean step size, mean kappa.
  """
  rep = report(model)
  header = (f"{'tensor':40s} {'kind':10s} {'elements':>9s} {'bits':>4s} "
            f"{'H':>6s} {'step':>10s} {'kappa':>8s}")
  lines = [header, "-" * len(header)]
  for t in rep.tensors:
    entropy = "" if t.kind != "weight" else f"{t.entropy:6.3f}"
    elements = str(t.elements) if t.kind == "weight" else ""
    lines.append(f"{t.name:40s} {t.kind:10s} {elements:>9s} {t.bits:4d} "
                 f"{entropy:>6s} {float(np.mean(t.step)):10.4g} "
                 f"{t.kappa:8.3g}")
  lines.append("-" * len(header))
  lines.append(f"quantized weights: {rep.quantized_parameters}, "
               f"{rep.bits_per_weight:.3f} bits/weight; float parameters: "
               f"{rep.float_parameters}")
  lines.append(f"estimated coded size: {rep.estimated_bytes / 1024:.1f} KiB "
               f"vs float32 {rep.float32_bytes / 1024:.1f} KiB "
               f"(x{rep.float32_bytes / max(rep.estimated_bytes, 1):.1f})")
  for line in lines:
    print_fn(line)
  return rep
