"""What a node process under test reports through its HTTP API."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.peers import NodeProcess


def runs_of(node: NodeProcess) -> list[dict]:
    """The node's pipeline runs, as ``GET /api/v1/runs`` lists them."""
    token = (Path(node.env["CURIA_DATA_DIR"]) / "api-token").read_text()
    response = httpx.get(
        f"{node.api_url}/api/v1/runs", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()
