"""The deployment files agree with the daemon: the Kubernetes manifests in deploy/kubernetes/
(ports, probe paths, stop timing, memory sized from the model), compose.yaml, the
Containerfile, and the routes they name exist in the app. Parsing only: no cluster needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bitnetd_trio.config import ModelConfig, ServerConfig, load_config
from bitnetd_trio.daemon.lifecycle import HYPERCORN_GRACE_MARGIN

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
CONTAINER_PORT = 8080  # the image's BITNETD_SERVER_LISTEN


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> dict:
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in docs(p) if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


@pytest.fixture(scope="module")
def container() -> dict:
    return by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def gib(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity)
    assert m, quantity
    return float(m.group(1)) * units.get(m.group(2), 1) / 2**30


def test_every_manifest_parses_with_kind_and_api_version() -> None:
    kinds = set()
    for path in sorted(K8S.glob("*.yaml")):
        for d in docs(path):
            assert d["apiVersion"] and d["metadata"]["name"], path
            kinds.add(d["kind"])
    assert {"Deployment", "Service", "InferencePool", "HTTPRoute"} <= kinds


def test_ports_and_selectors_line_up(container) -> None:
    deployment = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = container["ports"]
    assert port["containerPort"] == CONTAINER_PORT and port["name"] == "http"

    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", CONTAINER_PORT)

    pool = by_kind("InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": CONTAINER_PORT}]
    assert pool["spec"]["endpointPickerRef"]["name"]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] in ("FailOpen", "FailClose")
    route = by_kind("HTTPRoute")
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])


def test_probes_use_routes_the_daemon_serves(container) -> None:
    from bitnetd_trio.api.asgi import create_app
    from bitnetd_trio.config import Config

    routes = create_app(Config()).routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and "GET" in routes[get["path"]].methods, probe
        assert get["port"] in ("http", CONTAINER_PORT)
    # The liveness probe may only start once the model is loaded (no listener before).
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_stop_timing_covers_the_drain(container) -> None:
    spec = by_kind("Deployment")["spec"]["template"]["spec"]
    env = env_of(container)
    drain = float(env.get("BITNETD_SERVER_DRAIN_TIMEOUT", ServerConfig().drain_timeout))
    assert drain == ServerConfig().drain_timeout  # the manifest states the default
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    # preStop, then the drain, then hypercorn's own deadline: all before SIGKILL.
    assert grace >= pre_stop + drain + HYPERCORN_GRACE_MARGIN
    assert grace <= pre_stop + drain + HYPERCORN_GRACE_MARGIN + 15  # not a needless wait


def test_env_is_what_the_daemon_reads(container, monkeypatch) -> None:
    env = env_of(container)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BITNETD_MODEL_PATH", "")  # the file is not here
    config = load_config(None)
    assert config.model.threads == int(env["MAX_THREADS"])
    assert config.model.parallel == int(env["MODEL_INSTANCES"])
    assert int(container["resources"]["requests"]["cpu"]) == config.model.threads
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert env["BITNETD_MODEL_PATH"].startswith("/models/") and mounts["/models"]["readOnly"]


def test_memory_request_fits_the_model(container) -> None:
    """The mapped I2_S file + the F32 KV cache of every slot at the default context fit in the
    request (with 256 MiB for Python and buffers), and the request is not wildly above it."""
    from bitnetd_trio.engine import gguf_writer as gw

    shape = gw.FULL_2B4T
    env = env_of(container)
    slots = int(env["MODEL_INSTANCES"])
    ctx = min(ModelConfig().ctx_size or shape.n_ctx, shape.n_ctx)
    head_dim = shape.n_embd // shape.n_head
    kv = slots * ctx * shape.n_layer * 2 * shape.n_head_kv * head_dim * 4
    weights = sum(t.nbytes for t in gw.tensor_layout(shape, tie_head=True))
    need = (weights + kv) / 2**30 + 0.25
    request = gib(container["resources"]["requests"]["memory"])
    limit = gib(container["resources"]["limits"]["memory"])
    assert need <= request <= need + 1.5, (need, request)
    assert limit >= request


def test_compose_and_containerfile_agree() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert f"8080:{CONTAINER_PORT}" in service["ports"]
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert {"MAX_THREADS", "MODEL_INSTANCES"} <= set(service["environment"])
    assert service["restart"] == "unless-stopped"
    assert float(service["stop_grace_period"].rstrip("s")) >= (
        ServerConfig().drain_timeout + HYPERCORN_GRACE_MARGIN)

    text = (REPO / "Containerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, flags=re.M)
    assert f"BITNETD_SERVER_LISTEN=0.0.0.0:{CONTAINER_PORT}" in text
    assert f"EXPOSE {CONTAINER_PORT}" in text
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:8080/health", text, flags=re.M)
    assert re.search(r"^USER (?!root)", text, flags=re.M)
    entry = (REPO / "deploy" / "container" / "entrypoint.sh").read_text()
    assert "exec bitnetd -f" in entry  # the daemon is PID 1 and gets SIGTERM itself
    for ignore in (".containerignore", ".dockerignore"):
        lines = (REPO / ignore).read_text().splitlines()
        assert ".git" in lines and "build" in lines, ignore


def test_manifests_validate_against_the_kubernetes_api_schemas():
    """Deployment and Service against the published OpenAPI schemas of the Kubernetes API
    (kubernetes-validate's bundled schemas, strict: an unknown or misspelt field fails). The
    InferencePool is a custom resource, whose schema that package does not carry."""
    import kubernetes_validate

    for name in ("deployment.yaml", "service.yaml"):
        for doc in docs(K8S / name):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
