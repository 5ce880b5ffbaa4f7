"""A report in headless Chromium (Debian's ``chromium``): the page loads with no console message
at all (no error, no blocked request: the network is unreachable from the browser), its tables,
plots and thumbnails are in the rendered DOM, the sample filter works, and a screenshot is kept.

The screenshot goes to ``$MEDSHIELD_TEST_ARTIFACTS`` (default: pytest's tmp dir). Without
Chromium the test is skipped, unless ``MEDSHIELD_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_support import redteam_run

from medshield.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 120


def _browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        reason = "headless Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("MEDSHIELD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; MEDSHIELD_REQUIRE_BROWSER=1 requires it")
        pytest.skip(reason)
    return found


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # any network request fails loudly
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def _console(stderr: str) -> list[str]:
    """Chromium's console lines (messages, uncaught exceptions, blocked loads, CSP reports)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    browser = _browser()
    run = redteam_run(tmp_path)
    report = write_report(run)
    url = report.resolve().as_uri()
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]

    loaded = _chromium(browser, tmp_path / "profile", "--dump-dom", url)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert _console(loaded.stderr) == []
    dom = loaded.stdout
    assert dom.count("<table") >= 5 and dom.count("<img") >= 2
    assert dom.count('class="thumb t') == len(rows)
    assert f'data-shown="{len(rows)}"' in dom  # the filter script ran over every row

    figstep = sum(r["attack"] == "figstep" for r in rows)
    assert 0 < figstep < len(rows)
    filtered = _chromium(browser, tmp_path / "profile", "--dump-dom", url + "#attack=figstep")
    assert _console(filtered.stderr) == []
    assert f'data-shown="{figstep}"' in filtered.stdout
    assert f"{figstep} of {len(rows)} rows" in filtered.stdout
    assert len(re.findall(r"<tr [^>]*hidden", filtered.stdout)) == len(rows) - figstep

    artifacts = Path(os.environ.get("MEDSHIELD_TEST_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "report_redteam.png"
    shot = _chromium(
        browser,
        tmp_path / "profile",
        f"--screenshot={screenshot}",
        "--window-size=1280,2400",
        "--hide-scrollbars",
        url,
    )
    assert _console(shot.stderr) == []
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    shutil.copy(report, artifacts / "report_redteam.html")
    print(f"report screenshot: {screenshot}")
