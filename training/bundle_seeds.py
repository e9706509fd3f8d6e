"""A bundle's numbers over several training seeds: recorded in its metadata, shown in its model card.

A shipped bundle is one training run (one seed). What a user should rely on is how its config does over seeds and on
data whose tissue the training never saw, so a bundle can carry a ``seed_summary`` in ``metadata.json``::

    {"seeds": [0, 1, 2], "bundle_seed": 0, "evaluated_on": "test split, 1,000 scans",
     "unseen": "phantom seed 7 (tissue textures training never saw)",
     "metrics": {"accuracy": {"values": [0.941, 0.948, 0.939], "unseen": [0.953, 0.946, 0.950]}, ...},
     "baseline": "black box, 40 epochs: accuracy 0.946 +- 0.005", "source": "docs/benchmarks/mask_guidance.md"}

``values`` (and ``unseen``) hold one measured number per seed, in the order of ``seeds``; the card computes the mean
and the sample standard deviation. :func:`record_seed_summary` writes it into a bundle, re-renders the card and the
checksums; the weights are not touched.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pellucid.models.pretrained import METADATA_FILE


class SeedSummaryError(ValueError):
    """A seed summary whose fields do not fit together (named in the message)."""


def _mean_sd(values: Sequence[float]) -> str:
    """Mean ± population standard deviation (the convention of the docs the summaries come from)."""
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def check_seed_summary(summary: dict[str, Any]) -> None:
    """Raise :class:`SeedSummaryError` naming the field when ``summary`` is not as the module docstring says."""
    seeds = summary.get("seeds")
    if not isinstance(seeds, list) or len(seeds) < 2:
        raise SeedSummaryError(f"seed_summary: field 'seeds': expected a list of at least 2 seeds, got {seeds!r}")
    if summary.get("bundle_seed") not in seeds:
        raise SeedSummaryError(f"seed_summary: field 'bundle_seed': expected one of {seeds}, got "
                               f"{summary.get('bundle_seed')!r}")
    metrics = summary.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise SeedSummaryError("seed_summary: field 'metrics': expected at least one metric")
    for name, entry in metrics.items():
        if "values" not in entry:
            raise SeedSummaryError(f"seed_summary: metric {name!r}: field 'values' is missing")
        for key in ("values", "unseen"):
            if key in entry and len(entry[key]) != len(seeds):
                raise SeedSummaryError(f"seed_summary: metric {name!r}: field {key!r}: expected {len(seeds)} numbers "
                                       f"(one per seed {seeds}), got {len(entry[key])}")


def seed_summary_lines(summary: dict[str, Any] | None) -> list[str]:
    """The model card's "Over training seeds" section (no lines without a summary)."""
    if not summary:
        return []
    check_seed_summary(summary)
    seeds, index = summary["seeds"], summary["seeds"].index(summary["bundle_seed"])
    unseen = any("unseen" in entry for entry in summary["metrics"].values())
    lines = ["## Over training seeds", "",
             f"The config of this bundle trained with seeds {', '.join(map(str, seeds))} (this bundle: seed "
             f"{summary['bundle_seed']}), measured on the {summary.get('evaluated_on', 'test split')}"
             + (f" and on {summary['unseen']}" if unseen and summary.get("unseen") else "") + ".", "",
             "| metric | mean ± sd over seeds (population sd) | per seed | "
             + ("unseen data, mean ± sd | " if unseen else "") + "this bundle's seed |",
             "|---|---|---|" + ("---|" if unseen else "") + "---|"]
    for name, entry in summary["metrics"].items():
        values = [float(v) for v in entry["values"]]
        row = f"| {name} | {_mean_sd(values)} | {', '.join(f'{v:.3f}' for v in values)} | "
        if unseen:
            row += (_mean_sd([float(v) for v in entry["unseen"]]) if "unseen" in entry else "–") + " | "
        lines.append(row + f"{values[index]:.3f} |")
    lines.append("")
    if summary.get("baseline"):
        lines += [f"Baseline: {summary['baseline']}.", ""]
    if summary.get("source"):
        lines += [f"Commands and the runs behind these numbers: `{summary['source']}`.", ""]
    return lines


def record_seed_summary(bundle: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` into the bundle's metadata, re-render its model card and its checksums.

    Raises:
        SeedSummaryError: when ``summary`` does not fit (checked before anything is written).
    """
    from pellucid.training.bundle import model_card, write_checksums  # bundle.py renders cards with this module

    check_seed_summary(summary)
    bundle = Path(bundle)
    metadata = json.loads((bundle / METADATA_FILE).read_text(encoding="utf-8"))
    metadata["seed_summary"] = summary
    (bundle / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (bundle / "README.md").write_text(model_card(metadata))
    write_checksums(bundle)
    return bundle
