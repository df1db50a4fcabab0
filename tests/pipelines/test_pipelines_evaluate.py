"""pipelines.evaluate's printed AP table and exit status."""
from __future__ import annotations

import math

from pipelines.evaluate import exit_status, format_table


def test_ap_table_shows_sizes_without_objects_and_no_measurement_as_dashes():
    """pycocotools reports -1 for an object size the ground truth has none of (a val set of large
    objects only: APs, APm), which the table printed as '-100.00' AP %; a NaN AP (no image
    evaluated, every detection non-finite) printed 'nan'. Both are now '-', and a line says why."""
    metrics = {"AP": 0.5123, "AP50": 0.75, "AP75": 0.5, "APs": -1.0, "APm": -1.0, "APl": 0.5123}
    table = format_table(metrics, "title")
    assert "-100" not in table
    rows = table.splitlines()
    assert rows[0] == "title"
    values = [v.strip() for v in rows[2].split("|")]
    assert values == ["51.23", "75.00", "50.00", "-", "-", "51.23"]
    assert "APs, APm: the ground truth has no objects of that size" in table
    nan_table = format_table({k: math.nan for k in metrics}, "title")
    assert [v.strip() for v in nan_table.splitlines()[2].split("|")] == ["-"] * 6
    assert "no AP was measured" in nan_table
    assert "no AP was measured" not in table and "no objects" not in format_table({**metrics, "APs": 0.1,
                                                                                     "APm": 0.2}, "t")


def test_evaluate_exits_nonzero_when_no_ap_was_measured():
    """An evaluation that measured no AP (NaN: no image evaluated, no object in the ground truth,
    every detection non-finite) exited 0, like a scored model: ``evaluate && promote`` went on.
    It now exits 1 with an ``error:`` line; an AP of 0 is a measurement and exits 0."""
    assert exit_status({"AP": 0.41, "AP50": 0.6}) == (0, None)
    assert exit_status({"AP": 0.0}) == (0, None)
    for metrics in ({"AP": math.nan, "AP50": math.nan}, {}, {"AP": None}, {"AP": "nan"}):
        status, reason = exit_status(metrics)
        assert status == 1 and "no AP was measured" in reason, metrics
