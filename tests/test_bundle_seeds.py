"""A bundle's numbers over training seeds: recorded in its metadata, rendered in its model card, checksums kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pellucid.models.pretrained import read_metadata, verify_bundle
from pellucid.training.bundle_seeds import SeedSummaryError, record_seed_summary, seed_summary_lines

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = {"seeds": [0, 1, 2], "bundle_seed": 1, "evaluated_on": "test split", "unseen": "phantom seed 7",
           "metrics": {"accuracy": {"values": [0.90, 0.92, 0.94], "unseen": [0.80, 0.80, 0.83]},
                       "pointing_game": {"values": [0.5, 0.6, 0.7]}},
           "baseline": "black box 0.91", "source": "docs/x.md"}


def test_the_card_gives_mean_sd_each_seed_and_the_bundles_seed() -> None:
    lines = seed_summary_lines(SUMMARY)
    assert lines[0] == "## Over training seeds"
    # population sd, as the docs the summaries come from and their baselines report it
    assert "| accuracy | 0.920 ± 0.016 | 0.900, 0.920, 0.940 | 0.810 ± 0.014 | 0.920 |" in lines
    assert "| pointing_game | 0.600 ± 0.082 | 0.500, 0.600, 0.700 | – | 0.600 |" in lines
    assert "Baseline: black box 0.91." in lines
    assert seed_summary_lines(None) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"seeds": [0]}, r"field 'seeds': expected a list of at least 2 seeds"),
    ({"bundle_seed": 5}, r"field 'bundle_seed': expected one of \[0, 1, 2\], got 5"),
    ({"metrics": {"accuracy": {"values": [0.9, 0.9]}}}, r"metric 'accuracy': field 'values': expected 3 numbers"),
    ({"metrics": {"accuracy": {"unseen": [0.9, 0.9, 0.9]}}}, r"metric 'accuracy': field 'values' is missing"),
])
def test_a_summary_that_does_not_fit_is_refused_before_anything_is_written(tmp_path: Path, change, message) -> None:
    bundle = shutil.copytree(ROOT / "checkpoints" / "attention_classifier_phantom2d", tmp_path / "bundle")
    before = (bundle / "metadata.json").read_text()
    with pytest.raises(SeedSummaryError, match=message):
        record_seed_summary(bundle, {**SUMMARY, **change})
    assert (bundle / "metadata.json").read_text() == before


def test_recording_keeps_the_bundle_verifiable_and_its_weights(tmp_path: Path) -> None:
    bundle = shutil.copytree(ROOT / "checkpoints" / "attention_classifier_phantom2d", tmp_path / "bundle")
    weights = (bundle / "weights.safetensors").read_bytes()
    record_seed_summary(bundle, SUMMARY)
    metadata = read_metadata(bundle)
    verify_bundle(bundle, metadata)  # the checksums cover the new metadata and card
    assert metadata["seed_summary"] == json.loads(json.dumps(SUMMARY))
    assert "## Over training seeds" in (bundle / "README.md").read_text()
    assert (bundle / "weights.safetensors").read_bytes() == weights
