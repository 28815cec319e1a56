"""BUILD stays in step with the tree: every module and test has its target."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _targets(kind):
  text = open(os.path.join(ROOT, "BUILD"), encoding="utf-8").read()
  return set(re.findall(kind + r'\(\n    name = "([^"]+)"', text))


def test_every_module_has_a_py_library():
  modules = {f[:-3] for f in os.listdir(os.path.join(ROOT, "keras_cdl"))
             if f.endswith(".py") and f != "__init__.py"}
  assert modules <= _targets("py_library"), modules - _targets("py_library")


def test_every_test_file_has_a_py_test():
  tests = {f[:-3] for f in os.listdir(os.path.join(ROOT, "tests"))
           if f.endswith("_test.py")}
  assert tests == _targets("py_test")


def test_build_equals_generated_file_including_dependencies():
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "gen_build.py"),
       "--check"], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
