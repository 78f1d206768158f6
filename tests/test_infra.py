"""The deployment recipes in ``infra/``: the compose file against the official Compose Specification schema
(vendored by check-jsonschema) plus what a schema cannot see (API URLs, GPU reservation, Dask resources,
ports bound to 127.0.0.1, valid ``dask``/``labelrefinery`` command lines), and the Kubernetes manifests.

Each checker returns a list of problems, and broken copies of the files prove that the checks can fail.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
K8S = INFRA / "kubernetes"
PREFECT_SERVICE = "prefect-server"
SCHEDULER_SERVICE = "dask-scheduler"
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# ---- helpers -------------------------------------------------------------------------------------------
def compose_schema() -> dict:
    """The Compose Specification JSON schema as check-jsonschema vendors it (compose-spec/compose-spec)."""
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def schema_errors(doc: dict) -> list[str]:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def interpolate(value):
    """Compose variable interpolation with an empty environment: ``${X:-default}`` → ``default``."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        op = m["op"] or ""
        if op.endswith("?"):
            raise ValueError(f"{m[0]} requires {m['name']} to be set")
        return m["arg"] if op.endswith("-") else ""

    return _VAR.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def argv(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else str(value).split()


def service_argv(svc: dict) -> list[str]:
    return argv(svc.get("entrypoint")) + argv(svc.get("command"))


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dask_resources(args: list[str]) -> dict[str, float]:
    """``--resources "CPU=64 GPU=1"`` (possibly repeated) → {"CPU": 64.0, "GPU": 1.0}."""
    out: dict[str, float] = {}
    for i, a in enumerate(args):
        spec = args[i + 1] if a == "--resources" and i + 1 < len(args) else None
        if a.startswith("--resources="):
            spec = a.split("=", 1)[1]
        for part in (spec or "").replace(",", " ").split():
            name, _, qty = part.partition("=")
            out[name] = float(qty)
    return out


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def dask_cli_problems(where: str, args: list[str]) -> list[str]:
    """Parse ``dask scheduler|worker ...`` with the installed distributed CLI (nothing is started)."""
    import click
    from distributed.cli.dask_scheduler import main as scheduler_main
    from distributed.cli.dask_worker import main as worker_main

    if args[:1] in (["dask-scheduler"], ["dask-worker"]):
        args = ["dask", args[0].split("-")[1], *args[1:]]
    commands = {"scheduler": scheduler_main, "worker": worker_main}
    if len(args) < 2 or args[0] != "dask" or args[1] not in commands:
        return [f"{where}: not a dask scheduler/worker command: {args[:2]}"]
    try:
        commands[args[1]].make_context(f"dask {args[1]}", list(args[2:]))
    except click.ClickException as exc:
        return [f"{where}: {' '.join(args[:2])}: {exc.format_message()}"]
    return []


def labelrefinery_cli_problems(where: str, args: list[str]) -> list[str]:
    """Parse ``labelrefinery <command> ...`` with the project's own CLI (nothing runs)."""
    import typer

    from flows.cli import app

    if args[:1] != ["labelrefinery"]:
        return [f"{where}: not a labelrefinery command: {args[:1]}"]
    group = typer.main.get_command(app)
    try:
        ctx = group.make_context("labelrefinery", list(args[1:]))
        sub = group.get_command(ctx, args[1]) if len(args) > 1 else None
        if sub is None:
            return [f"{where}: unknown labelrefinery command {args[1:2]}"]
        sub.make_context(args[1], list(args[2:]))
    except typer.TyperException as exc:  # typer vendors its own click
        return [f"{where}: {exc}"]
    return []


def stage_requests() -> dict[str, dict[str, float]]:
    """What each kind of stage asks Dask for (infra/dask_local.yaml, read by flows/runtime.py)."""
    spec = yaml.safe_load((INFRA / "dask_local.yaml").read_text(encoding="utf-8"))
    return {k: {r: float(q) for r, q in v.items()} for k, v in spec["stage_resources"].items()}


def is_worker(svc: dict) -> bool:
    args = service_argv(svc)
    return args[:2] == ["dask", "worker"] or args[:1] == ["dask-worker"]


def is_gpu_worker(svc: dict) -> bool:
    return is_worker(svc) and "GPU" in dask_resources(service_argv(svc))


def port_host_ip(port) -> str | None:
    """The host IP a published port binds to; None when it binds every interface."""
    if isinstance(port, dict):
        return port.get("host_ip")
    text = str(port)
    if text.startswith("["):  # [::1]:8080:80
        return text[1 : text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


# ---- the compose file: what the schema cannot check ----------------------------------------------------
def compose_problems(raw: dict) -> list[str]:
    doc = interpolate(raw)
    problems: list[str] = []
    services: dict[str, dict] = doc.get("services") or {}
    server = services.get(PREFECT_SERVICE)
    if server is None:
        return [f"no {PREFECT_SERVICE!r} service"]
    server_args = service_argv(server)
    if server_args[:3] != ["prefect", "server", "start"]:
        problems.append(f"{PREFECT_SERVICE}: runs {server_args[:3]}, not `prefect server start`")
    api_url = f"http://{PREFECT_SERVICE}:{option(server_args, '--port') or '4200'}/api"
    db_url = environment(server).get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    db_host = re.match(r"postgresql\+asyncpg://[^@]*@([^:/]+)", db_url)
    if not db_host or db_host[1] not in services:
        problems.append(f"{PREFECT_SERVICE}: database URL {db_url!r} is not postgresql+asyncpg on a service")

    scheduler = services.get(SCHEDULER_SERVICE)
    if scheduler is None:
        return [*problems, f"no {SCHEDULER_SERVICE!r} service"]
    sched_args = service_argv(scheduler)
    problems += dask_cli_problems(SCHEDULER_SERVICE, sched_args)
    sched_address = f"tcp://{SCHEDULER_SERVICE}:{option(sched_args, '--port') or '8786'}"
    project_image = scheduler.get("image", "")
    if "labelrefinery" not in project_image or "build" not in scheduler:
        problems.append(f"{SCHEDULER_SERVICE}: must run the project's image (it unpickles task graphs)")

    requests = stage_requests()
    workers = {n: s for n, s in services.items() if is_worker(s)}
    gpu = {n: s for n, s in workers.items() if is_gpu_worker(s)}
    cpu = {n: s for n, s in workers.items() if n not in gpu}
    runners = {n: s for n, s in services.items() if service_argv(s)[:1] == ["labelrefinery"]}
    if not cpu or not gpu or not runners:
        found = (sorted(cpu), sorted(gpu), sorted(runners))
        problems.append(f"need CPU workers, a GPU worker and a runner; got {found}")

    mounts: dict[str, str] = {}
    for name, svc in {**workers, **runners}.items():
        args, env = service_argv(svc), environment(svc)
        if env.get("PREFECT_API_URL") != api_url:
            problems.append(f"{name}: PREFECT_API_URL is {env.get('PREFECT_API_URL')!r}, not {api_url!r}")
        if name in workers:
            problems += dask_cli_problems(name, args)
            if sched_address not in args:
                problems.append(f"{name}: does not connect to {sched_address}")
        else:
            problems += labelrefinery_cli_problems(name, args)
            if option(args, "--dask-address") not in (None, sched_address):
                problems.append(f"{name}: --dask-address is not {sched_address}")
        if "labelrefinery" not in svc.get("image", ""):
            problems.append(f"{name}: must run the project's image")
        for depends in (SCHEDULER_SERVICE, PREFECT_SERVICE):
            if depends not in (svc.get("depends_on") or {}):
                problems.append(f"{name}: does not depend on {depends}")
        for vol in svc.get("volumes") or []:
            source, _, target = (
                str(vol).partition(":")
                if isinstance(vol, str)
                else (vol.get("source"), "", vol.get("target"))
            )
            mounts.setdefault(name, target.split(":")[0] if target else "")
            if source and not source.startswith((".", "/", "~")) and source not in (doc.get("volumes") or {}):
                problems.append(f"{name}: volume {source!r} is not declared")
    if len(set(mounts.values())) != 1 or len(mounts) != len(workers) + len(runners):
        problems.append(f"workers and runner must mount the dataset at one path: {mounts}")

    for name, svc in cpu.items():
        res = dask_resources(service_argv(svc))
        if "GPU" in res or any(res.get(r, 0) < 2 * q for r, q in requests["cpu"].items()):
            problems.append(
                f"{name}: must advertise a CPU pool {requests['cpu']} x many and no GPU, has {res}"
            )
        if int(str((svc.get("deploy") or {}).get("replicas", 1))) < 1:
            problems.append(f"{name}: no replicas")
    for name, svc in gpu.items():
        args, res = service_argv(svc), dask_resources(service_argv(svc))
        if any(res.get(r, 0) < q for r, q in requests["gpu"].items()) or set(res) & set(requests["cpu"]):
            problems.append(
                f"{name}: must advertise {requests['gpu']} and none of {requests['cpu']}, has {res}"
            )
        if option(args, "--nthreads") != "1":
            problems.append(f"{name}: a GPU worker runs one thread")
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
            "devices"
        ) or []
        if not any(
            d.get("driver") == "nvidia"
            and "gpu" in (d.get("capabilities") or [])
            and str(d.get("count")) == "1"
            for d in devices
        ):
            problems.append(f"{name}: no NVIDIA GPU reservation (deploy.resources.reservations.devices)")

    for name, svc in services.items():
        for port in svc.get("ports") or []:
            if port_host_ip(port) not in ("127.0.0.1", "::1"):
                problems.append(
                    f"{name}: port {port!r} is published on every interface, bind it to 127.0.0.1"
                )
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, (list, dict)) else []:
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep!r}")
        if not svc.get("profiles") and "healthcheck" not in svc:
            problems.append(f"{name}: long-running service without a healthcheck")
        build = svc.get("build")
        if isinstance(build, dict):
            dockerfile = (
                COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            ).resolve()
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
    return problems


