"""Send instances to a node under test the way a modality does: DCMTK's storescu."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.peers import NodeProcess


def send_to_node(node: NodeProcess, files: list[Path]) -> None:
    """C-STORE ``files`` to ``node``; fails unless every instance got Success."""
    subprocess.run(
        ["storescu", "-aec", "CURIA", "-xv", "127.0.0.1", str(node.dicom_port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
    )
