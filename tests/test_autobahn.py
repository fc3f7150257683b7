"""The Autobahn|Testsuite fuzzing client against /echo (ECHO_ENDPOINT=1), through
tests/autobahn/run.py: chapters 1-10 with no FAILED case and no UNCLEAN close, invalid UTF-8
failed as it arrives (6.4.3, 6.4.4), compression (12, 13) reported as unimplemented, and
chapter 9 within 1.5x the websockets library's time in the same run.

The runner makes its own Python 2.7 environment (tests/autobahn/.venv27) the first time,
which takes about a minute more; the HTML report stays in tests/autobahn/report.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "autobahn", "run.py")
REPORT = os.path.join(HERE, "autobahn", "report")
RUN_TIMEOUT = 1200  # seconds: set-up (~75 s the first time) plus the run (~1 min)

pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 60)


@pytest.fixture(scope="module")
def suite():
    """One run of tests/autobahn/run.py for the module: (exit status, its output, summary)."""
    done = subprocess.run([sys.executable, RUNNER, "--cases", "1-10,12,13", "--report-dir", REPORT],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    output = done.stdout + done.stderr
    with open(os.path.join(REPORT, "runner-output.txt") if os.path.isdir(REPORT)
              else os.devnull, "w") as f:
        f.write(output)
    assert done.returncode in (0, 1), "the runner could not run the suite:\n" + output
    with open(os.path.join(REPORT, "summary.json")) as f:
        summary = json.load(f)
    print(done.stdout)
    return done.returncode, output, summary


def _chapters_1_to_10(summary):
    rows = {int(ch): row for ch, row in summary["chapters"].items() if 1 <= int(ch) <= 10}
    assert set(rows) >= {1, 2, 3, 4, 5, 6, 7, 9, 10}, rows  # the suite has no chapter 8
    return rows


def test_chapters_1_to_10_have_no_failed_case(suite):
    """Chapters 1-10 end with 0 FAILED cases."""
    _, output, summary = suite
    rows = _chapters_1_to_10(summary)
    assert sum(row["FAILED"] for row in rows.values()) == 0, output
    assert sum(row["cases"] for row in rows.values()) >= 300, output


def test_chapters_1_to_10_close_cleanly(suite):
    """Chapters 1-10 end with 0 UNCLEAN closes (7.3.4 and 7.3.5 included: close codes are sent)."""
    _, output, summary = suite
    rows = _chapters_1_to_10(summary)
    assert sum(row["UNCLEAN"] for row in rows.values()) == 0, output
    assert summary["cases"]["7.3.4"]["behaviorClose"] == "OK", output
    assert summary["cases"]["7.3.5"]["behaviorClose"] == "OK", output


def test_invalid_utf8_inside_one_frame_fails_fast(suite):
    """6.4.3 and 6.4.4 are OK: invalid UTF-8 closes with 1007 before the rest of its frame arrives."""
    # The payload is read as its bytes arrive (rfile.read1), so UTF-8 fails fast.
    _, output, summary = suite
    for case_id in ("6.4.3", "6.4.4"):
        case = summary["cases"][case_id]
        assert case["remoteCloseCode"] == 1007, (case_id, case)
        assert case["behavior"] == "OK", (case_id, case, output)


def test_compression_chapters_are_reported_unimplemented(suite):
    """Chapters 12 and 13 (permessage-deflate, which the server does not negotiate) are all UNIMPLEMENTED."""
    _, output, summary = suite
    for chapter in ("12", "13"):
        row = summary["chapters"][chapter]
        assert row["cases"] > 0 and row["UNIMPLEMENTED"] == row["cases"], (chapter, row, output)


def test_chapter_9_is_within_one_and_a_half_times_websockets(suite):
    """Chapter 9 (messages up to 16 MiB) takes at most 1.5x the websockets library's time, same run."""
    _, output, summary = suite
    nine = summary["chapter9"]
    assert nine and nine["websockets_ms"] > 0, output
    assert len(nine["cases"]) >= 50
    assert nine["chat_ms"] <= 1.5 * nine["websockets_ms"], output


def test_runner_reports_no_regression(suite):
    """The runner exits 0: no regression, and no traceback in the chat server's log."""
    status, output, summary = suite
    assert not summary["problems"], output
    assert status == 0, output
