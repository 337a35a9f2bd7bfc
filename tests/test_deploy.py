"""The shipped compose file and Dockerfile agree with the node's settings and CLI."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

import pytest
import yaml

from node.core.settings import Settings
from pipelines.jobs.celery_app import STAGES

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
CURIA_SERVICES = ["node", "cpu-worker", "gpu-worker", "flower"]


@pytest.mark.parametrize("service", CURIA_SERVICES)
def test_compose_environment_is_valid_configuration(
    service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = COMPOSE["services"][service]["environment"]
    for key in [k for k in os.environ if k.startswith("CURIA_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("CURIA_"):
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "x" * 32, str(value)))
    settings = Settings()
    assert not settings.is_embedded_broker and not settings.pipeline.embedded_worker
    assert settings.effective_database_url.startswith("postgresql+psycopg://")
    assert settings.archive.host == "orthanc"


def test_compose_workers_split_the_stages_between_them() -> None:
    queues = {}
    for service in ("cpu-worker", "gpu-worker"):
        command = COMPOSE["services"][service]["command"]
        assert command[0] == "worker"
        queues[service] = set(command[command.index("--queues") + 1].split(","))
    assert queues["gpu-worker"] == {"inference"}
    assert queues["cpu-worker"] | queues["gpu-worker"] == set(STAGES)
    gpu = COMPOSE["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["count"] == 1, "one worker process per GPU"


def test_image_runs_as_a_non_root_user_on_a_cuda_runtime() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvidia/cuda:[\w.-]+-runtime-", dockerfile, re.M)
    assert re.search(r"^USER curia$", dockerfile, re.M)
    assert 'pip install "torch==2.14.1"' in dockerfile


def test_image_installs_the_built_wheel_not_the_sources() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) == 2, "a stage that builds the wheel, then the runtime"
    build, runtime = stages
    assert re.match(r"\S+ AS wheel$", build.splitlines()[0])
    assert re.search(r"^RUN pip wheel .*--no-deps", build, re.M)
    assert "COPY --from=wheel" in runtime
    assert re.search(r"pip install [^\n]*/curia_node-\*\.whl", runtime)
    assert not re.search(r"pip install[^\n]* -e\b", dockerfile)
    assert not re.search(r"^COPY (?!--from)", runtime, re.M), "the runtime needs no sources"


def test_image_builds_the_wheel_from_every_packaged_folder() -> None:
    """A folder the wheel packages but the image does not copy would be missing from it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    packages = config["options.packages.find"]["include"].split()
    top_level = {name.split(".")[0] for name in packages}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert top_level == copied
