"""The synthetic language: exact entropy vs Monte Carlo, likelihood, determinism, speed."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from lmjax.data import synthetic
from lmjax.data.synthetic import PRESETS, SyntheticLanguage
from lmjax.errors import ConfigError

T = 64  # targets per sequence in the Monte-Carlo checks


@pytest.mark.parametrize("structure", [0.0, 0.3, 0.8, 0.95, 1.0])
def test_entropy_formula_matches_monte_carlo(structure):
  # Sequences are independent, so the standard error of the mean over
  # per-sequence losses is exact; 4.5 se keeps the false-alarm rate ~1e-5.
  lang = SyntheticLanguage(structure=structure)
  x = lang.sample(np.arange(3000), T + 1, seed=7)
  nll = -lang.log_prob(x)[:, 1:]
  per_seq = nll.mean(axis=1)
  se = per_seq.std(ddof=1) / math.sqrt(len(per_seq))
  exact = lang.entropy_rate(T)
  assert abs(per_seq.mean() - exact) <= 4.5 * se + 1e-9, (per_seq.mean(), exact, se)
  # The start-of-sequence effect: targets 1..15 lack some lag sources.
  head = nll[:, :15].mean(axis=1)
  head_se = head.std(ddof=1) / math.sqrt(len(head))
  exact_head = lang.position_entropies(T)[:15].mean()
  assert abs(head.mean() - exact_head) <= 4.5 * head_se + 1e-9


def test_pure_noise_is_uniform_with_floor_log_v():
  lang = SyntheticLanguage.from_preset("noise", vocab_size=300)
  assert lang.entropy_rate() == pytest.approx(math.log(300), abs=1e-12)
  assert lang.entropy_rate(17) == pytest.approx(math.log(300), abs=1e-12)
  x = lang.sample(np.arange(200), 50)
  np.testing.assert_allclose(lang.log_prob(x), -math.log(300), atol=1e-12)
  counts = np.bincount(x.reshape(-1), minlength=300)
  expected = x.size / 300
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 300 + 6 * math.sqrt(2 * 300)  # chi-square with 299 dof, generous


def test_determined_preset_has_zero_stationary_rate():
  lang = SyntheticLanguage.from_preset("determined")
  assert lang.entropy_rate() == 0.0
  x = lang.sample(np.arange(50), 200)
  lp = lang.log_prob(x)
  assert np.all(lp[:, 16:] == 0.0)  # every lag source exists from t=16 on


def test_log_prob_is_a_normalised_conditional():
  lang = SyntheticLanguage(structure=0.7, vocab_size=64, num_classes=8)
  x = lang.sample(np.arange(5), 40)
  for t in (1, 3, 10, 39):  # before and after the lag-16 sources exist
    ctx = np.repeat(x[:, : t + 1], 64, axis=0)
    ctx[:, t] = np.tile(np.arange(64), 5)
    p = np.exp(lang.log_prob(ctx)[:, t]).reshape(5, 64)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("preset", ["hard", "default", "determined"])
def test_token_frequencies_match_exact_marginals_and_are_zipfian(preset):
  lang = SyntheticLanguage.from_preset(preset)
  x = lang.sample(np.arange(3000), 65)
  exact = lang.token_marginals(65)
  np.testing.assert_allclose(exact.sum(axis=1), 1.0, atol=1e-12)
  rng = np.random.default_rng(0)
  for cols in (slice(0, 65), slice(3, 4), slice(20, 21)):  # all, early, late positions
    n = x[:, cols].size
    q = exact[cols].mean(axis=0)
    tv = 0.5 * np.abs(np.bincount(x[:, cols].reshape(-1), minlength=256) / n - q).sum()
    # Pure sampling noise sets the scale; a wrong marginal would sit far above it.
    noise = max(0.5 * np.abs(rng.multinomial(n, q) / n - q).sum() for _ in range(5))
    assert tv < 1.3 * noise, (cols, tv, noise)
  ranked = np.sort(exact[1:].mean(axis=0))[::-1]
  assert ranked[0] / ranked[127] > 10  # heavy head: far from uniform


def test_entropy_ordering_across_presets():
  rates = [SyntheticLanguage.from_preset(p).entropy_rate() for p in PRESETS]
  assert rates == sorted(rates, reverse=True)
  lang = SyntheticLanguage()
  # Mean over a finite window exceeds the stationary rate and converges to it.
  assert lang.entropy_rate(64) > lang.entropy_rate(256) > lang.entropy_rate()
  assert lang.entropy_rate(100000) == pytest.approx(lang.entropy_rate(), abs=1e-3)
  assert lang.unigram_entropy() > lang.entropy_rate(64)


def test_sampling_is_random_access_and_deterministic():
  lang = SyntheticLanguage()
  a = lang.sample([5, 6, 7, 100], 33, seed=3)
  b = np.concatenate([lang.sample([i], 33, seed=3) for i in (5, 6, 7, 100)])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(lang.sample([100], 20, seed=3)[0], a[3, :20])  # prefixes agree
  assert not np.array_equal(a, lang.sample([5, 6, 7, 100], 33, seed=4))
  assert not np.array_equal(a, lang.sample([5, 6, 7, 100], 33, seed=3, split="validation"))
  assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 256


def test_language_seed_changes_the_language_not_the_floor_formula():
  a, b = SyntheticLanguage(language_seed=0), SyntheticLanguage(language_seed=1)
  assert not np.array_equal(a.sample([0], 64), b.sample([0], 64))
  assert a.entropy_rate() != b.entropy_rate()  # class order and lags differ


def test_batch_generation_is_fast():
  lang = SyntheticLanguage()
  lang.sample(np.arange(64), 257)
  times = []
  for i in range(15):
    t0 = time.perf_counter()
    lang.sample(np.arange(64 * i, 64 * i + 64), 257)
    times.append(time.perf_counter() - t0)
  # ~2 ms on an idle core; generous so a busy shared machine does not flake.
  assert np.median(times) < 0.025


@pytest.mark.parametrize("kwargs", [
    dict(structure=1.5), dict(structure=-0.1), dict(vocab_size=1), dict(num_classes=0),
    dict(num_classes=300), dict(lags=()), dict(lags=(0, 4)), dict(structure=True),
])
def test_bad_settings_raise_one_line_config_errors(kwargs):
  with pytest.raises(ConfigError) as e:
    SyntheticLanguage(**kwargs)
  assert "\n" not in str(e.value)


def test_unknown_preset():
  with pytest.raises(ConfigError, match="preset"):
    synthetic.language_for("medium")


def test_class_sizes_sum_to_vocab():
  for v, c in [(256, 16), (512, 24), (17, 16), (16, 16), (300, 1), (1000, 3)]:
    sizes = synthetic.geometric_class_sizes(v, c)
    assert sizes.sum() == v and sizes.min() >= 1 and len(sizes) == c
