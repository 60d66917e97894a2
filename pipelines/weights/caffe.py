"""Reading a Caffe `.caffemodel` (a `NetParameter` protobuf) without Caffe: layer name -> weight blobs.

The message definition is the minimal subset of BVLC caffe.proto needed for the weights, built in
Python: NetParameter { name = 1; repeated V1LayerParameter layers = 2 (legacy); repeated LayerParameter
layer = 100 }; LayerParameter { name = 1; type = 2; repeated BlobProto blobs = 7 }; V1LayerParameter
{ name = 4; blobs = 6 }; BlobProto { num/channels/height/width = 1-4 (legacy 4-D shape); packed float
data = 5; BlobShape shape = 7 }; BlobShape { packed int64 dim = 1 }. Fields not declared here are
skipped by the parser, so full files from any Caffe fork (DeepLab's, SegNet's) parse.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import UserError


@cache
def _net_parameter_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="segpipe_caffe_weights.proto", package="segpipe_caffe")
    file.syntax = "proto2"

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        msg = file.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            f = msg.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                f.type_name = f".segpipe_caffe.{type_name}"
            if label == fdp.LABEL_REPEATED and kind in (fdp.TYPE_FLOAT, fdp.TYPE_INT64):
                f.options.packed = True

    opt, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED
    message("BlobShape", [("dim", 1, rep, fdp.TYPE_INT64, "")])
    message(
        "BlobProto",
        [
            ("num", 1, opt, fdp.TYPE_INT32, ""),
            ("channels", 2, opt, fdp.TYPE_INT32, ""),
            ("height", 3, opt, fdp.TYPE_INT32, ""),
            ("width", 4, opt, fdp.TYPE_INT32, ""),
            ("data", 5, rep, fdp.TYPE_FLOAT, ""),
            ("shape", 7, opt, fdp.TYPE_MESSAGE, "BlobShape"),
        ],
    )
    message(
        "LayerParameter",
        [
            ("name", 1, opt, fdp.TYPE_STRING, ""),
            ("type", 2, opt, fdp.TYPE_STRING, ""),
            ("blobs", 7, rep, fdp.TYPE_MESSAGE, "BlobProto"),
        ],
    )
    message(
        "V1LayerParameter",
        [("name", 4, opt, fdp.TYPE_STRING, ""), ("blobs", 6, rep, fdp.TYPE_MESSAGE, "BlobProto")],
    )
    message(
        "NetParameter",
        [
            ("name", 1, opt, fdp.TYPE_STRING, ""),
            ("layers", 2, rep, fdp.TYPE_MESSAGE, "V1LayerParameter"),
            ("layer", 100, rep, fdp.TYPE_MESSAGE, "LayerParameter"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    classes = message_factory.GetMessageClassesForFiles([file.name], pool)
    return classes["segpipe_caffe.NetParameter"]


def net_parameter():
    """A fresh, empty NetParameter message (also used to write test files in the releases' layout)."""
    return _net_parameter_class()()


def blob_tensor(blob) -> torch.Tensor:
    """BlobProto -> float32 tensor, shaped by `shape.dim` or the legacy num/channels/height/width.

    Legacy blobs are always 4-D; as Caffe's own upgrade does, a bias stored as 1 x 1 x 1 x N becomes N
    (and an inner-product weight 1 x 1 x O x I becomes O x I).
    """
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
        if shape[:3] == (1, 1, 1):
            shape = shape[3:]
        elif shape[:2] == (1, 1):
            shape = shape[2:]
    data = np.asarray(blob.data, dtype=np.float32)
    if int(np.prod(shape)) != data.size:
        raise ValueError(f"blob of shape {shape} holds {data.size} values")
    return torch.from_numpy(data.reshape(shape).copy())


def read_caffemodel(path: str | Path) -> dict[str, list[torch.Tensor]]:
    """`.caffemodel` -> {layer name: [blob tensors]} for every layer that has weights (`layer` or `layers`)."""
    from google.protobuf.message import DecodeError

    net = net_parameter()
    try:
        net.ParseFromString(Path(path).read_bytes())
    except DecodeError as err:
        raise UserError(f"{path} is not a Caffe .caffemodel (NetParameter protobuf): {err}") from None
    layers: dict[str, list[torch.Tensor]] = {}
    for layer in [*net.layer, *net.layers]:
        if not layer.blobs:
            continue
        if layer.name in layers:
            raise UserError(f"{path}: layer {layer.name!r} appears twice; pass the released .caffemodel")
        try:
            layers[layer.name] = [blob_tensor(b) for b in layer.blobs]
        except ValueError as err:
            raise UserError(f"{path}: layer {layer.name!r}: {err}; the file is damaged") from None
    if not layers:
        raise UserError(f"{path} has no layers with weights: pass a trained .caffemodel, not a .prototxt")
    return layers
