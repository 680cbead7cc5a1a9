"""Several categories with a one-model-per-category method (DDAD): a parent run directory holds one run per
category (RUN/<category>/), trained one after another, and tested into one table with the mean.

    RUN/categories.json          the categories, in order (marks the parent)
    RUN/<category>/              an ordinary run of that category alone
    RUN/test/metrics.json        each category's metrics and their mean (``overall`` is that mean: the
                                 categories' scores come from different models and are not pooled)

An interruption stops the job in the category it is in. Run again, it skips categories whose training
finished, resumes an unfinished one, and starts the rest.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_text
from ..data.formats import selected_categories
from ..results import TestMetrics
from ..runs import RunDir

MARKER = "categories.json"


def is_parent(run: RunDir) -> bool:
    return (run.root / MARKER).is_file()


def finished(run: RunDir) -> bool:
    """Whether the run's last training ended by its own budget (not interrupted, not still to start)."""
    if not run.log_path.is_file() or not run.checkpoints():
        return False
    lines = [line for line in run.log_path.read_text().splitlines() if "training stopped (" in line]
    return bool(lines) and "(interrupted)" not in lines[-1]


def train_each(config: Any, parent: RunDir, train: Callable[[Any, RunDir, bool], Any]) -> dict[str, Any]:
    """``train(config of one category, its run, resume)`` for each category that is not finished, in order;
    an interrupted one (Ctrl-C, SIGTERM) ends the job there, to be continued by the same command."""
    categories = selected_categories(config.data)
    parent.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(parent.root / MARKER, json.dumps({"categories": categories}, indent=2))
    results = {}
    for category in categories:
        run = RunDir(parent.root / category)
        if finished(run):
            print(f"{category}: trained already ({run.root}); skipped")
            continue
        print(f"{category}: training into {run.root}")
        results[category] = train(config.replace(data=replace(config.data, category=category)), run,
                                  bool(run.checkpoints()))
        if results[category].stopped_by == "interrupted":
            break
    return results


def test_each(parent: RunDir, test: Callable[[RunDir, Path], TestMetrics], out_dir: Path | None = None) -> TestMetrics:
    """``test(category run, its output folder)`` for each category, and one table of them with their mean."""
    categories = json.loads((parent.root / MARKER).read_text())["categories"]
    out_dir = Path(out_dir) if out_dir else parent.test_dir
    per = {c: test(RunDir(parent.root / c), out_dir / c) for c in categories}
    table = {c: m.overall for c, m in per.items()}
    first = next(iter(per.values()))
    metrics = TestMetrics(dataset=f"{len(categories)} categories, one model each", overall=first.overall,
                          categories=table, threshold=None, threshold_source="per category (see each category's folder)",
                          calibration_key="", seconds=sum(m.seconds for m in per.values()), settings=first.settings,
                          info={"runs": {c: str(parent.root / c) for c in categories}})
    metrics = replace(metrics, overall=metrics.mean)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.save(out_dir / "metrics.json")
    return metrics
