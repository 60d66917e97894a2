"""Batch inference stage: segment a folder, an s3:// prefix or a prepared split, and write the masks.

Ray Data streams the images: read bytes -> decode (CPU tasks) -> model (an actor pool, the model loaded once
per actor, on GPUs when the cluster has them, same-size images batched within a pixel budget; uint8 labels,
or float16 probabilities for the CRF, leave it) -> dense CRF (one Ray task per image holding a whole CPU and
the memory its CRF needs, when asked) -> encode and write (CPU tasks). Blocks move on as soon as they are ready, so memory stays bounded however many images
there are. Unreadable or oversized inputs are listed in DST/quarantine.jsonl with the reason and the rest
is written; an input whose output already exists is skipped, so a re-run resumes. DST/classes.json names
each class index with its colour (the model's classes, from the dataset it was trained on).

Formats (`FORMATS`): `png` palette masks named after the input (relative paths kept); `overlay` the
prediction painted over the image; `parquet` (image_id, mask PNG bytes, height, width); `voc` the PASCAL
VOC evaluation server's `results/VOC2012/Segmentation/comp6_test_cls/<id>.png`; `cityscapes` the
benchmark's label ids (not train ids) in `<city>_<seq>_<frame>_labelIds.png`, as cityscapesScripts reads.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings
from pipelines.inference.proposals import check_covered

FORMATS = ("png", "overlay", "parquet", "voc", "cityscapes")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
VOC_RESULTS = "results/VOC2012/Segmentation/comp6_test_cls"
CITYSCAPES_NAME = re.compile(r"(?P<city>[^/_]+(?:_[^/_]+)*?)_(?P<seq>\d{6})_(?P<frame>\d{6})")
QUARANTINE = "quarantine.jsonl"
LEGEND = "classes.json"  # what the masks' indices and the overlays' colours mean
SPLIT_INPUT = re.compile(r"^(?P<root>.+):(?P<split>[A-Za-z0-9_.-]+)$")  # DST_PREPARED:val


@dataclass(frozen=True)
class PredictConfig:
    model_uri: str
    input: str  # folder, s3:// prefix or PREPARED:SPLIT
    out: str  # folder or s3:// prefix
    format: str = "png"
    settings: InferenceSettings = InferenceSettings()
    batch_size: int = 4  # images per model call (same-size images share a forward pass, within PIXEL_BUDGET)
    concurrency: int = 0  # model actors; 0 = as many as the cluster holds (`model_actors`)
    num_gpus: float | None = None  # per model actor; None = one each when the cluster has GPUs, else CPUs
    max_pixels: int = 50_000_000  # larger inputs are quarantined, not decoded
    max_bytes: int = 100 << 20  # larger files are quarantined, not read
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.batch_size < 1 or self.concurrency < 0:
            raise UserError("--batch-size must be >= 1 and --concurrency >= 0")


def target_for(image_id: str, fmt: str) -> str:
    """Where an input's prediction goes, relative to DST ("" for parquet, which has no file per image)."""
    if fmt in ("png", "overlay"):
        return f"{image_id}.png"
    if fmt == "voc":
        return f"{VOC_RESULTS}/{posixpath.basename(image_id)}.png"
    if fmt == "cityscapes":
        match = CITYSCAPES_NAME.search(posixpath.basename(image_id))
        if match is None:
            raise ValueError(
                f"{image_id!r} is not named <city>_<seq>_<frame>*, which the Cityscapes format needs"
            )
        return f"{match['city']}_{match['seq']}_{match['frame']}_labelIds.png"
    return ""


def check_format(spec, fmt: str) -> None:
    """The benchmark formats are only meaningful for models of that benchmark's classes."""
    from pipelines.data.layouts.cityscapes import CITYSCAPES_CLASSES
    from pipelines.data.layouts.voc import VOC_CLASSES

    wanted = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}.get(fmt)
    if wanted is not None and tuple(spec.classes) != tuple(wanted):
        raise UserError(
            f"--format {fmt} needs a model of the {len(wanted)} {fmt} classes, but this one predicts "
            f"{spec.num_classes} ({', '.join(spec.classes[:4])}...): use --format png"
        )


def existing_outputs(out: str, fmt: str) -> set[str]:
    """Image ids (parquet) or relative paths (other formats) already written under DST."""
    files = storage.list_files(out)
    if fmt != "parquet":
        return set(files)
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(out)
    done: set[str] = set()
    for rel in files:
        if rel.endswith(".parquet"):
            table = pq.read_table(posixpath.join(root, rel), columns=["image_id"], filesystem=fs)
            done.update(table.column("image_id").to_pylist())
    return done


