"""experiments/structure_sweep.py on a tiny setting: losses finite, above the exact floor."""
import dataclasses
import json
import math

import jax
import pytest

from experiments import structure_sweep as ss
from lmjax import sharding
from lmjax.data import pipeline as data_lib
from lmjax.errors import ConfigError
from lmjax.sharding import MeshConfig


def test_tiny_sweep_stays_above_floor_and_writes_figure(tmp_path):
  # Tiny on purpose (seconds per run, mostly compilation); the claims checked are the ones
  # that hold at any size: a trained model's loss is finite and never below the true floor.
  sweep = ss.base_sweep(seq_len=32, global_batch=8, eval_batches=2, evals_per_run=1)
  # One device, as the experiment runs on a plain CPU: conftest simulates 8, and sharded
  # programs take several times longer to compile.
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  # One setting keeps this under a minute on a loaded 2-core CPU (each run is ~10 s of
  # compilation); the compilation cache stays off because it is process-wide, and sticky
  # once any earlier test has compiled without it.
  results = ss.run_sweep(["0.8"], [16, 32], 40 * 8 * 32, str(tmp_path / "runs"),
                         sweep=sweep, mesh=mesh, log=lambda _: None, compilation_cache="")
  assert [s["label"] for s in results["settings"]] == ["s=0.8"]
  (s,) = results["settings"]
  assert s["structure"] == 0.8
  # The floor is the data layer's exact one for this very config (not a copied number).
  data = dataclasses.replace(sweep.base.data, synthetic_structure=0.8)
  assert s["floor"] == pytest.approx(data_lib.entropy_floor(data, 32), abs=1e-12)
  assert [r["width"] for r in s["runs"]] == [16, 32]
  for r in s["runs"]:
    loss = r["final_eval_loss"]
    assert math.isfinite(loss), r
    assert loss > s["floor"], (r["width"], loss, s["floor"])
    # It trained: 40 steps already beat knowing nothing (log 256 = 5.545 nats).
    assert loss < math.log(256) - 0.2, (r["width"], loss)
    assert r["tokens"] == 40 * 8 * 32 and r["eval_curve"][-1]["eval_loss"] == loss
  assert s["above_floor"] is True
  assert s["runs"][1]["n_params"] > s["runs"][0]["n_params"]

  out = tmp_path / "fig" / "structure_sweep"
  paths = ss.plot(results, out)
  json_path = ss.write_json(results, out)
  png, svg = paths
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
  assert json.loads(json_path.read_text())["settings"][0]["floor"] == results["settings"][0][
      "floor"]


def test_parse_structure():
  assert ss.parse_structure("hard") == ("hard", {"synthetic_preset": "hard",
                                                  "synthetic_structure": None})
  assert ss.parse_structure("0.7") == ("s=0.7", {"synthetic_structure": 0.7})
  for bad in ("medium", "1.5", "-0.1"):
    with pytest.raises(ConfigError):
      ss.parse_structure(bad)


def test_run_config_follows_the_family_and_the_token_budget():
  sweep = ss.base_sweep()
  for width, layers in ((16, 1), (64, 2), (128, 4)):
    run = ss.run_config(sweep, width, 250_000)
    m = run.config.model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff) == (width, layers, width // 16, 4 * width)
    # 250000 tokens at 1024 per step is 244.1 steps: the nearest whole number of steps.
    assert run.config.train.steps == 244 and run.tokens == 244 * 1024
