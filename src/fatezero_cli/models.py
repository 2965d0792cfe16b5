"""Load Stable Diffusion 1.x for inversion and editing: hub id, diffusers folder or single file.

Only the four components FateZero needs are loaded (UNet, VAE, text encoder, tokenizer), each on
its own, so no safety checker or feature extractor is ever fetched. The scheduler is reduced to
a DDIM config with the SD 1.x settings DESIGN 3.2 prescribes, whatever scheduler the model ships.

Every model also gets an *identity*: the part of the inversion cache key that says which weights
produced the cached attention. It is content based (a weights hash, or the hub commit, which
names the content), so copying a model folder keeps its caches and editing weights in place
invalidates them. Hashing gigabytes on every run is too slow, so file hashes are memoised on
disk by (path, size, mtime_ns).
"""

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from fatezero_cli.errors import FatezeroError
from fatezero_cli.files import sha256_file, write_bytes_atomically

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

REQUIRED_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
HASHED_FOLDERS = (*REQUIRED_FOLDERS, "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_SUFFIXES = (".json", ".txt")
HASH_MEMO_FILE = "file-hashes.json"

SD1_SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
INVERTIBLE_SPACINGS = ("leading", "trailing")  # what DDIMInverseScheduler supports
MODEL_SCHEDULER_KEYS = (
    *SD1_SCHEDULER_DEFAULTS,
    "trained_betas",
    "rescale_betas_zero_snr",
)
FORCED_SCHEDULER_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
DEVICE_TYPES = ("cpu", "cuda", "mps")

# What diffusers, transformers, huggingface_hub and safetensors raise for a missing, unreachable
# or unreadable model. Anything else is a bug and keeps its traceback.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError, EntryNotFoundError)


@dataclass
class ModelBundle:
    """The loaded components, in eval mode with gradients off, on one device and dtype."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    identity: dict
    device: torch.device
    dtype: torch.dtype

    def ddim_scheduler(self) -> DDIMScheduler:
        """A fresh scheduler: schedulers keep per-run state (timesteps), so never share one."""
        return DDIMScheduler.from_config(self.scheduler_config)

    def ddim_inverse_scheduler(self) -> DDIMInverseScheduler:
        return DDIMInverseScheduler.from_config(self.scheduler_config)


@dataclass
class _Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    model_scheduler_config: dict


# --- device and dtype ----------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """None picks CUDA when present; an unusable device is a user error, not a CUDA traceback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise FatezeroError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from error
    if resolved.type not in DEVICE_TYPES:
        raise FatezeroError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    if resolved.type == "cuda":
        _check_cuda_device(resolved)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise FatezeroError("device mps requested but MPS is not available")
    return resolved


def _check_cuda_device(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise FatezeroError(f"device {device} requested but CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise FatezeroError(f"device {device} requested but only {count} CUDA device(s) exist")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 elsewhere by default (DESIGN 5); fp16 on CPU is refused because
    many CPU kernels are missing or far slower in half precision."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    resolved = DTYPES.get(dtype.lower())
    if resolved is None:
        raise FatezeroError(f"unknown dtype {dtype!r} (use fp16, bf16 or fp32)")
    if resolved == torch.float16 and device.type == "cpu":
        raise FatezeroError("fp16 is not supported on cpu (slow or missing kernels); use fp32")
    return resolved


# --- what kind of model --------------------------------------------------------------------


def _model_kind(model: str) -> str:
    """'folder', 'file' or 'hub'; a path that exists always wins over a hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise FatezeroError(f"model file {model} is not a .safetensors or .ckpt checkpoint")
        return "file"
    if _looks_like_hub_id(model):
        return "hub"
    raise FatezeroError(f"no such model path: {model}")


def _looks_like_hub_id(model: str) -> bool:
    if model.count("/") != 1 or model.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _check_diffusers_folder(folder: Path) -> None:
    missing = [f"{name}/" for name in REQUIRED_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FatezeroError(
            f"model folder {folder} has no {', '.join(missing)} "
            "(expected a diffusers folder with unet/, vae/, text_encoder/, tokenizer/)"
        )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- loading -------------------------------------------------------------------------------


def load_model(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    cache_root: Path | None = None,
    config: str | Path | None = None,
) -> ModelBundle:
    """Load `model` (diffusers folder, .safetensors/.ckpt file, or hub id) for FateZero.

    `config` is only used for single-file checkpoints: a local diffusers folder whose configs
    and tokenizer describe the checkpoint, so loading needs no network. `cache_root` is where
    file hashes are memoised (None: no memo).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    kind = _model_kind(model)
    if kind == "folder":
        components = _load_folder(Path(model).expanduser(), torch_dtype)
    elif kind == "file":
        components = _load_single_file(Path(model).expanduser(), config, torch_dtype)
    else:
        components = _load_hub(model, torch_dtype)
    return ModelBundle(
        unet=_frozen(components.unet, torch_device),
        vae=_frozen(components.vae, torch_device),
        text_encoder=_frozen(components.text_encoder, torch_device),
        tokenizer=components.tokenizer,
        scheduler_config=ddim_scheduler_config(components.model_scheduler_config),
        identity=model_identity(model, cache_root, config),
        device=torch_device,
        dtype=torch_dtype,
    )


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Inference only: eval mode, no gradients (tuning re-enables what it trains).

    On CPU, weights loaded from a folder still live in the memory-mapped safetensors file:
    unaligned, so CPU kernels give results that differ (~1e-7) from the same weights loaded any
    other way, and a crash (SIGBUS) if the file is rewritten while in use. So they are copied.
    """
    module = module.to(device).eval().requires_grad_(False)
    if device.type == "cpu":
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = tensor.data.clone()
    return module


def _load_part(what: str, source: str, load):
    try:
        return load()
    except LOAD_ERRORS as error:
        raise FatezeroError(f"cannot load {what} from {source}: {_first_line(error)}") from error


def _load_networks(source: str, dtype: torch.dtype, local_files_only: bool) -> tuple:
    """UNet, VAE, text encoder and tokenizer from a diffusers layout (local folder or hub repo)."""

    def load(what: str, loader, **kwargs):
        return _load_part(
            what,
            source,
            lambda: loader(source, subfolder=what, local_files_only=local_files_only, **kwargs),
        )

    return (
        load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype),
        load("vae", AutoencoderKL.from_pretrained, torch_dtype=dtype),
        load("text_encoder", CLIPTextModel.from_pretrained, dtype=dtype),
        load("tokenizer", CLIPTokenizer.from_pretrained),
    )


def _load_scheduler_config(source: str, local_files_only: bool) -> dict:
    return _load_part(
        "scheduler",
        source,
        lambda: dict(
            DDIMScheduler.load_config(
                source, subfolder="scheduler", local_files_only=local_files_only
            )
        ),
    )


def _load_diffusers_layout(source: str, dtype: torch.dtype, local_files_only: bool) -> _Components:
    with warnings.catch_warnings():
        # diffusers passes hub ids an argument huggingface_hub deprecated; users can't act on it.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        scheduler_config = _load_scheduler_config(source, local_files_only)
        return _Components(*_load_networks(source, dtype, local_files_only), scheduler_config)


def _load_folder(folder: Path, dtype: torch.dtype) -> _Components:
    """A local diffusers folder; without scheduler/ the SD 1.x schedule is assumed."""
    _check_diffusers_folder(folder)
    if (folder / "scheduler").is_dir():
        return _load_diffusers_layout(str(folder), dtype, local_files_only=True)
    return _Components(*_load_networks(str(folder), dtype, local_files_only=True), {})


def _load_hub(repo_id: str, dtype: torch.dtype) -> _Components:
    """The local Hugging Face cache first (works offline), the network only when that fails."""
    try:
        return _load_diffusers_layout(repo_id, dtype, local_files_only=True)
    except FatezeroError:
        pass  # not (fully) cached: fetch what is missing
    try:
        return _load_diffusers_layout(repo_id, dtype, local_files_only=False)
    except FatezeroError as error:
        raise FatezeroError(
            f"model {repo_id} is neither in the local Hugging Face cache nor reachable "
            "(offline, unknown repo or no access); --model accepts a local diffusers folder "
            "or a .safetensors/.ckpt file"
        ) from error


def _check_config_folder(config: Path) -> Path:
    if not (config / "model_index.json").is_file():
        raise FatezeroError(
            f"model config {config} is not a diffusers folder (no model_index.json); "
            "pass the folder of a diffusers SD 1.x model"
        )
    return config


def _is_network_error(error: BaseException) -> bool:
    return isinstance(error, ConnectionError | EntryNotFoundError | HfHubHTTPError)


def _load_single_file(file: Path, config: str | Path | None, dtype: torch.dtype) -> _Components:
    """An original (LDM) checkpoint. Its architecture, tokenizer and scheduler come from
    `config`, a local diffusers folder; without one diffusers looks for its guess of the base
    model in the Hugging Face cache, then online."""
    # Imported here: the pipeline module pulls in image processors that only this path needs.
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    config_folder = _check_config_folder(Path(config).expanduser()) if config else None
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(file),
            config=str(config_folder) if config_folder else None,
            torch_dtype=dtype,
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (*LOAD_ERRORS, SingleFileComponentError) as error:
        if config_folder is None and _is_network_error(error):
            raise FatezeroError(
                f"checkpoint {file} needs the diffusers config of its base model, which is "
                "neither in the local Hugging Face cache nor reachable; pass a local diffusers "
                "folder (e.g. the SD 1.x model it was trained from) as its config"
            ) from error
        raise FatezeroError(f"cannot load checkpoint {file}: {_first_line(error)}") from error
    return _Components(
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
        dict(pipeline.scheduler.config),
    )


def ddim_scheduler_config(model_config: dict) -> dict:
    """DESIGN 3.2: the model's noise schedule and prediction type, DDIM with the SD 1.x settings
    forced, whichever scheduler the model ships (SD 1.4/1.5 ship PNDM)."""
    kept = {
        key: model_config[key] for key in MODEL_SCHEDULER_KEYS if model_config.get(key) is not None
    }
    config = {**SD1_SCHEDULER_DEFAULTS, **kept, **FORCED_SCHEDULER_SETTINGS}
    if config["timestep_spacing"] not in INVERTIBLE_SPACINGS:
        # DDIM inversion needs an evenly strided grid; SD 1.x's own choice is "leading".
        config["timestep_spacing"] = "leading"
    if config["prediction_type"] not in SUPPORTED_PREDICTIONS:
        raise FatezeroError(
            f"unsupported prediction_type {config['prediction_type']!r} in the model's scheduler "
            f"(supported: {', '.join(SUPPORTED_PREDICTIONS)})"
        )
    return config


# --- identity ------------------------------------------------------------------------------


def model_identity(
    model: str, cache_root: Path | None = None, config: str | Path | None = None
) -> dict:
    """Which weights `model` names, for the inversion cache key.

    {"name", "kind": "hub", "revision"}: the cached snapshot's commit, which fixes the content.
    {"name", "kind": "folder"|"file", "sha256"} (+ "config_sha256" for a single file loaded with
    a config folder, whose path is kept as "config"): hashes of what loading reads. Cache keys
    must use revision/sha256; `name` and `config` (paths) say where to find it again.
    """
    kind = _model_kind(model)
    if kind == "hub":
        return {"name": model, "kind": "hub", "revision": _cached_revision(model)}
    path = Path(model).expanduser().resolve()
    hasher = _FileHasher(cache_root)
    if kind == "folder":
        digest = hasher.folder(path, _model_files(path))
        identity = {"name": str(path), "kind": kind, "sha256": digest}
    else:
        identity = {"name": str(path), "kind": kind, "sha256": hasher.file(path)}
        if config:
            config_path = Path(config).expanduser().resolve()
            identity["config"] = str(config_path)
            identity["config_sha256"] = hasher.folder(config_path, _config_files(config_path))
    hasher.save()
    return identity


def _cached_revision(repo_id: str) -> str:
    cached = try_to_load_from_cache(repo_id, "unet/config.json")
    if not isinstance(cached, str):
        raise FatezeroError(
            f"model {repo_id} is not in the local Hugging Face cache; load it once with a "
            "network connection, or pass a local diffusers folder or .safetensors/.ckpt file"
        )
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1]


def _files_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


def _loaded_weights(folder: Path) -> list[Path]:
    """The weight files diffusers/transformers read: never variants (name.fp16.safetensors),
    and .bin only when there is no .safetensors."""
    weights = [p for p in _files_in(folder, WEIGHT_SUFFIXES) if "." not in p.stem]
    safetensors = [p for p in weights if p.suffix == ".safetensors"]
    return safetensors or weights


def _model_files(folder: Path) -> list[Path]:
    files = []
    for name in HASHED_FOLDERS:
        files += _files_in(folder / name, CONFIG_SUFFIXES) + _loaded_weights(folder / name)
    return files


def _config_files(folder: Path) -> list[Path]:
    files = _files_in(folder, CONFIG_SUFFIXES)
    for name in HASHED_FOLDERS:
        files += _files_in(folder / name, CONFIG_SUFFIXES)
    return files


class _FileHasher:
    """sha256 of files, memoised in `cache_root` by (real path, size, mtime_ns).

    Concurrent runs may each rewrite the memo; the write is atomic, so the worst case is a lost
    entry that gets hashed again.
    """

    def __init__(self, cache_root: Path | None):
        self.memo_path = Path(cache_root) / HASH_MEMO_FILE if cache_root else None
        self.memo = self._read_memo()
        self.changed = False

    def _read_memo(self) -> dict:
        if self.memo_path is None:
            return {}
        try:
            memo = json.loads(self.memo_path.read_text())
        except (OSError, ValueError):
            return {}
        return memo if isinstance(memo, dict) else {}

    def file(self, path: Path) -> str:
        real = path.resolve()
        stat = real.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.memo.get(str(real))
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = sha256_file(real)
        self.memo[str(real)] = {"stamp": stamp, "sha256": digest}
        self.changed = True
        return digest

    def folder(self, folder: Path, files: list[Path]) -> str:
        """One hash over relative names and contents: moving the folder keeps it."""
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(f"{path.relative_to(folder).as_posix()}\0{self.file(path)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.memo_path is None or not self.changed:
            return
        memo = json.dumps(self.memo, indent=0, sort_keys=True).encode()
        write_bytes_atomically(self.memo_path, memo)
