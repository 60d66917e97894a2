"""`segpipe predict`: every output format, quarantine, resume, the CRF on float16 probabilities, s3:// in and
out, the official Cityscapes evaluator scoring `--format cityscapes` output exactly as `segpipe evaluate`
scores the same split; where model actors run (GPUs, CPUs) and how images are batched into forward passes."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import runtime, storage
from pipelines.cli import main
from pipelines.data.layouts.cityscapes import CITYSCAPES_CLASSES, TRAIN_LABELS
from pipelines.data.layouts.voc import VOC_CLASSES
from pipelines.errors import UserError
from pipelines.inference.core import (
    PIXEL_BUDGET,
    InferenceSettings,
    crf_params,
    input_padding,
    labels_in_passes,
    pixel_batches,
    predict_image,
)
from pipelines.inference.predict import VOC_RESULTS, PredictConfig, crf_batch, predict, ragged
from segmodels.artifact import load_model_dir
from segmodels.crf import CRFParams, dense_crf

VOC_PALETTE = [[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(21)]
SIZES = {"a.jpg": (40, 52), "nested/b.png": (40, 52), "nested/deeper/c.png": (33, 61)}


def write_inputs(root: Path) -> dict[str, np.ndarray]:
    """Three readable images of two sizes, one corrupt file, one over the pixel limit, one non-image."""
    rng = np.random.default_rng(1)
    images = {}
    for rel, (h, w) in SIZES.items():
        images[rel] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[rel]).save(root / rel, quality=95)
        images[rel] = np.asarray(Image.open(root / rel).convert("RGB"))  # what the JPEG decodes to
    Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(root / "huge.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (root / "README.txt").write_text("not an image, not an input")
    return images


def expected(folder: Path, image: np.ndarray) -> np.ndarray:
    return predict_image(load_model_dir(folder), image, InferenceSettings()).argmax(0)


def test_formats_quarantine_and_resume(
    ray_session, model_folder, tmp_path, capsys, monkeypatch, tricky_images
):
    folder = model_folder(VOC_CLASSES, VOC_PALETTE)
    src = tmp_path / "in"
    images = write_inputs(src)
    for name, (data, _) in tricky_images.items():
        (src / "tricky" / name).parent.mkdir(exist_ok=True)
        (src / "tricky" / name).write_bytes(data)
    out = tmp_path / "png"
    args = ["predict", "--model-uri", str(folder), "--input", str(src), "--out", str(out)]
    assert main([*args, "--max-pixels", "5000", "--json-out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["written"], result["skipped"], result["quarantined"]) == (3 + len(tricky_images), 0, 2)
    inputs = 5 + len(tricky_images)  # not on a terminal: a plain progress line, the last at 100 %
    assert f"predict: {inputs}/{inputs} images (100%), " in capsys.readouterr().err
    for rel, image in images.items():
        png = Image.open(out / Path(rel).with_suffix(".png"))
        assert png.mode == "P" and png.size == image.shape[1::-1]
        np.testing.assert_array_equal(np.asarray(png), expected(folder, image))
    # 16-bit grey, EXIF-rotated, CMYK and transparent-palette inputs: the masks the pyfunc model gives for
    # the same bytes, in the orientation a viewer shows (tests/pipelines/serve: the same through HTTP).
    import mlflow
    import pandas as pd

    from pipelines import tracking

    pyfunc = mlflow.pyfunc.load_model(str(tracking.save_pyfunc(folder, tmp_path / "pyfunc")))
    frame = pyfunc.predict(pd.DataFrame({"image": [data for data, _ in tricky_images.values()]}))
    for (name, (_, shape)), mask in zip(tricky_images.items(), frame["mask"], strict=True):
        written = np.asarray(Image.open(out / "tricky" / Path(name).with_suffix(".png")))
        assert written.shape == shape
        np.testing.assert_array_equal(written, np.asarray(Image.open(io.BytesIO(mask))), err_msg=name)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    reasons = {Path(q["path"]).stem: q["reason"] for q in quarantine}
    assert reasons.keys() == {"huge", "broken"}
    assert reasons["huge"].startswith("oversized") and "--max-pixels" in reasons["huge"]
    assert reasons["broken"].startswith("unreadable image")
    legend = json.loads((out / "classes.json").read_text())["classes"]
    assert [(c["name"], c["color"]) for c in legend] == [
        (n, list(c)) for n, c in zip(VOC_CLASSES, VOC_PALETTE, strict=True)
    ]

    # Resumable: a second run writes nothing new and leaves the outputs as they were.
    before = (out / "a.png").stat().st_mtime_ns
    (out / "nested/deeper/c.png").unlink()
    again = predict(PredictConfig(model_uri=str(folder), input=str(src), out=str(out), max_pixels=5000))
    assert (again["written"], again["skipped"], again["quarantined"]) == (1, 2 + len(tricky_images), 2)
    assert (out / "a.png").stat().st_mtime_ns == before and (out / "nested/deeper/c.png").is_file()
    shutil.rmtree(src / "tricky")  # the other formats on the plain inputs

    master, slave = pty.openpty()  # on a terminal: one line redrawn in place, then a newline
    with os.fdopen(slave, "w") as terminal, monkeypatch.context() as patched:
        patched.setattr(sys, "stderr", terminal)
        voc = predict(
            PredictConfig(model_uri=str(folder), input=str(src), out=str(tmp_path / "voc"), format="voc")
        )
        drawn = b""
        while select.select([master], [], [], 0.2)[0]:
            drawn += os.read(master, 65536)
    os.close(master)
    assert voc["written"] == 4  # without a pixel limit, huge.png is segmented too
    # Redrawn in place (\r, clear to the end of the line); Ray relays its workers' output to the same
    # stderr, so the one-newline rule is checked in tests/pipelines/test_progress.py.
    assert b"\rpredict: 5/5 images (100%), " in drawn and b"\x1b[K" in drawn  # (broken.jpg: quarantined)
    assert not re.search(rb"(^|\n)predict: ", drawn)  # no plain log lines on a terminal
    got = np.asarray(Image.open(tmp_path / "voc" / VOC_RESULTS / "c.png"))
    np.testing.assert_array_equal(got, expected(folder, images["nested/deeper/c.png"]))

    # (parquet: tests/pipelines/inference/test_predict.py::test_s3_in_and_out)
    overlay = tmp_path / "overlay"
    predict(PredictConfig(model_uri=str(folder), input=str(src), out=str(overlay), format="overlay"))
    assert Image.open(overlay / "a.png").mode == "RGB" and Image.open(overlay / "a.png").size == (52, 40)

    # The benchmark formats refuse a model of other classes instead of writing meaningless ids.
    assert main([*args[:-1], str(tmp_path / "cs"), "--format", "cityscapes"]) == 2
    assert "needs a model of the 19 cityscapes classes" in capsys.readouterr().err

    # The CRF refines the float16 probabilities the model actors send, one task per image.
    crf = tmp_path / "crf"
    assert main([*args[:-1], str(crf), "--crf", "--max-pixels", "5000"]) == 0
    model = load_model_dir(folder)
    params = crf_params(model.spec.crf, {})
    for rel, image in images.items():
        probs = predict_image(model, image, InferenceSettings()).astype(np.float16)
        got = np.asarray(Image.open(crf / Path(rel).with_suffix(".png")))
        np.testing.assert_array_equal(got, dense_crf(image, probs, params).argmax(0))

    # More GPUs than the cluster has: exit 2 naming the option, before any work.
    assert main([*args[:-1], str(tmp_path / "gpu"), "--num-gpus", "2"]) == 2
    assert "--num-gpus 2 but the Ray cluster has 0 GPUs" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


def test_an_image_whose_crf_needs_more_than_a_node_has_is_quarantined():
    batch = {
        "image": ragged([np.zeros((4, 5, 3), np.uint8)]),
        "probs": ragged([np.full((2, 4, 5), 0.5, np.float16)]),
        "error": np.array([""]),
    }
    out = crf_batch(batch, CRFParams(), memory_limit=2**20)
    assert out["error"][0].startswith("oversized for --crf") and "predict it without --crf" in out["error"][0]


def test_model_actors_go_on_gpus_when_the_cluster_has_them(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: 16)
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 2.0)
    auto = runtime.model_actors()
    assert (auto.device, auto.slots, auto.options) == ("cuda", 2, {"num_cpus": 1, "num_gpus": 1.0})
    shared = runtime.model_actors(0.25)
    assert (shared.device, shared.slots, shared.options["num_gpus"], shared.threads(8)) == (
        "cuda",
        8,
        0.25,
        1,
    )
    cpu = runtime.model_actors(0)  # CPUs on request: one core left to the read and write tasks
    assert (cpu.device, cpu.slots, cpu.options, cpu.threads(5)) == ("cpu", 15, {"num_cpus": 1}, 3)
    with pytest.raises(UserError, match="--num-gpus 1.5: give 0"):
        runtime.model_actors(1.5)
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 0.0)
    assert runtime.model_actors().device == "cpu"
    with pytest.raises(UserError, match="--tune-gpus 0.5 but the Ray cluster has 0 GPUs"):
        runtime.model_actors(0.5, option="--tune-gpus")


def test_evaluate_num_gpus_beyond_the_cluster_exits_2(ray_session, prepared_voc, capsys):
    args = ["evaluate", "--model-uri", "models:/not-fetched/1", "--data", prepared_voc, "--num-gpus", "0.5"]
    assert main(args) == 2
    assert "--num-gpus 0.5 but the Ray cluster has 0 GPUs" in capsys.readouterr().err


def test_pixel_batches_keep_sizes_apart_and_passes_within_the_budget(model_folder):
    shapes = [(10, 10, 3), (20, 10, 3), (10, 10, 3), (10, 10, 3), (20, 10, 3)]
    assert pixel_batches(shapes, budget=10**6) == [[0, 2, 3], [1, 4]]
    assert pixel_batches(shapes, budget=250) == [[0, 2], [3], [1], [4]]
    assert pixel_batches(shapes, budget=1) == [[0], [2], [3], [1], [4]]  # over the budget: alone
    assert pixel_batches(shapes, budget=1800, pad=10) == [[0, 2], [3], [1], [4]]  # 30x30 and 40x30 seen
    assert pixel_batches(shapes, budget=800, scale=2.0) == [[0, 2], [3], [1], [4]]
    # With FCN's pad a Cityscapes image is 2.75 Mpx (one per forward pass), a VOC image 0.4 Mpx (nine).
    assert pixel_batches([(1024, 2048, 3)] * 2, PIXEL_BUDGET, pad=100) == [[0], [1]]
    assert pixel_batches([(375, 500, 3)] * 12, PIXEL_BUDGET, pad=100) == [list(range(9)), [9, 10, 11]]
    fcn = load_model_dir(model_folder(VOC_CLASSES, VOC_PALETTE, archs=("fcn8s", "deeplab_largefov")))
    assert input_padding(fcn) == 100
    model = load_model_dir(model_folder(VOC_CLASSES, VOC_PALETTE, name="other"))
    assert input_padding(model) == 0

    # Evaluate's actors: same-size images share a forward pass, each gets the labels it gets alone.
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 52), (33, 61), (40, 52), (40, 52)]
    ]
    passes = []
    hook = model.ensemble.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    for settings in (InferenceSettings(), InferenceSettings(crf=True, crf_params={"iterations": 2})):
        passes.clear()
        ids = [str(i) for i in range(len(images))]
        got = dict(labels_in_passes(model, images, settings, ids))
        assert passes == [3, 1]  # two sizes: two passes, not four
        assert sorted(got) == [0, 1, 2, 3]
        for i, image in enumerate(images):
            assert got[i].dtype == torch.int64 and got[i].shape == image.shape[:2]
            assert torch.equal(got[i], torch.from_numpy(predict_image(model, image, settings).argmax(0)))
    hook.remove()


def test_s3_in_and_out(ray_session, model_folder, s3, tmp_path, mlflow_uri, downloads_removed):
    """s3:// in and out, with the model from a run (`runs:/...`): its download is removed afterwards."""
    from pipelines import tracking

    folder = model_folder(VOC_CLASSES, VOC_PALETTE)
    client = tracking.connect(mlflow_uri)
    run_id, _ = tracking.start_or_resume_run(client, "predict", "model")
    run_uri = tracking.log_model_folder(client, run_id, folder)
    images = write_inputs(tmp_path / "in")
    for path in (tmp_path / "in").rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{s3}/in/{path.relative_to(tmp_path / 'in').as_posix()}", path.read_bytes())
    cfg = PredictConfig(
        model_uri=run_uri,
        input=f"{s3}/in",
        out=f"{s3}/out",
        max_pixels=5000,
        tracking_uri=mlflow_uri,
        format="parquet",  # (png and the other formats: test_formats_quarantine_and_resume)
    )
    result = predict(cfg)
    assert (result["written"], result["quarantined"]) == (3, 2)
    listed = storage.list_files(f"{s3}/out")
    parts = sorted(name for name in listed if name.endswith(".parquet"))
    assert set(listed) == {*parts, "quarantine.jsonl", "classes.json"} and parts
    table = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(f"{s3}/out/{p}"))) for p in parts])
    rows = table.to_pandas().set_index("image_id")
    assert set(rows.index) == {"a", "nested/b", "nested/deeper/c"}
    row = rows.loc["nested/deeper/c"]
    assert (row["height"], row["width"]) == (33, 61)
    mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
    np.testing.assert_array_equal(mask, expected(folder, images["nested/deeper/c.png"]))
    resumed = predict(cfg)  # the parts already written list what is done
    assert (resumed["written"], resumed["skipped"]) == (0, 3)


