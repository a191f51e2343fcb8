"""Rows taken in together prefill in runs of similar prompt length
(`predictor.engine.prefill_groups`): what the runs are, and that nothing is lost or reordered
within a run."""

from __future__ import annotations

from predictor.engine.prefill_groups import LENGTH_RATIO, prefill_groups


def _lengths(runs: list[list[tuple[str, int | None]]]) -> list[list[int | None]]:
    return [[length for _, length in run] for run in runs]


def _rows(*lengths: int | None) -> list[tuple[str, int | None]]:
    return [(f"row{i}", length) for i, length in enumerate(lengths)]


def _length(row: tuple[str, int | None]) -> int | None:
    return row[1]


def test_rows_of_one_length_share_one_prefill() -> None:
    rows = _rows(222, 222, 222, 222)
    assert prefill_groups(rows, _length) == [rows]


def test_the_mixed_admission_measured_is_cut_into_runs_of_similar_length() -> None:
    rows = _rows(987, 154, 586, 218, 506, 362, 987, 218, 586, 154, 506, 362, 218, 154, 218)
    runs = prefill_groups(rows, _length)
    assert _lengths(runs) == [
        [154, 154, 154],
        [218, 218, 218, 218],
        [362, 362],
        [586, 506, 586, 506],
        [987, 987],
    ]
    for run in runs:  # each run within the ratio, in the order the rows came
        lengths = [length for _, length in run]
        assert min(lengths) >= LENGTH_RATIO * max(lengths)
        assert [rows.index(row) for row in run] == sorted(rows.index(row) for row in run)
    assert sorted(row for run in runs for row in run) == sorted(rows)


def test_a_row_just_under_the_ratio_starts_a_run_of_its_own() -> None:
    rows = _rows(1000, 750, 749)
    assert _lengths(prefill_groups(rows, _length)) == [[749], [1000, 750]]


def test_rows_not_yet_encoded_go_last_together() -> None:
    rows = _rows(None, 300, None, 300)
    assert _lengths(prefill_groups(rows, _length)) == [[300, 300], [None, None]]


def test_no_rows_no_runs() -> None:
    assert prefill_groups([], _length) == []
