"""lmjax/allocator.py: when a command line re-executes itself on mimalloc, and that it does."""
import os
import platform
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from lmjax import allocator
from lmjax.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LIB = "/site/cmeel.prefix/lib/libmimalloc.so"
# cmeel-mimalloc is a dependency exactly here (setup.py); elsewhere lmjax keeps glibc's malloc.
HAS_WHEEL = sys.platform.startswith("linux") and platform.machine() == "x86_64"


def test_reexec_env_rules():
  env = allocator.reexec_env({"PATH": "/bin"}, LIB, platform="linux")
  assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, "MIMALLOC_PURGE_DELAY": "-1"}
  # The user's own mimalloc settings win over lmjax's default.
  env = allocator.reexec_env({"MIMALLOC_PURGE_DELAY": "100"}, LIB, platform="linux")
  assert env["MIMALLOC_PURGE_DELAY"] == "100" and env["LD_PRELOAD"] == LIB
  assert allocator.reexec_env({"LMJAX_MALLOC": "mimalloc"}, LIB, platform="linux")
  # Cases that run on in the same process, untouched.
  assert allocator.reexec_env({"LMJAX_MALLOC": "system"}, LIB, platform="linux") is None
  assert allocator.reexec_env({"LMJAX_MALLOC": " System "}, LIB, platform="linux") is None
  assert allocator.reexec_env({"LD_PRELOAD": "/x/libtcmalloc.so"}, LIB, platform="linux") is None
  assert allocator.reexec_env({}, None, platform="linux") is None
  assert allocator.reexec_env({}, LIB, platform="darwin") is None
  # GPU/TPU hosts keep their runtime's allocators, unless JAX is told to use the CPU.
  assert allocator.reexec_env({}, LIB, platform="linux", accelerator=True) is None
  assert allocator.reexec_env({"JAX_PLATFORMS": "cpu"}, LIB, platform="linux",
                              accelerator=True)["LD_PRELOAD"] == LIB


def test_unknown_allocator_is_one_line_config_error():
  with pytest.raises(ConfigError, match=r"LMJAX_MALLOC='tcmalloc' is not a known allocator; "
                                        r"set it to mimalloc or system"):
    allocator.reexec_env({"LMJAX_MALLOC": "tcmalloc"}, LIB, platform="linux")


def test_own_command_line_only_repeats_this_command():
  mod = types.SimpleNamespace(__spec__=types.SimpleNamespace(name="lmjax.train"),
                              __file__="/r/lmjax/train.py")
  argv = ["python", "-X", "importtime", "-m", "lmjax.train", "--config=c.py", "-m"]
  assert allocator.own_command_line(argv, mod) == argv
  assert allocator.own_command_line(["python", "-m", "lmjax.sweep"], mod) is None
  # A harness that runs the CLI module inside itself (tests/cli_driver.py) is not repeated.
  assert allocator.own_command_line(["python", "tests/cli_driver.py"], mod) is None
  script = types.SimpleNamespace(__spec__=None, __file__=str(ROOT / "experiments/x.py"))
  argv = ["python", "-u", str(ROOT / "experiments/x.py"), "--out=o"]
  assert allocator.own_command_line(argv, script) == argv
  argv = ["python", "-W", "ignore", "-X", "importtime", str(ROOT / "experiments/x.py")]
  assert allocator.own_command_line(argv, script) == argv
  assert allocator.own_command_line(["python", "other.py"], script) is None
  assert allocator.own_command_line(["python"], script) is None


def test_mimalloc_library_is_installed_where_setup_py_requires_it():
  lib = allocator.mimalloc_library()
  if HAS_WHEEL:
    assert lib is not None and os.path.isfile(lib), "pip install -e . should bring cmeel-mimalloc"
  else:
    assert lib is None or os.path.isfile(lib)


PROBE = textwrap.dedent("""
    import json, os
    from lmjax import allocator
    from lmjax.cli import run_main

    def main(argv):
      print(json.dumps({"malloc": allocator.current(), "pid": os.getpid(),
                        "purge": os.environ.get("MIMALLOC_PURGE_DELAY")}))

    if __name__ == "__main__":
      run_main(main)
""")


def _probe(tmp_path, **env_extra):
  (tmp_path / "lmjax_probe.py").write_text(PROBE)
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "LMJAX_MALLOC", "MIMALLOC_PURGE_DELAY")}
  env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), **env_extra)
  proc = subprocess.Popen([sys.executable, "-m", "lmjax_probe"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=120)
  return proc, out, err


@pytest.mark.skipif(not HAS_WHEEL, reason="cmeel-mimalloc has wheels for Linux x86_64 only")
@pytest.mark.skipif(allocator.accelerator_present() and os.environ.get("JAX_PLATFORMS") != "cpu",
                    reason="a GPU/TPU host keeps glibc's malloc unless JAX_PLATFORMS=cpu")
def test_cli_reexecutes_on_mimalloc_and_opts_out(tmp_path):
  import json
  proc, out, err = _probe(tmp_path)
  assert proc.returncode == 0, err
  rec = json.loads(out)
  # Same pid: execve replaced the process, so a launcher's signals still reach the run.
  assert rec == {"malloc": "mimalloc", "pid": proc.pid, "purge": "-1"}

  proc, out, err = _probe(tmp_path, LMJAX_MALLOC="system")
  assert proc.returncode == 0, err
  assert json.loads(out)["malloc"] == "system"

  proc, out, err = _probe(tmp_path, LMJAX_MALLOC="tcmalloc")
  assert proc.returncode == 2 and out == ""
  assert err.strip().splitlines() == [
      "lmjax: error: LMJAX_MALLOC='tcmalloc' is not a known allocator; set it to mimalloc or "
      "system (or unset it for mimalloc)."]


def test_lmjax_clis_choose_the_allocator_before_importing_jax():
  # Their first statement decides (a bad value fails there, in one line, before jax loads;
  # re-executing after the imports cost ~2 s of imports twice per command).
  env = {**os.environ, "LMJAX_MALLOC": "tcmalloc", "PYTHONPATH": str(ROOT)}
  env.pop("LD_PRELOAD", None)
  for module in ("lmjax.train", "lmjax.sweep"):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--helpshort"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("import time:")]
    imported = [l.rsplit("|", 1)[-1].strip() for l in proc.stderr.splitlines()
                if l.startswith("import time:")]
    assert proc.returncode == 2 and lines == [
        "lmjax: error: LMJAX_MALLOC='tcmalloc' is not a known allocator; set it to mimalloc or "
        "system (or unset it for mimalloc)."], (module, proc.stderr[-2000:])
    assert "lmjax.allocator" in imported and not [m for m in imported
                                                  if m == "jax" or m.startswith("jax.")], module
