"""`pellucid review`: the session (interventions, prototype marks, checks), the server, and the page in Chromium."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from pellucid.models.prototype_corrections import read_corrections, write_corrections
from pellucid.training import InterpretableModule
from pellucid.training.cli import main
from pellucid.training.outputs.report import load_datamodule, load_module
from pellucid.training.prototypes.corrections import PrototypeCorrections
from pellucid.training.prototypes.push_data import push_dataset
from pellucid.training.review import render
from pellucid.training.review.screenshots import browser_problem, headless_chromium, page_ready, wait_for
from pellucid.training.review.server import ReviewServer, page_html
from pellucid.training.review.session import ReviewError, ReviewSession, open_session, split_dataset

TINY_PHANTOM = {"spatial_dims": 2, "seed": 0, "image_size": 32, "diameter_range_mm": [3.0, 8.0], "num_train": 12,
                "num_val": 4, "num_test": 6, "batch_size": 4}
TINY_BACKBONE = {"backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}
TINY_PROTOTYPES = {**TINY_BACKBONE, "prototypes_per_class": 2, "prototype_channels": 8}


def _fit(name: str, data_path: Path, folder: Path, model_kwargs: dict) -> Path:
    """A few training steps of ``name`` on the tiny phantom (ProtoPNet's recipe ends with a push), saved as .ckpt."""
    data = load_datamodule(data_path)
    torch.manual_seed(0)
    module = InterpretableModule(name, spatial_dims=data.spatial_dims, in_channels=data.in_channels,
                                 num_classes=data.num_classes, task=data.task, class_names=data.class_names,
                                 concepts=data.concept_specs, model_kwargs=model_kwargs, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder)
    trainer.fit(module, datamodule=data)
    path = folder / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny phantom config, and a tiny CBM and ProtoPNet trained on it for a few steps."""
    folder = tmp_path_factory.mktemp("review")
    data_path = folder / "data.yaml"
    data_path.write_text(yaml.safe_dump({"data": {"class_path": "pellucid.training.data.PhantomDataModule",
                                                  "init_args": TINY_PHANTOM}}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions on a busy machine: one thread is faster
    try:
        return {"data": data_path, "cbm": _fit("cbm", data_path, folder, TINY_BACKBONE),
                "protopnet": _fit("protopnet", data_path, folder, TINY_PROTOTYPES)}
    finally:
        torch.set_num_threads(threads)


def session(trained: dict[str, Path], name: str, corrections: Path, **options) -> ReviewSession:
    return open_session(str(trained[name]), str(trained["data"]), corrections, **options)


# ------------------------------------------------------------------------------------------------ session
def test_an_intervention_re_runs_the_concept_model_with_the_set_values(trained, tmp_path) -> None:
    review = session(trained, "cbm", tmp_path / "corrections.yaml")
    plain = review.predict(1)
    assert plain["without_interventions"] is None and plain["interventions"] == {}
    assert [row["name"] for row in plain["concepts"]] == [c["name"] for c in review.info()["concepts"]]
    changed = review.predict(1, {"diameter_mm": 30.0, "spiculated": 1})
    assert changed["interventions"] == {"diameter_mm": 30.0, "spiculated": 1.0}
    assert changed["without_interventions"] == plain["prediction"]
    assert changed["prediction"]["probabilities"] != plain["prediction"]["probabilities"]
    rows = {row["name"]: row for row in changed["concepts"]}
    assert rows["diameter_mm"]["set"] and rows["diameter_mm"]["predicted"] == pytest.approx(30.0, rel=1e-5)
    assert not rows["contrast"]["set"]
    # exactly the model's own forward with those interventions
    image = review.item(1)["image"][None]
    mask = torch.tensor([[spec.name in ("diameter_mm", "spiculated") for spec in review.concept_specs]])
    values = torch.tensor([[30.0 if s.name == "diameter_mm" else 1.0 for s in review.concept_specs]])
    with torch.no_grad():
        expected = review.model(image, concept_mask=mask, concept_values=values).logits.softmax(1)[0]
    assert [p["p"] for p in changed["prediction"]["probabilities"]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert changed["views"] and changed["views"][0]["overlay"].startswith("data:image/png;base64,")


def test_marking_a_prototype_writes_the_file_with_its_source_and_a_new_session_continues_it(trained,
                                                                                             tmp_path) -> None:
    path = tmp_path / "corrections.yaml"
    review = session(trained, "protopnet", path)
    provenance = review.model.prototype_provenance()
    assert all(source is not None for source in provenance)  # the recipe's last phase pushed
    assert not path.exists()  # nothing is written before the first mark
    review.mark(3, "forbid", "  corner marker ")
    review.mark(1, "keep")
    state = review.mark(0, "keep")
    review.mark(0, None)  # cleared again
    corrections = read_corrections(path, num_prototypes=len(provenance), spatial_dims=2)
    assert corrections.model == "protopnet" and corrections.checkpoint == str(trained["protopnet"])
    assert [(c.prototype, c.mark) for c in corrections.corrections] == [(1, "keep"), (3, "forbid")]
    forbidden = corrections.corrections[1]
    assert forbidden.note == "corner marker"
    assert forbidden.source == {key: provenance[3][key] for key in ("sample_id", "sample_index", "feature_index",
                                                                    "image_box")}
    assert forbidden.class_name == review.class_names[int(review.model.prototype_classes()[3])]
    assert state["written"] and state["path"] == str(path)
    again = session(trained, "protopnet", path)
    assert {row["prototype"]: row["mark"] for row in again.prototypes() if row["mark"]} == {1: "keep", 3: "forbid"}
    png = again.prototype_png(3)
    assert png.startswith(b"\x89PNG") and png == again.prototype_png(3)


def test_marking_where_a_prototype_activates_in_a_training_image_writes_its_peak_cell_which_fit_reads(
        trained, tmp_path) -> None:
    path = tmp_path / "corrections.yaml"
    review = session(trained, "protopnet", path, split="train")
    assert review.info()["activation_problem"] is None
    shown = review.predict(5)["prototypes"]
    prototype, other = shown[0]["prototype"], shown[1]["prototype"]
    assert shown[0]["peak"]["mark"] is None
    with torch.no_grad():
        maps = review.model(review.item(5)["image"][None], explain=True).prototype_maps[0]  # (P, h, w)
    cell = [int(i) for i in np.unravel_index(int(maps[prototype].argmax()), maps.shape[1:])]
    assert shown[0]["peak"]["feature_index"] == cell
    state = review.mark_activation(5, prototype, "keep", " lesion edge ")
    review.mark_activation(2, other, "forbid")
    review.mark_activation(3, other, "keep")
    review.mark_activation(3, other, None)  # cleared again
    review.mark(other, "forbid")  # its source patch: a mark of the other kind, beside the activation mark
    scale = 32 // maps.shape[-1]
    assert state["marked"]["patch"] == {"sample_id": str(review.item(5)["id"]), "sample_index": 5,
                                        "feature_index": cell, "image_box": [[c * scale, (c + 1) * scale]
                                                                             for c in cell]}
    assert state["counts"] == {"source": {"forbid": 0, "keep": 0}, "activation": {"forbid": 0, "keep": 1}}
    corrections = read_corrections(path, num_prototypes=6, spatial_dims=2)
    assert sorted((c.prototype, c.where, c.mark, c.source["sample_index"]) for c in corrections.corrections) == sorted(
        [(prototype, "activation", "keep", 5), (other, "activation", "forbid", 2),
         (other, "source", "forbid", review.provenance[other]["sample_index"])])
    kept = next(c for c in corrections.corrections if c.mark == "keep")
    assert kept.source == state["marked"]["patch"] and kept.note == "lesion edge"
    assert "where: activation" in path.read_text()
    assert review.predict(5)["prototypes"][0]["peak"]["mark"] == "keep"

    # a new session continues the file (on any split), counting both kinds of mark per prototype
    for split in ("train", "test"):
        rows = session(trained, "protopnet", path, split=split).prototypes()
        assert (rows[other]["mark"], rows[other]["activation_marks"]) == ("forbid", {"forbid": 1, "keep": 0})
        assert (rows[prototype]["mark"], rows[prototype]["activation_marks"]) == (None, {"forbid": 0, "keep": 1})

    # the fine-tune reads the file as written: each patch from the training data push reads, at the marked cell
    module = load_module(str(trained["protopnet"]))
    callback = PrototypeCorrections(path)
    assert callback.check_model(module.model).corrections == corrections.corrections
    data = load_datamodule(trained["data"])
    callback.setup(SimpleNamespace(datamodule=data), module, "fit")
    model = module.model.eval()
    active = getattr(model.prototypes, "active", torch.ones(6)).bool()
    expected: dict[str, list[torch.Tensor]] = {"forbid": [], "keep": []}
    with torch.no_grad():
        terms = callback.terms(model)
        for correction in corrections.corrections:
            image = push_dataset(SimpleNamespace(datamodule=data))[correction.source["sample_index"]]["image"]
            values = model(image[None], explain=True).prototype_maps[(0, slice(None), *correction.patch()[1])]
            expected[correction.mark].append(values[active].max() if correction.mark == "forbid"
                                             else values[correction.prototype])
    torch.testing.assert_close(terms["keep"], -maps[prototype].max())  # the kept patch is the prototype's peak
    torch.testing.assert_close(terms["forbid"], torch.stack(expected["forbid"]).mean())


def test_a_patch_where_a_prototype_activates_is_marked_only_on_the_training_data_push_reads(
        trained, tmp_path, monkeypatch) -> None:
    path = tmp_path / "corrections.yaml"
    with pytest.raises(ReviewError, match=r"^mark here: .* this review shows the test split; review with --split "
                                          r"train$") as caught:
        session(trained, "protopnet", path).mark_activation(0, 1, "forbid")
    assert "\n" not in str(caught.value) and not path.exists()
    review = session(trained, "protopnet", path, split="train")
    train = split_dataset(review.datamodule, "train")
    shuffled = torch.utils.data.Subset(train, list(reversed(range(len(train)))))
    monkeypatch.setattr(review.datamodule, "push_dataset", lambda: shuffled, raising=False)
    with pytest.raises(ReviewError, match=r"training sample 1 is '.*-000001', but the data push reads "
                                          r"\(push_dataset\) has '.*-000010' there"):
        review.mark_activation(1, 0, "forbid")
    assert not path.exists()


BAD_REQUESTS = [
    ("cbm", lambda s: s.predict(6), r"sample index: expected an index in \[0, 6\), got 6"),
    ("cbm", lambda s: s.predict(True), r"sample index: expected an integer index in \[0, 6\), got True"),
    ("cbm", lambda s: s.predict("2"), r"sample index: expected an integer index"),
    ("cbm", lambda s: s.predict(0, {"size": 3.0}), r"unknown concept 'size'; the model's concepts are \['diameter_mm'"),
    ("cbm", lambda s: s.predict(0, {"diameter_mm": -2.0}), r"'diameter_mm': expected a value in \[0, inf\] \(mm\), "
                                                           r"got -2"),
    ("cbm", lambda s: s.predict(0, {"spiculated": 1.5}), r"'spiculated': expected a value in \[0, 1\]"),
    ("cbm", lambda s: s.predict(0, {"contrast": float("nan")}), r"'contrast': expected a finite number"),
    ("cbm", lambda s: s.predict(0, {"contrast": "high"}), r"'contrast': expected a finite number .*got 'high'"),
    ("cbm", lambda s: s.predict(0, [1, 2]), r"interventions: expected an object"),
    ("cbm", lambda s: s.mark(0, "forbid"), r"cbm has no prototypes with sources"),
    ("cbm", lambda s: s.samples(0, 500), r"count: expected an integer in \[1, 100\], got 500"),
    ("protopnet", lambda s: s.predict(0, {"diameter_mm": 3.0}), r"protopnet takes no concept interventions"),
    ("protopnet", lambda s: s.mark(6, "forbid"), r"prototype: expected an index in \[0, 6\), got 6"),
    ("protopnet", lambda s: s.mark(-1, "keep"), r"prototype: expected an index in \[0, 6\), got -1"),
    ("protopnet", lambda s: s.mark(1, "shortcut"), r"mark: expected one of \['forbid', 'keep'\] or null"),
    ("protopnet", lambda s: s.mark(1, "forbid", 3), r"note: expected a text"),
    ("protopnet", lambda s: s.prototype_png(None), r"prototype: expected an integer index"),
    ("cbm", lambda s: s.mark_activation(0, 0, "forbid"), r"cbm has no prototypes with sources"),
    ("protopnet", lambda s: s.mark_activation(6, 0, "forbid"), r"sample index: expected an index in \[0, 6\)"),
    ("protopnet", lambda s: s.mark_activation(0, 6, "forbid"), r"prototype: expected an index in \[0, 6\), got 6"),
    ("protopnet", lambda s: s.mark_activation(0, 1, "off"), r"mark: expected one of \['forbid', 'keep'\] or null"),
    ("protopnet", lambda s: s.mark_activation(0, 1, "keep", None), r"note: expected a text"),
    ("protopnet", lambda s: s.mark_activation(0, 1, "keep"), r"mark here: .*review with --split train"),
]


@pytest.mark.parametrize(("name", "call", "message"), BAD_REQUESTS,
                         ids=[f"{n}-{m.split(':')[0][:30]}" for n, _, m in BAD_REQUESTS])
def test_a_bad_request_is_one_error_naming_what_was_expected_and_given(trained, tmp_path, name, call,
                                                                       message) -> None:
    review = session(trained, name, tmp_path / "corrections.yaml")
    with pytest.raises(ReviewError, match=message) as caught:
        call(review)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "corrections.yaml").exists()


def test_a_corrections_file_of_another_model_or_other_weights_is_refused(trained, tmp_path) -> None:
    path = tmp_path / "corrections.yaml"
    review = session(trained, "protopnet", path)
    review.mark(2, "forbid")
    corrections = read_corrections(path)
    corrections.corrections[0].source["sample_id"] = "someone-else"
    write_corrections(corrections, path)
    with pytest.raises(ReviewError, match=r"prototype 2's source there \(someone-else.*written for other weights"):
        session(trained, "protopnet", path)
    corrections.model = "pipnet"
    write_corrections(corrections, path)
    with pytest.raises(ReviewError, match=r"written for model 'pipnet', this is 'protopnet'"):
        session(trained, "protopnet", path)


def test_a_source_missing_from_the_given_training_data_is_named_with_the_fix(trained, tmp_path) -> None:
    review = session(trained, "protopnet", tmp_path / "c.yaml", data_overrides={"num_train": 2})
    late = next(p for p, source in enumerate(review.provenance) if source["sample_index"] >= 2)
    with pytest.raises(ReviewError, match=rf"prototype {late}: its source is training sample .* 2 samples; review "
                                          r"with the data the model was trained on \(e.g. --data-arg num_train="):
        review.prototype_png(late)


def test_data_that_does_not_fit_the_model_is_refused(trained, tmp_path) -> None:
    with pytest.raises(ReviewError, match=r"built for spatial_dims=2, the data has spatial_dims=3"):
        session(trained, "cbm", tmp_path / "c.yaml", data_overrides={"spatial_dims": 3, "image_size": 16})


def test_3d_views_cut_through_the_evidence_peak_and_the_lesion_centre_or_show_three_planes() -> None:
    image = np.zeros((1, 8, 10, 12), dtype=np.float32)
    evidence = np.zeros((8, 10, 12), dtype=np.float32)
    evidence[2, 3, 4] = 1.0
    mask = np.zeros((1, 8, 10, 12), dtype=np.float32)
    mask[0, 5:8, 6:9, 2:5] = 1.0  # centre (6, 7, 3)
    views = render.sample_views(image, evidence, mask)
    assert [v.caption for v in views] == ["evidence peak: axial slice 2", "lesion centre: axial slice 6"]
    assert views[0].overlay.shape == (10, 12, 3) and views[0].overlay.dtype == np.uint8
    assert (views[1].image[7, 3] == 0).all() and (views[1].image[6, 2] == render.OUTLINES["mask"]).all()
    planes = render.sample_views(image, evidence, None)
    assert [v.caption for v in planes] == ["evidence peak: axial slice 2", "evidence peak: coronal slice 3",
                                           "evidence peak: sagittal slice 4"]
    assert [v.image.shape[:2] for v in planes] == [(10, 12), (8, 12), (8, 10)]
    assert [v.caption for v in render.sample_views(image[:, 0], evidence[0], mask[:, 0])] == [""]


# ------------------------------------------------------------------------------------------------- server
@pytest.fixture
def served(trained, tmp_path) -> Iterator[ReviewServer]:
    server = ReviewServer(session(trained, "cbm", tmp_path / "corrections.yaml"), 0, quiet=True)
    server.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(server: ReviewServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def post(server: ReviewServer, path: str, value: object) -> tuple[int, str, bytes]:
    return request(server, "POST", path, json.dumps(value).encode(), {"Content-Type": "application/json"})


def test_the_server_listens_on_loopback_and_answers_json_or_one_json_error(served) -> None:
    assert served.server_address[0] == "127.0.0.1"
    status, kind, body = request(served, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b"pellucid review" in body
    status, _, body = request(served, "GET", "/api/info")
    assert status == 200 and json.loads(body)["model"] == "cbm"
    status, _, body = post(served, "/api/predict", {"index": 0, "interventions": {"diameter_mm": 10}})
    assert status == 200 and json.loads(body)["interventions"] == {"diameter_mm": 10.0}
    answers = {
        "unknown concept": post(served, "/api/predict", {"index": 0, "interventions": {"x": 1}}),
        "unknown field": post(served, "/api/predict", {"index": 0, "sample": 1}),
        "page out of range": request(served, "GET", "/api/samples?offset=99"),
        "not an integer": request(served, "GET", "/api/samples?count=ten"),
        "form post": request(served, "POST", "/api/predict", b"index=0",
                             {"Content-Type": "application/x-www-form-urlencoded"}),
        "invalid JSON": request(served, "POST", "/api/predict", b"{index", {"Content-Type": "application/json"}),
        "prototype of a cbm": request(served, "GET", "/api/prototype/0.png"),
        "mark here on a cbm": post(served, "/api/mark_activation", {"index": 0, "prototype": 0, "mark": "keep"}),
        "mark here without mark": post(served, "/api/mark_activation", {"index": 0, "prototype": 0}),
        "mark here, unknown field": post(served, "/api/mark_activation", {"index": 0, "patch": 0, "mark": None}),
    }
    for what, (status, kind, body) in answers.items():
        assert (status, kind) == (400, "application/json"), what
        error = json.loads(body)["error"]
        assert error and "Traceback" not in error and "\n" not in error, what
    status, _, body = request(served, "GET", "/api/nothing")
    assert status == 404 and "no such page" in json.loads(body)["error"]
    status, _, body = request(served, "GET", "/api/info", headers={"Host": "attacker.example:80"})
    assert status == 403 and "refused" in json.loads(body)["error"]


def test_the_page_loads_nothing_from_elsewhere() -> None:
    page = page_html().decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//|fonts\.googleapis|\bcdn[\w-]*\.", page, re.IGNORECASE)


def test_the_command_refuses_a_bad_port_and_is_dispatched_by_pellucid(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["review", "--ckpt", "x.ckpt", "--data", "d.yaml", "--port", "70000"])
    assert "--port: expected 0..65535, got 70000" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ browser
def test_the_page_in_headless_chromium_shows_predictions_intervenes_and_saves_forbidden_prototypes_and_patches(
        trained, tmp_path) -> None:
    problem = browser_problem()
    if problem:
        pytest.skip(problem)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    corrections, patches = tmp_path / "corrections.yaml", tmp_path / "patches.yaml"
    servers = [ReviewServer(session(trained, name, corrections if name == "protopnet" else tmp_path / "c.yaml"),
                            0, quiet=True) for name in ("cbm", "protopnet")]
    servers.append(ReviewServer(session(trained, "protopnet", patches, split="train"), 0, quiet=True))
    for server in servers:
        server.start()
    try:
        with headless_chromium() as driver:
            # the concept model: predictions, then an intervention changes the shown prediction
            driver.get(servers[0].url)
            wait_for(lambda: page_ready(driver), what="the cbm page")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#sample-table tbody tr")) == 6
            bars = driver.find_element(By.ID, "prediction").text
            assert "predicted" in bars and driver.find_elements(By.CSS_SELECTOR, "img.evidence")
            field = driver.find_element(By.CSS_SELECTOR, "input[data-concept='diameter_mm']")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys("40", Keys.TAB)
            wait_for(lambda: driver.find_elements(By.ID, "without-interventions"), what="the intervention")
            after = driver.find_element(By.ID, "prediction").text
            assert after != bars and driver.find_element(By.CSS_SELECTOR, "tr.set").text.startswith("diameter_mm")
            origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert all(name.startswith(servers[0].url) or name.startswith("data:") for name in origins), origins

            # the prototype model: mark prototype 2 forbidden with a note, in the page
            driver.get(servers[1].url)
            wait_for(lambda: page_ready(driver), what="the protopnet page")
            wait_for(lambda: driver.execute_script(
                "return [...document.querySelectorAll('#prototype-cards img.source')].every(i => i.complete && "
                "i.naturalWidth > 0)"), what="the source patches")
            driver.find_element(By.CSS_SELECTOR, "[data-note='2']").send_keys("corner marker")
            driver.find_element(By.CSS_SELECTOR, "#prototype-cards [data-prototype='2'][data-mark='forbid']").click()
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "[data-card='2'].forbid"), what="the mark")
            assert "source patches: 1 forbidden" in driver.find_element(By.ID, "status").text
            # on the test split a patch where a prototype activates cannot be marked: the buttons say why
            here = driver.find_element(By.CSS_SELECTOR, "#similar button[data-here][data-mark='forbid']")
            assert not here.is_enabled() and "--split train" in here.get_attribute("title")

            # reviewing the training split: "forbid here" on the first similar prototype of sample 0
            driver.get(servers[2].url)
            wait_for(lambda: page_ready(driver), what="the protopnet page on the training split")
            here = driver.find_element(By.CSS_SELECTOR, "#similar button[data-here][data-mark='forbid']")
            prototype = int(here.get_attribute("data-here"))
            driver.find_element(By.CSS_SELECTOR, f"[data-here-note='{prototype}']").send_keys("fires on the marker")
            here.click()
            wait_for(lambda: driver.execute_script(  # read in the page: the card's actions are redrawn on a mark
                f"return document.querySelector(\"[data-here-state='{prototype}']\").textContent") == "forbidden here",
                what="the mark here")
            assert "1 patch where a prototype activates: 1 forbidden" in driver.find_element(By.ID, "status").text
            assert driver.find_elements(By.CSS_SELECTOR, f"#similar [data-similar='{prototype}'] .peak.forbid .box")
            assert "1 forbidden" in driver.find_element(By.CSS_SELECTOR, f"[data-here-count='{prototype}']").text
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    saved = read_corrections(corrections)
    assert [(c.prototype, c.mark, c.note) for c in saved.corrections] == [(2, "forbid", "corner marker")]
    assert saved.corrections[0].source["sample_id"] == servers[1].session.provenance[2]["sample_id"]
    (patch,) = read_corrections(patches, num_prototypes=6, spatial_dims=2).corrections
    assert (patch.prototype, patch.where, patch.mark, patch.note) == (prototype, "activation", "forbid",
                                                                      "fires on the marker")
    assert patch.source == servers[2].session.activation_patch(0, prototype)
