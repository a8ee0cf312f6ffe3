"""Every door rejects bad input with one line naming the fix: no traceback, exit status 2,
and nothing in the workdir damaged. (Issue: at least 30 malformed inputs.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

from lmjax.train import onednn_dots_supported
from tests.util import tree_hash

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"
TINY_SWEEP = ROOT / "experiments" / "configs" / "sweeps" / "tiny.py"


def _cases(tmp: Path):
  """(name, module, argv, expected fragment of the one line) for each malformed input."""
  files = tmp / "files"
  files.mkdir()
  (files / "empty.txt").write_text("")
  (files / "bad_utf8.txt").write_bytes(b"hello \xff\xfe world\n")
  (files / "no_text_dir").mkdir()
  (files / "no_text_dir" / "image.bin").write_bytes(b"\x00\x01")
  (files / "syntax.py").write_text("def get_config(:\n")
  (files / "unknown_key.py").write_text(
      SMOKE.read_text().replace("return c", "c.train.stepz = 3\n  return c"))
  (files / "good.txt").write_text("Some text.\n\nAnother paragraph of text.\n" * 50)
  csv = files / "runs.csv"
  rows = ["N,D,loss"] + [f"{n},{d},{3 + 1e3 / n}" for n in (1e6, 2e6, 4e6, 8e6)
                         for d in (1e8, 2e8, 4e8)]
  csv.write_text("\n".join(rows) + "\n")
  (files / "missing_col.csv").write_text("N,loss\n1,2\n")
  (files / "non_numeric.csv").write_text(csv.read_text().replace("4000000.0", "four", 1))
  (files / "negative.csv").write_text(csv.read_text().replace("1000000.0", "-1000000.0", 1))
  (files / "few.csv").write_text("\n".join(rows[:3]) + "\n")
  (files / "garbage.sqlite").write_bytes(b"this is not a database at all" * 10)
  (files / "sweep_unknown.py").write_text(
      TINY_SWEEP.read_text().replace("return c", "c.budgetz = (1.0,)\n  return c"))
  train = lambda *a: ["lmjax.train", [f"--config={SMOKE}", *a]]
  t = lambda name, args, frag: (name, *train(*args), frag)
  wd = lambda name: f"--workdir={tmp / 'work' / name}"
  text = lambda path, *extra: ["--config.data.kind=text", f"--config.data.path={path}",
                               "--config.model.vocab_size=384", *extra]
  return [
      t("unknown override", [wd("a"), "--config.model.d_modle=32"], "d_modle"),
      ("unknown key in file", "lmjax.train", [f"--config={files / 'unknown_key.py'}", wd("b")],
       "unknown config key 'train.stepz'"),
      ("missing config file", "lmjax.train", [f"--config={files / 'nope.py'}", wd("c")],
       "No such file"),
      ("config syntax error", "lmjax.train", [f"--config={files / 'syntax.py'}", wd("d")],
       "syntax"),
      t("heads do not divide width", [wd("e"), "--config.model.n_heads=3"],
        "not divisible by model.n_heads"),
      t("kv heads do not divide heads", [wd("f"), "--config.model.n_kv_heads=3"],
        "does not divide model.n_heads"),
      t("unknown position", [wd("g"), "--config.model.position=alibi"], "model.position"),
      t("zero width", [wd("h"), "--config.model.d_model=0"], "model.d_model"),
      t("no run length", [wd("i"), "--config.train.steps=0"], "exactly one of"),
      t("two run lengths", [wd("j"), "--config.train.tokens=1000"], "exactly one of"),
      t("sequence longer than model", [wd("k"), "--config.train.seq_len=128"], "max_len"),
      t("mesh does not match devices", [wd("l"), "--config.mesh.data=3"], "devices"),
      t("unknown schedule", [wd("m"), "--config.optim.schedule=exponential"], "optim.schedule"),
      t("negative learning rate", [wd("n"), "--config.optim.lr=-1"], "optim.lr"),
      t("warmup longer than run", [wd("o"), "--config.optim.warmup_steps=1000"], "warmup_steps"),
      t("unknown data kind", [wd("p"), "--config.data.kind=parquet"], "data.kind"),
      t("missing text path", [wd("q"), *text(files / "absent.txt")], "absent.txt"),
      t("empty text file", [wd("r"), *text(files / "empty.txt")], "empty"),
      t("invalid utf-8", [wd("s"), *text(files / "bad_utf8.txt")], "UTF-8"),
      t("directory with no text", [wd("t"), *text(files / "no_text_dir")], "no_text_dir"),
      t("tfds not prepared", [wd("u"), "--config.data.kind=tfds", "--config.data.path=lm1b",
                              f"--config.data.tfds_data_dir={files}",
                              "--config.model.vocab_size=384"], "lm1b"),
      t("vocab smaller than tokenizer", [wd("v"), *text(files / "good.txt")[:2],
                                         "--config.model.vocab_size=256"], "vocab"),
      t("wrong value type", [wd("w"), "--config.train.steps=ten"], "steps"),
      t("missing workdir", [], "--workdir"),
      t("stray positional argument", [wd("x"), "extra"], "unexpected arguments"),
      t("rollback that raises lr", [wd("y"), "--config.guard.rollback_lr_factor=2"],
        "rollback_lr_factor"),
      t("keep zero checkpoints", [wd("z"), "--config.checkpoint.keep=0"], "checkpoint.keep"),
      t("negative z-loss", [wd("za"), "--config.train.z_loss=-1"], "train.z_loss"),
      t("unknown field set to None", [wd("zb"), "--config.train.stepz=None"], "train.stepz"),
      t("required field set to None", [wd("zc"), "--config.train.seq_len=null"],
        "train.seq_len"),
      t("unknown dot library", [wd("zd"), "--config.train.cpu_dots=mkl"], "train.cpu_dots"),
      ("sweep unknown key", "lmjax.sweep",
       [f"--config={files / 'sweep_unknown.py'}", wd("sa")], "budgetz"),
      ("sweep negative budget", "lmjax.sweep",
       [f"--config={TINY_SWEEP}", wd("sb"), "--config.budgets=(1e9,-1.0)"], "sweep.budgets"),
      ("sweep corrupt manifest", "lmjax.sweep",
       [f"--config={TINY_SWEEP}", f"--workdir={files / 'garbage_sweep'}"], "manifest"),
      ("sweep worker before start", "lmjax.sweep", ["--worker", wd("sc")], "--worker needs"),
      ("sweep missing config", "lmjax.sweep", [wd("sd")], "--config is required"),
      ("sweep worker cores not numbers", "lmjax.sweep", ["--worker", wd("sf"),
                                                        "--worker_cores=first,second"],
       "--worker_cores"),
      ("sweep worker cores not on this machine", "lmjax.sweep", ["--worker", wd("sg"),
                                                                 "--worker_cores=99999"],
       "--worker_cores"),
      *([t("oneDNN dots this jaxlib cannot run", [wd("ze"), "--config.train.cpu_dots=onednn"],
           "cpu_dots"),
         ("sweep oneDNN dots this jaxlib cannot run", "lmjax.sweep",
          [f"--config={TINY_SWEEP}", wd("se"), "--config.base.train.cpu_dots=onednn"],
          "cpu_dots")]
        if onednn_dots_supported() else []),   # CI's jaxlib 0.10.2 cannot
      ("fit missing column", "lmjax.fit", [f"--runs={files / 'missing_col.csv'}",
                                           f"--out={tmp / 'fit1'}"], "column"),
      ("fit non-numeric", "lmjax.fit", [f"--runs={files / 'non_numeric.csv'}",
                                        f"--out={tmp / 'fit2'}"], "four"),
      ("fit negative", "lmjax.fit", [f"--runs={files / 'negative.csv'}",
                                     f"--out={tmp / 'fit3'}"], "> 0"),
      ("fit too few points", "lmjax.fit", [f"--runs={files / 'few.csv'}",
                                           f"--out={tmp / 'fit4'}", "--approaches=3"], "runs"),
      ("fit missing file", "lmjax.fit", [f"--runs={files / 'none.csv'}",
                                         f"--out={tmp / 'fit5'}"], "none.csv"),
      ("fit missing manifest", "lmjax.fit", [f"--runs={files / 'none.sqlite'}",
                                             f"--out={tmp / 'fit6'}"], "none.sqlite"),
      ("fit garbage manifest", "lmjax.fit", [f"--runs={files / 'garbage.sqlite'}",
                                             f"--out={tmp / 'fit7'}"], "garbage.sqlite"),
  ]


def test_malformed_inputs_get_one_line_and_damage_nothing(tmp_path):
  cases = _cases(tmp_path)
  assert len(cases) >= 30
  (tmp_path / "files" / "garbage_sweep").mkdir()
  (tmp_path / "files" / "garbage_sweep" / "manifest.sqlite").write_bytes(b"not sqlite" * 20)
  before = tree_hash(tmp_path / "files")
  payload = [{"module": m, "argv": argv, "env": {"JAX_PLATFORMS": "cpu"}}
             for _, m, argv, _ in cases]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_driver.py")], cwd=ROOT,
                        env=env, input=json.dumps(payload), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  failures = []
  for (name, _, _, fragment), res in zip(cases, results):
    lines = [l for l in res["stderr"].splitlines() if l.strip()]
    ok = (res["rc"] == 2 and len(lines) == 1 and "Traceback" not in res["stderr"]
          and fragment.lower() in lines[0].lower())
    if not ok:
      failures.append(f"{name}: rc={res['rc']} stderr={res['stderr'][-600:]!r}")
  assert not failures, "\n".join(failures)
  assert tree_hash(tmp_path / "files") == before  # inputs untouched
  work = tmp_path / "work"
  leftovers = sorted(p.name for p in work.iterdir()) if work.exists() else []
  assert leftovers == [], f"bad input left workdirs behind: {leftovers}"