def is_done(image_id: str, fmt: str, done: set[str]) -> bool:
    if fmt == "parquet":
        return image_id in done
    try:
        return target_for(image_id, fmt) in done
    except ValueError:
        return False  # misnamed: the writer quarantines it


# ---------------------------------------------------------------------------------------------- stages
def decode_batch(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """bytes -> uint8 H,W,3 images; an input that cannot be decoded keeps an empty image and its reason."""
    from pipelines.images import ImageError, decode_image

    images, errors = [], []
    for data in batch["bytes"]:
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
            errors.append("")
        except Exception as err:  # any undecodable input is quarantined instead of failing the whole job
            images.append(np.zeros((1, 1, 3), np.uint8))
            if isinstance(err, ImageError) and err.kind == "too_large":
                errors.append(f"oversized: {err} (raise --max-pixels)")
            else:
                errors.append(f"unreadable image: {err}")
    return {**without(batch, "bytes"), "image": ragged(images), "error": np.array(errors)}


def without(batch: dict[str, np.ndarray], *columns: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k not in columns}


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays (numpy would stack same-shape arrays into one block otherwise)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):  # one by one: a slice assignment would broadcast same-shape arrays
        out[i] = array
    return out


class Segmenter:
    """Ray Data actor: the model loaded once; uint8 masks, or float16 class probabilities for the CRF stage."""

    def __init__(
        self,
        payload_ref,
        settings: InferenceSettings,
        threads: int,
        device: str,
        probs: bool,
        keep_image: bool,
    ):
        import ray
        import torch

        from pipelines.inference.core import materialize
        from segmodels.artifact import load_model_dir

        torch.set_num_threads(threads)
        # The ref travels inside a list so Ray hands it over unresolved; fetched once per actor.
        self.model = load_model_dir(materialize(ray.get(payload_ref[0])), device=device)
        self.settings, self.probs, self.keep_image = settings, probs, keep_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipelines.inference.core import probabilities_in_passes

        images, errors = batch["image"], batch["error"]
        results: list[Any] = [np.zeros((1, 1), np.uint8)] * len(images)
        readable = [i for i in range(len(images)) if not errors[i]]
        ids = [str(batch["image_id"][i]) for i in readable]
        passes = probabilities_in_passes(self.model, [images[i] for i in readable], self.settings, ids)
        for group, probs in passes:
            # Half the bytes of float32 through the object store; the CRF's unary is -log(p) of them.
            out = probs.half() if self.probs else probs.max(1).indices.to(torch.uint8)
            for g, result in zip(group, out.cpu().numpy(), strict=True):
                results[readable[g]] = result
        rest = (
            batch if self.keep_image else without(batch, "image")
        )  # the image is only needed by CRF, overlay
        return {**rest, "probs" if self.probs else "mask": ragged(results)}


def crf_mask(image: np.ndarray, probs: np.ndarray, params) -> np.ndarray:
    """Dense CRF (DeepLab's mean field, the model's parameters) on float16 C,H,W probabilities -> uint8 H,W."""
    from segmodels.crf import dense_crf

    return dense_crf(image, probs, params).argmax(0).astype(np.uint8)


def crf_batch(batch: dict[str, np.ndarray], params, memory_limit: int) -> dict[str, np.ndarray]:
    """Masks from each image's probabilities, one Ray task per image.

    Each task holds a whole CPU (pydensecrf is single-threaded C++ that holds the GIL) and reserves the
    memory the CRF of that image needs (`crf_memory_bytes` of its H x W x C: 3.7 GB for a 2048x1024 image
    of 19 classes), which one reservation for the whole stage could not do for images of every size. An
    image whose CRF needs more than the largest node has is quarantined instead of waiting forever.
    """
    import ray

    from segmodels.crf import crf_memory_bytes

    refine = ray.remote(crf_mask)
    masks: list[Any] = [np.zeros((1, 1), np.uint8)] * len(batch["probs"])
    errors = [str(e) for e in batch["error"]]
    pending = {}
    for i, (image, probs) in enumerate(zip(batch["image"], batch["probs"], strict=True)):
        if errors[i]:
            continue
        need = crf_memory_bytes(image.shape[0], image.shape[1], probs.shape[0])
        if need > memory_limit:
            errors[i] = (
                f"oversized for --crf: its dense CRF needs {need / 2**30:.1f} GiB, more than the "
                f"{memory_limit / 2**30:.1f} GiB of the largest node; predict it without --crf"
            )
            continue
        pending[i] = refine.options(num_cpus=1, memory=need).remote(image, probs, params)
    for i, ref in pending.items():
        masks[i] = ray.get(ref)
    return {**without(batch, "probs", "error"), "mask": ragged(masks), "error": np.array(errors)}


