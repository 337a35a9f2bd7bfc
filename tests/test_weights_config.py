"""Weights from configuration: a real HF-layout folder is used, a wrong one stops the node."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from node.core.settings import Settings
from pipelines.jobs.runtime import Runtime
from pipelines.model.backbone import demo_backbone, save_hf_folder
from tests.support.peers import VENV_BIN, free_port


def node_run(tmp_path: Path, weights: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CURIA_DATA_DIR": str(tmp_path / "data"),
        "CURIA_DICOM__PORT": str(free_port()),
        "CURIA_API__PORT": str(free_port()),
        "CURIA_MODEL__WEIGHTS_DIR": str(weights),
    }
    return subprocess.run(
        [str(VENV_BIN / "curia-node"), "run"], env=env, capture_output=True, text=True, timeout=120
    )


def test_configured_folder_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    folder = tmp_path / "weights"
    save_hf_folder(demo_backbone("tiny", seed=3), folder)
    runtime = Runtime(Settings(data_dir=tmp_path, model={"weights_dir": folder}))
    assert runtime.backbone.spec.hidden_size == demo_backbone("tiny").spec.hidden_size
    assert runtime.heads[0].card.hidden_size == runtime.backbone.spec.hidden_size


@pytest.mark.slow
def test_node_refuses_a_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "not-curia"
    folder.mkdir()
    result = node_run(tmp_path, folder)
    assert result.returncode == 3
    assert "cannot load the Curia weights" in result.stderr
    assert "config.json" in result.stderr


@pytest.mark.slow
def test_node_refuses_a_three_channel_model(tmp_path: Path) -> None:
    folder = tmp_path / "rgb"
    save_hf_folder(demo_backbone("tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_channels"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    result = node_run(tmp_path, folder)
    assert result.returncode == 3
    assert "num_channels" in result.stderr


@pytest.mark.slow
def test_compile_option_wraps_the_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.compile hands the backbone to torch.compile (compiled lazily, on first use)."""
    import torch

    monkeypatch.delenv("CURIA_CONFIG", raising=False)
    seen: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda model: seen.append(model) or model)
    runtime = Runtime(Settings(data_dir=tmp_path, model={"demo_size": "tiny", "compile": True}))
    assert seen == [runtime.backbone.model]
