"""Dataset names → files, through a LLaMA-Factory registry (``dataset_info.json``).

``data.train: alpaca_en_demo`` resolves like LLaMA-Factory's ``dataset: alpaca_en_demo``: the entry's
``file_name`` (a file or a folder of files, relative to the registry), ``formatting`` (alpaca | sharegpt),
``columns``, ``tags`` and ``ranking`` say how to read it; entries with only hub urls (``hf_hub_url`` with
``split``/``subset``) are read with the ``datasets`` library when online.

Differences from LLaMA-Factory, on purpose:

- A local ``file_name`` that exists wins over a hub url (LLaMA-Factory prefers the hub), so a registry works
  offline when the files are there.
- ``num_samples`` keeps the first N records (LLaMA-Factory samples N at random); shuffle in the recipe.
- Multimodal entries (``images``/``videos``/``audios`` columns) and ``script_url``/``cloud_file_name`` sources
  are refused with a DataError rather than read half-way.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError
from posttrain.data.formats import FILE_READERS, OnInvalid, ReadResult, Where, read_records, records_from_rows
from posttrain.data.records import Kind

REGISTRY_FILE = "dataset_info.json"

ENTRY_KEYS = frozenset(
    {
        "hf_hub_url",
        "ms_hub_url",
        "om_hub_url",
        "script_url",
        "cloud_file_name",
        "file_name",
        "file_sha1",
        "formatting",
        "ranking",
        "subset",
        "split",
        "folder",
        "num_samples",
        "columns",
        "tags",
    }
)

# LLaMA-Factory column names → this package's field names, per formatting (see posttrain.data.formats).
LF_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
        "kto_tag": "label",
    },
    "sharegpt": {
        "messages": "messages",
        "system": "system",
        "tools": "tools",
        "chosen": "chosen",
        "rejected": "rejected",
        "kto_tag": "label",
    },
}
LF_COLUMNS["openai"] = LF_COLUMNS["sharegpt"]
MULTIMODAL_COLUMNS = ("images", "videos", "audios")


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset: local ``paths``, or a hub dataset (``hf_hub_url``, ``split``, ``subset``)."""

    name: str
    paths: tuple[Path, ...] = ()
    hf_hub_url: str | None = None
    other_hub_url: str | None = None  # "ms_hub_url=..." when only ModelScope/Modelers host it
    format: str = "auto"
    kind: Kind | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    num_samples: int | None = None
    registry: Path | None = None


def _data_files(folder: Path) -> tuple[Path, ...]:
    files = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_READERS))
    if not files:
        raise DataError(folder, None, None, f"folder holds no data files ({', '.join(FILE_READERS)})")
    return files


def _local(path: Path) -> tuple[Path, ...]:
    return _data_files(path) if path.is_dir() else (path,)


def find_registry(registry: str | Path | None, search_dirs: Sequence[str | Path]) -> Path | None:
    """The registry file: ``registry`` (a file, or a folder holding dataset_info.json), else the first
    ``search_dirs`` folder that holds one."""
    if registry is not None:
        path = Path(registry)
        path = path / REGISTRY_FILE if path.is_dir() else path
        if not path.is_file():
            raise DataError(path, None, None, "registry not found (expected a LLaMA-Factory dataset_info.json)")
        return path
    return next((Path(d) / REGISTRY_FILE for d in search_dirs if (Path(d) / REGISTRY_FILE).is_file()), None)


