"""The deployment files in server/: every Kubernetes manifest validates against the Kubernetes schemas (strict:
unknown fields are errors), the InferenceService against KServe's CRD schema, the compose file against the
Compose specification; what the manifests tell surgeon (options, ports, probes, images, mounts) is what
surgeon and the Dockerfile do; and the Indexed Job's and the Slurm script's commands, run here with the shard
index set by hand, give the same table.json as one `surgeon study` run.

Validators (the test extra): kubernetes-validate, the Kubernetes OpenAPI schemas of each release as JSON
schemas, checked with jsonschema (kubeconform, the usual CLI, is a Go binary on no registry this project uses);
jsonschema on KServe's CRD schema, vendored in server/schemas/; check-jsonschema's vendored compose-spec schema
(the Docker CLI's `docker compose config` is not on CI's machine)."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from surgeon.cli import app
from surgeon.v1 import surgeon_pb2

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "server"
KUBERNETES = SERVER / "kubernetes"
COMPOSE = SERVER / "compose.yaml"
SLURM = SERVER / "slurm" / "study.sbatch"
#: the oldest release with every field used GA or on by default (podFailurePolicy GA in 1.31,
#: backoffLimitPerIndex beta since 1.29), and the newest kubernetes-validate knows
KUBERNETES_VERSIONS = ("1.31", "1.37")
KSERVE_SCHEMA = SERVER / "schemas" / "kserve-inferenceservice-v1beta1.json"
KSERVE_SCHEMA_SHA256 = "bed581e78b97661d2043ed0c8681625397b56883b6aa8e2342a4a42eb2ba2a5b"  # server/schemas/README.md
KSERVE_API = ("serving.kserve.io/v1beta1", "InferenceService")
SURGEON_SERVICE = surgeon_pb2.DESCRIPTOR.services_by_name["Surgeon"].full_name
TINY_STUDY = """
name = "deploy test"
[rank]
n_images = 100
[[models]]
name = "toy"
[[policies]]
policy = "top-k"
k = 2
[[data]]
name = "shape"
path = "toy:shape"
n = 30
[[bias]]
name = "probe"
path = "toy"
n = 10
"""  # 4 cells: (baseline, top-k) x (shape, probe)


def documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc is not None
    ]


def document(filename: str, kind: str) -> dict:
    (found,) = [doc for name, doc in documents() if name == filename and doc["kind"] == kind]
    return found


def pod_spec(doc: dict) -> dict:
    """The pod template's spec; an InferenceService's predictor holds the pod fields itself."""
    return doc["spec"]["predictor"] if doc["kind"] == "InferenceService" else doc["spec"]["template"]["spec"]


def workloads() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc["kind"] in ("Deployment", "Job", "InferenceService")]


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.MULTILINE)
    assert match
    return match.group(1)


def dockerfile_stages() -> dict[str, list[str]]:
    """Each Dockerfile stage's ENTRYPOINT (exec form), [] where it sets none."""
    stages: dict[str, list[str]] = {}
    stage = None
    for line in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if found := re.match(r"FROM \S+ AS (\S+)", line):
            stage = found.group(1)
            stages[stage] = []
        elif line.startswith("ENTRYPOINT ") and stage:
            stages[stage] = json.loads(line.removeprefix("ENTRYPOINT "))
    return stages


def image_targets() -> dict[str, str]:
    """Image reference -> the Dockerfile target that builds it (the tags the manifests' headers build)."""
    version = project_version()
    return {f"surgeon:{version}": "surgery", f"surgeon:{version}-oip": "oip"}


def cli_params(argv: list[str], env: dict[str, str], monkeypatch) -> dict:
    """The options of `surgeon ARGV` as surgeon's own CLI parses them in the container's environment, without
    running it: an unknown option or a bad value raises (click's UsageError, as typer vendors it)."""
    assert argv[0] == "surgeon", argv
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = typer.main.get_command(app).commands[argv[1]]
    return command.make_context(argv[1], list(argv[2:])).params


def container_argv(container: dict) -> list[str]:
    """What the container runs: its command, or the image's entrypoint, then its args."""
    entrypoint = container.get("command") or dockerfile_stages()[image_targets()[container["image"]]]
    return [*entrypoint, *container.get("args", [])]


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# ---- schemas ---------------------------------------------------------------------------------------------