def encode_output(fmt: str, image: np.ndarray, mask: np.ndarray, palette) -> bytes:
    """One prediction in the file format of `fmt` (not parquet)."""
    from PIL import Image

    from pipelines.data.dataset import encode_mask
    from pipelines.data.layouts.cityscapes import train_id_to_label_id
    from pipelines.report import blend, palette_png

    if fmt == "cityscapes":
        return encode_mask(train_id_to_label_id()[mask])
    if fmt == "overlay":
        buffer = io.BytesIO()
        Image.fromarray(blend(image, mask, palette)).save(buffer, format="PNG")
        return buffer.getvalue()
    return palette_png(mask, palette)


def write_batch(batch: dict[str, np.ndarray], fs, out: str, fmt: str, palette) -> dict[str, np.ndarray]:
    """Encode and write each prediction under DST (fs resolved on the driver); one status row per input."""
    from pipelines.report import palette_png

    targets, errors, rows = [], [], []
    for image_id, image, mask, error in zip(
        batch["image_id"],
        batch.get("image", [None] * len(batch["mask"])),
        batch["mask"],
        batch["error"],
        strict=True,
    ):
        target = ""
        if not error:
            try:
                target = target_for(str(image_id), fmt)
                if fmt == "parquet":
                    rows.append((str(image_id), palette_png(mask, palette), *mask.shape))
                else:
                    storage.put_bytes(
                        fs, posixpath.join(out, target), encode_output(fmt, image, mask, palette)
                    )
            except ValueError as err:
                error = str(err)
        targets.append(target)
        errors.append(error)
    if rows:
        write_parquet_part(fs, out, rows)
    return {"path": batch["path"], "target": np.array(targets), "error": np.array(errors)}


