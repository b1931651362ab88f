"""notebooks/InfiniteTalk.ipynb executed headless (nbclient) on the CPU: the parameters cell is
overridden the papermill way (a cell injected after the one tagged "parameters") to skip the
install, the download and the public link and to use the tiny model; the notebook starts the
web page in the background, and the test checks that it answers on 127.0.0.1, then stops it."""
from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("gradio")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "InfiniteTalk.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_parameters(nb, **values):
    """A copy of `nb` with `values` set in a cell after the "parameters" cell (what papermill does)."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def stop(pid_file: Path) -> None:
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)  # the notebook starts the page in its own session
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def test_notebook_runs_headless_and_serves_the_page(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name in ("REF", "INSTALL", "DOWNLOAD", "SHARE", "MODEL"):
        assert f"{name} = " in params.source, f"the parameters cell sets {name}"
    port = free_port()
    nb = with_parameters(nb, INSTALL=False, DOWNLOAD=False, SHARE=False, MODEL="tiny", PORT=port, WAIT_S=150)
    monkeypatch.setenv("INFINITETALK_UI_OUTPUTS", str(tmp_path / "ui-jobs"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    client = nbclient.NotebookClient(nb, timeout=200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
        outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "download skipped" in outputs
        assert f"the page answers at http://127.0.0.1:{port}/" in outputs
        html = "".join(str(o.get("data", {}).get("text/html", "")) for c in nb.cells for o in c.get("outputs", []))
        assert f'href="http://127.0.0.1:{port}/"' in html
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:  # still served after the run
            assert page.status == 200
            assert "Model: tiny" in page.read().decode("utf-8", "replace"), "the page runs the tiny model"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("ui-jobs",)) == ["ui.log", "ui.pid"]
    finally:
        stop(tmp_path / "ui.pid")
