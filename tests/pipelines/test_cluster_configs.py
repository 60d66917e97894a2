"""The files of cluster/ validated offline, as far as each can be without a cloud or a cluster.

- KubeRay manifests: against the `v1` OpenAPI schema of the operator's CRDs in
  cluster/kuberay/crds/ (vendored from ../shared/kuberay-crds; translated to JSON Schema, unknown fields rejected as `kubectl apply`'s
  strict field validation does), plus metadata, images and the autoscaling bounds.
- Network exposure: only the Serve port leaves the cluster; dashboard, GCS and client stay inside.
- cluster/ray-cluster.aws.yaml: against Ray's launcher schema and the checks `ray up` runs first.
- cluster/serve_config.yaml: against Ray Serve's `ServeDeploySchema`; equal to the RayService's.
- cluster/Dockerfile: base image and pins agree with pyproject.toml; it installs the project.
- Every `segpipe ...` command line names a real subcommand.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import importlib
import io
import itertools
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = KUBERAY / "crds"  # vendored, gzipped, from ../shared/kuberay-crds (see its README)

SERVE_PORT = 8000
INTERNAL_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
NAMESPACE = "segpipe"
# Where cluster/Dockerfile puts this checkout inside the image.
IMAGE_CHECKOUT = "/home/ray/segpipe"
# Subcommands of the Step 5/6 CLI that may not be in pipelines.cli yet; once they are, command lines
# naming them are parsed by the real parser instead.
PLANNED_SUBCOMMANDS = {"retrain", "serve", "train", "prepare", "tune", "evaluate", "ensemble", "promote"}

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_LOADER) if doc is not None]


def _manifests() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted(KUBERAY.glob("*.yaml")) for doc in _load_all(p)]


def _manifest(kind: str) -> dict:
    (doc,) = [doc for _, doc in _manifests() if doc["kind"] == kind]
    return doc


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_pins() -> dict[str, str]:
    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return {
        canonicalize_name(r.name): str(s.version) for r in reqs for s in r.specifier if s.operator == "=="
    }


def _pins_in(text: str) -> dict[str, str]:
    return {
        canonicalize_name(m[1]): m[2]
        for m in re.finditer(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.+]+)", text)
    }


# ------------------------------------------------------------------------------ KubeRay CRD schemas
def _to_json_schema(node: dict) -> dict:
    """One node of a Kubernetes structural (OpenAPI v3) schema -> JSON Schema Draft 7.

    `nullable` becomes a null type; `x-kubernetes-*` annotations are dropped (int-or-string already
    comes with its `anyOf`; the CEL `x-kubernetes-validations` cannot be evaluated here); objects
    with declared properties reject unknown fields, as `kubectl apply --validate=strict` (the
    default) does, so a misspelt field fails instead of being pruned silently.
    """
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):
        checker.checks(name)(lambda v, b=bits: not isinstance(v, int) or -(2 ** (b - 1)) <= v < 2 ** (b - 1))
    return checker


@functools.cache
def _crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    """kind -> validator of the CRD's `v1` schema."""
    validators = {}
    paths = sorted(CRD_DIR.glob("ray.io_*.yaml.gz"))
    assert len(paths) == 4, f"expected the four KubeRay CRDs in {CRD_DIR}, found {paths}"
    for path in paths:
        crd = yaml.load(gzip.decompress(path.read_bytes()).decode(), Loader=_LOADER)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _to_json_schema(v1["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(
            schema, format_checker=_format_checker()
        )
    return validators


# The fields of ObjectMeta that a manifest may set; the API server validates them itself.
_METADATA_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["namespace"],
    "oneOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL.pattern},
        "generateName": {"type": "string", "maxLength": 57, "pattern": r"^[a-z0-9][-a-z0-9]*-$"},
        "namespace": {"const": NAMESPACE},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_OPEN = {"type": "object"}  # a part the API server validates itself (pod templates, probes, env)


def _kind_schema(spec: dict | None = None) -> dict:
    """A core kind with apiVersion, kind, metadata and (when given) the spec schema, nothing else."""
    properties: dict = {"apiVersion": {}, "kind": {}, "metadata": {}}
    if spec is not None:
        properties["spec"] = {"type": "object", "additionalProperties": False, **spec}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["spec"] if spec is not None else [],
        "properties": properties,
    }


