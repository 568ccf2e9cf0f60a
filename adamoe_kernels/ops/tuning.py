"""Tuned kernel configs as data: one JSON file per GPU model, read by the launchers.

Where a table comes from, first match wins:

1. ``ADAMOE_KERNEL_CONFIGS=/path/file.json``: that file, for every device (CPU tensors too, which
   is how ``tests/aot_compile.py`` compiles a table's configs without a GPU);
2. ``adamoe_kernels/configs/<slug>.json`` for a CUDA tensor, ``<slug>`` being the device name
   slugged (``torch.cuda.get_device_name``: ``"NVIDIA H200"`` -> ``nvidia-h200.json``);
3. none: the launchers use their built-in defaults, unchanged.

Under the Triton interpreter the launchers keep their pinned config and never read a table.
``bench/gpu_check.py`` (its tuning step) writes such a file; commit it as
``adamoe_kernels/configs/<slug>.json`` (it ships as package data).

Format (``"format": 1``)::

    {"format": 1, "device": "NVIDIA H200",
     "entries": [{"op": "gemm", "dtype": "bfloat16", "n": 8, "H": 4096, "I": 14336,
                  "rows_per_expert": 1536,
                  "config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64,
                             "num_warps": 8, "num_stages": 3}}]}

``op`` is one of ``OPS``: ``gemm`` (``grouped_gemm_kernel``: the forward GEMMs and the backward
``d hidden`` GEMMs), ``swiglu_bwd`` (``swiglu_backward_kernel``), ``wgrad``
(``grouped_weight_grad_kernel``). ``rows_per_expert`` (optional) is the static row bound
``cdiv(T*k, n)`` the entry was tuned at; among the entries of one (op, dtype, n, H, I) the one
nearest in log2 wins, and an entry without it matches any batch. Other keys of an entry (timings,
notes) are kept and ignored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ._common import KernelConfig

OPS = ("gemm", "swiglu_bwd", "wgrad")
FORMAT = 1
ENV_FILE = "ADAMOE_KERNEL_CONFIGS"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_KEYS = {f.name for f in fields(KernelConfig)}
_REQUIRED_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K"}


class ConfigFileError(ValueError):
    """A tuned-config file that cannot be used; the message starts with the file's path."""


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: the config file stem and bench/results folder."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Entry:
    op: str
    dtype: str
    n: int
    H: int
    I: int  # noqa: E741 (the package's name for the intermediate size)
    rows_per_expert: int | None
    config: KernelConfig


@dataclass(frozen=True)
class ConfigTable:
    """The validated entries of one file (``path``)."""

    path: str
    device: str | None
    entries: tuple[Entry, ...]

    def lookup(self, op: str, dtype: torch.dtype, n: int, H: int, I: int,  # noqa: E741
               rows_per_expert: int | None = None) -> KernelConfig | None:
        """The entry's config for this shape, or None (then the caller's default applies)."""
        name = dtype_name(dtype)
        match = [e for e in self.entries
                 if (e.op, e.dtype, e.n, e.H, e.I) == (op, name, n, H, I)]
        if not match:
            return None

        def distance(e: Entry) -> float:
            if e.rows_per_expert is None:  # a generic entry: only when no sized one matches
                return math.inf
            if not rows_per_expert:
                return 0.0
            return abs(math.log2(e.rows_per_expert) - math.log2(rows_per_expert))

        return min(match, key=distance).config


