from collections import Counter
from itertools import islice

import numpy as np
import pandas as pd
import pytest

from lib.data.sampling import (centroid_entries, class_uniform_counts, class_uniform_epoch,
                               class_uniform_stream, rare_class_stream, rcs_class_probabilities,
                               uniform_stream)
from lib.errors import ConfigError, DataError


def take(stream, n):
    return list(islice(stream, n))


def test_class_uniform_counts_match_robustnet_gtav_log():
    assert class_uniform_counts(12388, 19, 0.5) == (326, 6194)
    assert class_uniform_counts(100, 19, 0.0) == (0, 100)
    with pytest.raises(ConfigError):
        class_uniform_counts(100, 19, 1.5)


def test_uniform_stream_permutes_every_epoch_and_resumes_at_any_draw():
    draws = take(uniform_stream(10, seed=3), 30)
    assert [d.k for d in draws] == list(range(30))
    epochs = [[d.index for d in draws[e * 10:(e + 1) * 10]] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    assert take(uniform_stream(10, seed=3, start=17), 13) == draws[17:]
    assert take(uniform_stream(10, seed=4), 10) != draws[:10]


def entries_by_class(n_images: int, sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Synthetic centroid entries; cy = class * 1000 + entry number identifies them."""
    rng = np.random.default_rng(seed)
    return [np.stack([rng.integers(0, n_images, size), c * 1000 + np.arange(size), np.zeros(size, int)], 1)
            for c, size in enumerate(sizes)]


def test_class_uniform_epoch_composition():
    entries = entries_by_class(200, [3, 50, 0, 30])
    epoch = class_uniform_epoch(200, entries, 0.5, np.random.default_rng(0))
    per_class, n_random = class_uniform_counts(200, 4, 0.5)
    assert (per_class, n_random) == (25, 100)
    assert len(epoch) == n_random + 3 * per_class  # class 2 has no entries
    uniform = epoch[epoch[:, 1] < 0]
    assert len(uniform) == n_random and len(set(uniform[:, 0])) == n_random  # without replacement
    picked = Counter(epoch[epoch[:, 1] >= 0, 1].tolist())
    assert sorted(picked[c] for c in range(3)) == [8, 8, 9]  # 3 entries cycled to 25
    assert all(picked[1000 + j] <= 1 for j in range(50)) and sum(picked[1000 + j] for j in range(50)) == 25
    assert all(picked[3000 + j] <= 1 for j in range(30)) and sum(picked[3000 + j] for j in range(30)) == 25
    assert 0 < np.flatnonzero(epoch[:, 1] >= 0)[0] < 60  # the parts are shuffled together


def test_class_uniform_stream_draws_each_class_pct_over_c_of_the_time():
    n, num_classes, pct = 190, 19, 0.5
    entries = entries_by_class(n, [1 + 7 * c for c in range(num_classes)])
    draws = take(class_uniform_stream(n, entries, pct, seed=1), 10 * n)
    classes = Counter(d.centroid[0] // 1000 for d in draws if d.centroid is not None)
    assert set(classes) == set(range(num_classes))
    for c in range(num_classes):
        assert classes[c] / len(draws) == pytest.approx(pct / num_classes, rel=0.05)
    uniform_share = sum(d.centroid is None for d in draws) / len(draws)
    assert uniform_share == pytest.approx(1 - pct, rel=0.05)
    assert take(class_uniform_stream(n, entries, pct, seed=1, start=250), 300) == draws[250:550]


def test_centroid_entries_maps_ids_to_rows_and_skips_other_splits():
    centroids = pd.DataFrame({"id": ["b", "a", "z", "b"], "class": [0, 2, 1, 2],
                              "cy": [5, 6, 7, 8], "cx": [9, 10, 11, 12]})
    entries = centroid_entries(centroids, ["a", "b"], num_classes=3)
    assert entries[0].tolist() == [[1, 5, 9]]
    assert entries[1].tolist() == []
    assert sorted(entries[2].tolist()) == [[0, 6, 10], [1, 8, 12]]
    with pytest.raises(DataError, match="class 2"):
        centroid_entries(centroids, ["a", "b"], num_classes=2)


def rcs_counts() -> np.ndarray:
    """(30 images, 5 classes): classes 0-1 common, 2-3 rare, class 4 only in small amounts."""
    rng = np.random.default_rng(0)
    counts = np.zeros((30, 5), np.int64)
    counts[:, 0] = rng.integers(40000, 60000, 30)
    counts[:, 1] = rng.integers(20000, 30000, 30)
    counts[:10, 2] = rng.integers(3500, 8000, 10)
    counts[20:23, 3] = rng.integers(3100, 4000, 3)
    counts[:, 4] = rng.integers(0, 2999, 30)
    return counts


def test_rcs_probabilities_are_a_softmax_over_eligible_classes():
    counts = rcs_counts()
    probabilities = rcs_class_probabilities(counts, temperature=0.3, min_pixels=3000)
    frequency = counts.sum(0) / counts.sum()
    expected = np.exp((1 - frequency[:4]) / 0.3)
    np.testing.assert_allclose(probabilities[:4], expected / expected.sum())
    assert probabilities[4] == 0.0
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[3] > probabilities[2] > probabilities[1] > probabilities[0]  # rarer -> likelier
    with pytest.raises(ConfigError):
        rcs_class_probabilities(counts, 0.3, min_pixels=10**6)


def test_rare_class_stream_follows_the_probabilities():
    counts = rcs_counts()
    probabilities = rcs_class_probabilities(counts, temperature=0.3, min_pixels=3000)
    draws = take(rare_class_stream(counts, 0.3, 3000, 6000, seed=0), 3000)
    assert [d.k for d in draws] == list(range(3000))
    observed = np.bincount([d.rare_class for d in draws], minlength=5)
    assert observed[4] == 0  # no image has more than min_pixels of class 4
    expected = probabilities[:4] * len(draws)
    chi_square = ((observed[:4] - expected) ** 2 / expected).sum()
    assert chi_square < 16.3  # 3 degrees of freedom, p = 0.001
    assert all(counts[d.index, d.rare_class] > 3000 for d in draws)
    assert all(d.min_pixels == 6000 and d.centroid is None for d in draws)
    assert take(rare_class_stream(counts, 0.3, 3000, 6000, seed=0, start=1234), 5) == draws[1234:1239]