# ---- the Kubernetes recipe ----------------------------------------------------------------------------
def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name.endswith("-values.yaml"):
            continue  # Helm values, not a manifest
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((path.name, doc))
    return docs


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers") or [])


def k8s_problems(docs: list[tuple[str, dict]]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for fname, doc in docs:
        for key in ("apiVersion", "kind", "metadata", "spec"):
            if key not in doc:
                problems.append(f"{fname}: missing {key}")
        if (
            doc.get("kind") in ("DaskCluster", "DaskWorkerGroup")
            and doc.get("apiVersion") != "kubernetes.dask.org/v1"
        ):
            problems.append(f"{fname}: {doc.get('kind')} must be apiVersion kubernetes.dask.org/v1")
        by_kind.setdefault(doc.get("kind"), []).append(doc)
    clusters, groups = by_kind.get("DaskCluster", []), by_kind.get("DaskWorkerGroup", [])
    if len(clusters) != 1 or not groups:
        return [
            *problems,
            f"need one DaskCluster and a GPU DaskWorkerGroup, got {len(clusters)}, {len(groups)}",
        ]
    cluster = clusters[0]
    name = cluster["metadata"]["name"]
    requests = stage_requests()
    claims = {d["metadata"]["name"] for d in by_kind.get("PersistentVolumeClaim", [])}
    for d in by_kind.get("PersistentVolumeClaim", []):
        if "ReadWriteMany" not in d["spec"].get("accessModes", []):
            problems.append(f"PVC {d['metadata']['name']}: workers on several nodes need ReadWriteMany")

    def pod_problems(where: str, pod: dict) -> list[str]:
        out = []
        for vol in pod.get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in claims:
                out.append(f"{where}: claim {claim!r} is not defined")
        return out

    sched_spec = cluster["spec"]["scheduler"]
    (sched,) = containers(sched_spec["spec"])
    problems += dask_cli_problems(f"{name} scheduler", argv(sched.get("args")))
    if "labelrefinery" not in sched.get("image", ""):
        problems.append("scheduler: must run the project's image (it unpickles task graphs)")
    svc_ports = {p["port"] for p in sched_spec["service"]["ports"]}
    if 8786 not in svc_ports or sched_spec["service"].get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"scheduler service: needs port 8786 and type ClusterIP, has {sched_spec['service']}")

    api_urls = set()
    worker_groups = [("default", cluster["spec"]["worker"])] + [
        (g["metadata"]["name"], g["spec"]["worker"]) for g in groups
    ]
    gpu_groups = 0
    for gname, group in worker_groups:
        pod = group["spec"]
        problems += pod_problems(gname, pod)
        for c in containers(pod):
            args = argv(c.get("args"))
            problems += dask_cli_problems(gname, args)
            res = dask_resources(args)
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            api_urls.add(env.get("PREFECT_API_URL"))
            limits = (c.get("resources") or {}).get("limits") or {}
            if "GPU" in res:
                gpu_groups += 1
                if str(limits.get("nvidia.com/gpu")) != "1" or option(args, "--nthreads") != "1":
                    problems.append(f"{gname}: a GPU worker needs limits nvidia.com/gpu: 1 and --nthreads 1")
                if set(res) & set(requests["cpu"]) or any(
                    res.get(r, 0) < q for r, q in requests["gpu"].items()
                ):
                    problems.append(f"{gname}: must advertise {requests['gpu']} only, has {res}")
            else:
                if "nvidia.com/gpu" in limits or any(
                    res.get(r, 0) < 2 * q for r, q in requests["cpu"].items()
                ):
                    problems.append(
                        f"{gname}: a CPU worker advertises a CPU pool and holds no GPU, has {res}"
                    )
            if not any(m.get("mountPath") == "/data" for m in c.get("volumeMounts") or []):
                problems.append(f"{gname}: the dataset is not mounted at /data")
    for g in groups:
        if g["spec"].get("cluster") != name:
            problems.append(
                f"DaskWorkerGroup {g['metadata']['name']}: joins {g['spec'].get('cluster')!r}, not {name!r}"
            )
    if gpu_groups != 1:
        problems.append(f"expected one GPU worker group, found {gpu_groups}")

    for job in by_kind.get("Job", []):
        pod = job["spec"]["template"]["spec"]
        problems += pod_problems("Job", pod)
        for c in containers(pod):
            args = argv(c.get("command")) + argv(c.get("args"))
            problems += labelrefinery_cli_problems("Job", args)
            if option(args, "--dask-address") != f"tcp://{name}-scheduler:8786":
                problems.append(
                    f"Job: --dask-address must be the operator's service tcp://{name}-scheduler:8786"
                )
            api_urls.add({e["name"]: e.get("value") for e in c.get("env") or []}.get("PREFECT_API_URL"))
    if len(api_urls) != 1 or None in api_urls:
        problems.append(f"every worker and the Job need one PREFECT_API_URL, found {api_urls}")
    return problems


