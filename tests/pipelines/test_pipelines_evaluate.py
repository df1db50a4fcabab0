"""pipelines.evaluate's printed AP table."""
from __future__ import annotations

import math

from pipelines.evaluate import format_table


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
