"""An executed notebook as one self-contained HTML file (nbconvert): images embedded, opens without Jupyter."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from lib.paths import atomic_write_text


def write_html_report(notebook: Union[str, Path], out: Union[str, Path], show_code: bool = False) -> Path:
    """Convert `notebook` to `out` (atomic). Output images are embedded as data URIs, and so are images that
    markdown cells link to; code cells are hidden unless `show_code` (the executed notebook keeps them)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(embed_images=True, exclude_input=not show_code, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(notebook).stem}})
    atomic_write_text(out, body)
    return Path(out)
