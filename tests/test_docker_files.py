"""The Docker files agree with the code: no engine, no network, just the files read as text.

``docker/Dockerfile`` (service), ``docker/Dockerfile.train`` (jobs), ``docker/compose.yaml`` and
``.dockerignore``: every ``ranker`` command line they run parses with the real CLI parser, every
``RANKER_*`` variable they (or docs/deployment.md) set is a field of the service settings, torch
is installed with the Makefile's pin before the project, the images run as non-root, and the
compose dependencies, volumes and paths fit together.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml  # PyYAML, installed with uvicorn[standard]

from ranker.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"service": DOCKER / "Dockerfile", "train": DOCKER / "Dockerfile.train"}
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
ROOT_USERS = {"root", "0"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, args)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path}: the last instruction ends in a line continuation"
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif instruction != "ARG" or stages:
            assert stages, f"{path}: {instruction} before the first FROM"
            stages[-1].instructions.append((instruction, args))
    assert stages, f"{path}: no FROM"
    return stages


def exec_form(args: str, where: str) -> list[str]:
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{where}: not in exec (JSON) form: {args}")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), where
    return argv


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def image_argv(dockerfile: Path) -> tuple[list[str], list[str]]:
    """``(ENTRYPOINT, CMD)`` of the final stage, exec form."""
    final = parse_dockerfile(dockerfile)[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    return (
        exec_form(entrypoint, f"{dockerfile.name} ENTRYPOINT") if entrypoint else [],
        exec_form(cmd, f"{dockerfile.name} CMD") if cmd else [],
    )


def service_dockerfile(name: str, service: dict) -> Path:
    build = service.get("build")
    assert isinstance(build, dict), f"compose service {name!r} builds no image of this repository"
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), f"compose service {name!r}: {dockerfile} does not exist"
    return dockerfile


def ranker_command_lines() -> list[tuple[str, list[str]]]:
    """Every argv the images and compose services run, as ``(where, argv)``."""
    lines = []
    for kind, path in DOCKERFILES.items():
        entrypoint, cmd = image_argv(path)
        lines.append((f"{path.name} ({kind})", entrypoint + cmd))
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue  # an upstream image (redis)
        entrypoint, cmd = image_argv(service_dockerfile(name, service))
        if "entrypoint" in service:
            entrypoint = service["entrypoint"]
        command = service.get("command", cmd)
        assert isinstance(command, list), f"compose service {name!r}: use the list form of command"
        lines.append((f"compose service {name!r}", entrypoint + command))
    return lines


def makefile_torch_pin() -> str:
    m = re.search(r"^TORCH\s*:=\s*(torch==\S+)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile no longer pins torch as `TORCH := torch==X.Y.Z`"
    return m.group(1)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


# --- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_runs_as_a_user_that_is_not_root(kind: str) -> None:
    final = parse_dockerfile(DOCKERFILES[kind])[-1]
    user = final.last("USER")
    assert user, f"{DOCKERFILES[kind].name}: the final stage sets no USER (it would run as root)"
    assert user.split(":")[0] not in ROOT_USERS, f"{DOCKERFILES[kind].name}: USER {user}"
    last_user = max(i for i, (ins, _) in enumerate(final.instructions) if ins == "USER")
    assert not any(ins == "RUN" for ins, _ in final.instructions[last_user:]), "RUN after USER"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_torch_is_the_makefiles_pin_installed_before_the_project(kind: str) -> None:
    pin = makefile_torch_pin()
    runs = [a for stage in parse_dockerfile(DOCKERFILES[kind]) for a in stage.all("RUN")]
    torch_at = [i for i, a in enumerate(runs) if "pip install" in a and pin in a.split()]
    project_at = [i for i, a in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", a)]
    assert torch_at, f"{DOCKERFILES[kind].name}: no `pip install ... {pin}` (the Makefile's pin)"
    assert project_at, f"{DOCKERFILES[kind].name}: the project (`pip install .`) is not installed"
    assert torch_at[0] < project_at[0], "torch must come first, or pip may pick another build"
    assert "download.pytorch.org/whl/cpu" in runs[torch_at[0]], "torch's CPU build"
    other_torch = [a for a in runs if re.search(r"\btorch==", a) and pin not in a.split()]
    assert not other_torch, f"a torch pin other than the Makefile's {pin}: {other_torch}"


def test_service_image_has_a_healthcheck_on_healthz() -> None:
    final = parse_dockerfile(DOCKERFILES["service"])[-1]
    check = final.last("HEALTHCHECK")
    assert check, "docker/Dockerfile has no HEALTHCHECK"
    assert "/healthz" in check
    argv = exec_form(check[check.index("CMD") + 3 :].strip(), "HEALTHCHECK CMD")
    assert argv[:2] == ["python", "-c"], "the slim image has no curl: python -c with urllib"
    compile(argv[2], "HEALTHCHECK", "exec")  # the one-liner is valid Python
    assert "8000" in final.all("EXPOSE")
    assert image_argv(DOCKERFILES["service"])[1] == [
        "ranker",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_dockerignore_keeps_local_state_out_but_not_what_the_images_copy() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for must in (".venv", "data", "artifacts", "runs", ".git"):
        assert must in patterns, f".dockerignore does not exclude {must}"

    def ignored(rel: str) -> bool:
        parts = Path(rel).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatchcase(p, pat.lstrip("/"))
            or fnmatch.fnmatchcase(p, pat.removeprefix("**/"))
            for pat in patterns
            if not pat.startswith("!")
            for p in prefixes
        )

    for path in DOCKERFILES.values():
        for stage in parse_dockerfile(path):
            for args in stage.all("COPY"):
                words = args.split()
                if any(w.startswith("--from") for w in words):
                    continue
                for src in (w for w in words[:-1] if not w.startswith("--")):
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
                    assert not ignored(src), f"{path.name}: COPY {src} is excluded by .dockerignore"


# --- commands and settings -----------------------------------------------------------------------


def test_every_ranker_command_line_parses_with_the_cli() -> None:
    parser = build_parser()
    subcommands = set(next(a for a in parser._actions if a.dest == "command").choices)
    lines = ranker_command_lines()
    assert len(lines) >= 2 + 4  # two images, four compose services built from them
    for where, argv in lines:
        assert argv and argv[0] == "ranker", f"{where}: runs {argv}, not the ranker command"
        if argv[1:] == ["--help"]:
            continue  # the training image's default: it says what to run
        assert argv[1] in subcommands, f"{where}: `ranker {argv[1]}` is no subcommand"
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse (see the error above)")


def test_every_ranker_variable_is_a_settings_field() -> None:
    fields = set(Settings.model_fields)
    texts = {p.name: p.read_text() for p in (*DOCKERFILES.values(), COMPOSE)}
    if DEPLOYMENT_DOC.exists():
        texts[DEPLOYMENT_DOC.name] = DEPLOYMENT_DOC.read_text()
    used = {(name, v) for name, text in texts.items() for v in re.findall(r"RANKER_\w+", text)}
    assert used
    unknown = sorted(
        f"{v} ({name})" for name, v in used if v[len("RANKER_") :].lower() not in fields
    )
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"


def test_the_values_set_are_valid_settings() -> None:
    env: dict[str, str] = {}
    for instruction in parse_dockerfile(DOCKERFILES["service"])[-1].all("ENV"):
        env |= dict(re.findall(r"(RANKER_\w+)=(\S+)", instruction))
    env |= environment(compose()["services"]["ranker"])
    values = {k[len("RANKER_") :].lower(): v for k, v in env.items() if k.startswith("RANKER_")}
    settings = Settings(**values)  # raises on a value of the wrong type or range
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://redis:6379/0"
    # Unset: each artifact serves the ranking config it was exported with, whatever its heads.
    assert settings.ranking_config is None


# --- compose -------------------------------------------------------------------------------------


def test_compose_dependencies_exist_and_order_the_jobs() -> None:
    services = compose()["services"]
    assert {"redis", "generate", "train", "push-features", "ranker"} <= set(services)
    for name, service in services.items():
        deps = service.get("depends_on", {})
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on {target!r}, which is no service"
            assert target != name
            assert spec.get("condition", "service_started") in CONDITIONS, f"{name} -> {target}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[target] or "build" in services[target], (
                    f"{name} waits for {target} to be healthy, and it has no healthcheck"
                )

    def condition(name: str, target: str) -> str:
        return services[name]["depends_on"][target]["condition"]

    assert condition("train", "generate") == "service_completed_successfully"
    assert condition("push-features", "train") == "service_completed_successfully"
    assert condition("push-features", "redis") == "service_healthy"
    assert condition("ranker", "push-features") == "service_completed_successfully"
    assert condition("ranker", "redis") == "service_healthy"
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    ranker = services["ranker"]
    assert environment(ranker)["RANKER_REDIS_URL"] == "redis://redis:6379/0"
    assert environment(services["push-features"])["RANKER_REDIS_URL"] == "redis://redis:6379/0"
    assert any(str(p).split(":")[-1] == "8000" for p in ranker["ports"])


def test_compose_volumes_are_declared_and_connect_the_jobs() -> None:
    doc = compose()
    declared = set(doc.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}  # service -> target -> named volume
    for name, service in doc["services"].items():
        for spec in service.get("volumes", []):
            source, target = str(spec).split(":")[:2]
            if source.startswith((".", "/", "~")):
                continue  # a bind mount
            assert source in declared, f"{name}: volume {source!r} is not declared"
            mounts.setdefault(name, {})[target] = source
    # generate writes the data train and push-features read; train writes the artifact the
    # service loads, from where RANKER_ARTIFACT points.
    assert mounts["generate"]["/app/data"] == mounts["train"]["/app/data"]
    assert mounts["push-features"]["/app/data"] == mounts["generate"]["/app/data"]
    artifact = environment(doc["services"]["ranker"])["RANKER_ARTIFACT"]
    served = [v for t, v in mounts["ranker"].items() if artifact.startswith(t.rstrip("/") + "/")]
    assert served == [mounts["train"]["/app/artifacts"]], "the service reads another volume"


def test_compose_cluster_profile_joins_six_nodes_and_serves_from_them() -> None:
    """`--profile cluster`: six cluster-mode nodes with their own volumes, a one-shot job that
    joins them once all are healthy (3 masters + 3 replicas, idempotent on a rerun), the push
    and the service pointed at the cluster; the default services stay out of the profile."""
    services = compose()["services"]
    nodes = [f"redis-node-{i}" for i in range(1, 7)]
    in_profile = {n for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert in_profile == {*nodes, "redis-cluster-create", "push-features-cluster", "ranker-cluster"}
    volumes = set()
    for n in nodes:
        argv = services[n]["command"]
        assert argv[0] == "redis-server"
        assert argv[argv.index("--cluster-enabled") + 1] == "yes", n
        assert services[n]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
        volumes |= {str(v).split(":")[0] for v in services[n]["volumes"]}
    assert len(volumes) == 6  # one nodes.conf per node
    create = services["redis-cluster-create"]
    assert all(create["depends_on"][n]["condition"] == "service_healthy" for n in nodes)
    script = create["command"][0]
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert "--cluster-yes" in script and "cluster_state:ok" in script
    assert "redis-node-$$n" in script and "for n in 1 2 3 4 5 6" in script
    url = "redis+cluster://redis-node-1:6379/0"
    push, ranker = services["push-features-cluster"], services["ranker-cluster"]
    assert environment(push)["RANKER_REDIS_URL"] == url
    assert environment(ranker)["RANKER_REDIS_URL"] == url
    assert push["depends_on"]["redis-cluster-create"]["condition"] == (
        "service_completed_successfully"
    )
    assert ranker["depends_on"]["push-features-cluster"]["condition"] == (
        "service_completed_successfully"
    )
    assert service_dockerfile("ranker-cluster", ranker) == DOCKERFILES["service"].resolve()
    values = {k[len("RANKER_") :].lower(): v for k, v in environment(ranker).items()}
    settings = Settings(**values)
    assert settings.redis_url is not None
    from ranker.feature_store import cluster_url

    assert cluster_url(settings.redis_url.get_secret_value())[1] is True
