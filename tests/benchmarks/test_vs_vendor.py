"""The vendor benchmark's per-sample feeds: one image input, or token models' inputs by name."""

from __future__ import annotations

import numpy as np

from benchmarks.vs_vendor import samples


def test_one_input_is_fed_as_input_one_sample_at_a_time():
    x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    feeds = samples(x)
    assert [list(f) for f in feeds] == [["input"]] * 3
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["input"], x[i : i + 1])


def test_token_inputs_are_fed_by_name_with_their_rows_kept_together():
    ids = np.arange(4 * 5).reshape(4, 5)
    mask = (np.arange(4 * 5).reshape(4, 5) % 3 > 0).astype(np.int64)
    feeds = samples({"input_ids": ids, "attention_mask": mask})
    assert len(feeds) == 4
    for i, feed in enumerate(feeds):
        assert feed["input_ids"].shape == (1, 5)
        np.testing.assert_array_equal(feed["input_ids"][0], ids[i])
        np.testing.assert_array_equal(feed["attention_mask"][0], mask[i])