def load_registry(path: Path) -> dict[str, Any]:
    """The registry's entries by name; unreadable JSON is a DataError."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(path, None, None, f"not UTF-8 ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise DataError(path, error.lineno, None, f"not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(entries, dict):
        raise DataError(path, None, None, f"expected an object of dataset entries, got {type(entries).__name__}")
    return entries


def resolve_dataset(
    name_or_path: str | Path,
    registry: str | Path | None = None,
    search_dirs: Sequence[str | Path] = (),
) -> DatasetSpec:
    """A file, a folder of files, ``hf:org/name`` (a hub dataset), or a registry name → :class:`DatasetSpec`.

    A path that exists wins over a registry entry of the same name.

    Names are looked up in ``registry`` (a dataset_info.json or its folder) or, without one, in the first of
    ``search_dirs`` holding a dataset_info.json. An unknown name raises DataError listing close names.
    """
    text = str(name_or_path)
    path = Path(name_or_path)
    if path.exists():
        return DatasetSpec(name=path.name, paths=_local(path))
    if text.startswith("hf:"):
        return DatasetSpec(name=text, hf_hub_url=text[3:])
    registry_path = find_registry(registry, search_dirs)
    if registry_path is None:
        looked = [str(d) for d in search_dirs]
        raise DataError(
            text, None, None, f"not a file, and no {REGISTRY_FILE} to look the name up in (searched {looked})"
        )
    entries = load_registry(registry_path)
    if text not in entries:
        close = difflib.get_close_matches(text, list(entries), n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"no close name among {len(entries)} entries"
        raise DataError(registry_path, None, "dataset", f"unknown dataset {text!r}; {hint}")
    return spec_from_entry(text, entries[text], registry_path)


def spec_from_entry(name: str, entry: Any, registry_path: Path) -> DatasetSpec:
    """One registry entry → :class:`DatasetSpec` (LLaMA-Factory columns translated to this package's fields)."""

    def error(key: str | None, problem: str) -> DataError:
        return DataError(registry_path, None, f"{name}.{key}" if key else name, problem)

    if not isinstance(entry, dict):
        raise error(None, f"expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise error(unknown[0], f"unknown key; expected some of {', '.join(sorted(ENTRY_KEYS))}")
    formatting = entry.get("formatting", "alpaca")
    if not isinstance(formatting, str) or formatting not in LF_COLUMNS:
        raise error("formatting", f"expected one of {', '.join(LF_COLUMNS)}, got {formatting!r}")
    lf_columns = entry.get("columns") or {}
    if not isinstance(lf_columns, dict):
        raise error("columns", f"expected an object, got {type(lf_columns).__name__}")
    for column in MULTIMODAL_COLUMNS:
        if column in lf_columns:
            raise error(f"columns.{column}", f"multimodal dataset ({column}); the text-only data layer cannot read it")
    columns: dict[str, str] = {}
    for lf_name, key in lf_columns.items():
        if lf_name not in LF_COLUMNS[formatting]:
            raise error(
                f"columns.{lf_name}",
                f"unknown column for {formatting} formatting; expected some of {', '.join(LF_COLUMNS[formatting])}",
            )
        columns[LF_COLUMNS[formatting][lf_name]] = key
    ranking = bool(entry.get("ranking", False))
    tags = entry.get("tags") or {}
    if not isinstance(tags, dict):
        raise error("tags", f"expected an object, got {type(tags).__name__}")
    file_format = formatting  # the formats module has a reader of the same name for each
    kind: Kind = "preference" if ranking else "unpaired" if "kto_tag" in lf_columns else "conversation"
    if formatting == "alpaca" and not ranking and set(lf_columns) == {"prompt"}:
        # LLaMA-Factory's pretraining description: only the prompt column, which holds the document.
        file_format, kind, columns = "text", "text", {"text": lf_columns["prompt"]}
    file_name = entry.get("file_name")
    local = (registry_path.parent / file_name) if isinstance(file_name, str) else None
    if local is not None and local.suffix.lower() == ".txt":
        file_format, kind, columns = "text", "text", {}  # a .txt file is one document per line whatever the columns
    num_samples = entry.get("num_samples")
    if num_samples is not None and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1
    ):
        raise error("num_samples", f"expected a positive integer, got {num_samples!r}")
    base = DatasetSpec(
        name=name,
        format=file_format,
        kind=kind,
        columns=columns,
        tags=tags,
        num_samples=num_samples,
        registry=registry_path,
    )
    if local is not None and local.exists():
        return replace(base, paths=_local(local))
    hub = entry.get("hf_hub_url")
    if isinstance(hub, str):
        subset = entry.get("subset")
        return replace(
            base,
            hf_hub_url=hub,
            split=str(entry.get("split", "train")),
            subset=subset if isinstance(subset, str) else None,
        )
    other = next(
        (f"{key}={entry[key]}" for key in ("ms_hub_url", "om_hub_url") if isinstance(entry.get(key), str)), None
    )
    if other is not None:
        return replace(base, other_hub_url=other)
    if local is not None:
        raise DataError(local, None, None, f"file not found (dataset {name!r} of {registry_path})")
    source = next((key for key in ("script_url", "cloud_file_name") if key in entry), None)
    if source:
        raise error(source, "dataset scripts and cloud files are not supported; download the data and set file_name")
    raise error(None, "entry has neither file_name nor hf_hub_url")


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_rows(spec: DatasetSpec) -> Iterator[tuple[Where, Any]]:
    """Rows of a hub dataset (the ``datasets`` library downloads and caches it)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            spec.name,
            None,
            None,
            f"needs the datasets library to read hf_hub_url={spec.hf_hub_url} (pip install datasets)",
        ) from None
    try:
        table = datasets.load_dataset(spec.hf_hub_url, name=spec.subset, split=spec.split)
    except Exception as error:  # network, auth, missing split: datasets raises many types
        raise DataError(
            spec.name,
            None,
            None,
            f"cannot load hf_hub_url={spec.hf_hub_url} ({type(error).__name__}: {str(error)[:160]})",
        ) from None
    label = f"{spec.hf_hub_url}[{spec.split}]"
    for index, row in enumerate(table, start=1):
        yield Where(label, index, f"row {index} of split {spec.split!r}"), dict(row)


def read_dataset(
    spec: DatasetSpec, kind: Kind | None = None, on_invalid: OnInvalid = "error", offline: bool | None = None
) -> ReadResult:
    """Read a resolved dataset with :func:`~posttrain.data.formats.read_records` (files) or the ``datasets``
    library (hub, only when online: ``offline=None`` follows HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    kind = kind or spec.kind
    offline = _offline() if offline is None else offline
    if spec.paths:
        parts = [read_records(p, kind, spec.format, spec.columns, spec.tags, on_invalid) for p in spec.paths]
        kinds = {part.kind for part in parts}
        if len(kinds) > 1:
            raise DataError(
                spec.name,
                None,
                None,
                f"files hold different record kinds {sorted(kinds)}: {[p.summary() for p in parts]}",
            )
        formats = sorted({part.format for part in parts})
        result = ReadResult(
            [r for part in parts for r in part.records],
            "+".join(formats),
            parts[0].kind,
            [e for part in parts for e in part.invalid],
            sum(part.rows_read for part in parts),
            str(spec.paths[0]) if len(spec.paths) == 1 else spec.name,
        )
    elif spec.hf_hub_url is not None:
        if offline:
            raise DataError(
                spec.name,
                None,
                None,
                f"needs network: hf_hub_url={spec.hf_hub_url} (offline); download it and set file_name",
            )
        result = records_from_rows(
            _hub_rows(spec), spec.hf_hub_url, kind, spec.format, spec.columns, spec.tags, on_invalid
        )
    else:
        raise DataError(
            spec.name,
            None,
            None,
            f"needs network: {spec.other_hub_url} (only the Hugging Face hub is supported); download it and set file_name",
        )
    if spec.num_samples is not None:
        result.records = result.records[: spec.num_samples]
    return result
