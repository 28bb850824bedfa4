"""deploy/kubernetes: every manifest parsed (yaml.safe_load_all) and checked against its
contract; the kustomization rendered with ``kubectl kustomize`` when kubectl is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from configparser import ConfigParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from deploy_files import REPO, secret_leaks

from orchestrator.cli import main as studyq_main
from workers.config import WorkerSettings

KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
SETTINGS_VARIABLES = {f"STUDYQ_{name.upper()}" for name in WorkerSettings.model_fields} | {
    "STUDYQ_DATABASE_URL_FILE",
    "STUDYQ_BROKER_URL_FILE",
}
PLACEHOLDER = "REPLACE_ME"
PGBOUNCER = "studyq-pgbouncer"


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    document = yaml.safe_load(KUSTOMIZATION.read_text())
    assert isinstance(document, dict)
    return document


def _generated_files(kustomization: dict[str, Any]) -> set[str]:
    return {
        entry.split("=")[-1]
        for generator in kustomization.get("configMapGenerator", [])
        for entry in generator.get("files", [])
    }


@pytest.fixture(scope="module")
def objects(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object of every manifest the kustomization lists."""
    found = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            if document is not None:
                found.append(document)
    return found


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "Job")]


# -- the kustomization ---------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_file(kustomization: dict[str, Any]) -> None:
    yaml_files = {path.name for path in KUBERNETES.glob("*.yaml")} | {
        path.name for path in KUBERNETES.glob("*.yml")
    }
    listed = set(kustomization["resources"])
    generated = _generated_files(kustomization)
    assert listed | generated | {KUSTOMIZATION.name} == yaml_files
    assert not listed & generated
    for name in listed | generated:
        assert (KUBERNETES / name).is_file(), name


def test_every_manifest_parses_into_named_objects(objects: list[dict[str, Any]]) -> None:
    assert objects
    for document in objects:
        assert document.get("apiVersion") and document.get("kind"), document
        assert document["metadata"]["name"], document
        assert "namespace" not in document["metadata"], "the kustomization sets the namespace"


def test_the_study_the_coordinator_job_runs_is_valid(
    kustomization: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "studyq-study"
    for name in _generated_files(kustomization):
        assert studyq_main(["validate", str(KUBERNETES / name)]) == 0, capsys.readouterr().err


# -- the workers ----------------------------------------------------------------------------


def test_the_worker_deployment(objects: list[dict[str, Any]]) -> None:
    worker = _one(objects, "Deployment", "studyq-worker")
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    container = _container(worker)
    assert container["image"] == "studyq"
    assert container["args"][0] == "worker"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command == ["studyq", "check"], probe
        assert container[probe]["timeoutSeconds"] >= 10, "studyq check imports Celery"
    assert _pod(worker)["securityContext"]["runAsNonRoot"] is True


def test_terminating_a_worker_leaves_time_for_its_runs(objects: list[dict[str, Any]]) -> None:
    worker = _one(objects, "Deployment", "studyq-worker")
    grace = float(_env(_container(worker))["STUDYQ_SHUTDOWN_GRACE_S"]["value"])
    assert _pod(worker)["terminationGracePeriodSeconds"] >= grace + 60


def test_keda_scales_the_workers_on_the_studyq_queue(objects: list[dict[str, Any]]) -> None:
    scaled = _one(objects, "ScaledObject", "studyq-worker")
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "studyq-worker"
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    worker_args = _container(_one(objects, "Deployment", "studyq-worker"))["args"]
    queue = worker_args[worker_args.index("--queues") + 1]
    assert trigger["metadata"]["listName"] == queue == "studyq"
    assert int(trigger["metadata"]["listLength"]) > 0
    auth = _one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    for ref in auth["spec"]["secretTargetRef"]:
        secret = _one(objects, "Secret", ref["name"])
        assert ref["key"] in secret["stringData"]


# -- Flower ---------------------------------------------------------------------------------


def test_flower_requires_auth_from_a_secret_and_is_not_exposed(
    objects: list[dict[str, Any]],
) -> None:
    flower = _one(objects, "Deployment", "studyq-flower")
    container = _container(flower)
    auth = _env(container)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert auth["key"] in _one(objects, "Secret", auth["name"])["stringData"]
    script = container["args"][0]
    assert "--persistent=True" in script and "--db=/data/flower.db" in script
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in _pod(flower)["volumes"]}
    claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    _one(objects, "PersistentVolumeClaim", claim)
    service = _one(objects, "Service", "studyq-flower")
    assert service["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize(
    ("basic_auth", "refused"),
    [("", True), ("admin:REPLACE_ME", True), ("lab:s3cret-value", False)],
)
def test_flower_refuses_to_start_with_the_template_password(
    objects: list[dict[str, Any]], tmp_path: Path, basic_auth: str, refused: bool
) -> None:
    """The container's shell guard, run with a stand-in for celery on PATH."""
    container = _container(_one(objects, "Deployment", "studyq-flower"))
    assert container["command"] == ["/bin/sh", "-c"]
    celery = tmp_path / "celery"
    celery.write_text('#!/bin/sh\necho "celery $*"\n')
    celery.chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", "-c", container["args"][0]],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "FLOWER_BASIC_AUTH": basic_auth},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if refused:
        assert done.returncode == 2 and "studyq-flower Secret" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("celery --app=workers.app flower --address=0.0.0.0")


