"""Serving stage: the registered model on an autoscaled Ray Serve endpoint, one hop from the ingress.

    HTTP -> Serve proxy -> SegmentationIngress -> SegmentationModel (whole ensemble, @serve.batch)
                                               [-> CRFRefiner, 1-CPU replicas, with --crf]

Modules, one concern each: `config` (ServeConfig, app args, runtime knobs), `refs` (model URIs),
`uploads` (body limits and safe decoding), `model` (the model deployment), `crf` (the CRF pool),
`render` (answers), `ingress` (HTTP routes and errors), `server` (the application and its lifecycle).
`pipelines.serve_proxy` (JSON errors from Serve's own proxy) lives outside the package so that the proxy,
which imports it at start-up, does not import the application. `pipelines.serve:app` is the Serve args builder.
"""

from pipelines.serve.config import APP_NAME, ServeConfig, config_from_args
from pipelines.serve.crf import CRFRefiner
from pipelines.serve.ingress import SegmentationIngress
from pipelines.serve.model import SegmentationModel
from pipelines.serve.server import app, build_app, serve_forever, start_server, stop_server

__all__ = [
    "APP_NAME",
    "CRFRefiner",
    "SegmentationIngress",
    "SegmentationModel",
    "ServeConfig",
    "app",
    "build_app",
    "config_from_args",
    "serve_forever",
    "start_server",
    "stop_server",
]
