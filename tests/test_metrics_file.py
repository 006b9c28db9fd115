"""The one metrics.jsonl reader: records as written; a torn last line skipped; any other bad line one clear error."""

from __future__ import annotations

import json

import pytest

from moe_model.errors import MetricsError, UserError
from moe_model.metrics_file import read_metrics, read_metrics_lines
from moe_model.train import checkpoint

LINES = [{"step": s, "loss": 2.0 / s, "step_time_s": 0.1} for s in range(1, 5)]


def write(tmp_path, text: str):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    return path


def test_a_good_file_reads_back_as_written(tmp_path):
    path = write(tmp_path, "".join(json.dumps(m) + "\n" for m in LINES) + "\n")
    assert read_metrics(path) == LINES
    assert [text for text, _ in read_metrics_lines(path)] == [json.dumps(m) for m in LINES]


def test_a_torn_last_line_is_skipped_and_a_resume_trims_it(tmp_path):
    path = write(tmp_path, "".join(json.dumps(m) + "\n" for m in LINES) + '{"step": 5, "lo')
    assert read_metrics(path) == LINES
    checkpoint.trim_metrics(path, 3)
    assert read_metrics(path) == LINES[:3] and path.read_text().endswith("\n")


@pytest.mark.parametrize("bad, why", [("{not json", "line 2 is not JSON"), ('{"loss": 1.0}', "line 2 has no 'step'"),
                                      ("[1, 2]", "line 2 has no 'step'")])
def test_any_other_bad_line_names_the_file_and_line(tmp_path, bad, why):
    for text in (json.dumps(LINES[0]) + "\n" + bad + "\n" + json.dumps(LINES[1]) + "\n",  # in the middle
                 json.dumps(LINES[0]) + "\n" + bad + "\n"):  # last, but complete: not a crash mid-write
        path = write(tmp_path, text)
        with pytest.raises(MetricsError, match=why) as err:
            read_metrics(path)
        assert str(path) in str(err.value) and isinstance(err.value, UserError)


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(MetricsError, match="does not exist"):
        read_metrics(tmp_path / "metrics.jsonl")