@pytest.mark.slow
def test_cityscapes_output_scores_the_same_with_the_official_evaluator(ray_session, model_folder, tmp_path):
    """cityscapesScripts' evalPixelLevelSemanticLabeling on `--format cityscapes` output == segpipe evaluate."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize
    from pipelines.inference.evaluate import EvalConfig, evaluate

    root = synthesize(SynthConfig(layout="cityscapes", out=str(tmp_path / "cs"), num_train=1, num_val=6))
    prepared = str(tmp_path / "prepared")
    prepare(PrepareConfig(dataset="cityscapes", root=str(root), out=prepared, splits=("val",)))
    palette = [list(label.color) for label in TRAIN_LABELS]
    folder = model_folder(CITYSCAPES_CLASSES, palette, archs=("fcn8s",), seed=3)
    results = tmp_path / "results"
    written = predict(
        PredictConfig(model_uri=str(folder), input=f"{prepared}:val", out=str(results), format="cityscapes")
    )
    assert written["written"] == 6
    ours = evaluate(EvalConfig(model_uri=str(folder), data=prepared, split="val"))["metrics"]["miou"]

    args = cs_eval.args
    args.cityscapesPath, args.predictionPath, args.predictionWalk = str(root), str(results), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    ground_truth = sorted(str(p) for p in (root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    predictions = [cs_eval.getPrediction(args, gt) for gt in ground_truth]
    scores = cs_eval.evaluateImgLists(predictions, ground_truth, args)
    official = scores["averageScoreClasses"]
    print(f"\nmIoU: cityscapesScripts {official:.4f}, segpipe evaluate {ours:.4f}")
    assert official == pytest.approx(ours, abs=0.005)
