"""Kubernetes manifests, autoscaling queries and the Grafana dashboard, checked offline (no cluster
runs here).

* Every object of every YAML file under deploy/k8s/ validates strictly (unknown fields fail):
  core kinds against the Kubernetes OpenAPI schema (kubernetes-validate), KEDA's ScaledObject,
  prometheus-operator's ServiceMonitor and KubeRay's RayJob against their CRDs' schemas, vendored
  in deploy/k8s/schemas/ (README there: source, version, licence). A kind with neither fails.
* The relations between the objects: probes, hardening and drain timing of the pod, the spread,
  the index Job writing the volume the replicas mount read-only, the ServiceMonitor reaching the
  Service's port, one autoscaler on the Deployment.
* Every PromQL expression (the dashboard's, the ScaledObject's, the alternative HPA's metrics)
  parses and selects only series, with only labels, that a running app exports: the names come
  from the app's own /metrics (TestClient and the engine double), not from a list kept here.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from service.api import create_app
from service.predictor import Predictor
from service.settings import Settings
from service.spec import Demonstrations, ServingSpec
from service.state import ServiceState
from tests.doubles import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = K8S / "schemas"
DASHBOARD = DEPLOY / "grafana" / "erc.json"
# The oldest Kubernetes the manifests promise to work on (deploy/README.md): a field added later
# fails here. matchLabelKeys in a topology spread is on by default from 1.27.
K8S_VERSION = "1.33.0"
# Labels Prometheus gives every series it scrapes through a ServiceMonitor (target labels).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# Grafana's interval variables, given a value so that the expression parses as Prometheus sees it.
GRAFANA_INTERVALS = re.compile(r"\$__(?:rate_interval|interval|range)\b")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if SCHEMAS not in p.parents)


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def applied() -> list[dict]:
    """What `kubectl apply -f deploy/k8s/` creates: the folder's files, not its subfolders."""
    return [doc for path in manifest_files() if path.parent == K8S for doc in load(path)]


def one(docs: list[dict], kind: str, name: str = "erc") -> dict:
    """The object of that kind and name (other files, such as rayjob-label.yaml, add their own)."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


# --- schemas ----------------------------------------------------------------------------------

_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"


def _strict(schema: dict) -> dict:
    """The API server's strict field validation (kubectl's default): a field the schema does not
    name is an error, except under x-kubernetes-preserve-unknown-fields. A CRD's structural
    schema leaves additionalProperties out (the server prunes or rejects unknown fields), so a
    plain JSON-schema validator would accept any typo; this closes every object that lists its
    properties. ObjectMeta comes from the Kubernetes schema (strict too)."""
    if not isinstance(schema, dict):
        return schema
    if schema.get("$ref", "").endswith(_OBJECT_META):
        schema["$ref"] = f"{_DEFINITIONS_URI}#/$defs/{_OBJECT_META}"
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for sub in schema.get("properties", {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        _strict(schema.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)
    return schema


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> a validator for every vendored CRD schema."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Registry().with_resource(_DEFINITIONS_URI, Resource.from_contents(definitions))
    validators = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = _strict(json.loads(path.read_text()))
        for gvk in schema.pop("x-kubernetes-group-version-kind"):
            api_version = f"{gvk['group']}/{gvk['version']}"
            validators[api_version, gvk["kind"]] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def validation_errors(doc: dict) -> list[str]:
    """Why ``doc`` would be refused, as 'where: what' lines; [] when it validates."""
    validator = crd_validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is not None:
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')} (vendor its CRD's in {SCHEMAS})"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    return []


def test_the_crd_schemas_are_vendored():
    assert {kind for _, kind in crd_validators()} == {"ScaledObject", "ServiceMonitor", "RayJob"}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_strictly(path: Path):
    docs = load(path)
    assert docs, f"{path} holds no object"
    errors = {f"{d.get('kind')} {d['metadata'].get('name')}": e for d in docs if (e := validation_errors(d))}
    assert not errors, errors


_RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "probe"},
    "spec": {
        "entrypoint": "python job.py",
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [{"name": "h", "image": "i"}]}}}
        },
    },
}


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("ScaledObject", lambda d: d["spec"].update(minReplicas=2)),  # the HPA's spelling
        ("ScaledObject", lambda d: d["spec"].update(maxReplicaCount="8")),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("metadata")),
        ("ScaledObject", lambda d: d["metadata"].update(labelz={})),  # ObjectMeta is strict too
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(targetPortName="http")),
        ("RayJob", lambda d: d["spec"].update(entryPoint="python job.py")),
        ("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(containerz=[])),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["topologySpreadConstraints"][0].update(maxskew=1)),
        ("Job", lambda d: d["spec"]["template"]["spec"].update(restartPolicy=7)),
    ],
)
def test_validation_refuses_a_broken_object(kind: str, break_it):
    """The validators are not vacuous: each object validates as written, and a misspelt field, a
    wrong type or a missing required field in it does not."""
    doc = _RAYJOB if kind == "RayJob" else one(applied(), kind, "erc-index" if kind == "Job" else "erc")
    assert validation_errors(doc) == []
    broken = copy.deepcopy(doc)
    break_it(broken)
    assert validation_errors(broken), f"{kind}: the broken copy validated"


# --- the service's pods -----------------------------------------------------------------------


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def _image_env(name: str) -> set[str]:
    """The values of an ENV variable set in the Dockerfile's runtime stages."""
    return set(re.findall(rf"\b{name}=(\S+)", (ROOT / "Dockerfile").read_text()))


