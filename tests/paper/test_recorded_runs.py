"""The results the docs quote come from recorded runs, not from hand.

`docs/runs/` keeps the report of each run that the README and docs/results.md cite, as `genir-jax reproduce`
wrote it (`report.md`; with `report.json` where the run pools seeds). A table the docs copy from a report must
be that report's table, line for line, and every interval the README's family comparison quotes must be one
that a cited report prints: editing a number by hand, or re-running without updating the docs, fails here.
"""

from __future__ import annotations

import json
import re

from tests.conftest import REPO_ROOT

RUNS = REPO_ROOT / "docs" / "runs"
POOLED = RUNS / "squad-dev-cpu-3seeds"
CLAIMS_HEADING = "## Which of the paper's claims hold, per seed and pooled"
COMPARISON_HEADING = "### Two model families on squad-dev"
# An interval as reports print it: "30.18 [27.44, 33.02] (n=1057)", "31.00 [29.30, 32.65] (n=3x1057)".
INTERVAL = re.compile(r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]†?%? \(n=[\dx+]+\)")


def _table_after(text: str, heading: str) -> list[str]:
    """The lines of the first markdown table after the line `heading`."""
    lines = text.splitlines()
    start = lines.index(heading)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    assert table, f"no table after {heading!r}"
    return table


def _section(text: str, heading: str) -> str:
    """From the line that starts with `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = re.search(rf"^{re.escape(heading)}.*$", text, flags=re.M)
    assert start, f"no heading {heading!r}"
    return re.split(rf"^#{{1,{len(level)}}} ", text[start.end():], maxsplit=1, flags=re.M)[0]


def test_the_claims_table_of_results_md_is_the_pooled_reports_and_its_verdicts_are_computed():
    report = (POOLED / "report.md").read_text(encoding="utf-8")
    record = json.loads((POOLED / "report.json").read_text(encoding="utf-8"))
    table = _table_after(report, CLAIMS_HEADING)
    results = (REPO_ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert "\n".join(table) in results, "docs/results.md's claims table is not the pooled report's"
    verdicts = [row.rstrip(" |").rsplit(" | ", 1)[1] for row in table[2:]]
    assert verdicts == [claim["pooled_verdict"] for claim in record["claims"]]
    assert len(record["seeds"]) == 3


def test_every_interval_of_the_readme_family_comparison_is_printed_by_a_cited_report():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    comparison = _section(readme, COMPARISON_HEADING)
    reports = "\n".join(path.read_text(encoding="utf-8") for path in RUNS.glob("**/report.md"))
    quoted = INTERVAL.findall(comparison)
    assert len(quoted) >= 8, quoted
    assert [interval for interval in quoted if interval not in reports] == []
