"""`segpipe models` and `segpipe demo`: what a newcomer runs first.

The demo is the real pipeline on a generated dataset, all on this machine: `synth` writes a team's own
data (images/, masks/ and classes.yaml of 4 defect classes; `--layout voc`: PASCAL VOC's layout and 21
classes), `retrain` prepares it with Ray Data, searches two architectures with Ray Tune (each trial a Ray
Train run), selects an ensemble, registers it and promotes it, then Ray Serve serves the champion and
real HTTP requests segment a few validation images.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.report import format_table

# Tiny CPU settings per architecture for demos and tests; same architectures, fewer channels.
TINY_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "fcn32s": {"width": 0.125},
    "fcn16s": {"width": 0.125},
    "fcn8s": {"width": 0.125},
    "deconvnet": {"width": 0.125},
    "deeplab_largefov": {"width": 0.125},
    "dilation": {"width": 0.125, "context": "basic"},
    "unet": {"width": 0.125, "padding": "same"},
    "pspnet": {"backbone": "resnet18"},
}


def model_table(size: tuple[int, int] = (512, 512), num_classes: int = 21, width: float = 1.0) -> list[dict]:
    """Build each architecture, run one forward pass at `size`, count parameters and GMACs."""
    import torch

    import segmodels
    from segmodels.complexity import count_gmacs, count_params

    rows = []
    for name in segmodels.MODELS:
        kwargs = {"width": width} if width != 1.0 and "width" in TINY_MODEL_ARGS[name] else {}
        model = segmodels.build_model(name, num_classes, **kwargs).eval()
        started = time.perf_counter()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *size))
        seconds = time.perf_counter() - started
        if tuple(out.shape) != (1, num_classes, *size):
            raise RuntimeError(f"{name} returned {tuple(out.shape)} for a {size} input")
        rows.append(
            {
                "model": name,
                "params_m": count_params(model) / 1e6,
                "gmacs": count_gmacs(model, size),
                "forward_s": seconds,
                "args": kwargs,
            }
        )
        del model
    return rows


def print_model_table(rows: list[dict], size: tuple[int, int]) -> None:
    print(f"Models at input 1x3x{size[0]}x{size[1]} (one CPU forward pass each):")
    print(
        format_table(
            ["model", "params (M)", "GMACs", "forward (s)"],
            [
                [r["model"], round(r["params_m"], 2), round(r["gmacs"], 1), round(r["forward_s"], 2)]
                for r in rows
            ],
        )
    )


DEMO_LAYOUTS = ("folder", "voc")
# The val mIoU a newcomer should see the champion reach on the default demo (`make demo`): shapes that
# are visibly segmented and mostly given their own class. The 4 defect classes of the `folder` layout are
# learnt to ~0.9 in 6 epochs; VOC's 21 classes (`--layout voc`) need far more than the demo's minutes.
DEMO_TARGET_MIOU = 0.5


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = "demo"
    epochs: int = 6
    trials: int = 2  # per architecture
    num_train: int = 64
    num_val: int = 16
    port: int = 8000
    keep_serving: bool = False
    layout: str = "folder"  # folder (images/ + masks/ + classes.yaml: the own-data path) | voc

    def __post_init__(self) -> None:
        if self.layout not in DEMO_LAYOUTS:
            raise UserError(f"--layout {self.layout!r}: choose one of {', '.join(DEMO_LAYOUTS)}")
        if self.epochs < 1 or self.trials < 1:
            raise UserError(f"--epochs and --trials must be >= 1, got {self.epochs} and {self.trials}")
        if self.num_train < 8 or self.num_val < 4:
            raise UserError(
                f"--num-train {self.num_train} --num-val {self.num_val}: the demo needs at least 8 training "
                "images (two batches) and 4 val images (it segments 4 over HTTP)"
            )
        if not 0 < self.port < 65536:
            raise UserError(f"--port {self.port} is not a TCP port (1-65535)")


def demo_retrain_config(cfg: DemoConfig, source: Path, work: Path) -> dict[str, Any]:
    """A `segpipe retrain` config for the generated dataset: two architectures, tiny widths, ASHA."""
    base = {
        "crop": 64,
        "batch_size": 4,
        "epochs": cfg.epochs,
        "optimizer": "adamw",
        "lr_policy": "fixed",
        "scale_min": 0.75,
        "scale_max": 1.25,
        "num_overlays": 4,
        "cpus_per_worker": 1.0,
    }
    return {
        "name": "demo",
        "source": {"dataset": cfg.layout, "root": str(source)},
        "prepared": str(work / "prepared"),
        "storage": str(work / "ray_results"),
        "tracking_uri": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "experiment": "segpipe-demo",
        "register_as": "segpipe-demo",
        "crf": True,
        "crf_grid": "small",  # 18 settings, not DeepLab's 54: the demo's minutes go to training
        "search": {
            "num_samples": cfg.trials,
            "max_concurrent": 1,
            "grace_period": 2,
            "reduction_factor": 2,
            "architectures": {
                "unet": {
                    "base": {**base, "model_args": TINY_MODEL_ARGS["unet"]},
                    "space": {"lr": {"loguniform": [1e-3, 5e-3]}},
                },
                "pspnet": {
                    "base": {**base, "model_args": TINY_MODEL_ARGS["pspnet"]},
                    "space": {"lr": {"loguniform": [5e-4, 2e-3]}},
                },
            },
        },
    }


def post_image(url: str, path: Path, query: str = "") -> bytes:
    content_type = "image/png" if path.suffix == ".png" else "image/jpeg"
    request = urllib.request.Request(
        f"{url}/v1/segment{query}",
        data=path.read_bytes(),
        method="POST",
        headers={"Content-Type": content_type},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return reply.read()


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole mission on this machine; returns what it printed as data (for tests)."""
    import yaml

    from pipelines.data.synth import SynthConfig, synthesize
    from pipelines.jobs.retrain import load_retrain, retrain
    from pipelines.runtime import ensure_ray
    from pipelines.serve import ServeConfig, start_server, stop_server

    started = time.perf_counter()
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    what = {
        "voc": "a PASCAL VOC-layout dataset",
        "folder": "an own-data folder (images/, masks/, classes.yaml)",
    }
    print(f"[segpipe demo] 1/4 generating {what[cfg.layout]} in {work / cfg.layout}")
    source = synthesize(
        SynthConfig(
            layout=cfg.layout,
            out=str(work / cfg.layout),
            num_train=cfg.num_train,
            num_val=cfg.num_val,
            seed=0,
        )
    )
    config_file = work / "retrain-demo.yaml"
    config_file.write_text(yaml.safe_dump(demo_retrain_config(cfg, source, work), sort_keys=False))
    print(
        f"[segpipe demo] 2/4 retraining: prepare -> tune (unet, pspnet) -> ensemble -> promote ({config_file})"
    )
    ensure_ray()
    retrain_cfg = load_retrain(str(config_file))
    result = retrain(retrain_cfg)
    print(f"[segpipe demo] 3/4 serving {result['champion']} with Ray Serve")
    url = start_server(
        ServeConfig(
            model_uri=result["champion"], tracking_uri=retrain_cfg.tracking_uri, port=cfg.port, max_replicas=1
        )
    )
    try:
        print("[segpipe demo] 4/4 segmenting validation images over HTTP")
        overlays = work / "overlays"
        overlays.mkdir(exist_ok=True)
        images = val_images(cfg.layout, source)[:4]
        answers = []
        for image in images:
            answers.append(json.loads(post_image(url, image, "?format=json")))
            (overlays / f"{image.stem}-overlay.jpg").write_bytes(post_image(url, image, "?format=overlay"))
            (overlays / f"{image.stem}-mask.png").write_bytes(post_image(url, image))
        summary = summarise(result, answers, url, work, overlays, time.perf_counter() - started)
        if cfg.keep_serving:
            print(f"\nServing at {url} (open it in a browser); Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    finally:
        stop_server()
    return summary


def val_images(layout: str, source: Path) -> list[Path]:
    """The generated dataset's validation images, in file order."""
    if layout == "folder":
        return sorted((source / "images" / "val").iterdir())
    voc = source / "VOCdevkit" / "VOC2012"
    val_ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return [voc / "JPEGImages" / f"{image_id}.jpg" for image_id in val_ids]


def summarise(
    result: dict[str, Any], answers: list[dict], url: str, work: Path, overlays: Path, seconds: float
) -> dict[str, Any]:
    steps = result["steps"]
    tune = steps["tune"]["output"]["best"]
    ensemble = steps["ensemble"]["output"]
    print("\nBest trial per architecture (val mIoU):")
    print(
        format_table(
            ["architecture", "best trial's model", "val mIoU"],
            [[arch, uri, ensemble["candidates"].get(uri, 0.0)] for arch, uri in tune.items()],
        )
    )
    m = ensemble["metrics"]
    print("\nEnsemble (registered as challenger):")
    print(
        format_table(
            ["members", "mIoU", "pixel acc", "mean acc", "fwIoU", "CRF"],
            [
                [
                    len(ensemble["members"]),
                    m["miou"],
                    m["pixel_acc"],
                    m["mean_acc"],
                    m["fwiou"],
                    "yes" if ensemble["crf"] else "no",
                ]
            ],
        )
    )
    print(f"\nPromotion: {result['reason']}")
    promote = steps["promote"]["output"]
    kept = not promote["promoted"] and promote["champion"]["miou"] is not None
    champion_miou = promote["champion" if kept else "challenger"]["miou"]
    verdict = "met" if champion_miou >= DEMO_TARGET_MIOU else "NOT met: more --epochs or --num-train"
    print(
        f"Champion:  {result['champion']} (version {result['champion_version']}): val mIoU "
        f"{champion_miou:.3f} (target >= {DEMO_TARGET_MIOU}: {verdict})"
    )
    print(format_table(["step", "seconds"], [[s, round(v["seconds"], 1)] for s, v in steps.items()]))
    print(f"\nEndpoint:  {url}  (POST /v1/segment, GET /v1/model, GET / for the upload page)")
    print(f"Answers:   {[sorted(a.get('classes_present', []))[:4] for a in answers]}")
    print(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    print(f"Overlays:  open {overlays}/*-overlay.jpg (the endpoint's answers on 4 val images, with a legend)")
    print("           and, in the MLflow UI, each training run's overlays/ and confusion matrix artifacts")
    print(f"Demo took {seconds:.0f} s")
    return {
        "url": url,
        "seconds": seconds,
        "retrain": result,
        "answers": answers,
        "overlays": str(overlays),
        "champion_miou": champion_miou,
        "target_miou": DEMO_TARGET_MIOU,
    }