def _power_of_two(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_config(cfg, where: str) -> KernelConfig:
    """A ``KernelConfig`` from a JSON object; ``ConfigFileError`` naming ``where`` if invalid."""
    if not isinstance(cfg, dict):
        raise ConfigFileError(f"{where}: 'config' must be an object, got {type(cfg).__name__}")
    unknown = set(cfg) - _CONFIG_KEYS
    missing = _REQUIRED_KEYS - set(cfg)
    if unknown or missing:
        raise ConfigFileError(f"{where}: config keys: unknown {sorted(unknown)}, "
                              f"missing {sorted(missing)} (allowed: {sorted(_CONFIG_KEYS)})")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if not _power_of_two(cfg[key]) or cfg[key] < 16:
            raise ConfigFileError(f"{where}: {key} must be a power of two >= 16, got {cfg[key]!r}")
    if "num_warps" in cfg and cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ConfigFileError(f"{where}: num_warps must be 1, 2, 4, 8 or 16, got {cfg['num_warps']!r}")
    for key in ("num_stages", "GROUP_M"):
        if key in cfg and not _positive_int(cfg[key]):
            raise ConfigFileError(f"{where}: {key} must be a positive integer, got {cfg[key]!r}")
    return KernelConfig(**cfg)


def parse_table(data, path: str) -> ConfigTable:
    """Validate a decoded config file; every error names ``path`` and the bad entry."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ConfigFileError(f"{path}: expected an object with an 'entries' list")
    if data.get("format", FORMAT) != FORMAT:
        raise ConfigFileError(f"{path}: format {data.get('format')!r} is not {FORMAT}")
    entries = []
    for i, e in enumerate(data["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict):
            raise ConfigFileError(f"{where}: must be an object")
        if e.get("op") not in OPS:
            raise ConfigFileError(f"{where}: op must be one of {OPS}, got {e.get('op')!r}")
        if e.get("dtype") not in DTYPES:
            raise ConfigFileError(f"{where}: dtype must be one of {sorted(DTYPES)}, "
                                  f"got {e.get('dtype')!r}")
        for key in ("n", "H", "I"):
            if not _positive_int(e.get(key)):
                raise ConfigFileError(f"{where}: {key} must be a positive integer, got {e.get(key)!r}")
        rows = e.get("rows_per_expert")
        if rows is not None and not _positive_int(rows):
            raise ConfigFileError(f"{where}: rows_per_expert must be a positive integer, got {rows!r}")
        entries.append(Entry(e["op"], e["dtype"], e["n"], e["H"], e["I"], rows,
                             parse_config(e.get("config"), where)))
    return ConfigTable(path=str(path), device=data.get("device"), entries=tuple(entries))


_CACHE: dict[str, tuple[tuple, ConfigTable]] = {}


def load_table(path) -> ConfigTable:
    """Read and validate a config file (cached until the file changes)."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read the kernel-config file ({err.strerror})") from None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"{path}: not valid JSON ({err})") from None
    table = parse_table(data, path)
    _CACHE[path] = (stamp, table)
    return table


_DEVICE_NAMES: dict[int, str] = {}


def _cuda_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def config_path(device: torch.device, config_dir: Path | None = None) -> Path | None:
    """The file whose table applies to ``device`` (see the module docstring), or None."""
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env)
    if device.type != "cuda":
        return None
    path = Path(config_dir or CONFIG_DIR) / f"{device_slug(_cuda_name(device))}.json"
    return path if path.exists() else None


_FORCED: list[dict[str, KernelConfig]] = []
_TABLES: list[ConfigTable] = []


@contextlib.contextmanager
def force_configs(**configs: KernelConfig):
    """Use these configs (``op=KernelConfig``) for every shape and device while the block runs,
    under the interpreter too: the tuner's candidates and tests. ``BLOCK_M`` still shrinks to
    the rows per expert as for every config."""
    bad = set(configs) - set(OPS)
    if bad:
        raise ValueError(f"force_configs: unknown ops {sorted(bad)} (ops: {OPS})")
    _FORCED.append(configs)
    try:
        yield
    finally:
        _FORCED.remove(configs)


@contextlib.contextmanager
def use_table(table: ConfigTable | str | os.PathLike):
    """Make ``table`` (or the file at that path) the table for every device while the block runs."""
    if not isinstance(table, ConfigTable):
        table = load_table(table)
    _TABLES.append(table)
    try:
        yield table
    finally:
        _TABLES.remove(table)


def forced(op: str) -> KernelConfig | None:
    for configs in reversed(_FORCED):
        if op in configs:
            return configs[op]
    return None


def active_table(device: torch.device) -> ConfigTable | None:
    if _TABLES:
        return _TABLES[-1]
    path = config_path(device)
    return None if path is None else load_table(path)


def lookup(op: str, device: torch.device, dtype: torch.dtype, *, n: int, H: int, I: int,  # noqa: E741
           rows_per_expert: int | None = None) -> KernelConfig | None:
    """The tuned config of ``op`` for this device and shape, or None (use the default)."""
    table = active_table(device)
    return None if table is None else table.lookup(op, dtype, n, H, I, rows_per_expert)


def table_json(entries: list[dict], device: str | None = None, **meta) -> dict:
    """A config file's content from entry dicts (validated); what the tuner writes."""
    data = {"format": FORMAT, "device": device, **meta, "entries": entries}
    parse_table(json.loads(json.dumps(data)), "<table_json>")
    return data