def test_deployment_carries_the_probes_and_is_hardened():
    """The pod deploy/README.md promises (moved from tests/test_deploy.py)."""
    pod = _pod(one(applied(), "Deployment"))
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup, readiness = container["startupProbe"], container["readinessProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a model load takes minutes
    assert readiness["timeoutSeconds"] >= 5 and readiness["failureThreshold"] >= 3
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/dev/shm"]]  # HOME, shared memory
    env = {e["name"]: float(e["value"]) for e in container["env"] if re.fullmatch(r"ERC_\w+_S", e["name"])}
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop >= 3  # endpoints leave before the drain starts
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + env["ERC_DRAIN_GRACE_S"] + env["ERC_REQUEST_TIMEOUT_S"]
    assert env["ERC_DRAIN_TIMEOUT_S"] >= env["ERC_REQUEST_TIMEOUT_S"]


def _containers(node) -> list[dict]:
    """Every container and init container anywhere in a manifest."""
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    if not isinstance(node, dict):
        return []
    found = [c for key in ("containers", "initContainers") for c in node.get(key, []) if isinstance(c, dict)]
    return found + [c for value in node.values() for c in _containers(value)]


def test_service_settings_in_the_manifests_exist():
    """Settings ignore unknown ERC_ variables (extra="ignore"): a misspelt one would do nothing."""
    known = {f"ERC_{name.upper()}" for name in Settings.model_fields}
    used = {
        env["name"]
        for path in manifest_files()
        for container in _containers(load(path))
        for env in container.get("env", [])
        if env["name"].startswith("ERC_")
    }
    assert used and not used - known, sorted(used - known)


def test_replicas_spread_over_nodes():
    deployment = one(applied(), "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in _pod(deployment)["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in spread
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        # It counts the erc pods themselves.
        assert _selects(constraint["labelSelector"]["matchLabels"], labels), constraint
    pdb = one(applied(), "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)


def test_index_job_writes_the_volume_the_replicas_read():
    from service.cli import data_app, index_app

    docs = applied()
    deployment, service, pdb = (one(docs, k) for k in ("Deployment", "Service", "PodDisruptionBudget"))
    job = one(docs, "Job", "erc-index")
    pod, job_pod = _pod(deployment), _pod(job)
    [index_root] = _image_env("ERC_INDEX_ROOT")
    [data_dir] = _image_env("ERC_DATA_DIR")

    def index_mount(p: dict, container: dict) -> tuple[dict, dict]:
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == index_root]
        [volume] = [v for v in p["volumes"] if v["name"] == mount["name"]]
        return mount, volume["persistentVolumeClaim"]

    mount, claim = index_mount(pod, pod["containers"][0])
    assert mount["readOnly"] is True and claim["readOnly"] is True
    [builder] = [c for c in job_pod["containers"] if c["command"][:3] == ["erc", "index", "ensure"]]
    assert "ensure" in {c.name for c in index_app.registered_commands}
    job_mount, job_claim = index_mount(job_pod, builder)
    assert job_claim["claimName"] == claim["claimName"] and not job_mount.get("readOnly")
    pvc = one(docs, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # one writer, readers on any node
    # The data the build reads: fetched by an init container into the volume the builder reads.
    [fetch] = job_pod["initContainers"]
    assert fetch["command"] == ["erc", "data", "fetch"] and "fetch" in {c.name for c in data_app.registered_commands}
    data_mounts = {m["name"] for c in (fetch, builder) for m in c["volumeMounts"] if m["mountPath"] == data_dir}
    assert len(data_mounts) == 1
    assert job_pod["restartPolicy"] in {"Never", "OnFailure"} and job_pod["automountServiceAccountToken"] is False
    for c in job_pod["containers"] + job_pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["capabilities"]["drop"]
    # The Job's pod is no replica: neither the Service nor the budget may count it.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert not _selects(selector, job_labels)
    # The replicas wait for the index the entrypoint needs, not crash on its absence.
    found = re.search(r'index="\$\{ERC_INDEX_ROOT:-([^}]+)\}/(\w+)"', (DEPLOY / "entrypoint.sh").read_text())
    assert found and found.group(1) == index_root
    needed = f"{index_root}/{found.group(2)}/manifest.json"
    assert any(needed in " ".join(c["command"]) for c in pod["initContainers"]), needed


def test_service_monitor_scrapes_the_pods_metrics(exported):
    docs = applied()
    service, monitor, deployment = (one(docs, k) for k in ("Service", "ServiceMonitor", "Deployment"))
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {}))
    assert _selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"] for p in _pod(deployment)["containers"][0]["ports"]}
    # The service's own labels that a target label would shadow (its `endpoint` against the
    # operator's port name): without honorLabels Prometheus renames the service's to
    # exported_endpoint, and every `by (endpoint)` would group by "http".
    shadowed = set().union(*exported.labels.values()) & TARGET_LABELS
    assert shadowed == {"endpoint"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert ports[endpoint["port"]]["targetPort"] in container_ports
        assert endpoint["path"] == exported.path
        assert endpoint.get("honorLabels") is True


def test_compose_file_has_its_services():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"erc", "nginx", "prometheus"} <= set(compose["services"])


# --- what the app exports, and the queries over it --------------------------------------------


class Exported:
    """The series names a running app exports at ``path``, each with its label names."""

    path = "/metrics"

    def __init__(self, text: str) -> None:
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"),
        }
        self.labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            # A labelled family with no sample yet still exports its series once one comes.
            for suffix in suffixes.get(family.type, ("",)):
                self.labels.setdefault(family.name + suffix, set())
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)


