"""Results: the output folder, ``<stem>.json`` (``meta`` + ``rows``, what ``make_readme_table.py``
reads), the markdown tables printed at the end of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from . import RESULTS_DIR
from .provenance import device_name


def output_dir(args, device: torch.device) -> Path:
    out = Path(args.out) if args.out else RESULTS_DIR / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    return out


def result_stem(script: str, quick: bool) -> str:
    return f"{script}_quick" if quick else script


def write_results(out_dir: Path, stem: str, meta: dict, rows: list[dict], **extra) -> Path:
    """Write ``<out_dir>/<stem>.json`` = ``{"meta": ..., "rows": [...], **extra}``; return its path."""
    path = Path(out_dir) / f"{stem}.json"
    payload = {"meta": meta, **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def save_results(args, out_dir: Path, stem: str, meta: dict, rows: list[dict], plot_fn,
                 tables: Sequence[tuple[list[dict], list]], header: str = "", **extra) -> dict:
    """The end of every script: ``<stem>.json`` (+ ``<stem>.png`` by ``plot_fn(rows, meta, path)``
    unless ``--no-plot``), a header line and markdown ``tables`` (``(rows, columns)`` pairs) on
    stdout. Returns ``{"json", "png", "meta", "rows", **extra}``."""
    path = write_results(out_dir, stem, meta, rows, **extra)
    png = None if args.no_plot else plot_fn(rows, meta, Path(out_dir) / f"{stem}.png")
    print(f"\n{meta['device_name']} | backend {meta.get('backend')} | {meta['dtype']} | "
          f"torch {meta['torch']}{' | ' + header if header else ''}\n")
    print("\n\n".join(markdown_table(t_rows, cols) for t_rows, cols in tables))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return {"json": path, "png": png, "meta": meta, "rows": rows, **extra}


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def markdown_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header). Floats are printed with 3 significant decimals; None as '-'."""
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
