"""The checkpoints shipped in ``checkpoints/`` (built by ``benchmarks/build_zoo.py``): complete, loadable, measured.

The tests iterate the shipped bundles, not the registry: a new architecture without a bundle yet leaves them green.
Every bundle names a registered architecture, loads through ``load_pretrained`` (sha256 verified, nothing unpickled),
explains phantom images within the output contract, records its measured metrics and its training config; the
architectures the README's zoo table promises are shipped (all but the cosine ProtoPNet and the ResNet-10 black box
also in 3D); the folder stays under 60 MB. Fine-tuning from a shipped bundle onto another number of classes keeps the
backbone and re-initialises what no longer fits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pellucid.models import list_bundles, list_models, load_pretrained, validate_output
from pellucid.models.pretrained import read_metadata, shipped_checkpoints_dir
from pellucid.training import InterpretableModule
from pellucid.training.bundle import initialise_from
from pellucid.training.cli import print_zoo
from pellucid.training.data.phantom import PhantomConfig, PhantomGenerator

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
# The README's zoo table: these architectures ship a 2D phantom bundle, and these also a 3D one.
REQUIRED_2D = {"attention_classifier", "attention_unet", "bcos", "blackbox", "blackbox_resnet10", "cbm", "cbm_spatial",
               "cem", "pipnet", "protopnet", "protopnet_cosine", "xprotonet"}
REQUIRED_3D = {"attention_classifier", "attention_unet", "bcos", "blackbox", "cbm", "cbm_spatial", "cem", "pipnet",
               "protopnet", "xprotonet"}
LIMIT_BYTES = 60 * 1024 * 1024


@pytest.fixture(autouse=True)
def _shipped_folder(monkeypatch) -> None:
    monkeypatch.delenv("PELLUCID_CHECKPOINTS", raising=False)


def shipped() -> list[Path]:
    return sorted(p for p in SHIPPED.iterdir() if (p / "metadata.json").is_file()) if SHIPPED.is_dir() else []


def test_every_shipped_bundle_names_a_registered_architecture_and_the_promised_ones_are_shipped() -> None:
    assert shipped_checkpoints_dir() == SHIPPED
    assert [b.name for b in list_bundles()] == [b.name for b in shipped()]
    found: dict[int, set[str]] = {2: set(), 3: set()}
    for bundle in shipped():
        metadata = read_metadata(bundle)
        assert metadata["model"]["name"] in list_models(), (bundle.name, metadata["model"]["name"])
        found[metadata["spatial_dims"]].add(metadata["model"]["name"])
    assert REQUIRED_2D <= found[2], sorted(REQUIRED_2D - found[2])
    assert REQUIRED_3D <= found[3], sorted(REQUIRED_3D - found[3])


def test_pellucid_zoo_lists_every_shipped_bundle_with_its_headline_metrics(capsys) -> None:
    print_zoo()
    printed = capsys.readouterr().out
    assert f"{len(shipped())} provided checkpoint(s):" in printed
    for bundle in shipped():
        (line,) = [line for line in printed.splitlines() if line.strip().startswith(bundle.name + " ")]
        assert "pointing_game " in line and ("accuracy " in line or "dice " in line), line


def test_the_checkpoint_folder_stays_under_60_mb() -> None:
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert 0 < size < LIMIT_BYTES, f"checkpoints/ holds {size / 2**20:.1f} MB"


@pytest.mark.parametrize("bundle", shipped(), ids=lambda p: p.name)
def test_a_shipped_bundle_loads_explains_and_records_how_it_was_made(bundle: Path) -> None:
    model, metadata = load_pretrained(bundle.name)  # sha256 checked, safetensors only
    model.eval()
    assert metadata["name"] == bundle.name
    config = yaml.safe_load((bundle / "config.yaml").read_text())
    assert config["model"]["model"] == metadata["model"]["name"]
    metrics = metadata["metrics"]
    task_metric = "test/dice" if metadata["task"] == "segmentation" else "test/accuracy"
    assert 0.0 <= metrics[task_metric] <= 1.0 and "localization/pointing_game" in metrics, sorted(metrics)
    assert f"{task_metric}: " in (bundle / "README.md").read_text()
    spec = metadata["input"]
    generator = PhantomGenerator(PhantomConfig(spatial_dims=metadata["spatial_dims"],
                                               image_size=tuple(spec["image_size"]),
                                               spacing_mm=tuple(spec["spacing_mm"])), seed=0)
    samples = [generator.sample("test", i) for i in range(2)]
    image = torch.from_numpy(np.stack([s.image for s in samples]))
    with torch.no_grad():
        output = model(image, explain=True)
    validate_output(output, image, num_classes=len(metadata["classes"]))
    assert output.localization is not None


def test_fine_tuning_from_a_shipped_bundle_keeps_the_backbone_and_reinitialises_the_head() -> None:
    _, metadata = load_pretrained("protopnet_phantom2d")
    kwargs = {k: v for k, v in metadata["model"]["kwargs"].items()
              if k not in ("spatial_dims", "in_channels", "num_classes")}
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=2, model_kwargs=kwargs)
    report = "\n".join(initialise_from(module, "protopnet_phantom2d"))
    assert "re-initialised last_layer.weight" in report and "re-initialised prototypes.vectors" in report, report
    assert "kept fresh prototypes._extra_state" in report, report  # provenance of 30 prototypes cannot describe 20
    assert module.model.prototypes.sources == [None] * 20
    shipped_model, _ = load_pretrained("protopnet_phantom2d")
    for name, tensor in module.model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, shipped_model.backbone.state_dict()[name], msg=name)
