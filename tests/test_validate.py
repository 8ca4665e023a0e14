"""The real bids-validator-deno on built datasets."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from bids_llm_encode.bids import validate as V
from bids_llm_encode.errors import BidsAppError, ValidationError

from layouts import make_layout

pytestmark = pytest.mark.skipif(
    shutil.which("bids-validator-deno") is None
    and not (V.Path(sys.executable).parent / "bids-validator-deno").exists(),
    reason="bids-validator-deno not installed")


def test_good_layout_passes(tmp_path, caplog):
    root = make_layout(tmp_path / "ds", runs=(1, 2))
    with caplog.at_level("WARNING", logger="bids_llm_encode.bids.validate"):
        V.validate_dataset(root)
    assert "warnings" in caplog.text  # e.g. recommended sidecar keys: logged, not fatal


def test_broken_layout_fails(tmp_path):
    root = make_layout(tmp_path / "ds")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x"}))  # no BIDSVersion
    (root / "sub-01/func/sub-01_task-pieman_bold.json").unlink()  # no RepetitionTime/TaskName
    with pytest.raises(ValidationError) as exc:
        V.validate_dataset(root)
    msg = str(exc.value)
    assert exc.value.exit_code == 16
    assert "JSON_KEY_REQUIRED (BIDSVersion)" in msg and "/dataset_description.json" in msg
    assert "sub-01_task-pieman_bold.nii.gz" in msg
    assert len(msg.splitlines()) <= 14


def test_validate_derivatives_returns_issues(tmp_path):
    root = make_layout(tmp_path / "ds")
    report = V.validate_derivatives(root / "derivatives" / "fmriprep")
    assert set(report) >= {"errors", "warnings", "summary", "returncode"}
    assert all({"code", "severity", "location"} <= set(i) for i in report["errors"] + report["warnings"])
    assert (report["returncode"] == 16) == bool(report["errors"])


def test_missing_validator(monkeypatch, tmp_path):
    monkeypatch.setattr(V, "EXECUTABLE", "no-such-validator-xyz")
    with pytest.raises(BidsAppError, match="--skip-bids-validation"):
        V.validate_dataset(make_layout(tmp_path / "ds"))


def test_parse_legacy_and_garbage():
    legacy = {"issues": {"errors": [{"key": "NO_T1W", "reason": "r",
                                     "files": [{"file": {"relativePath": "/sub-01/x.nii"}}]}],
                         "warnings": []}, "summary": {}}
    rep = V.parse_report("log line\n" + json.dumps(legacy))
    assert rep["errors"][0]["code"] == "NO_T1W" and rep["errors"][0]["location"] == "/sub-01/x.nii"
    with pytest.raises(BidsAppError):
        V.parse_report("no json here")


def test_summary_is_short():
    issues = [{"code": f"C{i}", "location": f"/f{j}"} for i in range(30) for j in range(5)]
    text = V.summarize(issues)
    assert len(text.splitlines()) == 11 and "and 2 more" in text and "20 more issue codes" in text
