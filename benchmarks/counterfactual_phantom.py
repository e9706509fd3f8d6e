"""Counterfactual metrics of shipped bundles on the 2D phantom, beside reference explanations on the same model.

For each bundle, the counterfactual metrics (``docs/counterfactual_metrics.md``) of its own explanation are measured
on the phantom test split together with those of two reference maps shown for the same model and the same twins:

- ``lesion mask``: the ground-truth lesion mask as the map (what a perfect lesion localizer shows; completeness 1 by
  construction, correctness as good as "the whole lesion, uniformly" is);
- ``constant``: the same value everywhere (correctness 0.5, completeness about ``|lesion| / |image|``).

An explanation is counterfactually right when it does at least as well as the lesion mask: it knows *which part* of
the lesion the model reacts to, not only where the lesion is.

    python benchmarks/counterfactual_phantom.py                       # ProtoPNet, CBM, black box; 300 test scans
    python benchmarks/counterfactual_phantom.py --bundles xprotonet_phantom2d cem_phantom2d --num-test 1000
    python benchmarks/counterfactual_phantom.py --json /tmp/counterfactual.json
    python benchmarks/counterfactual_phantom.py --coverage             # what the top pixels of each map cover

``--coverage`` prints instead, per bundle, which share of the spicule pixels and of the rest of the lesion the top
``n`` pixels of the bundle's own map cover (``n`` = the pixels that differ from the finding-free twin, as in the
completeness metric; ties at the cut shared out), over the spiculated test scans.

The numbers of the report card (``pellucid report --ckpt <bundle> --data zoo:phantom2d --data-arg num_test=300``)
are the ``own`` rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from pellucid.training.evaluate import (
    ExplanationEvaluator,
    concept_specs,
    evidence_maps,
    load_datamodule,
    load_module,
    machine,
    resolve_config,
    top_blocks,
    twin_source,
)

DEFAULT_BUNDLES = ("protopnet_phantom2d", "cbm_phantom2d", "blackbox_phantom2d")
SHOWN = ("own", "lesion mask", "constant")
COLUMNS = ("counterfactual_correctness", "counterfactual_completeness", "counterfactual_label_agreement",
           "counterfactual_concept_direction", "counterfactual_concept_leakage", "pointing_game",
           "deletion_faithfulness", "deletion_tied_share")


def _reference_map(shown: str, batch: dict[str, Any], maps_shape: torch.Size) -> torch.Tensor | None:
    if shown == "lesion mask":
        return (batch["mask"] > 0).float().expand(-1, maps_shape[1], *batch["mask"].shape[2:])
    if shown == "constant":
        return torch.full(maps_shape, 0.5)
    return None


@torch.no_grad()
def measure(bundle: str, num_test: int, deletion_samples: int) -> dict[str, dict[str, float | None]]:
    """The metrics of ``bundle``'s own explanation and of the reference maps, on ``num_test`` test phantoms."""
    module = load_module(bundle)
    model = module.model.eval()
    data = load_datamodule(resolve_config("zoo:phantom2d"), {"num_test": num_test})
    data.setup("test")
    specs = concept_specs(model) or module.hparams.get("concepts")
    evaluators = {shown: ExplanationEvaluator(task=module.task, concept_specs=specs,
                                              data_concept_specs=data.concept_specs,
                                              deletion_samples=deletion_samples if shown == "own" else 0,
                                              twins=twin_source(data), counterfactual_samples=num_test)
                  for shown in SHOWN}
    for batch in data.test_dataloader():
        output = model(batch["image"], explain=True)
        for shown, evaluator in evaluators.items():
            replaced = _reference_map(shown, batch, output.localization.shape)
            shown_output = output if replaced is None else dataclasses.replace(output, localization=replaced)
            evaluator.update(model, shown_output, batch)
    results = {}
    for shown, evaluator in evaluators.items():
        found = evaluator.compute()
        results[shown] = {m.name: m.value for m in found.metrics
                          if m.name in COLUMNS or m.name.startswith("counterfactual_")}
    return results


@torch.no_grad()
def coverage(bundle: str, num_test: int) -> dict[str, float]:
    """Share of the spicule pixels and of the rest of the lesion inside the top ``n`` pixels of the bundle's map."""
    model = load_module(bundle).model.eval()
    data = load_datamodule(resolve_config("zoo:phantom2d"), {"num_test": num_test})
    data.setup("test")
    covered, total = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for batch in data.test_dataloader():
        maps = evidence_maps(model(batch["image"], explain=True))
        twins = data.counterfactual_twins(batch["id"], ("no_spiculation", "normal"))
        rows = twins["no_spiculation"].applicable.nonzero()[:, 0]
        above, at_least, weight = top_blocks(maps[rows], twins["normal"].region[rows].flatten(1).sum(dim=1))
        top = above.float() + weight.view(-1, *[1] * (maps.ndim - 1)) * (at_least.float() - above.float())
        spicules = twins["no_spiculation"].region[rows, 0].float()
        rest = twins["normal"].region[rows, 0].float() * (1 - spicules)
        for index, part in enumerate((spicules, rest)):
            covered[index] += float((top * part).sum())
            total[index] += float(part.sum())
    share = (covered / total).tolist()
    return {"spicules_covered": share[0], "rest_of_lesion_covered": share[1]}


def table(report: dict[str, Any]) -> list[str]:
    """A markdown table: one row per (bundle, explanation)."""
    lines = ["| bundle | explanation | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for bundle, rows in report["bundles"].items():
        for shown, values in rows.items():
            cells = ["–" if values.get(c) is None else f"{values[c]:.3f}" for c in COLUMNS]
            lines.append(f"| `{bundle}` | {shown} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", default=list(DEFAULT_BUNDLES))
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--deletion-samples", type=int, default=64)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--coverage", action="store_true", help="print what the top pixels of each map cover")
    args = parser.parse_args(argv)
    start = time.time()
    if args.coverage:
        found = {bundle: coverage(bundle, args.num_test) for bundle in args.bundles}
        for bundle, shares in found.items():
            print(f"{bundle}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
        return found
    report = {"num_test": args.num_test, "bundles": {b: measure(b, args.num_test, args.deletion_samples)
                                                     for b in args.bundles}}
    report.update(seconds=round(time.time() - start, 1), machine=machine())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    print("\n".join(table(report)))
    print(f"{report['seconds']} s on {report['machine']}")
    return report


if __name__ == "__main__":
    main()