# ---- tests -------------------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification():
    raw = load_compose()
    assert schema_errors(raw) == []
    assert schema_errors(interpolate(raw)) == []  # what `docker compose config` validates


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("typo_in_service_key", "services/postgres: "),
        ("ports_not_a_list", "services/prefect-server/ports: "),
        ("unknown_top_level_key", "<root>: "),
        ("device_reservation_misspelt", "services/dask-worker-gpu/deploy/resources: "),
        ("healthcheck_interval_number", "services/dask-worker-gpu/healthcheck/interval: "),
    ],
)
def test_schema_rejects_a_broken_compose_file(breakage, expected):
    doc = load_compose()
    gpu = doc["services"]["dask-worker-gpu"]
    if breakage == "typo_in_service_key":
        doc["services"]["postgres"]["helthcheck"] = doc["services"]["postgres"].pop("healthcheck")
    elif breakage == "ports_not_a_list":
        doc["services"][PREFECT_SERVICE]["ports"] = "127.0.0.1:4200:4200"
    elif breakage == "unknown_top_level_key":
        doc["service"] = doc.pop("services")
    elif breakage == "device_reservation_misspelt":
        gpu["deploy"]["resources"]["reservation"] = gpu["deploy"]["resources"].pop("reservations")
    elif breakage == "healthcheck_interval_number":
        gpu["healthcheck"]["interval"] = 15
    errors = schema_errors(doc)
    assert any(e.startswith(expected) for e in errors), errors