def write_parquet_part(fs, out: str, rows: list[tuple]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, masks, heights, widths = zip(*rows, strict=True)
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "mask": pa.array(masks, pa.binary()),
            "height": pa.array(heights, pa.int32()),
            "width": pa.array(widths, pa.int32()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.put_bytes(fs, posixpath.join(out, f"part-{uuid.uuid4().hex}.parquet"), buffer.getvalue())


# ---------------------------------------------------------------------------------------------- sources
def read_source(cfg: PredictConfig, done: set[str]):
    """(Ray Dataset of {image_id, bytes}, images in it, quarantined records, skipped count) for the input."""
    import ray.data

    from pipelines.data.dataset import MANIFEST_NAME

    match = SPLIT_INPUT.match(cfg.input)
    if match and storage.exists(storage.join(match["root"], MANIFEST_NAME)):
        return read_split(match["root"], match["split"], cfg, done)
    if not storage.is_dir(cfg.input):
        raise UserError(
            f"--input {cfg.input!r} is neither a folder, an s3:// prefix nor PREPARED:SPLIT of a prepared dataset"
        )
    fs, root = storage.filesystem(cfg.input)
    _, out_root = storage.filesystem(cfg.out)
    inside = posixpath.relpath(out_root, root) + "/" if out_root.startswith(root + "/") else None
    paths, quarantined, skipped = [], [], 0
    for rel, size in sorted(storage.list_files(cfg.input).items()):
        if not rel.lower().endswith(IMAGE_EXTENSIONS) or (inside and rel.startswith(inside)):
            continue
        image_id = posixpath.splitext(rel)[0]
        if is_done(image_id, cfg.format, done):
            skipped += 1
        elif size > cfg.max_bytes:
            reason = f"oversized: {size}-byte file is over the {cfg.max_bytes}-byte limit"
            quarantined.append(record(storage.join(cfg.input, rel), reason))
        else:
            paths.append(posixpath.join(root, rel))
    if not paths:
        return None, 0, quarantined, skipped
    if cfg.settings.proposals is not None:
        ids = (posixpath.splitext(posixpath.relpath(p, root))[0] for p in paths)
        check_covered(cfg.settings.proposals, ids, "proposals file")
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)

    def image_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [posixpath.splitext(posixpath.relpath(p, root))[0] for p in batch["path"]]
        return {"image_id": np.array(ids), "path": batch["path"], "bytes": batch["bytes"]}

    ds = ds.map_batches(image_ids, batch_format="numpy", zero_copy_batch=True)
    return ds, len(paths), quarantined, skipped


def read_split(root: str, split: str, cfg: PredictConfig, done: set[str]):
    from pipelines.data.dataset import IMAGE, IMAGE_ID, open_prepared

    data = open_prepared(root)
    ids = [i for i in data.split(split, columns=[IMAGE_ID]).to_pandas()[IMAGE_ID]]
    todo = {i for i in ids if not is_done(i, cfg.format, done)}
    if not todo:
        return None, 0, [], len(ids)
    if cfg.settings.proposals is not None:
        check_covered(cfg.settings.proposals, sorted(todo), "proposals file")

    def pending(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([i in todo for i in batch[IMAGE_ID]], dtype=bool)
        ids = batch[IMAGE_ID][keep]
        paths = np.array([f"{cfg.input}/{i}" for i in ids])
        return {"image_id": ids, "path": paths, "bytes": batch[IMAGE][keep]}

    ds = data.split(split, columns=[IMAGE_ID, IMAGE]).map_batches(pending, batch_format="numpy")
    return ds, len(todo), [], len(ids) - len(todo)


def record(path: str, reason: str) -> dict[str, str]:
    """One line of quarantine.jsonl."""
    return {"path": path, "reason": reason}


# ---------------------------------------------------------------------------------------------- stage
def predict(cfg: PredictConfig) -> dict[str, Any]:
    """Segment every input not yet segmented; returns counts, timing and where the outputs are."""
    import ray

    from pipelines.inference.core import crf_params, model_payload
    from pipelines.model_uri import fetched_model
    from pipelines.progress import progress
    from pipelines.runtime import ensure_ray, largest_node_memory, model_actors
    from segmodels.artifact import read_spec

    ensure_ray()
    model = model_actors(cfg.num_gpus)  # a wrong --num-gpus fails before the download
    with fetched_model(cfg.model_uri, cfg.tracking_uri) as folder:  # the download goes when read
        spec = read_spec(folder)
        check_format(spec, cfg.format)
        payload = model_payload(folder)
    params = crf_params(spec.crf, cfg.settings.crf_params) if cfg.settings.crf else None
    started = time.perf_counter()
    ds, pending, quarantined, skipped = read_source(cfg, existing_outputs(cfg.out, cfg.format))
    written = 0
    if ds is not None:
        actors = cfg.concurrency or model.slots
        light = {"num_cpus": 0.5}  # decode and write tasks: mostly I/O and C code, half a CPU each
        ds = ds.map_batches(
            decode_batch, fn_kwargs={"max_pixels": cfg.max_pixels}, batch_format="numpy", **light
        )
        ds = ds.map_batches(
            Segmenter,
            fn_constructor_kwargs={
                "payload_ref": [ray.put(payload)],
                "settings": cfg.settings,
                "threads": model.threads(actors),
                "device": model.device,
                "probs": cfg.settings.crf,
                "keep_image": cfg.settings.crf or cfg.format == "overlay",
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **model.options,
        )
        if cfg.settings.crf:
            # Its own CPU is given back while it waits for the per-image CRF tasks it starts.
            ds = ds.map_batches(
                crf_batch,
                fn_kwargs={"params": params, "memory_limit": largest_node_memory()},
                batch_format="numpy",
                **light,
            )
        fs, out_root = storage.filesystem(cfg.out)
        ds = ds.map_batches(
            write_batch,
            fn_kwargs={"fs": fs, "out": out_root, "fmt": cfg.format, "palette": spec.palette},
            batch_format="numpy",
            **light,
        )
        with progress("predict", pending) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for path, error in zip(batch["path"], batch["error"], strict=True):
                    if error:
                        quarantined.append(record(str(path), str(error)))
                    else:
                        written += 1
                bar.advance(len(batch["path"]))
    seconds = time.perf_counter() - started
    quarantine_uri = storage.join(cfg.out, QUARANTINE)
    storage.write_text(quarantine_uri, "".join(json.dumps(r) + "\n" for r in quarantined))
    legend = [
        {"index": i, "name": n, "color": list(c)}
        for i, (n, c) in enumerate(zip(spec.classes, spec.palette, strict=True))
    ]
    storage.write_text(storage.join(cfg.out, LEGEND), json.dumps({"classes": legend}, indent=1) + "\n")
    return {
        "model_uri": cfg.model_uri,
        "input": cfg.input,
        "out": cfg.out,
        "format": cfg.format,
        "written": written,
        "skipped": skipped,
        "quarantined": len(quarantined),
        "quarantine": quarantine_uri,
        "seconds": seconds,
        "images_per_s": written / max(seconds, 1e-9),
    }
