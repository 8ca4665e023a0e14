"""Run the official BIDS validator (``bids-validator-deno``) on the raw dataset or on outputs.

The validator (PyPI package ``bids-validator-deno``) runs offline in about a
second per dataset. With ``--format json`` it prints one JSON object::

    {"issues": {"issues": [{"code", "subCode"?, "severity", "location", "issueMessage"?, "rule"?}, ...],
                "codeMessages": {code: message}},
     "summary": {...}}

and exits with 16 when there are errors. Older validators printed
``{"issues": {"errors": [...], "warnings": [...]}}`` with ``files`` per issue;
:func:`parse_report` reads both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from ..errors import BidsAppError, MissingInputError, ValidationError

log = logging.getLogger(__name__)

EXECUTABLE = "bids-validator-deno"
MAX_SUMMARY_LINES = 10


def find_validator() -> Path:
    """Locate ``bids-validator-deno``: next to ``sys.executable`` first, then on ``PATH``.

    Raises
    ------
    BidsAppError
        When it is not installed.
    """
    here = Path(sys.executable).parent / EXECUTABLE
    if here.is_file() and os.access(here, os.X_OK):
        return here
    found = shutil.which(EXECUTABLE)
    if found:
        return Path(found)
    raise BidsAppError(
        f"the BIDS validator ({EXECUTABLE}) was not found next to {sys.executable} nor on PATH: "
        f"install it (pip install bids-validator-deno) or pass --skip-bids-validation")


def parse_report(text: str, source: str = "validator output") -> dict:
    """Parse the validator's JSON into ``{"errors": [...], "warnings": [...], "summary": {...}}``.

    Each issue is a dict with at least ``code`` (str), ``severity`` ('error' or
    'warning'), ``location`` (dataset-relative path or '') and ``message`` (str).

    Raises
    ------
    BidsAppError
        When the text holds no JSON object the validator could have printed.
    """
    start = text.find("{")
    if start < 0:
        raise BidsAppError(f"the BIDS validator printed no JSON ({source}): {text.strip()[:500]!r}")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise BidsAppError(f"cannot parse the BIDS validator's JSON ({source}): {exc}") from exc
    issues = data.get("issues", {})
    out = {"errors": [], "warnings": [], "summary": data.get("summary", {})}
    if isinstance(issues, dict) and isinstance(issues.get("issues"), list):  # bids-validator >= 2
        messages = issues.get("codeMessages", {}) or {}
        for item in issues["issues"]:
            sev = str(item.get("severity", "error")).lower()
            entry = {"code": str(item.get("code", "UNKNOWN")), "subCode": item.get("subCode"),
                     "severity": "warning" if sev.startswith("warn") else ("ignore" if sev == "ignore" else "error"),
                     "location": str(item.get("location", "") or ""),
                     "message": str(item.get("issueMessage") or messages.get(item.get("code"), "")).strip()}
            if entry["severity"] != "ignore":
                out[entry["severity"] + "s"].append(entry)
    elif isinstance(issues, dict):  # legacy (1.x) layout
        for key, sev in (("errors", "error"), ("warnings", "warning")):
            for item in issues.get(key, []) or []:
                files = item.get("files") or [{}]
                for f in files:
                    fobj = (f or {}).get("file") or {}
                    out[key].append({"code": str(item.get("key") or item.get("code", "UNKNOWN")),
                                     "subCode": None, "severity": sev,
                                     "location": str(fobj.get("relativePath", "") or ""),
                                     "message": str(item.get("reason", "")).strip()})
    else:
        raise BidsAppError(f"unexpected BIDS validator JSON ({source}): no 'issues' object")
    return out


def summarize(issues: Sequence[dict], max_lines: int = MAX_SUMMARY_LINES) -> str:
    """At most ``max_lines`` lines: one per issue code (with sub-code), its count and some files."""
    groups: dict[str, list[str]] = defaultdict(list)
    for it in issues:
        key = it["code"] + (f" ({it['subCode']})" if it.get("subCode") else "")
        groups[key].append(it.get("location") or "<dataset>")
    lines = []
    for key, locs in list(groups.items())[:max_lines]:
        uniq = list(dict.fromkeys(locs))
        more = f" and {len(uniq) - 3} more" if len(uniq) > 3 else ""
        lines.append(f"  {key}: {', '.join(uniq[:3])}{more}")
    if len(groups) > max_lines:
        lines.append(f"  ... and {len(groups) - max_lines} more issue codes")
    return "\n".join(lines)


def run_validator(path: Path, extra_args: Sequence[str] = (), timeout: Optional[float] = 600) -> dict:
    """Run the validator on ``path`` and return :func:`parse_report`'s result (plus ``returncode``)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"cannot validate {path}: no such folder")
    exe = find_validator()
    cmd = [str(exe), "--format", "json", *extra_args, str(path)]
    log.info("Validating %s with %s", path, exe.name)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        raise BidsAppError(f"cannot run {exe}: {exc}; install bids-validator-deno or pass "
                           f"--skip-bids-validation") from exc
    except subprocess.TimeoutExpired as exc:
        raise BidsAppError(f"the BIDS validator did not finish on {path} within {timeout} s") from exc
    if proc.returncode not in (0, 16) and "{" not in proc.stdout:
        raise BidsAppError(f"the BIDS validator failed on {path} (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    report = parse_report(proc.stdout, source=f"{exe.name} on {path}")
    report["returncode"] = proc.returncode
    return report


def validate_dataset(bids_dir: Path) -> None:
    """Validate the raw dataset; warnings are logged, errors end the run.

    Raises
    ------
    ValidationError
        Exit code 16, with a summary of the error codes and files.
    BidsAppError
        When the validator is not installed or cannot run.
    """
    report = run_validator(Path(bids_dir))
    for w in report["warnings"]:
        log.debug("BIDS validator warning %s%s at %s", w["code"],
                  f" ({w['subCode']})" if w.get("subCode") else "", w["location"])
    if report["warnings"]:
        log.warning("BIDS validator: %d warnings in %s:\n%s", len(report["warnings"]), bids_dir,
                    summarize(report["warnings"]))
    if report["errors"] or report["returncode"] == 16:
        raise ValidationError(
            f"{bids_dir} is not a valid BIDS dataset ({len(report['errors'])} errors):\n"
            f"{summarize(report['errors'])}\n"
            f"Fix the dataset, or pass --skip-bids-validation to run anyway.")
    log.info("BIDS validation of %s passed", bids_dir)


def validate_derivatives(out_dir: Path) -> dict:
    """Validate an output folder as a BIDS-Derivatives dataset; return the parsed issues.

    Returns
    -------
    dict
        ``{"errors": [...], "warnings": [...], "summary": {...}, "returncode": int}``
        (see :func:`parse_report`). It raises nothing for validation errors: the caller decides.
    """
    return run_validator(Path(out_dir), ["--datasetTypes", "derivative"])