def test_compose_topology_is_consistent():
    assert compose_problems(load_compose()) == []


def _break_compose(doc: dict, breakage: str) -> None:
    s = doc["services"]
    if breakage == "gpu_worker_without_api_url":
        del s["dask-worker-gpu"]["environment"]["PREFECT_API_URL"]
    elif breakage == "runner_with_wrong_api_url":
        s["labelrefinery"]["environment"] = {
            **s["labelrefinery"]["environment"],
            "PREFECT_API_URL": "http://x/api",
        }
    elif breakage == "gpu_worker_without_reservation":
        del s["dask-worker-gpu"]["deploy"]
    elif breakage == "gpu_worker_advertises_cpu":
        i = s["dask-worker-gpu"]["command"].index("GPU=1")
        s["dask-worker-gpu"]["command"][i] = "GPU=1 CPU=64"
    elif breakage == "cpu_worker_without_cpu":
        i = s["dask-worker-cpu"]["command"].index("--resources")
        del s["dask-worker-cpu"]["command"][i : i + 2]
    elif breakage == "port_on_all_interfaces":
        s[PREFECT_SERVICE]["ports"] = ["4200:4200"]
    elif breakage == "port_on_0000":
        s[SCHEDULER_SERVICE]["ports"] = [{"target": 8787, "published": 8787, "host_ip": "0.0.0.0"}]
    elif breakage == "misspelt_worker_option":
        i = s["dask-worker-cpu"]["command"].index("--nthreads")
        s["dask-worker-cpu"]["command"][i] = "--threads"
    elif breakage == "runner_unknown_option":
        s["labelrefinery"]["command"] = [*s["labelrefinery"]["command"], "--no-such-option"]
    elif breakage == "stock_dask_scheduler_image":
        s[SCHEDULER_SERVICE] = {**s[SCHEDULER_SERVICE], "image": "ghcr.io/dask/dask:latest"}
        s[SCHEDULER_SERVICE].pop("build")
    elif breakage == "sqlite_database":
        s[PREFECT_SERVICE]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] = "sqlite+aiosqlite:///x.db"
    elif breakage == "dataset_at_another_path":
        s["labelrefinery"]["volumes"] = ["labelrefinery-data:/mnt/data"]
    elif breakage == "no_healthcheck":
        del s["dask-worker-cpu"]["healthcheck"]
    else:
        raise AssertionError(breakage)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("gpu_worker_without_api_url", "dask-worker-gpu: PREFECT_API_URL"),
        ("runner_with_wrong_api_url", "labelrefinery: PREFECT_API_URL"),
        ("gpu_worker_without_reservation", "no NVIDIA GPU reservation"),
        ("gpu_worker_advertises_cpu", "dask-worker-gpu: must advertise"),
        ("cpu_worker_without_cpu", "dask-worker-cpu: must advertise a CPU pool"),
        ("port_on_all_interfaces", "prefect-server: port '4200:4200'"),
        ("port_on_0000", "dask-scheduler: port"),
        ("misspelt_worker_option", "No such option '--threads'"),
        ("runner_unknown_option", "--no-such-option"),
        ("stock_dask_scheduler_image", "dask-scheduler: must run the project's image"),
        ("sqlite_database", "is not postgresql+asyncpg"),
        ("dataset_at_another_path", "mount the dataset at one path"),
        ("no_healthcheck", "dask-worker-cpu: long-running service without a healthcheck"),
    ],
)
def test_topology_checks_reject_a_broken_compose_file(breakage, expected):
    doc = load_compose()
    _break_compose(doc, breakage)
    problems = compose_problems(doc)
    assert any(expected in p for p in problems), problems


