"""Where a training run's weights start: `--pretrained FILE` (ImageNet backbone) and `--init-from URI`
(another model's tensors, FCN section 4.2 staging).

`--pretrained` takes a torchvision state dict, or Caffe's VGG16 (`VGG_ILSVRC_16_layers.caffemodel`, the
weights the Caffe references start from) for the VGG trunks, read without Caffe and renamed by the
release imports' layer names. Each file fixes the input the network must be fed (`check_pretrained`).

The driver (`check_init_from`, called by `train.resolve`) fetches the source once, checks that some tensor
matches by name and shape, and pins the URI (local folder -> absolute path, `models:/NAME@ALIAS` -> its
version) so every worker reads the same model. Each Ray Train worker (`apply_init_from`) then copies the
matching tensors of the source's member 0 into the model it built, on a fresh start only (a resume loads
its checkpoint instead); rank 0 logs what was copied, skipped and kept to the MLflow run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pipelines import tracking
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.model_uri import ModelUri, fetched_model

REPORT_ARTIFACT = "init_from.json"
CAFFE_SUFFIX = ".caffemodel"
VGG_TRUNKS = ("vgg16", "vgg16_bn")


def check_pretrained(cfg: TrainConfig) -> None:
    """The weights file and the input convention must agree: Caffe's VGG16 was trained on BGR 0-255 minus
    the mean (its conv1_1 reads BGR), torchvision's on ImageNet-normalised RGB."""
    caffe = Path(cfg.pretrained).suffix == CAFFE_SUFFIX
    if caffe and cfg.input_convention != "caffe_bgr":
        raise UserError(
            f"--pretrained {cfg.pretrained} is a Caffe model, trained on BGR 0-255 minus the mean: set "
            "input_convention: caffe_bgr (--input-convention caffe_bgr)"
        )
    if not caffe and cfg.input_convention == "caffe_bgr":
        raise UserError(
            f"--pretrained {cfg.pretrained}: torchvision's weights take ImageNet-normalised RGB, not "
            "input_convention caffe_bgr: pass Caffe's VGG_ILSVRC_16_layers.caffemodel, or set "
            "input_convention: imagenet"
        )


def caffe_vgg16_state(path: str | Path, model) -> dict:
    """Caffe's VGG16 (Simonyan & Zisserman's VGG_ILSVRC_16_layers) in torchvision's layout, for `model`'s trunk.

    conv1_1 .. conv5_3 -> features.N (`releases.vgg_conv_names`, as `import-weights` maps the FCN,
    DeepLab and Dilation releases); the fully connected fc6 / fc7 -> classifier.0 / classifier.3 (flattened
    where a file stores them as convolutions), which `load_backbone_state` turns into the fc6 / fc7
    convolutions as for torchvision's VGG16. conv1_1 keeps its BGR input order: the network is fed BGR
    (input_convention caffe_bgr). A BN trunk (DeconvNet) keeps its own BN initialisation: Caffe's VGG16
    has none, and DeconvNet adds the BN layers to it (Noh et al. section 3.1).
    """
    from pipelines.weights.caffe import read_caffemodel
    from pipelines.weights.releases import vgg_conv_names

    arch = getattr(model, "arch", type(model).__name__)
    if getattr(model, "imagenet_source", None) not in VGG_TRUNKS:
        raise ValueError(
            f"Caffe's VGG16 starts the VGG trunks (fcn32s/16s/8s, deeplab_largefov, dilation, deconvnet), "
            f"not {arch}; pass a torchvision state dict for it"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass Caffe's VGG_ILSVRC_16_layers.caffemodel"
        )
    layers = read_caffemodel(path)
    batch_norm = model.imagenet_source == "vgg16_bn"
    own = model.state_dict()
    state = {}
    names = [*vgg_conv_names(batch_norm), ("fc6", "classifier.0"), ("fc7", "classifier.3")]
    absent = [name for name, _ in names if len(layers.get(name, [])) < 2]
    if absent:
        raise ValueError(
            f"{path} is not Caffe's VGG16: no weights and bias for {', '.join(absent[:3])}; pass "
            "VGG_ILSVRC_16_layers.caffemodel"
        )
    for name, index in names:
        weight, bias = layers[name][:2]
        key = index if name.startswith("fc") else f"features.{index}"
        state[f"{key}.weight"] = weight.flatten(1) if name.startswith("fc") else weight
        state[f"{key}.bias"] = bias
        if batch_norm and not name.startswith("fc"):
            bn = f"features.{index + 1}."
            state.update({k: v for k, v in own.items() if k.startswith(bn)})
    mapped = {name for name, _ in names}
    for name in layers.keys() - mapped:  # fc8, the 1000-way classifier: reported as unused
        state.update({f"{name}.{p}": blob for p, blob in zip(("weight", "bias"), layers[name], strict=False)})
    return state


