"""The LoRA adapters a server holds over ONE base model: loading (checked against the base, from allowed
directories only), unloading that really frees, an LRU of at most ``max_loaded`` adapters with pinning, and the
reference counts that make an unload wait for the requests still using the adapter.

Every adapter lives in one peft model over the served base, so requests for different adapters (and the base)
share one forward (``serve.batched_lora``: every row's LoRA update in one batched matmul per layer). The errors are typed
so the server can answer each with its status: :class:`AdapterNotFoundError` 404, :class:`AdapterMismatchError` 400,
:class:`AdapterPathError` 403, :class:`AdapterCapacityError` 503.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.models.loading import ModelLoadError, _base_of, adapter_config_of, model_dir_of
from posttrain.serve.batched_lora import BatchedLora

BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch."""

# Config keys that say where or how a model was saved, not what it computes: a copy of the base differs only here.
_PROVENANCE_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


class AdapterError(Exception):
    """An adapter request that cannot be served; the message says why and what to do."""


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is loaded or loadable (HTTP 404 ``model_not_found``)."""


class AdapterMismatchError(AdapterError):
    """The adapter was not trained on the served base, or its shapes do not fit it (HTTP 400)."""


class AdapterPathError(AdapterError):
    """The adapter path lies outside the allowed directories, or is not an adapter directory (HTTP 403)."""


class AdapterCapacityError(AdapterError):
    """``max_loaded`` adapters are resident and each is pinned or in use, so none can make room (HTTP 503)."""


@dataclass
class LoadedAdapter:
    """One resident adapter: where it came from, its size, and who uses it."""

    name: str
    path: Path
    num_parameters: int
    pinned: bool = False
    in_use: int = 0
    unloading: bool = False


@dataclass
class AdapterCounters:
    """Residency traffic since start: ``hits`` found the adapter resident, ``misses`` loaded it on demand."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    unloads: int = 0
    evictions: int = 0