@functools.cache
def kserve_validator() -> jsonschema.Draft4Validator:
    """KServe's CRD schema, strict like the API server's field validation: an object schema that lists its
    properties and allows no unknown fields (no x-kubernetes-preserve-unknown-fields) refuses others."""
    text = KSERVE_SCHEMA.read_bytes()
    assert hashlib.sha256(text).hexdigest() == KSERVE_SCHEMA_SHA256, "the vendored KServe schema changed"

    def strict(node):
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: strict(value) for key, value in node.items()}
        open_object = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in node and not open_object:
            node["additionalProperties"] = False
        return node

    return jsonschema.Draft4Validator(strict(json.loads(text)))


def schema_errors(doc: dict) -> list[str]:
    """Why `doc` is not a valid object (empty: it is), for every Kubernetes version tested."""
    if (doc.get("apiVersion"), doc.get("kind")) == KSERVE_API:
        errors = [f"{list(e.path)}: {e.message}" for e in kserve_validator().iter_errors(doc)]
        # the CRD schema leaves metadata open: check it as the ObjectMeta of a core object
        return errors + schema_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"Kubernetes {version}, {list(error.path)}: {error.message}")
    return errors


@pytest.mark.parametrize("doc", [d for _, d in documents()], ids=[f"{n}:{d['kind']}" for n, d in documents()])
def test_every_manifest_validates(doc):
    assert schema_errors(doc) == []  # a kind without a schema raises SchemaNotFoundError: nothing goes unchecked


@pytest.mark.parametrize(
    ("filename", "kind", "edit", "message"),
    [
        ("serve.yaml", "Deployment", lambda s: s["containers"][0].update(imagePullPolcy="Always"), "imagePullPolcy"),
        ("serve.yaml", "Deployment", lambda s: s["containers"][0]["startupProbe"]["grpc"].update(port="grpc"), "port"),
        ("study-shards.yaml", "Job", lambda s: s.update(restartPolicy=7), "restartPolicy"),
        ("serve-model-kserve.yaml", "InferenceService", lambda s: s.update(minReplica=1), "minReplica"),
        ("serve-model-kserve.yaml", "InferenceService", lambda s: s["containers"][0].pop("name"), "name"),
        ("serve-model-kserve.yaml", "InferenceService", lambda s: s["containers"][0].update(envs=[]), "envs"),
    ],
)
def test_the_validators_refuse_a_broken_manifest(filename, kind, edit, message):
    doc = copy.deepcopy(document(filename, kind))
    edit(pod_spec(doc))
    errors = schema_errors(doc)
    assert errors and message in " ".join(errors)


def test_kserve_metadata_is_checked_too():
    doc = copy.deepcopy(document("serve-model-kserve.yaml", "InferenceService"))
    doc["metadata"]["labels"] = {"app": 1}
    assert schema_errors(doc)


def test_compose_file_validates_against_the_compose_spec(tmp_path):
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*check, str(COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("read_only:", "read_onyl:"), encoding="utf-8")
    result = subprocess.run([*check, str(broken)], capture_output=True, text=True)
    assert result.returncode == 1 and "read_onyl" in result.stdout


# ---- what the manifests tell surgeon -------------------------------------------------------------------


def test_images_are_the_dockerfile_targets_at_the_project_version():
    stages, targets = dockerfile_stages(), image_targets()
    assert set(targets.values()) <= set(stages)
    for filename, doc in workloads():
        for container in pod_spec(doc)["containers"]:
            assert container["image"] in targets, (filename, container["image"])
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for name, service in compose["services"].items():
        assert targets[service["image"]] == service["build"]["target"], name
        assert (COMPOSE.parent / service["build"]["context"] / "Dockerfile").resolve() == REPO / "Dockerfile"


def test_no_secret_in_a_manifest():
    texts = [p.read_text(encoding="utf-8") for p in [*KUBERNETES.glob("*.yaml"), COMPOSE, SLURM]]
    assert not any(re.search(r"^kind:\s*Secret\b", text, re.MULTILINE) for text in texts)
    for filename, doc in workloads():
        for container in pod_spec(doc)["containers"]:
            for env in container.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET|KEY", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (filename, env["name"])


def test_pods_run_as_the_images_user_without_privileges_and_with_bounded_resources():
    uid = int(re.search(r"^USER (\d+):\d+$", (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1))
    for filename, doc in workloads():
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid, filename
        assert spec["automountServiceAccountToken"] is False, filename
        mounts_tmp = []
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert context["readOnlyRootFilesystem"] is True, filename
            mounts_tmp.append(any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]))
            for need in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][need]), (filename, need)
        assert all(mounts_tmp), f"{filename}: a read-only root needs a writable /tmp"