def test_interpolation_takes_compose_defaults():
    assert interpolate("${A:-x}/${B-y}/${C}/$$D") == "x/y//$D"
    with pytest.raises(ValueError):
        interpolate("${PASSWORD:?set it}")


def test_dockerfile_installs_the_project():
    text = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install .*-e \.", text, re.M)  # editable: runtime reads infra/ from the tree
    for path in ("pyproject.toml", "schemas", "tasks", "flows", "infra", "data_catalog.yaml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert (REPO / path).exists(), path
    assert re.search(r"^USER (?!root)\w+", text, re.M)


def test_kubernetes_manifests_are_consistent():
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {"DaskCluster", "DaskWorkerGroup", "PersistentVolumeClaim", "Job"}
    assert k8s_problems(docs) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        ("wrong_api_version", "must be apiVersion kubernetes.dask.org/v1"),
        ("no_gpu_limit", "labelrefinery-gpu: a GPU worker needs limits nvidia.com/gpu: 1"),
        ("gpu_group_elsewhere", "joins 'another'"),
        (
            "gpu_group_two_threads",
            "labelrefinery-gpu: a GPU worker needs limits nvidia.com/gpu: 1 and --nthreads 1",
        ),
        ("cpu_worker_gpu", "expected one GPU worker group, found 2"),
        ("job_address", "Job: --dask-address"),
    ],
)
def test_kubernetes_checks_reject_broken_manifests(breakage, expected):
    docs = copy.deepcopy(k8s_documents())
    cluster = next(d for _, d in docs if d["kind"] == "DaskCluster")
    group = next(d for _, d in docs if d["kind"] == "DaskWorkerGroup")
    gpu_container = group["spec"]["worker"]["spec"]["containers"][0]
    if breakage == "wrong_api_version":
        cluster["apiVersion"] = "kubernetes.dask.org/v1alpha1"
    elif breakage == "no_gpu_limit":
        del gpu_container["resources"]["limits"]["nvidia.com/gpu"]
    elif breakage == "gpu_group_elsewhere":
        group["spec"]["cluster"] = "another"
    elif breakage == "gpu_group_two_threads":
        gpu_container["args"][gpu_container["args"].index("--nthreads") + 1] = "2"
    elif breakage == "cpu_worker_gpu":
        args = cluster["spec"]["worker"]["spec"]["containers"][0]["args"]
        args[args.index("CPU=64")] = "CPU=64 GPU=1"
    elif breakage == "job_address":
        job = next(d for _, d in docs if d["kind"] == "Job")
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        args[args.index("--dask-address") + 1] = "tcp://127.0.0.1:8786"
    problems = k8s_problems(docs)
    assert any(expected in p for p in problems), problems


def test_prefect_helm_values_use_postgresql_and_match_the_workers():
    values = yaml.safe_load((K8S / "prefect-server-values.yaml").read_text(encoding="utf-8"))
    assert values["postgresql"]["enabled"] is True
    assert values["postgresql"]["primary"]["persistence"]["enabled"] is True
    assert not values["postgresql"]["auth"].get("password"), "no password committed; set it at install time"
    host = values["fullnameOverride"]
    port = values["service"]["port"]
    urls = {
        e["value"]
        for _, d in k8s_documents()
        if d["kind"] in ("DaskCluster", "DaskWorkerGroup")
        for c in d["spec"]["worker"]["spec"]["containers"]
        for e in c.get("env") or []
        if e["name"] == "PREFECT_API_URL"
    }
    assert urls == {f"http://{host}:{port}/api"}
