"""The public evaluation API the benchmarks call, and the benchmark scripts as its thin callers.

``pellucid.training.evaluate`` (fit, test, seeds, the baseline's budget) and ``evaluate_measures`` (upsampling
ceiling, latent separation); sweep_config.py (seeds, summary, parallel runs); every script imports pellucid only
through the public API.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pellucid.training.evaluate import fit_config, same_backbone_overrides, same_budget_overrides, seed_summary
from pellucid.training.evaluate_measures import latent_separation, upsampling_ceiling

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from probe_checkpoint import probe  # noqa: E402
from sweep_config import expand_seeds, variant_summaries  # noqa: E402

SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
PUBLIC_MODULES = {"pellucid.models", "pellucid.training", "pellucid.training.data", "pellucid.training.evaluate",
                  "pellucid.training.evaluate_measures"}
TINY = ["--trainer.max_epochs=1", "--data.init_args.num_train=32", "--data.init_args.num_val=16",
        "--data.init_args.num_test=16", "--data.init_args.batch_size=16", "--trainer.deterministic=false"]


def test_baseline_gets_the_evaluated_configs_budget_and_backbone(tmp_path: Path) -> None:
    config = tmp_path / "evaluated.yaml"
    config.write_text("trainer: {max_epochs: 7}\ndata: {init_args: {augment: true}}\nmodel:\n  model_kwargs:\n"
                      "    backbone: monai/convnet\n    backbone_kwargs: {channels: [8, 16], strides: [2, 1]}\n")
    assert same_budget_overrides(config) == ["--trainer.max_epochs=7", "--data.init_args.augment=true"]
    assert same_backbone_overrides(config) == [
        "--model.model_kwargs.backbone=monai/convnet", "--model.model_kwargs.backbone_kwargs=null",
        '--model.model_kwargs.backbone_kwargs={"channels": [8, 16], "strides": [2, 1]}']
    config.write_text("model: {model_kwargs: {backbone_kwargs: [1, 2]}}\n")
    with pytest.raises(ValueError, match=r"evaluated\.yaml: expected model\.model_kwargs\.backbone_kwargs"):
        same_backbone_overrides(config)


def test_expand_seeds_names_each_run_and_appends_the_seed() -> None:
    variants = [("base", []), ("m10", ["--model.lr=0.1"])]
    assert expand_seeds(variants, []) == variants
    assert expand_seeds(variants, [0, 3]) == [
        ("base_s0", ["--seed_everything=0"]), ("base_s3", ["--seed_everything=3"]),
        ("m10_s0", ["--model.lr=0.1", "--seed_everything=0"]), ("m10_s3", ["--model.lr=0.1", "--seed_everything=3"])]


def test_seed_summary_gives_mean_population_sd_and_range() -> None:
    assert seed_summary([0.9, 0.7]) == {"mean": 0.8, "sd": 0.1, "min": 0.7, "max": 0.9}
    assert seed_summary([1 / 3], digits=2) == {"mean": 0.33, "sd": 0.0, "min": 1 / 3, "max": 1 / 3}
    with pytest.raises(ValueError, match="seed_summary: expected at least one value"):
        seed_summary([])


def test_variant_summaries_skip_missing_numbers_and_list_missing_seeds() -> None:
    results = [
        {"variant": "a_s0", "overrides": [], "accuracy": 0.9, "dice": None, "minutes": 1.0},
        {"variant": "a_s1", "overrides": [], "accuracy": 0.7, "dice": None, "minutes": 2.0},
        {"variant": "b_s0", "overrides": [], "accuracy": 0.5, "dice": 0.25, "minutes": 1.0},
    ]
    a, b = variant_summaries(results, ["a", "b"], [0, 1])
    assert a["seeds"] == [0, 1] and a["missing"] == []
    assert a["accuracy"] == {"mean": 0.8, "sd": 0.1, "min": 0.7, "max": 0.9}
    assert "dice" not in a and "minutes" not in a
    assert b["seeds"] == [0] and b["missing"] == [1]
    assert b["dice"] == {"mean": 0.25, "sd": 0.0, "min": 0.25, "max": 0.25}


def test_parallel_sweep_reports_every_run_and_fails_naming_the_broken_one(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "sweep_config.py"),
               str(ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"),
               "--variant", "good=", "--variant", "bad=--trainer.max_epochs=not-a-number",
               "--seeds", "0", "1", "--jobs", "2", "--out", str(tmp_path), "--shared", *TINY]
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_ERROR_REPORTING": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert done.returncode != 0
    assert "2 of 4 runs failed" in done.stderr
    assert "'bad_s0'" in done.stderr and "'bad_s1'" in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = {line["variant"]: line for line in lines if "overrides" in line}
    assert sorted(runs) == ["good_s0", "good_s1"]
    assert all(0.0 <= runs[name]["accuracy"] <= 1.0 for name in runs)
    assert runs["good_s1"]["overrides"] == ["--seed_everything=1"]
    summaries = {line["variant"]: line for line in lines if "missing" in line}
    assert summaries["good"]["seeds"] == [0, 1] and summaries["good"]["missing"] == []
    assert summaries["good"]["accuracy"]["min"] <= summaries["good"]["accuracy"]["mean"] <= \
        summaries["good"]["accuracy"]["max"]
    assert summaries["bad"]["missing"] == [0, 1]
    assert (tmp_path / "bad_s0.log").read_text(encoding="utf-8").strip(), "the failed run's log is kept"
    assert (tmp_path / "good_s0" / "report").is_dir()


@pytest.mark.parametrize(("argv", "message"), [(["--jobs", "0"], "--jobs must be at least 1, got 0"),
                                               (["--variant", "x=", "--variant", "x="], "variant names must differ")])
def test_bad_arguments_are_refused(argv: list[str], message: str) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "sweep_config.py"),
               str(ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"), *argv]
    if "--variant" not in argv:
        command += ["--variant", "x="]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 2
    assert message in done.stderr


def test_the_baseline_built_with_the_overrides_has_the_evaluated_backbone(tmp_path: Path) -> None:
    """Both keys of ``backbone_kwargs`` reach the model (per-key overrides would lose the first)."""
    from pellucid.training.cli import build_cli

    config = tmp_path / "evaluated.yaml"
    config.write_text("model:\n  model_kwargs:\n"
                      "    backbone_kwargs: {channels: [8, 16, 24, 24], strides: [2, 2, 1, 1]}\n")
    cli = build_cli(["--config", str(ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"),
                     *same_backbone_overrides(config), "--trainer.logger=false",
                     "--data.init_args.num_train=8", "--data.init_args.num_val=8", "--data.init_args.num_test=8"],
                    run=False)
    backbone = cli.model.model.backbone
    assert (len(backbone.stages), backbone.stride, backbone.out_channels) == (4, 4, 24)
    config.write_text("model:\n  model_kwargs:\n    backbone_kwargs: {channels: [4, 8, 12]}\n")
    cli = build_cli(["--config", str(ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"),
                     *same_backbone_overrides(config), "--trainer.logger=false"], run=False)
    assert cli.model.hparams.model_kwargs["backbone_kwargs"] == {"channels": [4, 8, 12]}  # no baseline strides


def test_upsampling_ceiling_scores_the_ideal_cell_map_per_interpolation() -> None:
    ceiling = upsampling_ceiling
    rows, columns = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, 0] = ((rows - 8) ** 2 + (columns - 8) ** 2 <= 9).float()  # a disc where four 8-pixel cells meet
    masks[1, 0, 8:16, 8:16] = 1  # exactly one cell
    assert ceiling(masks, 8) == {"cubic": 1.0, "linear": 0.5}  # the disc can hold only a cubic peak
    assert ceiling(masks, 1) == {"cubic": 1.0, "linear": 1.0}
    with pytest.raises(ValueError, match=r"image size \(32, 32\) is not divisible by stride 3"):
        ceiling(masks, 3)
    volumes = torch.zeros(1, 1, 16, 16, 16)
    volumes[0, 0, 8:16, 0:8, 8:16] = 1  # exactly one 8-voxel cell: the ceiling in 3D, as issue 17 asks
    assert ceiling(volumes, 8) == {"cubic": 1.0, "linear": 1.0}


def test_latent_separation_reports_agreement_per_finding() -> None:
    separation = latent_separation
    types = torch.tensor([1, 2] * 3 + [5, 6] * 3)  # round / irregular, then round / irregular calcified
    vectors = torch.cat([torch.arange(6.0), 100 + torch.arange(6.0)]).unsqueeze(1)  # grouped by calcification only
    result = separation(vectors, types, labels=torch.zeros(12, dtype=torch.long), k=5)
    assert result["same_finding"] == {"irregular": 0.4, "spiculated": 1.0, "calcified": 1.0}  # 2 of 5 share shape
    assert result["same_type"] == 0.4 and result["same_class"] == 1.0


@pytest.mark.parametrize("bundle", ["protopnet_phantom2d", "xprotonet_phantom2d"])
def test_probe_sees_a_shipped_2d_prototype_network_learning_and_looking_at_the_lesion(bundle: str) -> None:
    """``probe_checkpoint.py`` on bundles that learned (test accuracy 0.93 / 0.89, pointing 0.997 / 0.935): every
    class predicted, similarities that vary between scans, maps that peak on the lesion (similarity maps for
    ProtoPNet, occurrence maps for XProtoNet)."""
    result = probe(bundle, samples=40, batch_size=20)
    assert result["samples"] == 40 and sum(result["predicted_counts"]) == 40
    assert min(result["predicted_counts"]) > 0 and result["accuracy"] >= 0.75
    assert result["similarity_sd_over_samples"] > 0.1  # a collapsed latent space gives about 0
    assert result["map_peak_on_lesion"] > 0.5


def test_scripts_import_pellucid_only_through_the_public_api_and_no_other_script() -> None:
    scripts = {path.stem for path in SCRIPTS}
    for path in SCRIPTS:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module not in scripts, f"{path.name} imports the script {module}; put shared logic in the API"
                if module.startswith("pellucid") and module not in PUBLIC_MODULES | {"pellucid.training.bundle"}:
                    raise AssertionError(f"{path.name} imports {module}; expected only {sorted(PUBLIC_MODULES)}")


def test_every_script_imports_and_answers_help() -> None:
    """One interpreter imports every script (so a moved module breaks here), then ``--help`` of two."""
    code = ("import importlib, sys; sys.path.insert(0, 'benchmarks'); "
            f"[importlib.import_module(name) for name in {[path.stem for path in SCRIPTS]!r}]")
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_ERROR_REPORTING": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for script in ("evaluate_cbm.py", "build_zoo.py"):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=300, check=False)
        assert done.returncode == 0 and "--quick" in done.stdout, done.stderr[-2000:]


def test_fit_config_tests_the_last_weights_and_refuses_an_unknown_selection(tmp_path: Path) -> None:
    config = ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"
    fit = fit_config(config, ["--trainer.logger=false", *TINY], seed=3, root=tmp_path, select="last", test=True)
    assert fit.checkpoint == tmp_path / "last-weights.ckpt" and fit.checkpoint.is_file()
    assert fit.epochs == 1 and fit.fit_seconds > 0 and fit.test_seconds > 0
    assert 0.0 <= fit.test["test/accuracy"] <= 1.0
    assert all(key.startswith("test/") for key in fit.test)
    final = {key: value.detach().cpu().clone() for key, value in fit.module.state_dict().items()
             if isinstance(value, torch.Tensor)}
    loaded = fit.selected_module().state_dict()  # the weights read back from the "last" checkpoint
    assert all(torch.equal(value, loaded[key]) for key, value in final.items())
    with pytest.raises(ValueError, match="select must be 'best' or 'last', got 'first'"):
        fit_config(config, select="first")


def test_step_3d_quick_reports_time_ratios_to_the_reference_and_peak_memory(tmp_path: Path) -> None:
    """``step_3d.py --quick`` (16^3, one interleaved repetition) on one family: ratios of the medians, memory, JSON."""
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_ERROR_REPORTING": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_3d.py"), "--quick", "--models", "blackbox",
                           "--json", str(tmp_path / "step.json")], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "step.json").read_text())
    assert report == json.loads(done.stdout)
    assert report["volume"] == [16, 16, 16] and report["batch_size"] == 2 and report["repeats"] == 1
    assert report["machine"]["torch_threads"] == 1 and "resnet10" in report["reference"]["name"]
    row = report["families"]["blackbox"]
    assert len(row["family_steps_wall_s"]) == len(row["reference_steps_wall_s"]) == 1
    assert row["wall_ratio"] == pytest.approx(row["family_wall_s"] / row["reference_wall_s"], rel=2e-3)
    assert row["cpu_ratio"] == pytest.approx(row["family_cpu_s"] / row["reference_cpu_s"], rel=2e-3)
    assert row["parameters"] < report["reference"]["parameters"]  # the tiny default black box vs ResNet-10
    assert row["total_peak_mb"] > 0 and report["reference"]["total_peak_mb"] > 0
    assert row["total_memory_ratio"] == pytest.approx(row["total_peak_mb"] / report["reference"]["total_peak_mb"],
                                                      rel=2e-3)
    assert "| blackbox |" in done.stderr


def test_diagnose_3d_by_diameter_counts_every_scan_once_per_bin(tmp_path: Path) -> None:
    """``diagnose_3d.py by-diameter`` on a 2D bundle: the bins partition the scans; the overall accuracy is theirs."""
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_ERROR_REPORTING": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "diagnose_3d.py"), "by-diameter", "--spatial-dims", "2",
               "--models", "blackbox_phantom2d", "--samples", "60", "--json", str(tmp_path / "d.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    bins = json.loads((tmp_path / "d.json").read_text())["by-diameter"]["blackbox_phantom2d"]
    parts = [row for name, row in bins.items() if name != "all"]
    assert sum(row["n"] for row in parts) == bins["all"]["n"] == 60
    right = sum(row["accuracy"] * row["n"] for row in parts if row["n"])
    assert right / 60 == pytest.approx(bins["all"]["accuracy"], abs=0.01)


def test_sweep_measures_each_run_again_on_unseen_textures(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep_config import main as sweep_main
    from sweep_config import reseeded

    monkeypatch.setenv("WANDB_MODE", "disabled")
    sweep_main([str(ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"), "--variant", "base=",
                "--texture-seeds", "7", "--out", str(tmp_path), "--shared", *TINY])
    line = json.loads([row for row in capsys.readouterr().out.splitlines() if row.startswith("{")][-1])
    assert 0.0 <= line["accuracy"] <= 1.0 and 0.0 <= line["accuracy@7"] <= 1.0
    assert (tmp_path / "base" / "report_seed7" / "report.json").is_file()
    from pellucid.training.data import PhantomDataModule

    original = PhantomDataModule(spatial_dims=2, seed=0, num_train=8, num_val=8, num_test=8, batch_size=4)
    copy = reseeded(original, 7)
    assert copy.hparams["seed"] == 7 and {**copy.hparams, "seed": 0} == {
        k: v for k, v in original.hparams.items() if not k.startswith("_")}
    with pytest.raises(ValueError, match="has no 'seed' setting"):
        reseeded(object(), 7)