def test_every_claim_a_pod_mounts_is_declared():
    claims = {doc["metadata"]["name"] for _, doc in documents() if doc["kind"] == "PersistentVolumeClaim"}
    used = {
        volume["persistentVolumeClaim"]["claimName"]
        for _, doc in workloads()
        for volume in pod_spec(doc).get("volumes", [])
        if "persistentVolumeClaim" in volume
    }
    kserve = pod_spec(document("serve-model-kserve.yaml", "InferenceService"))["containers"][0]
    used.add(re.match(r"pvc://([^/]+)/", literal_env(kserve)["STORAGE_URI"]).group(1))
    assert used == claims


def test_serve_deployment_matches_surgeon_serve(monkeypatch):
    deployment, service = document("serve.yaml", "Deployment"), document("serve.yaml", "Service")
    (container,) = pod_spec(deployment)["containers"]
    params = cli_params(container_argv(container), literal_env(container), monkeypatch)
    (port,) = container["ports"]
    assert params["port"] == port["containerPort"]  # read from $SURGEON_PORT, as the image's health check does
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == params["port"], probe
    assert container["readinessProbe"]["grpc"]["service"] == SURGEON_SERVICE
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    token = next(e for e in container["env"] if e["name"] == params["token_env"])
    assert token["valueFrom"]["secretKeyRef"] == {"name": "surgeon-token", "key": "token"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts[str(params["exports_root"])].get("readOnly")
    for root in ("models_root", "data_root"):
        assert mounts[str(params[root])]["readOnly"], root
    # the drain (--grace, then 10 s for cancelled jobs to clean up) ends before Kubernetes kills the pod
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > params["grace"] + 10
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("filename", ["serve-model.yaml", "serve-model-kserve.yaml"])
def test_serve_model_matches_surgeon_serve_model(filename, monkeypatch):
    (doc,) = [d for name, d in workloads() if name == filename]
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    params = cli_params(container_argv(container), literal_env(container), monkeypatch)
    assert params["host"] == "0.0.0.0"
    ports = {p["containerPort"]: p["name"] for p in container["ports"]}
    assert set(ports) == {params["http_port"], params["grpc_port"], params["metrics_port"]}
    assert container["ports"][0]["containerPort"] == params["http_port"]  # KServe's Service serves the first on 80
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in (params["http_port"], ports[params["http_port"]]), probe
    annotations = spec["annotations"] if doc["kind"] == "InferenceService" else doc["spec"]["template"]["metadata"]
    annotations = annotations if doc["kind"] == "InferenceService" else annotations["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(params["metrics_port"])
    assert params["threads"] == int(container["resources"]["limits"]["cpu"])  # onnxruntime fits the CPU limit
    export = str(params["export_dir"])
    if doc["kind"] == "InferenceService":
        env = literal_env(container)
        assert env["PROTOCOL"] == "v2"  # the Open Inference Protocol, as KServe names it
        assert env["STORAGE_URI"].startswith("pvc://") and export == "/mnt/models"  # KServe mounts it there
        assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"  # else it aims at port 9091
        assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    else:
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == export]
        assert mount["readOnly"]
        service = document(filename, "Service")
        assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports.values())


def test_an_option_surgeon_lacks_is_refused(monkeypatch):
    with pytest.raises(Exception, match="No such option"):
        cli_params(["surgeon", "serve-model", "/model", "--metrics-prot", "9000"], {}, monkeypatch)
    with pytest.raises(Exception, match="valid integer"):
        cli_params(["surgeon", "serve"], {"SURGEON_PORT": "grpc"}, monkeypatch)


def test_compose_services_match_the_cli(monkeypatch):
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    stages = dockerfile_stages()
    serve = compose["services"]["serve"]
    params = cli_params([*stages["surgery"], *serve["command"]], serve["environment"], monkeypatch)
    assert serve["ports"] == [f"127.0.0.1:{params['port']}:{params['port']}"]
    model = compose["services"]["serve-model"]
    export = re.fullmatch(r"\$\{SURGEON_EXPORT:-(/exports/[^}]+)\}", model["command"][0])
    assert export, model["command"][0]
    params = cli_params([*stages["oip"], export.group(1), *model["command"][1:]], {}, monkeypatch)
    published = {p.rsplit(":", 1)[1] for p in model["ports"]}
    assert published == {str(params[p]) for p in ("http_port", "grpc_port", "metrics_port")}
    assert model["volumes"][0]["read_only"] and model["volumes"][0]["source"] == serve["volumes"][0].split(":")[0]


