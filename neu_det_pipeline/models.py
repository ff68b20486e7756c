"""Device, precision and model loading shared by every step.

Loading always goes through the libraries' own `from_pretrained` (hub ids on a GPU node, local
hub-layout folders offline); this module picks the device and dtype and turns a failed load into
one line naming the config key and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from neu_det_pipeline.errors import PipelineError

T = TypeVar("T")

LOCAL_DIR_PREFIX = "local-dir:"
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF_PRECISION_VARIANT = "fp16"
WEIGHT_FILE = re.compile(
    r"(?:diffusion_pytorch_model|model|pytorch_model)(?:-\d{5}-of-\d{5})?(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?"
    r"\.(?P<format>safetensors|bin)"
)
"""The weight file names diffusers and transformers load, whole or sharded, plain or of a variant (`.fp16`,
`.non_ema`; sharded `model.fp16-00001-of-00002.safetensors`, legacy `model-00001-of-00002.fp16.safetensors`);
other files (`v1-5-pruned.safetensors`, `..._promax.safetensors`) are not loaded by `from_pretrained`."""


def resolve_device(name: str) -> torch.device:
    """`run.device` -> a torch device; `auto` takes CUDA when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("run.device=cuda but no CUDA device is visible; set run.device=auto or run.device=cpu")
    return torch.device(name)


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""How summaries name the dtype a step ran in."""


def select_precision(device_type: str, mixed_precision: str, bf16_supported: bool, fp16_safe: bool = True) -> str:
    """The precision (`no`, `fp16`, `bf16`) that really runs for `run.mixed_precision` on a device type.

    On a GPU: as configured, except that a model that is not fp16-safe (DINOv3) runs in bf16 where the GPU
    supports it, else in fp32. On CPU: bf16 when asked for explicitly and the CPU has bf16 kernels; fp16, the
    default, runs in fp32 (CPU fp16 kernels are slow or missing).
    """
    if device_type != "cuda":
        return "bf16" if mixed_precision == "bf16" and bf16_supported else "no"
    if mixed_precision == "fp16" and not fp16_safe:
        return "bf16" if bf16_supported else "no"
    return mixed_precision


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU build runs the bf16 kernels the pipeline needs (convolution, matmul, autocast)."""
    try:
        images = torch.ones(1, 3, 8, 8, dtype=torch.bfloat16)
        torch.nn.functional.conv2d(images, torch.ones(4, 3, 3, 3, dtype=torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 4) @ torch.ones(4, 2)
    except RuntimeError:
        return False
    return True


def bf16_supported(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()


def precision_for(device: torch.device, mixed_precision: str, fp16_unsafe_model: str | None = None) -> str:
    """`select_precision` for a real device (`fp16_unsafe_model`: the model's name when it is not fp16-safe);
    a precision other than the configured one is said once."""
    precision = select_precision(device.type, mixed_precision, bf16_supported(device), fp16_unsafe_model is None)
    if mixed_precision == "bf16" and precision == "no":
        _note_once("run.mixed_precision=bf16: this CPU has no bf16 kernels; running in fp32")
    elif mixed_precision == "fp16" and precision != "fp16" and device.type == "cuda":
        _note_once(f"{fp16_unsafe_model} is not fp16-safe: it runs in {precision_name(precision)} instead of run.mixed_precision=fp16")
    return precision


def precision_name(precision: str) -> str:
    """`no`/`fp16`/`bf16` -> the dtype name summaries record (`fp32`, `fp16`, `bf16`)."""
    return DTYPE_NAMES[MIXED_PRECISION_DTYPES[precision]]


def inference_dtype(device: torch.device, mixed_precision: str, fp16_unsafe_model: str | None = None) -> torch.dtype:
    """Dtype for inference weights: `run.mixed_precision` as `select_precision` lets it run on `device`."""
    return MIXED_PRECISION_DTYPES[precision_for(device, mixed_precision, fp16_unsafe_model)]


@functools.cache
def _note_once(message: str) -> None:
    from neu_det_pipeline.recipe import console  # the step's console: the note lands in its log too

    console.print(f"[yellow]note:[/] {message}", highlight=False)


def local_folder(model_id: str) -> Path | None:
    """The folder `model_id` names, or None when it reads as a hub id."""
    if model_id.startswith(LOCAL_DIR_PREFIX):
        return Path(model_id.removeprefix(LOCAL_DIR_PREFIX))
    path = Path(model_id).expanduser()
    # `org/name` may be a hub id or a relative folder; a leading `/`, `.` or `~` can only be a folder.
    return path if path.exists() or model_id.startswith(("/", ".", "~")) else None


def weights_variant(model_id: str, dtype: torch.dtype, subfolder: str | None = None) -> str | None:
    """`"fp16"` when the weights will be held in `dtype` half precision (fp16 or bf16) and the repo or folder has
    fp16 variant files (in `subfolder` when given, else in any component folder of a pipeline); None otherwise,
    and the full-precision files load as before. Pass the result as `variant=` to `from_pretrained`.

    fp16 files halve the download and the host memory, and casting them to bf16 loses nothing that casting
    the fp32 files would keep (fp16 has more mantissa bits). The files decide, not try-then-fall-back:
    diffusers raises for a missing variant only after asking for it (and logs an error), and a broad fallback
    would hide real load errors. A hub id is listed on the hub; offline, or when the listing fails (gated,
    network down), its cached snapshot is listed, so a cache an earlier run filled loads again offline.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    for name in _model_files(model_id):
        match = WEIGHT_FILE.fullmatch(name.rsplit("/", 1)[-1])
        # safetensors only, so choosing a variant never makes a loader unpickle
        if name.startswith(prefix) and match and match["variant"] == HALF_PRECISION_VARIANT and match["format"] == "safetensors":
            return HALF_PRECISION_VARIANT
    return None


@functools.cache
def _hub_repo_files(model_id: str) -> tuple[str, ...]:
    """The hub's file listing of a repo, asked once per process: a pipeline loads several components of one repo,
    and each asks which variant files it has. Failures are not cached."""
    from huggingface_hub import HfApi

    return tuple(HfApi().list_repo_files(model_id))


def _model_files(model_id: str) -> list[str]:
    """Relative paths of the files of a local folder, or of a hub repo (or its cached snapshot); [] if unknown."""
    folder = local_folder(model_id)
    if folder is None:
        from huggingface_hub import is_offline_mode, snapshot_download

        if not is_offline_mode():
            try:
                return list(_hub_repo_files(model_id))
            except Exception:  # noqa: BLE001 - gated, missing, server or connection errors: the cache decides
                pass
        try:
            folder = Path(snapshot_download(model_id, local_files_only=True))
        except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
            return []
    if not folder.is_dir():
        return []
    return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def drop_log_messages(logger_name: str, prefix: str) -> Iterator[None]:
    """Inside the block, drop the messages of `logger_name` that start with `prefix` (an expected, harmless notice)."""
    message_filter = _DropMessage(prefix)
    logger = logging.getLogger(logger_name)
    logger.addFilter(message_filter)
    try:
        yield
    finally:
        logger.removeFilter(message_filter)


@functools.cache
def quiet_library_progress() -> None:
    """Hide what transformers and diffusers print on every load when nothing is wrong.

    Their per-load bars ("Loading weights", "Loading pipeline components", "Writing model shards") take
    no visible time and break into rich's display; download bars of the hub stay on, since on a GPU node
    a multi-GB download is real information. Real warnings still show.
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also turns the hub's bars off ...
    enable_progress_bars()  # ... so they are turned back on
    diffusers_logging.disable_progress_bar()
    # `load_textual_inversion` grows the embedding matrix with transformers' default mean resizing, which
    # announces how the new rows are initialised; the loaded embeddings overwrite those rows at once.
    logging.getLogger("transformers.modeling_utils").addFilter(_DropMessage("The new embeddings will be initialized"))


def load_model(config_key: str, model_id: str, load: Callable[[], T]) -> T:
    """Run `load()`; a missing folder or an unreachable hub id becomes one line naming `config_key` and the fix."""
    quiet_library_progress()
    folder = local_folder(model_id)
    if folder is not None and not folder.is_dir():
        raise PipelineError(
            f"{config_key}: model folder {folder} does not exist; set {config_key}=<folder in hub layout or hub id> "
            f"(tiny offline models: `neu-det tiny-models DIR`)"
        )
    try:
        return load()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"{config_key}={model_id!r} could not be loaded ({reason}); set {config_key} to a local model folder, "
            f"or to a hub id that is in the Hugging Face cache or downloadable"
        ) from None