def load_pretrained(model, path: str) -> tuple[list[str], list[str]]:
    """`--pretrained`: a torchvision state dict or Caffe's VGG16 into `model`'s backbone -> (missing, unused)."""
    from segmodels.weights import load_backbone_state, load_backbone_weights

    if Path(path).suffix != CAFFE_SUFFIX:
        return load_backbone_weights(model, path)
    return load_backbone_state(model, caffe_vgg16_state(path, model), str(path))


@contextmanager
def source_weights_file(uri: str, tracking_uri: str):
    """Yield (safetensors file, MemberSpec) of member 0 of the model at `uri`; a downloaded copy is
    removed after."""
    from segmodels.artifact import read_spec

    with fetched_model(uri, tracking_uri) as folder:
        spec = read_spec(folder)
        yield folder / spec.members[0].weights, spec.members[0]


def pin_uri(uri: str, tracking_uri: str) -> str:
    """The same model, named so that it cannot move before the workers read it (an alias resolved to its
    version, a folder absolute: workers do not share the driver's directory)."""
    return str(ModelUri.parse(uri).pinned(tracking_uri))


def check_init_from(cfg: TrainConfig, num_classes: int, tracking_uri: str) -> str:
    """Driver check: the source exists and shares at least one tensor with `cfg.model`; returns the pinned URI."""
    import torch
    from safetensors import safe_open

    from segmodels import build_model
    from segmodels.weights import match_tensors

    uri = pin_uri(cfg.init_from, tracking_uri)
    with torch.device("meta"):
        target = {
            k: v.shape for k, v in build_model(cfg.model, num_classes, **cfg.model_args).state_dict().items()
        }
    from pipelines.train.loop import input_convention

    with source_weights_file(uri, tracking_uri) as (weights, member), safe_open(str(weights), "pt") as f:
        source = {k: f.get_slice(k).get_shape() for k in f.keys()}  # shapes only: no tensor is read
    ours = input_convention(cfg.input_convention)
    if (member.input.channel_order, member.input.scale) != (ours.channel_order, ours.scale):
        raise UserError(
            f"--init-from {cfg.init_from} was trained on {member.input.channel_order} input at scale "
            f"{member.input.scale:g}, but input_convention {cfg.input_convention} feeds "
            f"{ours.channel_order} at scale {ours.scale:g}: set input_convention to the source's "
            "(caffe_bgr for a Caffe-input model)"
        )
    report = match_tensors(target, source)
    if not report.copied:
        raise UserError(
            f"--init-from {cfg.init_from}: no tensor of that model matches {cfg.model} "
            f"({num_classes} classes, model args {cfg.model_args}) by name and shape "
            f"({len(report.skipped)} names match with other shapes); initialise from a model of the same "
            "family and width (e.g. fcn16s from fcn32s), or drop --init-from"
        )
    print(
        f"[segpipe] --init-from {uri}: {len(report.copied)} tensors to copy, {len(report.skipped)} skipped "
        f"(shape differs), {len(report.kept)} left at their own init"
    )
    return uri


def apply_init_from(model, uri: str, *, tracking_uri: str, run_id: str | None = None):
    """Worker side: copy the matching tensors into `model`; with `run_id` log the report to MLflow."""
    from safetensors.torch import load_file

    from segmodels.weights import copy_matching

    with source_weights_file(uri, tracking_uri) as (weights, _):
        report = copy_matching(model, load_file(str(weights)))
    if run_id:
        client = tracking.connect(tracking_uri)
        tracking.log_params(
            client,
            run_id,
            {
                "init_from.copied": len(report.copied),
                "init_from.skipped": len(report.skipped),
                "init_from.kept": len(report.kept),
            },
        )
        client.log_dict(run_id, {"source": uri, **report.to_json()}, REPORT_ARTIFACT)
    return report
