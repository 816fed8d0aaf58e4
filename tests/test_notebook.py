"""examples/render_upload.ipynb runs headless, start to end, and its bar ends full and green.

The notebook runs in a real IPython kernel (nbclient + ipykernel) with ipywidgets, so
``tqdm.auto`` draws the widget a Jupyter user sees; nbclient keeps the widgets' last
state, which is what the assertions read.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "render_upload.ipynb"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


@pytest.fixture
def kernel_dir(tmp_path: Path) -> Path:
    """A ``python3`` kernel spec for this interpreter, found before any other.

    Whatever ``python3`` kernels a machine has (another Python, none at all), the
    notebook then runs on the interpreter and packages running the tests.
    """
    kernels = tmp_path / "jupyter" / "kernels"
    write_kernel_spec(path=str(kernels / "python3"))
    spec = json.loads((kernels / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return tmp_path / "jupyter"


@pytest.fixture
def executed(kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    # The kernel imports this checkout's ctrlupload, installed or not.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=60,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return notebook


def outputs_text(notebook: Any) -> str:
    parts: list[str] = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


def test_notebook_uploads_the_render_and_gets_the_same_bytes_back(executed: Any) -> None:
    errors = [
        output
        for cell in executed.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors

    text = outputs_text(executed)
    assert "round trip: 3 of 3 assets came back identical" in text
    assert "DIFFERENT" not in text
    for name in ("video.mp4", "subtitles.srt", "thumb.jpg"):  # the backend's rows
        assert re.search(rf"^videos/V-001/S-001/JOB-1/{re.escape(name)} +\d+ B ", text, re.M)

    # The widget's last state: one bar for the whole render, full, green, in MiB.
    state = executed.metadata["widgets"][WIDGET_STATE]["state"]
    (bar,) = (
        model["state"]
        for model in state.values()
        if model["model_name"] in ("FloatProgressModel", "IntProgressModel")
    )
    assert bar["max"] == sum(_asset_sizes(text).values())
    assert bar["value"] == bar["max"]
    assert bar["bar_style"] == "success"
    style = state[bar["style"].removeprefix("IPY_MODEL_")]["state"]
    assert style["bar_color"] == "green"
    labels = [m["state"]["value"] for m in state.values() if m["model_name"] == "HTMLModel"]
    assert any("8.0/8.0\u2007MiB" in label for label in labels), labels


def _asset_sizes(text: str) -> dict[str, int]:
    """The sizes the notebook printed for its sample files (``name  size bytes``)."""
    sizes = {
        name: int(size) for name, size in re.findall(r"^(\S+\.\w+)\s+(\d+) bytes$", text, re.M)
    }
    assert sorted(sizes) == ["subtitles.srt", "thumb.jpg", "video.mp4"]
    return sizes
