"""``pellucid predict --interventions <csv>``: a person's corrected findings change a concept model's predictions.

The file is refused, before anything is written, with one line naming file, row, field, expected, actual and the
fix; applied, the corrected samples' rows carry the set values, the corrections and the prediction without them,
and their probabilities are those of the model called with the same ``concept_mask``/``concept_values``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pellucid.models import ConceptSpec, create_model
from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.cli import main
from pellucid.training.concepts.intervention_file import InterventionFileError, read_interventions, unit_range
from pellucid.training.data import PhantomDataModule
from pellucid.training.outputs.writer_folder import RUN_FILE, read_run_record
from pellucid.training.outputs.writer_index import read_index

ROOT = Path(__file__).resolve().parents[1]
SPECS = [ConceptSpec("size_mm", "continuous", "mm"), ConceptSpec("lobulated", "binary"),
         ConceptSpec("contrast", "continuous", "a.u.")]
DATA = ["--config", str(ROOT / "configs/data/phantom2d.yaml"), "--data.init_args.image_size=32",
        "--data.init_args.spacing_mm=2.0", "--data.init_args.num_train=16", "--data.init_args.num_val=4",
        "--data.init_args.num_test=6", "--data.init_args.batch_size=4"]
QUICK = ["--model.model_kwargs.backbone_kwargs.channels=[4,8]", "--model.model_kwargs.backbone_kwargs.strides=[2,2]",
         "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
PHANTOM = [*DATA, "--config", str(ROOT / "configs/model/cbm.yaml"), *QUICK]
CLASSES = ["normal", "benign", "malignant"]


def csv_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def refusal(path: Path, text: str, model=None) -> str:
    with pytest.raises(InterventionFileError) as caught:
        table = read_interventions(csv_file(path, text))
        if model is not None:
            table.check_model(model)
    message = str(caught.value)
    assert message.startswith(f"interventions file {path}") and "\n" not in message
    assert "expected " in message and "; fix: " in message
    return message


def test_a_malformed_file_is_refused_naming_row_field_expected_and_actual(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    message = refusal(bad, "id,finding,value\na,size_mm,3\n")
    assert ", row 1: expected a header with the columns ['id', 'concept', 'value']" in message
    assert "add the column(s) ['concept']" in message
    message = refusal(bad, "id,concept,value\na,size_mm,3\nb,size_mm,twelve\n")
    assert "row 3, field 'value'" in message and "got 'twelve'" in message
    assert "row 2, field 'concept': expected a value, got an empty cell" in refusal(bad, "id,concept,value\na,,3\n")
    message = refusal(bad, "id,concept,value\na,size_mm,3\na,size_mm,4\n")
    assert "row 3" in message and "already set in row 2" in message
    assert "expected at least one row" in refusal(bad, "id,concept,value\n")
    assert "got 'nan'" in refusal(bad, "id,concept,value\na,size_mm,nan\n")
    with pytest.raises(InterventionFileError, match=r"missing.csv: expected a readable CSV file, got "):
        read_interventions(tmp_path / "missing.csv")


def test_concepts_units_and_ranges_are_checked_against_the_model(tmp_path: Path) -> None:
    cbm = create_model("cbm", 2, in_channels=1, num_classes=2, concepts=SPECS,
                       backbone_kwargs={"channels": [4], "strides": [2]})
    path = tmp_path / "fix.csv"
    message = refusal(path, "id,concept,value\na,size_mm,3\na,diameter,4\n", cbm)
    assert "row 3, field 'concept': expected one of the model's concepts ['contrast', 'lobulated', 'size_mm']" in \
        message and "got 'diameter'" in message
    message = refusal(path, "id,concept,value\na,size_mm,-2\n", cbm)
    assert "row 2, field 'value': expected a value of 'size_mm' in [0, inf] (mm), got -2" in message
    assert "in [0, 1] (0/1 or a probability), got 2" in refusal(path, "id,concept,value\na,lobulated,2\n", cbm)
    message = refusal(path, "id,concept,value,unit\na,size_mm,1.2,cm\n", cbm)
    assert "row 2, field 'unit': expected 'mm' (the unit of 'size_mm') or blank, got 'cm'" in message
    table = read_interventions(csv_file(path, "id,concept,value,unit\na,size_mm,12,mm\na,contrast,-0.5,\n"))
    assert table.check_model(cbm) == SPECS  # a.u. may be negative; the unit cell may match or stay blank
    blackbox = create_model("blackbox", 2, in_channels=1, num_classes=2,
                            backbone_kwargs={"channels": [4], "strides": [2]})
    message = refusal(path, "id,concept,value\na,size_mm,3\n", blackbox)
    assert "expected a concept model whose forward takes concept_mask and concept_values" in message
    assert "model 'blackbox'" in message
    assert unit_range(ConceptSpec("fill", "continuous", "%")) == (0.0, 100.0)
    with pytest.raises(InterventionFileError, match=r"row 2, field 'id': expected a sample id of the prediction data "
                                                    r"\(2 samples: 'x', 'y'\), got 'a'"):
        table.check_ids(["x", "y"])


@pytest.fixture(scope="module")
def cbm_checkpoint(tmp_path_factory) -> Path:
    """A tiny cbm fitted for one epoch on the 2D phantom (32 px of 2 mm)."""
    base = tmp_path_factory.mktemp("cbm")
    main(["fit", *PHANTOM, "--trainer.max_epochs=1", f"--trainer.default_root_dir={base}"])
    (checkpoint,) = sorted(base.rglob("last.ckpt"))
    return checkpoint


def predict(checkpoint: Path, out: Path, *extra: str) -> dict[str, dict[str, str]]:
    main(["predict", *PHANTOM, "--config", str(ROOT / "configs/predict/explanations.yaml"),
          f"--ckpt_path={checkpoint}", f"--trainer.callbacks.output_dir={out}",
          f"--trainer.default_root_dir={out.parent}", *extra])
    return {row["id"]: row for row in read_index(out)}


def probabilities_of(row: dict[str, str]) -> np.ndarray:
    return np.array([float(row[f"prob:{name}"]) for name in CLASSES])


def test_predict_applies_the_corrections_and_records_them(cbm_checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    first, second = "phantom2d-predict-000001", "phantom2d-predict-000004"  # in the first and the second batch
    corrections = csv_file(tmp_path / "corrections.csv", f"id,concept,value,unit\n{first},diameter_mm,30,mm\n"
                                                         f"{first},spiculated,1,\n{second},contrast,0.05,a.u.\n")
    plain = predict(cbm_checkpoint, tmp_path / "plain")
    corrected = predict(cbm_checkpoint, tmp_path / "corrected", "--interventions", str(corrections))
    assert sorted(plain) == sorted(corrected) and len(plain) == 6
    for sample_id, row in corrected.items():
        if sample_id not in (first, second):  # untouched samples predict as without the file
            np.testing.assert_allclose(probabilities_of(row), probabilities_of(plain[sample_id]), atol=1e-6)
            assert row["interventions"] == ""
            continue
        assert row["prediction_without_interventions"] == plain[sample_id]["prediction"]
    assert json.loads(corrected[first]["interventions"]) == {"diameter_mm": 30.0, "spiculated": 1.0}
    assert json.loads(corrected[second]["interventions"]) == {"contrast": 0.05}
    assert float(corrected[first]["concept:diameter_mm [mm]"]) == pytest.approx(30.0, abs=1e-4)
    assert float(corrected[first]["concept:spiculated [probability]"]) == pytest.approx(1.0, abs=1e-5)
    assert float(corrected[second]["concept:contrast [a.u.]"]) == pytest.approx(0.05, abs=1e-5)
    with np.load(tmp_path / "corrected" / corrected[first]["file"]) as saved:
        assert saved["concept_logits"][0] == pytest.approx(30.0, abs=1e-4)  # the explanation is the corrected one
    # the written probabilities are the model's, called with the same intervention
    module = load_checkpoint(cbm_checkpoint)
    data = PhantomDataModule(spatial_dims=2, image_size=32, spacing_mm=2.0, num_train=16, num_val=4, num_test=6,
                             batch_size=4)
    data.setup("predict")
    image = data.predict_dataloader().dataset[1]["image"][None]
    specs = [spec.name for spec in module.model.concept_specs]
    mask = torch.tensor([[name in ("diameter_mm", "spiculated") for name in specs]])
    values = torch.tensor([[30.0 if name == "diameter_mm" else 1.0 for name in specs]])
    with torch.no_grad():
        expected = module.model.eval()(image, concept_mask=mask, concept_values=values).logits.softmax(1)[0]
        before = module.model(image).logits.softmax(1)[0]
    np.testing.assert_allclose(probabilities_of(corrected[first]), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities_of(plain[first]), before.numpy(), atol=1e-5)
    assert float((expected - before).abs().max()) > 1e-3  # the correction changed the prediction
    record = read_run_record(tmp_path / "corrected")
    assert record["interventions_sha256"] == read_interventions(corrections).sha256
    # other corrections into the same folder: refused like another model's explanations
    other = csv_file(tmp_path / "other.csv", f"id,concept,value\n{first},diameter_mm,5\n")
    with pytest.raises(SystemExit):
        predict(cbm_checkpoint, tmp_path / "corrected", "--interventions", str(other))
    assert "already holds explanations of the same weights under other interventions" in capsys.readouterr().err


def test_bad_ids_or_models_stop_the_command_in_one_line_before_anything_is_written(
        cbm_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    typo = csv_file(tmp_path / "typo.csv", "id,concept,value\nphantom2d-predict-000001,diameter_mm,4\n"
                                           "phantom2d-predict-00002,diameter_mm,4\n")
    with pytest.raises(SystemExit) as stop:
        predict(cbm_checkpoint, tmp_path / "out", "--interventions", str(typo))
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and "\n" not in error
    assert error.startswith(f"pellucid: error: interventions file {typo}, row 3, field 'id': expected a sample id")
    assert "got 'phantom2d-predict-00002'" in error
    assert not (tmp_path / "out" / RUN_FILE).exists() and not list((tmp_path / "out").glob("*.npz"))
    with pytest.raises(SystemExit) as stop:
        main(["predict", *DATA, "--config", str(ROOT / "configs/model/blackbox.yaml"), *QUICK,
              "--interventions", str(typo)])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 1 and "model 'blackbox'" in error and "leave out --interventions" in error
    with pytest.raises(SystemExit) as stop:
        main(["fit", *PHANTOM, "--interventions", str(typo), "--trainer.fast_dev_run=true"])
    assert "--interventions applies to predict only, not to fit" in capsys.readouterr().err