# -- Jobs -----------------------------------------------------------------------------------


def test_the_migration_job_upgrades_the_schema_as_the_coordinator(
    objects: list[dict[str, Any]],
) -> None:
    job = _one(objects, "Job", "studyq-db-upgrade")
    container = _container(job)
    assert container["args"] == ["db", "upgrade"]
    (secret_volume,) = [v for v in _pod(job)["volumes"] if "secret" in v]
    assert secret_volume["secret"]["secretName"] == "studyq-coordinator"
    # directly to PostgreSQL, not through PgBouncer
    (item,) = secret_volume["secret"]["items"]
    assert item == {"key": "direct_database_url", "path": "database_url"}
    url = _one(objects, "Secret", "studyq-coordinator")["stringData"][item["key"]]
    assert urlsplit(url).hostname != PGBOUNCER and urlsplit(url).port == 5432
    assert _pod(job)["restartPolicy"] == "Never"


def test_the_coordinator_job_runs_the_study_from_the_config_map(
    objects: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    job = _one(objects, "Job", "studyq-coordinator")
    container = _container(job)
    args = container["args"]
    assert args[:2] == ["run", "/study/study.yaml"]
    assert args[args.index("--broker") + 1] == "$(STUDYQ_BROKER_URL)"
    assert "STUDYQ_BROKER_URL" in _env(container), "$(VAR) expands only a defined variable"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    (study,) = [v for v in _pod(job)["volumes"] if "configMap" in v]
    assert mounts[study["name"]] == "/study"
    assert study["configMap"]["name"] == kustomization["configMapGenerator"][0]["name"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [1, 2], "failed runs are not retried"


# -- configuration and secrets --------------------------------------------------------------


def test_studyq_containers_read_only_settings_that_exist(objects: list[dict[str, Any]]) -> None:
    for workload in _workloads(objects):
        for name in _env(_container(workload)):
            if name.startswith("STUDYQ_"):
                assert name in SETTINGS_VARIABLES, f"{workload['metadata']['name']}: {name}"


def test_secrets_come_from_secret_objects_only(objects: list[dict[str, Any]]) -> None:
    """URLs and passwords reach containers as files of a Secret volume (`*_FILE`) or
    `secretKeyRef`s, each naming a Secret and key that exist."""
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    for workload in _workloads(objects):
        name = workload["metadata"]["name"]
        container = _container(workload)
        for variable, entry in _env(container).items():
            if variable.endswith(("_URL", "PASSWORD", "AUTH")):
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], (name, variable)
            if variable.endswith("_FILE"):
                mount = next(
                    m
                    for m in container["volumeMounts"]
                    if entry["value"].startswith(m["mountPath"])
                )
                volume = next(v for v in _pod(workload)["volumes"] if v["name"] == mount["name"])
                secret = secrets[volume["secret"]["secretName"]]
                key = entry["value"].rsplit("/", 1)[1]
                assert key in secret["stringData"], (name, variable)
                assert volume["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"


def test_the_secret_templates_hold_only_placeholders(objects: list[dict[str, Any]]) -> None:
    for secret in (o for o in objects if o["kind"] == "Secret"):
        assert "data" not in secret, "templates use stringData, never encoded values"
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key}"


def test_no_secret_is_written_in_any_manifest(objects: list[dict[str, Any]]) -> None:
    def reference(value: str) -> bool:
        return PLACEHOLDER in value or re.fullmatch(r"\$\([A-Z_]+\)", value) is not None

    assert secret_leaks(objects, reference) == []
    planted = {"env": [{"name": "STUDYQ_REDIS_PASSWORD", "value": "hunter2"}]}
    assert secret_leaks(planted, reference), "the scanner must find a planted password"


# -- PgBouncer ------------------------------------------------------------------------------


def _pgbouncer_ini(objects: list[dict[str, Any]]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_string(_one(objects, "ConfigMap", PGBOUNCER)["data"]["pgbouncer.ini"])
    return parser


def test_pgbouncer_pools_transactions_with_the_settings_of_the_compose_file(
    objects: list[dict[str, Any]],
) -> None:
    ini = _pgbouncer_ini(objects)
    assert ini["pgbouncer"]["pool_mode"] == "transaction"
    shipped = ConfigParser()
    shipped.read(REPO / "deploy" / "pgbouncer" / "pgbouncer.ini")
    assert dict(ini["pgbouncer"]) == dict(shipped["pgbouncer"]), "one set of settings"
    assert set(ini["databases"]) == set(shipped["databases"]) == {"studyq"}
    assert int(ini["pgbouncer"]["max_db_connections"]) < 100, "PostgreSQL's max_connections"


def test_workers_and_coordinator_reach_postgresql_through_pgbouncer(
    objects: list[dict[str, Any]],
) -> None:
    service = _one(objects, "Service", PGBOUNCER)
    deployment = _one(objects, "Deployment", PGBOUNCER)
    port = _pgbouncer_ini(objects)["pgbouncer"]["listen_port"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == int(port)
    for name in ("studyq-worker", "studyq-coordinator"):
        url = urlsplit(_one(objects, "Secret", name)["stringData"]["database_url"])
        assert (url.hostname, url.port) == (PGBOUNCER, int(port)), name
        assert parse_qs(url.query) == {"prepare_threshold": ["none"]}, name


def test_pgbouncer_authenticates_every_role_from_its_secret(
    objects: list[dict[str, Any]],
) -> None:
    container = _container(_one(objects, "Deployment", PGBOUNCER))
    auth_file = _pgbouncer_ini(objects)["pgbouncer"]["auth_file"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(_one(objects, "Deployment", PGBOUNCER))["volumes"]}
    (auth,) = [name for name, v in volumes.items() if "secret" in v]
    assert auth_file == f"{mounts[auth]}/userlist.txt"
    secret = _one(objects, "Secret", volumes[auth]["secret"]["secretName"])
    users = [
        line.split()[0].strip('"') for line in secret["stringData"]["userlist.txt"].splitlines()
    ]
    assert users == ["studyq_coordinator", "studyq_worker", "studyq_analyst"]
    assert volumes[auth]["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"


# -- rendered -------------------------------------------------------------------------------


def test_kustomize_renders_the_stack_in_the_studyq_namespace(
    kustomization: dict[str, Any],
) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for document in objects:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "studyq", document["metadata"]
    image = f"{kustomization['images'][0]['newName']}:{kustomization['images'][0]['newTag']}"
    for workload in _workloads(objects):
        if workload["metadata"]["name"] != "studyq-pgbouncer":
            assert _container(workload)["image"] == image
    (config_map,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] != PGBOUNCER
    ]
    assert config_map["metadata"]["name"].startswith("studyq-study-"), "content-hashed"
    job = _one(objects, "Job", "studyq-coordinator")
    (study,) = [v for v in _pod(job)["volumes"] if "configMap" in v]
    assert study["configMap"]["name"] == config_map["metadata"]["name"]