@pytest.fixture(scope="module")
def exported() -> Exported:
    """The app on the engine double, after a prediction and a refused request, so that the
    labelled families (endpoint and status, label set and label, reason) carry samples."""
    settings = Settings(max_body_bytes=1024)
    engine = FakeEngine()

    async def loader(s: Settings, state: ServiceState) -> None:
        state.engine = engine
        state.predictor = Predictor(s, ServingSpec(demonstrations=Demonstrations(k=0), model_name="fake"), engine, {})

    with TestClient(create_app(settings, loader=loader)) as client:
        for _ in range(100):
            if client.get("/ready").status_code == 200:
                break
        dialogue = {"id": "d", "turns": [{"speaker": "A", "text": "Hello"}, {"speaker": "B", "text": "Hi!"}]}
        assert client.post("/predict", json={"dialogue": dialogue}).status_code == 200
        assert client.post("/predict", content=b"{" + b" " * 2048 + b"}").status_code == 413
        response = client.get(Exported.path)
        assert response.status_code == 200
        return Exported(response.text)


class Query:
    """One PromQL expression: the series it selects and the labels it names."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.ast = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
        self.selectors: list[tuple[str | None, dict[str, str]]] = []  # name, {label: matcher}
        self.grouping: set[str] = set()
        self.quantiles: list = []
        promql_parser.walk(self.ast, self._visit)

    def _visit(self, node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers
            name = node.name or next((m.value for m in matchers if m.name == "__name__"), None)
            ops = {m.name: f"{str(m.op).split('.')[-1]} {m.value}" for m in matchers if m.name != "__name__"}
            self.selectors.append((name, ops))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            self.grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            self.grouping.update(node.modifier.matching.labels)
        elif isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            self.quantiles.append(node.args[1])
        return True

    @property
    def metrics(self) -> set[str | None]:
        return {name for name, _ in self.selectors}

    def problems(self, exported: Exported) -> list[str]:
        """What Prometheus would answer with nothing (an unknown series or label), or wrongly."""
        found = []
        for name, labels in self.selectors:
            if name not in exported.labels or not name.startswith("erc_"):
                found.append(f"selects {name!r}, which the service does not export")
                continue
            if unknown := set(labels) - exported.labels[name] - TARGET_LABELS:
                found.append(f"matches {name} on labels it does not have: {sorted(unknown)}")
        known = set().union(*(exported.labels.get(n, set()) for n in self.metrics)) | TARGET_LABELS
        if unknown := self.grouping - known:
            found.append(f"groups by labels none of its series has: {sorted(unknown)}")
        for arg in self.quantiles:  # histogram_quantile over buckets, aggregated keeping `le`
            inner = Query(str(arg))
            if not all(n and n.endswith("_bucket") for n in inner.metrics):
                found.append(f"histogram_quantile over {sorted(map(str, inner.metrics))}, not a histogram's buckets")
            kept = arg.modifier.labels if isinstance(arg, promql_parser.AggregateExpr) and arg.modifier else []
            if isinstance(arg, promql_parser.AggregateExpr) and "le" not in kept:
                found.append("histogram_quantile over an aggregation that drops `le`")
        return found


def test_query_checks_catch_mistakes(exported):
    """The checks below are not vacuous."""
    assert exported.labels["erc_engine_waiting_requests"] == set()
    assert {"endpoint", "status", "le"} <= exported.labels["erc_http_request_duration_seconds_bucket"]
    assert Query("sum(rate(erc_http_requests_total[5m]))").problems(exported) == []
    for bad in (
        "sum(erc_engine_queue_depth)",  # no such metric
        "sum(rate(erc_http_requests[5m]))",  # a counter's family name, not its series
        'sum(erc_engine_waiting_requests{status="200"})',  # a label it does not have
        "sum by (label) (rate(erc_http_requests_total[5m]))",
        "histogram_quantile(0.9, sum by (endpoint) (rate(erc_http_request_duration_seconds_bucket[5m])))",
        "histogram_quantile(0.9, rate(erc_http_request_duration_seconds_sum[5m]))",
        "sum(process_resident_memory_bytes)",  # exported, but not the service's own
    ):
        assert Query(bad).problems(exported), bad
    with pytest.raises(ValueError):
        Query("sum(rate(erc_http_requests_total[5m])")


def _dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def test_dashboard_queries_select_what_the_service_exports(exported):
    targets = _dashboard_targets()
    assert targets
    problems = {f"{title}: {expr}": p for title, expr in targets if (p := Query(expr).problems(exported))}
    assert not problems, problems


def test_dashboard_covers_the_service(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Importable into any Grafana: the data source is a variable, not this or that instance's uid.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", variables["namespace"]["query"]["query"])
    assert found and not Query(found.group(1)).problems(exported) and found.group(2) in TARGET_LABELS
    queries = [Query(expr) for _, expr in _dashboard_targets()]
    selected = set().union(*(q.metrics for q in queries))
    for needed in (
        "erc_http_requests_total",  # requests per endpoint and status
        "erc_http_request_duration_seconds_bucket",  # their latency
        "erc_predictions_total",  # labels predicted
        "erc_engine_waiting_requests",  # the queue the autoscaler reads
        "erc_engine_batch_size_bucket",
        "erc_prefix_cache_hit_tokens_total",
        "erc_prefix_cache_queried_tokens_total",
    ):
        assert needed in selected, needed
    latency = [q for q in queries if "erc_http_request_duration_seconds_bucket" in q.metrics]
    assert any({"endpoint", "status"} <= q.grouping for q in latency)


def test_one_autoscaler_on_the_queue(exported):
    docs = applied()
    deployment, scaled, pdb, monitor = (
        one(docs, k) for k in ("Deployment", "ScaledObject", "PodDisruptionBudget", "ServiceMonitor")
    )
    # KEDA creates the HPA: a second autoscaler on the same Deployment would fight it.
    autoscalers = [
        d
        for d in docs
        if d["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}
        and d["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    ]
    assert autoscalers == [scaled]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] > pdb["spec"]["minAvailable"]  # a node drain can always evict one
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    job = monitor["metadata"]["name"]  # prometheus-operator's job label: the Service's name
    thresholds = {}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        query = Query(meta["query"])
        assert not query.problems(exported), (meta["query"], query.problems(exported))
        assert all(labels.get("job") == f"Equal {job}" for _, labels in query.selectors), meta["query"]
        [metric] = query.metrics
        thresholds[metric] = float(meta["threshold"])
        assert meta["ignoreNullValues"] == "false"  # no series is an error (fallback), not zero load
    assert set(thresholds) == {"erc_engine_waiting_requests", "erc_inflight_requests"}
    # Scale out before a replica refuses work (429 past ERC_MAX_INFLIGHT).
    assert thresholds["erc_inflight_requests"] < Settings().max_inflight
    # The documented alternative (an HPA on prometheus-adapter's external metrics) stays in step.
    [hpa] = load(K8S / "alternatives" / "hpa-prometheus-adapter.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        spec["minReplicaCount"],
        spec["maxReplicaCount"],
    )
    external = {m["external"]["metric"]["name"]: m["external"] for m in hpa["spec"]["metrics"]}
    assert set(external) == set(thresholds) and set(external) <= set(exported.labels)
    for metric, target in external.items():
        assert float(target["target"]["averageValue"]) == thresholds[metric]
        assert target["metric"]["selector"]["matchLabels"] == {"job": job}