def check_adapter_name(name: str) -> None:
    """Names become model ids and on-demand directory names, so only a plain file name is accepted."""
    if not name or name in (BASE, ".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise AdapterPathError(f"adapter name {name!r} is not allowed: use a plain name without '/' or leading '.'")


def return_freed_memory() -> None:
    """Hand the memory of deleted tensors back to the operating system. Freeing a tensor gives its bytes to the C
    allocator, and glibc keeps freed heap memory for reuse: without a trim an unloaded adapter never leaves the
    process's resident memory (vLLM #54839), though the next load reuses it. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # peft's modules hold reference cycles: their tensors are freed only by the collector
    library = ctypes.util.find_library("c")
    if library is None:
        return
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
    if trim is not None:
        trim(0)


def resolve_adapter_dir(path: str | Path, allowed_dirs: Iterable[Path], trusted: bool = False) -> Path:
    """The adapter directory ``path`` names (an adapter directory or a LoRA run directory, ``RUN/model``), after
    symlinks. Unless ``trusted`` (paths the operator gave on the command line), it must lie inside one of
    ``allowed_dirs`` and so must every file in it: a request can name only adapters the operator put there.
    A relative path is taken inside the allowed directories; any ``..`` component is refused outright."""
    raw = Path(path).expanduser()
    if ".." in raw.parts:
        raise AdapterPathError(f"adapter path {str(path)!r} contains '..'; give a path inside the adapter directory")
    roots = [Path(d).resolve() for d in allowed_dirs]
    if raw.is_absolute() or trusted:
        candidates = [raw]
    else:
        candidates = [root / raw for root in roots]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise AdapterNotFoundError(f"adapter path {str(path)!r} does not exist")
    real = found.resolve()

    def inside(target: Path) -> bool:
        return any(target == root or target.is_relative_to(root) for root in roots)

    if not trusted and not inside(real):
        allowed = ", ".join(str(r) for r in roots) or "none (start the server with --adapter-dir)"
        raise AdapterPathError(
            f"adapter path {str(path)!r} resolves to {real}, outside the allowed directories: {allowed}"
        )
    try:
        directory = model_dir_of(real)
    except FileNotFoundError as error:
        raise AdapterPathError(str(error)) from None
    if not (directory / "adapter_config.json").is_file():
        raise AdapterPathError(f"{directory} holds full weights, not a LoRA adapter (no adapter_config.json)")
    if not trusted:
        leaving = [f.name for f in directory.iterdir() if not inside(f.resolve())]
        if leaving:
            raise AdapterPathError(f"{directory}: {', '.join(leaving)} link outside the allowed directories")
    return directory


def adapter_tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """The saved adapter's tensor names and shapes, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    path = directory / "adapter_model.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    legacy = directory / "adapter_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="meta", weights_only=True)
        return {key: tuple(tensor.shape) for key, tensor in state.items()}
    raise AdapterPathError(f"{directory}: no adapter_model.safetensors (or .bin) to load")


def _comparable_config(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS}


class AdapterRegistry:
    """LoRA adapters over one base model, all in one peft model (see the module docstring).

    ``base_model``: the served transformers model (plain, not peft), loaded from ``base_dir``. ``allowed_dirs``:
    where run-time loads may read from. ``adapter_dirs``: directories whose sub-directories are loaded on demand
    when a request names them (``DIR/NAME``); they are allowed directories too.

    Thread safety: ``model_lock`` is held by whoever runs the model (the engine, per forward) and by the peft
    mutations here, so an adapter never appears or vanishes mid-forward. Bookkeeping has its own lock, never held
    while waiting for ``model_lock``, so :meth:`acquire` and :meth:`release` do not wait for a forward."""

    def __init__(
        self,
        base_model: Any,
        base_dir: str | Path,
        allowed_dirs: Iterable[str | Path] = (),
        adapter_dirs: Iterable[str | Path] = (),
        max_loaded: int = 8,
    ) -> None:
        from peft import PeftModel

        if isinstance(base_model, PeftModel):
            raise TypeError("AdapterRegistry serves a plain transformers base model; merge or unwrap the peft model")
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.base_model = base_model.eval()  # served, never trained: dropout off (and peft's mixed batches need it)
        self.base_dir = model_dir_of(base_dir)
        self.adapter_dirs = [Path(d).resolve() for d in adapter_dirs]
        self.allowed_dirs = [Path(d).resolve() for d in allowed_dirs] + self.adapter_dirs
        self.max_loaded = max_loaded
        self.counters = AdapterCounters()
        self.model_lock = threading.RLock()
        self._state = threading.Condition(threading.Lock())
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._loading: set[str] = set()
        self._peft: Any = None  # the peft model, made at the first load (peft has no empty PeftModel)
        self._batched: BatchedLora | None = None  # its mixed-adapter forward, made at the first one
        # Shapes of the base as loaded: wrapping in LoRA layers renames modules (``.base_layer``), and a mismatch
        # must be found before peft injects anything.
        self._module_shapes: dict[str, tuple[int, ...]] = {}
        for name, module in base_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self._module_shapes[name] = (module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Embedding):
                self._module_shapes[name] = (module.num_embeddings, module.embedding_dim)
        self._parameter_shapes = {name: tuple(p.shape) for name, p in base_model.named_parameters()}

    # -- what the engine calls ------------------------------------------------------------------------------
    def acquire(self, name: str | None) -> None:
        """Count one user of adapter ``name`` (None: the base), loading it from ``adapter_dirs`` when it is not
        resident. Every acquire needs one :meth:`release`."""
        if name is None:
            return
        check_adapter_name(name)
        with self._state:
            while name in self._loading:
                self._state.wait()
            adapter = self._adapters.get(name)
            if adapter is not None and not adapter.unloading:
                adapter.in_use += 1
                self._adapters.move_to_end(name)
                self.counters.hits += 1
                return
            if adapter is not None:
                raise AdapterNotFoundError(f"adapter {name!r} is being unloaded")
        on_demand = next((d / name for d in self.adapter_dirs if (d / name).exists()), None)
        if on_demand is None:
            raise AdapterNotFoundError(f"the model {name!r} does not exist: no loaded adapter or base by that name")
        self._load(name, on_demand, pin=False, trusted=False, users=1)

    def release(self, name: str | None) -> None:
        """One user of ``name`` is done (its request finished or was cancelled)."""
        if name is None:
            return
        with self._state:
            self._adapters[name].in_use -= 1
            self._state.notify_all()

    def forward(self, adapter_names: list[str | None], **inputs: Any) -> Any:
        """The served model's forward over a batch whose row ``i`` uses adapter ``adapter_names[i]`` (None: the
        base). Call it holding ``model_lock``."""
        if self._peft is None or not self._peft.peft_config:
            # Nothing loaded: the LoRA layers left behind by unloads hold no adapter and compute the base exactly.
            return self.base_model(**inputs)
        if self._batched is None:
            self._batched = BatchedLora(self._peft)
        return self._batched.forward(adapter_names, **inputs)

    # -- what the server's admin endpoints call -------------------------------------------------------------
    def load(self, name: str, path: str | Path, pin: bool = False, trusted: bool = False) -> LoadedAdapter:
        """Load the adapter at ``path`` as ``name`` (checked against the base first), evicting the least recently
        used unpinned idle adapter when ``max_loaded`` are resident. ``trusted``: the operator's own path (the
        command line), exempt from the allowed-directory check."""
        check_adapter_name(name)
        return self._load(name, path, pin=pin, trusted=trusted, users=0)

    def unload(self, name: str, timeout: float | None = None) -> None:
        """Unload ``name`` once the requests using it are done (no new ones are admitted meanwhile), deleting its
        weights from the peft model. TimeoutError (the adapter stays) if they are not done within ``timeout``."""
        with self._state:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.unloading:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
            adapter.unloading = True
            if not self._state.wait_for(lambda: adapter.in_use == 0, timeout):
                adapter.unloading = False
                raise TimeoutError(f"adapter {name!r} is still used by {adapter.in_use} request(s)")
        self._delete(name)
        with self._state:
            self.counters.unloads += 1

    def adapters(self) -> list[LoadedAdapter]:
        """The resident adapters, least recently used first (copies: safe to read without the lock)."""
        with self._state:
            return [LoadedAdapter(**vars(a)) for a in self._adapters.values() if not a.unloading]

    def is_loaded(self, name: str) -> bool:
        with self._state:
            return name in self._adapters and not self._adapters[name].unloading

    # -- mechanics ---------------------------------------------------------------------------------------------
    def _load(self, name: str, path: str | Path, pin: bool, trusted: bool, users: int) -> LoadedAdapter:
        directory = resolve_adapter_dir(path, self.allowed_dirs, trusted)
        self.check_matches_base(directory)
        with self._state:
            while name in self._loading:
                self._state.wait()
            resident = self._adapters.get(name)
            if resident is not None and users and not resident.unloading:
                # Another request loaded it on demand while this one waited.
                resident.in_use += users
                self.counters.hits += 1
                return resident
            if resident is not None:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
            victim = self._choose_victim()
            self._loading.add(name)
        try:
            if victim is not None:
                self._delete(victim)
                with self._state:
                    self.counters.evictions += 1
            with self.model_lock:
                before = sum(p.numel() for p in self.base_model.parameters())
                self._attach(name, directory)
                added = sum(p.numel() for p in self.base_model.parameters()) - before
        finally:
            with self._state:
                self._loading.discard(name)
                self._state.notify_all()
        with self._state:
            adapter = LoadedAdapter(name, directory, added, pinned=pin, in_use=users)
            self._adapters[name] = adapter
            self.counters.loads += 1
            self.counters.misses += bool(users)
            self._state.notify_all()
            return adapter

    def _choose_victim(self) -> str | None:
        """The adapter to evict for a new one (least recently used, unpinned, idle), marked so no request takes
        it meanwhile; None when there is room. Call holding the state lock."""
        if len(self._adapters) + len(self._loading) < self.max_loaded:
            return None
        for name, adapter in self._adapters.items():
            if not adapter.pinned and adapter.in_use == 0 and not adapter.unloading:
                adapter.unloading = True
                return name
        raise AdapterCapacityError(
            f"{self.max_loaded} adapters are loaded (--max-loaded) and each is pinned or in use; "
            "unload one or raise --max-loaded"
        )

    def _attach(self, name: str, directory: Path) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base_model, directory, adapter_name=name)
        else:
            self._peft.load_adapter(directory, adapter_name=name)
        # peft forgets its active adapter when the last one is deleted; a valid one keeps its forward working
        # (every forward names its rows' adapters, so which one is "active" does not change any answer).
        self._peft.set_adapter(name)
        self._peft.eval()
        self._peft.requires_grad_(False)
        if self._batched is not None:
            self._batched.invalidate()

    def _delete(self, name: str) -> None:
        with self.model_lock, warnings.catch_warnings():
            # peft warns that the deleted adapter was the active one and names another: expected here.
            warnings.simplefilter("ignore", UserWarning)
            self._peft.delete_adapter(name)
            if self._batched is not None:
                self._batched.invalidate()
            remaining = [n for n in self._peft.peft_config]
            if remaining:
                self._peft.set_adapter(remaining[0])
                self._peft.requires_grad_(False)
            with self._state:  # lock order: model_lock, then the state lock; never the other way round
                del self._adapters[name]
                self._state.notify_all()
        return_freed_memory()

    def check_matches_base(self, directory: Path) -> None:
        """Raise :class:`AdapterMismatchError` unless the adapter in ``directory`` is a LoRA adapter trained on the
        served base (the same directory, or a copy with the same config) whose every tensor fits the base's
        modules. Serving it over another base would answer, silently, with a different model."""
        config = adapter_config_of(directory)
        where = directory / "adapter_config.json"
        if config.peft_type.value != "LORA":
            raise AdapterMismatchError(f"{where}: a {config.peft_type.value} adapter; only LoRA adapters are served")
        if getattr(config, "use_dora", False):
            raise AdapterMismatchError(
                f"{where}: DoRA adapters cannot share a mixed-adapter batch (peft); serve the merged model "
                f"(posttrain export {directory.parent} --merge)"
            )
        if config.task_type not in (None, "CAUSAL_LM"):
            raise AdapterMismatchError(f"{where}: task {config.task_type}; a chat server serves CAUSAL_LM adapters")
        try:
            recorded_base = _base_of(directory, config)
        except ModelLoadError as error:
            raise AdapterMismatchError(str(error)) from None
        self._check_base_identity(where, recorded_base)
        for key, shape in adapter_tensor_shapes(directory).items():
            self._check_tensor_fits(where, key, shape)

    def _check_base_identity(self, where: Path, recorded_base: str | Path) -> None:
        if isinstance(recorded_base, str):
            if recorded_base not in (str(self.base_dir), getattr(self.base_model, "name_or_path", None)):
                raise AdapterMismatchError(
                    f"{where}: trained on {recorded_base!r}, which is not on this machine, so it cannot be checked "
                    f"against the served base {self.base_dir}; set base_model_name_or_path to the served base"
                )
            return
        if (recorded_base / "adapter_config.json").exists():
            raise AdapterMismatchError(
                f"{where}: trained on top of the adapter {recorded_base}, not on the plain base; serve the merged "
                f"model of {recorded_base} (posttrain export --merge) as the base instead"
            )
        if recorded_base.resolve() == self.base_dir.resolve():
            return
        ours, theirs = _comparable_config(self.base_dir), _comparable_config(recorded_base)
        differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differing:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} vs served {ours.get(k)!r}" for k in differing[:4])
            raise AdapterMismatchError(f"{where}: trained on {recorded_base}, not the served base ({shown})")

    def _check_tensor_fits(self, where: Path, key: str, shape: tuple[int, ...]) -> None:
        name = key.removeprefix("base_model.model.")
        for marker, side in (
            (".lora_A.", "A"),
            (".lora_B.", "B"),
            (".lora_embedding_A", "A"),
            (".lora_embedding_B", "B"),
        ):
            if marker in name:
                module = name.split(marker)[0]
                base = self._module_shapes.get(module)
                if base is None:
                    raise AdapterMismatchError(f"{where}: {key} adapts {module}, which the served base does not have")
                # Linear (in, out): A is (r, in), B is (out, r); Embedding (num, dim): A is (r, num), B is (dim, r).
                expected = base[0] if side == "A" else base[1]
                got = shape[1] if side == "A" else shape[0]
                if got != expected:
                    raise AdapterMismatchError(
                        f"{where}: {key} has shape {list(shape)}, which does not fit {module} of the served base "
                        f"({'input' if side == 'A' else 'output'} size {expected})"
                    )
                return
        # A fully trained module saved with the adapter (peft's modules_to_save): it replaces the base's tensor.
        expected_shape = self._parameter_shapes.get(name)
        if expected_shape is None:
            raise AdapterMismatchError(f"{where}: {key} has no counterpart in the served base")
        if expected_shape != shape:
            raise AdapterMismatchError(
                f"{where}: {key} has shape {list(shape)}, the served base's {name} has {list(expected_shape)}"
            )
