"""BENCHMARKS.md is shared: each benchmark owns one marked section of it."""

import os
import platform
import re
import subprocess

__all__ = ["write_section", "machine"]


def write_section(path, start, end, section):
  """Replaces the text between `start` and `end` markers in `path`.

  `section` must begin with `start` and end with `end`.  The file is created
  (with a `# Benchmarks` title) if absent, and the section appended if the
  markers are not there yet; every other section is left as it was.
  """
  if not (section.startswith(start) and section.rstrip("\n").endswith(end)):
    raise ValueError(f"`section` must start with {start!r} and end with "
                     f"{end!r}.")
  text = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      text = f.read()
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end) + "\n?", re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
  else:
    if not text:
      text = "# Benchmarks\n"
    text = text.rstrip("\n") + "\n\n" + section
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def machine():
  """`"<nproc> cores (nproc), <CPU model>, <memory> RAM"` of this machine."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      names = re.findall(r"model name\s*:\s*(.*)", f.read())
    cpu = names[0].strip() if names else cpu
  except OSError:
    pass
  memory = "unknown memory"
  try:
    with open("/proc/meminfo") as f:
      kib = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
    memory = f"{kib / 2**20:.1f} GiB"
  except (OSError, AttributeError):
    pass
  nproc = subprocess.run(["nproc"], capture_output=True, text=True,
                         check=False).stdout.strip() or str(os.cpu_count())
  return f"{nproc} cores (nproc), {cpu}, {memory} RAM"