# Core kinds used in cluster/kuberay/, with the fields the manifests may use.
_CORE_SCHEMAS = {
    ("v1", "ServiceAccount"): _kind_schema(),
    ("apps/v1", "Deployment"): _kind_schema(
        {
            "required": ["selector", "template"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "selector": {"type": "object", "required": ["matchLabels"]},
                "template": {
                    "type": "object",
                    "required": ["metadata", "spec"],
                    "properties": {"metadata": _OPEN, "spec": {"type": "object", "required": ["containers"]}},
                },
            },
        }
    ),
    ("v1", "Service"): _kind_schema(
        {
            "required": ["selector", "ports"],
            "properties": {
                "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                "selector": {"type": "object"},
                "ports": {"type": "array", "items": {"type": "object", "required": ["port"]}},
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _kind_schema(
        {
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {"port": {"type": "string"}, "path": {}, "interval": {}},
                    },
                },
            },
        }
    ),
    ("v1", "ConfigMap"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["data"],
        "properties": {
            "apiVersion": {},
            "kind": {},
            "metadata": {},
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
}


def manifest_errors(doc: dict) -> list[str]:
    """Schema errors of one manifest: its CRD's (ray.io) or a core kind's, plus its metadata."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if api == "ray.io/v1":
        validators = _crd_validators()
        if kind not in validators:
            return [f"kind {kind!r} is not one of the KubeRay CRDs {sorted(validators)}"]
        validator = validators[kind]
    elif (api, kind) in _CORE_SCHEMAS:
        validator = jsonschema.Draft7Validator(_CORE_SCHEMAS[(api, kind)])
    else:
        return [f"{api}/{kind}: no schema to validate it against: add one to _CORE_SCHEMAS"]
    errors = list(validator.iter_errors(doc))
    errors += [e for e in jsonschema.Draft7Validator(_METADATA_SCHEMA).iter_errors(doc.get("metadata", {}))]
    return sorted(f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster spec inside a KubeRay resource ([] for other kinds)."""
    spec = doc.get("spec", {})
    cluster = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayCronJob": spec.get("jobTemplate", {}).get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }.get(doc.get("kind"))
    return [cluster] if cluster else []


def _pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


@pytest.mark.parametrize("name,doc", _manifests(), ids=[f"{n}:{d['kind']}" for n, d in _manifests()])
def test_manifest_validates_against_its_schema(name, doc):
    assert manifest_errors(doc) == [], name


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda c: c["workerGroupSpecs"][0].update(maxReplica=8), "'maxReplica' was unexpected"),
        (lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda c: c["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda c: c["workerGroupSpecs"][0].update(replicas=2**31), "is not a 'int32'"),
        (lambda c: c["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    ],
    ids=["wrong-type", "unknown-field", "start-param-not-string", "missing-required", "int32", "enum"],
)
def test_a_broken_manifest_fails_validation(mutate, expected):
    doc = _manifest("RayCluster")
    mutate(doc["spec"])
    errors = manifest_errors(doc)
    assert any(expected in e for e in errors), errors


def test_a_broken_metadata_fails_validation():
    doc = _manifest("RayService")
    doc["metadata"]["name"] = "Segpipe_Serve"
    assert any("does not match" in e for e in manifest_errors(doc))


def test_manifests_use_one_image_and_the_pinned_ray_version():
    version, ray = _pyproject()["project"]["version"], _pyproject_pins()["ray"]
    clusters = [(name, c) for name, doc in _manifests() for c in _cluster_specs(doc)]
    assert len(clusters) == 4, "expected the RayCluster, RayJob, RayCronJob and RayService"
    for name, cluster in clusters:
        assert cluster["rayVersion"] == ray, name
        images = {c["image"] for pod in _pod_specs(cluster) for c in pod["containers"]}
        assert images == {f"registry.example.com/segpipe:{version}"}, name


def test_every_cluster_autoscales_a_gpu_worker_group_with_token_auth():
    for name, doc in _manifests():
        for cluster in _cluster_specs(doc):
            assert cluster["enableInTreeAutoscaling"] is True, name
            assert cluster["authOptions"] == {"mode": "token", "secretName": "segpipe-ray-token"}, name
            gpu_groups = []
            for group in cluster["workerGroupSpecs"]:
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
                container = group["template"]["spec"]["containers"][0]
                limits, requests = container["resources"]["limits"], container["resources"]["requests"]
                # Kubernetes rejects extended resources whose request differs from the limit.
                assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), name
                if limits.get("nvidia.com/gpu", 0) >= 1:
                    gpu_groups.append(group)
            assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), name


def test_head_services_do_not_collide():
    # KubeRay names the head Service `<name>-head-svc` for a RayCluster and a RayService alike.
    names = [
        doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] in ("RayCluster", "RayService")
    ]
    assert len(names) == len(set(names)) == 2, names


def test_pods_have_the_service_account_and_the_heads_take_no_work():
    (account,) = [doc for _, doc in _manifests() if doc["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == "segpipe"
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    templates = [(n, pod) for n, doc in _manifests() for c in _cluster_specs(doc) for pod in _pod_specs(c)]
    templates += [(n, d["spec"]["template"]["spec"]) for n, d in _manifests() if d["kind"] == "Deployment"]
    assert len(templates) == 9  # 4 Ray clusters x (head + GPU group) + the MLflow server
    for name, pod in templates:
        assert pod["serviceAccountName"] == "segpipe", name
    for name, doc in _manifests():
        for cluster in _cluster_specs(doc):
            assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name


def test_a_stuck_retrain_ends_before_the_next_scheduled_one():
    cron = _manifest("RayCronJob")
    minute, hour, day, month, weekday = cron["spec"]["schedule"].split()
    assert (day, month, weekday) == ("*", "*", "*") and hour.isdigit(), "the test knows daily schedules"
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_the_endpoint_upgrade_strategy_and_the_mlflow_server_are_chosen():
    service = _manifest("RayService")
    assert service["spec"]["upgradeStrategy"]["type"] in (
        "NewCluster",
        "None",
        "NewClusterWithIncrementalUpgrade",
    )
    env = _manifest("ConfigMap")["data"]["MLFLOW_TRACKING_URI"]
    (mlflow,) = [
        doc for _, doc in _manifests() if doc["kind"] == "Service" and doc["metadata"]["name"] == "mlflow"
    ]
    assert env == f"http://{mlflow['metadata']['name']}.{NAMESPACE}.svc:{mlflow['spec']['ports'][0]['port']}"
    (server,) = [doc for _, doc in _manifests() if doc["kind"] == "Deployment"]
    command = " ".join(server["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--artifacts-destination=s3://" in command and "--backend-store-uri=" in command
    assert "mlflow.segpipe.svc:5000" in command  # the Host header clients send is allowed
    readme = (CLUSTER / "README.md").read_text()
    assert "KubeRay v1.7.0" in readme and ">= v1.6.0" in readme and "RayCronJob=true" in readme


def test_retrain_job_and_schedule_run_the_same_job():
    job, cron = _manifest("RayJob"), _manifest("RayCronJob")
    assert cron["spec"]["jobTemplate"] == job["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert len(cron["spec"]["schedule"].split()) == 5, "a five-field cron schedule"
    assert shlex.split(job["spec"]["entrypoint"])[:2] == ["segpipe", "retrain"]


# ---------------------------------------------------------------------------------- network exposure
def exposure_problems(manifests: list[dict], launcher: dict) -> list[str]:
    """Ways in which a port other than Serve's would be reachable from outside the cluster."""
    problems = []

    def external_service(where: str, service: dict) -> None:
        spec = service.get("spec", {})
        if spec.get("type", "ClusterIP") in ("LoadBalancer", "NodePort") or spec.get("externalIPs"):
            for port in spec.get("ports", []):
                ports = {port.get("port"), port.get("targetPort", port.get("port"))}
                if ports != {SERVE_PORT}:
                    problems.append(f"{where}: exposes {sorted(ports, key=str)} outside the cluster")

    for doc in manifests:
        where = f"{doc['kind']} {doc['metadata'].get('name', doc['metadata'].get('generateName'))}"
        if doc["kind"] == "Service":
            external_service(where, doc)
        if doc["kind"] == "RayService" and "serveService" in doc["spec"]:
            external_service(f"{where} serveService", doc["spec"]["serveService"])
        if doc["kind"] == "Ingress":
            for rule in doc["spec"].get("rules", []):
                for path in rule.get("http", {}).get("paths", []):
                    if path["backend"]["service"]["port"].get("number") != SERVE_PORT:
                        problems.append(f"{where}: routes to a port other than {SERVE_PORT}")
        for cluster in _cluster_specs(doc):
            head = cluster["headGroupSpec"]
            head_type = head.get("serviceType", "ClusterIP")
            custom_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
            if head_type != "ClusterIP" or custom_type != "ClusterIP":
                problems.append(f"{where}: head service is not ClusterIP (it carries {INTERNAL_PORTS})")
            if head.get("enableIngress"):
                problems.append(f"{where}: enableIngress publishes the dashboard")
            for pod in _pod_specs(cluster):
                if pod.get("hostNetwork"):
                    problems.append(f"{where}: hostNetwork puts every Ray port on the node's address")
                for c in pod["containers"]:
                    problems += [
                        f"{where}: hostPort {p['hostPort']}" for p in c.get("ports", []) if "hostPort" in p
                    ]
    for rule in launcher["provider"].get("security_group", {}).get("IpPermissions", []):
        if (rule.get("FromPort"), rule.get("ToPort")) != (SERVE_PORT, SERVE_PORT):
            problems.append(f"launcher security group opens {rule.get('FromPort')}-{rule.get('ToPort')}")
    return problems


def _launcher() -> dict:
    return yaml.load((CLUSTER / "ray-cluster.aws.yaml").read_text(), Loader=_LOADER)


def test_only_the_serve_port_is_exposed_outside_the_cluster():
    manifests = [doc for _, doc in _manifests()]
    assert exposure_problems(manifests, _launcher()) == []
    # And Serve is exposed: by the RayService's LoadBalancer and the launcher's security group.
    serve_service = _manifest("RayService")["spec"]["serveService"]["spec"]
    assert serve_service["type"] == "LoadBalancer"
    assert [p["port"] for p in serve_service["ports"]] == [SERVE_PORT]
    assert [r["FromPort"] for r in _launcher()["provider"]["security_group"]["IpPermissions"]] == [SERVE_PORT]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda svc, launcher: svc["spec"]["rayClusterConfig"]["headGroupSpec"].update(
            serviceType="LoadBalancer"
        ),
        lambda svc, launcher: svc["spec"]["serveService"]["spec"]["ports"].append(
            {"name": "dash", "port": 8265}
        ),
        lambda svc, launcher: svc["spec"]["rayClusterConfig"]["headGroupSpec"].update(enableIngress=True),
        lambda svc, launcher: svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"].update(
            hostNetwork=True
        ),
        lambda svc, launcher: launcher["provider"]["security_group"]["IpPermissions"].append(
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265}
        ),
    ],
    ids=["head-loadbalancer", "dashboard-on-serve-lb", "head-ingress", "host-network", "launcher-sg"],
)
def test_exposing_an_internal_port_is_caught(mutate):
    service, launcher = _manifest("RayService"), _launcher()
    mutate(service, launcher)
    assert exposure_problems([service], launcher) != []


# ---------------------------------------------------------------------------------- launcher config
def _launcher_schema_errors(config: dict) -> list[str]:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    assert _launcher_schema_errors(config) == []
    # What `ray up` does before it contacts AWS: merge the provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_a_broken_launcher_config_fails_validation():
    config = _launcher()
    config["available_node_types"]["worker-gpu-a10g"]["max_workers"] = "eight"
    config["idle_timout_minutes"] = 5
    errors = _launcher_schema_errors(config)
    assert any("'eight' is not of type 'integer'" in e for e in errors), errors
    assert any("'idle_timout_minutes' was unexpected" in e for e in errors), errors


def test_launcher_has_a_cpu_head_and_autoscaled_gpu_workers():
    config = _launcher()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_workers = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers and all(t["min_workers"] < t["max_workers"] for t in gpu_workers.values())
    assert sum(t.get("min_workers", 0) for t in types.values()) < config["max_workers"]


def test_launcher_installs_this_checkout_on_every_node():
    config = _launcher()
    mounted = {remote for remote, local in config["file_mounts"].items() if local == "."}
    assert mounted == {IMAGE_CHECKOUT}
    installs = [shlex.split(cmd) for cmd in config["setup_commands"] if IMAGE_CHECKOUT in cmd]
    assert any(cmd[:2] == ["pip", "install"] and cmd[-1] == IMAGE_CHECKOUT for cmd in installs)
    ray = _pyproject_pins()["ray"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-cu\d+", config["docker"]["image"])
    pins = _pins_in("\n".join(config["setup_commands"]))
    assert pins and all(_pyproject_pins()[name] == version for name, version in pins.items()), pins


# -------------------------------------------------------------------------------------- Serve config
def serve_config_errors(config: dict) -> list[str]:
    """Errors `serve deploy` would raise, plus keys Serve would silently ignore (typos)."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        parsed = ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [f"{'/'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]

    def ignored(raw, kept, path: str) -> list[str]:
        if isinstance(raw, dict) and isinstance(kept, dict):
            return [f"{path}/{k}: unknown, ignored by Serve" for k in raw if k not in kept] + [
                e for k in raw if k in kept for e in ignored(raw[k], kept[k], f"{path}/{k}")
            ]
        if isinstance(raw, list) and isinstance(kept, list):
            return [
                e
                for i, (r, k) in enumerate(zip(raw, kept, strict=True))
                for e in ignored(r, k, f"{path}/{i}")
            ]
        return []

    errors = ignored(config, parsed.model_dump(exclude_unset=True), "")
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            # Stays a plain dict in the schema; Serve builds AutoscalingConfig from it at deploy time.
            auto = deployment.get("autoscaling_config") or {}
            errors += [
                f"autoscaling_config/{k}: unknown" for k in auto if k not in AutoscalingConfig.model_fields
            ]
            try:
                AutoscalingConfig.model_validate(auto)
            except ValidationError as err:
                errors += [f"autoscaling_config/{e['loc'][0]}: {e['msg']}" for e in err.errors()]
    return errors


def _serve_config() -> dict:
    return yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())


def test_serve_config_validates_against_serves_schema():
    config = _serve_config()
    assert serve_config_errors(config) == []
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("segpipe", "/", "pipelines.serve:app")
    assert config["http_options"]["port"] == SERVE_PORT
    assert app["args"]["model_uri"].endswith("@champion")


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda d: d["autoscaling_config"].update(max_replicas="many"), "autoscaling_config/max_replicas"),
        (lambda d: d.update(autoscaling_confg={"max_replicas": 2}), "autoscaling_confg: unknown"),
        (lambda d: d.update(num_replicas=2), "num_replicas is not allowed when autoscaling_config"),
        (lambda d: d.update(max_queued_requests=0), "max_queued_requests must be -1"),
    ],
    ids=["wrong-type", "typo", "conflict", "bad-queue"],
)
def test_a_broken_serve_config_fails_validation(mutate, expected):
    config = _serve_config()
    mutate(config["applications"][0]["deployments"][0])
    errors = serve_config_errors(config)
    assert any(expected in e for e in errors), errors


def test_rayservice_serves_the_same_config_as_serve_config_yaml():
    embedded = yaml.safe_load(_manifest("RayService")["spec"]["serveConfigV2"])
    assert embedded == _serve_config()


def test_serve_config_names_what_pipelines_serve_defines():
    from ray import serve

    module = importlib.import_module("pipelines.serve")
    assert callable(module.app), "import_path pipelines.serve:app must name the args builder"
    defined = {obj.name for obj in vars(module).values() if isinstance(obj, serve.Deployment)}
    for app in _serve_config()["applications"]:
        for deployment in app["deployments"]:
            assert deployment["name"] in defined, (
                f"cluster/serve_config.yaml configures deployment {deployment['name']!r} but "
                f"pipelines/serve/ defines {sorted(defined)}: rename one of them"
            )


# ---------------------------------------------------------------------------------------- Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def test_dockerfile_base_image_matches_pyproject():
    (base,) = [args for instr, args in _dockerfile() if instr == "FROM"]
    ray = _pyproject_pins()["ray"]
    # The CUDA variant: GPU-capable, and the same image the launcher runs.
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-cu\d+", base), base
    assert base == _launcher()["docker"]["image"]


def test_dockerfile_pins_match_pyproject():
    runs = "\n".join(args for instr, args in _dockerfile() if instr == "RUN")
    pins = _pins_in(runs)
    assert {"torch", "torchvision"} <= pins.keys()
    assert {name: _pyproject_pins()[name] for name in pins} == pins


def test_dockerfile_installs_the_project():
    steps = _dockerfile()
    copied = [shlex.split(args)[-2] for instr, args in steps if instr == "COPY"]
    for source in copied:
        assert (REPO / source).exists(), f"cluster/Dockerfile copies {source}, missing from the repo"
    packages = {p.rstrip("*") for p in _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    install = next(
        i
        for i, (instr, args) in enumerate(steps)
        if instr == "RUN" and re.search(r"pip install .*\s\.$", args)
    )
    copied_before = {shlex.split(args)[-2] for instr, args in steps[:install] if instr == "COPY"}
    assert {"pyproject.toml", *packages} <= copied_before
    workdir = [args for instr, args in steps[:install] if instr == "WORKDIR"][-1]
    assert workdir == IMAGE_CHECKOUT


def test_configs_named_by_manifests_are_in_the_image():
    copies_cluster = any(
        shlex.split(args)[-2] == "cluster" for instr, args in _dockerfile() if instr == "COPY"
    )
    for argv in _segpipe_command_lines():
        for flag, value in itertools.pairwise(argv):
            if flag == "--config" and value.startswith(IMAGE_CHECKOUT + "/"):
                relative = value.removeprefix(IMAGE_CHECKOUT + "/")
                assert relative.startswith("cluster/") and copies_cluster, value
                assert (REPO / relative).is_file(), f"{value} is named in cluster/ but {relative} is missing"


# -------------------------------------------------------------------------------- segpipe commands
_SEPARATORS = {"&&", "||", ";", "|", "--", "exec"}


def _segpipe_invocations(command: str) -> list[list[str]]:
    tokens = shlex.split(command, comments=True)
    found = []
    for i, token in enumerate(tokens):
        if Path(token).name == "segpipe" and (i == 0 or tokens[i - 1] in _SEPARATORS):
            rest = tokens[i + 1 :]
            end = next((j for j, t in enumerate(rest) if t in _SEPARATORS - {"--"}), len(rest))
            found.append(rest[:end])
    return found


def _segpipe_command_lines() -> list[list[str]]:
    commands = []
    for _, doc in _manifests():
        spec = doc.get("spec", {})
        commands += [s["entrypoint"] for s in (spec, spec.get("jobTemplate", {})) if "entrypoint" in s]
    launcher = _launcher()
    commands += [c for key, value in launcher.items() if key.endswith("_commands") for c in value]
    commands += [args for instr, args in _dockerfile() if instr in ("RUN", "CMD", "ENTRYPOINT")]
    readme = (CLUSTER / "README.md").read_text()
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S):
        commands += re.sub(r"\\\n", " ", block).splitlines()
    return [argv for command in commands for argv in _segpipe_invocations(command)]


def test_segpipe_command_lines_name_real_subcommands():
    import argparse

    from pipelines.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    argvs = _segpipe_command_lines()
    assert ["retrain", "--config", f"{IMAGE_CHECKOUT}/cluster/retrain-voc.yaml"] in argvs
    for argv in argvs:
        assert argv, "`segpipe` without a subcommand"
        if argv[0] in subparsers.choices:
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"`segpipe {shlex.join(argv)}` does not parse: {stderr.getvalue()}")
        else:
            assert argv[0] in PLANNED_SUBCOMMANDS, f"`segpipe {argv[0]}` is not a segpipe subcommand"


def test_command_line_finder_finds_what_it_should():
    found = _segpipe_invocations(
        "ray job submit --working-dir . -- segpipe retrain --config a.yaml && echo done"
    )
    assert found == [["retrain", "--config", "a.yaml"]]
    assert _segpipe_invocations("kubectl -n segpipe get pods  # segpipe serve") == []