def test_study_jobs_agree_on_shards_files_and_volumes():
    shards, collect = document("study-shards.yaml", "Job"), document("study-collect.yaml", "Job")
    assert shards["spec"]["completionMode"] == "Indexed"
    (shard,), (collector,) = pod_spec(shards)["containers"], pod_spec(collect)["containers"]
    env = literal_env(shard)
    assert int(env.pop("SHARDS")) == shards["spec"]["completions"]
    assert literal_env(collector) == env  # same study file, output, cache and data
    assert pod_spec(collect)["volumes"] == pod_spec(shards)["volumes"]
    assert collector["volumeMounts"] == shard["volumeMounts"] and collector["image"] == shard["image"]
    assert "--shard" in shard["args"][0] and "--collect" in collector["args"][0]


# ---- the study's shards, run here ---------------------------------------------------------------------


def surgeon_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment, with this interpreter's `surgeon` first on PATH (the one a container has)."""
    bin_dir = Path(sys.executable).parent
    assert shutil.which("surgeon", path=str(bin_dir)), f"no surgeon script next to {sys.executable}"
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def run(*commands: tuple[list[str], dict[str, str]]) -> None:
    """Run (argv, env) commands at once, as a cluster runs shards side by side, and wait for all (stderr to
    files: a pipe nobody reads yet would stall a process that fills it)."""
    running = []
    for argv, env in commands:
        log = tempfile.TemporaryFile(mode="w+")
        running.append((argv, log, subprocess.Popen(argv, env=surgeon_env(env), stdout=log, stderr=log)))
    for argv, log, process in running:
        with log:
            process.wait(timeout=600)
            log.seek(0)
            assert process.returncode == 0, f"{argv} exited {process.returncode}: {log.read()[-2000:]}"


def job_command(doc: dict, root: Path, study: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The Job's container command for this machine: each volume a folder under `root` (the same claim and
    subPath, the same folder, across Jobs), the ConfigMap's study file written into its folder, and the env's
    paths moved under those folders; the command itself runs as written."""
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            where = root / "claims" / volume["persistentVolumeClaim"]["claimName"] / mount.get("subPath", "")
        elif "configMap" in volume:
            where = root / "configmaps" / volume["configMap"]["name"]
            (item,) = volume["configMap"]["items"]
            where.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(study, where / item["path"])
        else:  # emptyDir: one per pod
            where = root / "pods" / f"{doc['metadata']['name']}-{env.get('JOB_COMPLETION_INDEX', '')}" / mount["name"]
        where.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = where
    moved = {}
    for name, value in literal_env(container).items():
        mount = max((m for m in mounts if value == m or value.startswith(m + "/")), key=len, default=None)
        moved[name] = str(mounts[mount]) + value[len(mount) :] if mount else value
    return [*container["command"], *container["args"]], {**moved, **env}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny study file, table.json of one `surgeon study` run of it), with a cache of its own."""
    tmp = tmp_path_factory.mktemp("one-run")
    study = tmp / "study.toml"
    study.write_text(TINY_STUDY, encoding="utf-8")
    run((["surgeon", "study", str(study), "--out", str(tmp / "out"), "--quiet"], {"SURGEON_CACHE_DIR": str(tmp / "c")}))
    return study, tmp / "out" / "table.json"


@pytest.mark.slow
def test_indexed_job_shards_then_collect_equal_one_run(tmp_path, one_run):
    """Two shards side by side (SHARDS and the index set by hand, as Kubernetes sets JOB_COMPLETION_INDEX) on
    the same volumes, then collect."""
    study, table = one_run
    shards, collect = document("study-shards.yaml", "Job"), document("study-collect.yaml", "Job")
    run(*[job_command(shards, tmp_path, study, {"SHARDS": "2", "JOB_COMPLETION_INDEX": str(i)}) for i in range(2)])
    outputs = list((tmp_path / "claims").rglob("table.json"))
    assert outputs == []  # shards leave the table to --collect
    run(job_command(collect, tmp_path, study, {}))
    (written,) = (tmp_path / "claims").rglob("table.json")
    assert written.read_bytes() == table.read_bytes()


@pytest.mark.slow
def test_slurm_array_then_collect_equal_one_run(tmp_path, one_run):
    """The array's two tasks side by side (SLURM_ARRAY_TASK_ID and _COUNT set by hand, as `sbatch --array=0-1`
    sets them), then the same script without an array index collects."""
    study, table = one_run
    env = {"STUDY_FILE": str(study), "STUDY_OUT": str(tmp_path / "out"), "SURGEON_CACHE_DIR": str(tmp_path / "c")}
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        env[name] = ""  # a test run inside a Slurm job must not see its own array
    run(
        *[
            (["bash", str(SLURM)], {**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"})
            for i in range(2)
        ]
    )
    assert not (tmp_path / "out" / "table.json").exists()
    run((["bash", str(SLURM)], env))
    assert (tmp_path / "out" / "table.json").read_bytes() == table.read_bytes()
