"""A trained model as one ONNX or TorchScript file that takes pixels, verified against PyTorch before it is kept.

The graph's input ``pixels`` is uint8 (N, S, S, 3) RGB at the model's stored size S (``resize.size`` of
model.json: what :func:`resnet_ray.images.decode` makes of any image under the model's resize policy); N is a
dynamic batch axis. Inside: the evaluation preprocessing of :class:`resnet_ray.transforms.Preprocess` (to float,
bilinear resize to ``image_size``, the training normalization), the network, and two outputs of shape (N, C):
``probabilities`` (softmax, with the Predictor's temperature where it applies one) and ``logits``. A consumer sends
only pixels.

The export folder holds the graph (``model.onnx`` or ``model.torchscript.pt``) and ``model.json``: the model's own
metadata, with ``sha256`` now that of the graph file, ``source_sha256`` that of the weights it came from, and
``export`` (format, file, input and outputs, the exporter, the verification's figures).

Verification runs the written file (ONNX Runtime for ONNX, ``torch.jit.load`` for TorchScript), loaded the way a
consumer loads it (:func:`load_export`: SHA-256 first), on real images of the run's test split, and compares it
with the ``Predictor`` that evaluation, prediction and serving use: identical top-1 on every image and every
probability within :data:`TOLERANCE`, at batch sizes 1 and ``batch_size``. Everything is written into a temporary
folder beside the output and renamed into place only when it passes; a failing export leaves nothing.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript``, exports these
convolutional networks exactly (opset :data:`OPSET`) and takes half the time of the dynamo exporter on a CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from resnet_ray import storage
from resnet_ray.checkpoint import MODEL_INFO, CheckpointError
from resnet_ray.config import Config
from resnet_ray.saved_model import SavedModel
from resnet_ray.transforms import Preprocess

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT = "pixels"
OUTPUTS = ("probabilities", "logits")
OPSET = 17
TOLERANCE = 1e-4  # max |probability - the Predictor's| on any class of any image


class ExportError(CheckpointError):
    """An export that does not reproduce the PyTorch model, or an export folder that is not intact."""


class PixelModel(torch.nn.Module):
    """uint8 (N, S, S, 3) pixels -> (probabilities, logits), each (N, C): preprocessing and network in one graph."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.model, self.preprocess, self.temperature = model, preprocess, float(temperature)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.preprocess(pixels))
        scaled = logits / self.temperature if self.temperature != 1.0 else logits
        return scaled.softmax(dim=1), logits


def pixel_model(saved: SavedModel, temperature: float = 1.0) -> PixelModel:
    """The graph of a saved model as a CPU module in eval mode."""
    return PixelModel(saved.load().float().cpu(), saved.preprocess(), temperature).eval()


@contextlib.contextmanager
def _quiet_tracing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "the legacy TorchScript-based ONNX export"
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace / save / load: "deprecated" since 2.10
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)  # strided slices (option A shortcuts)
        yield


def _example(size: int) -> torch.Tensor:
    return torch.zeros((2, size, size, 3), dtype=torch.uint8)  # batch 2: nothing specializes on a batch of one


def write_onnx(module: PixelModel, size: int, path: str) -> None:
    axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    with _quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            module,
            (_example(size),),
            path,
            dynamo=False,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def write_torchscript(module: PixelModel, size: int, path: str) -> None:
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(module, (_example(size),), check_trace=False)
        torch.jit.save(traced, path)


WRITERS: dict[str, Callable[[PixelModel, int, str], None]] = {"onnx": write_onnx, "torchscript": write_torchscript}


@dataclass
class ExportedModel:
    """A loaded, SHA-256-checked export: ``run(pixels)`` -> probabilities (N, C) float32."""

    run: Callable[[np.ndarray], np.ndarray]
    info: dict
    folder: str


def _onnx_runner(blob: bytes, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([OUTPUTS[0]], {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


def _torchscript_runner(blob: bytes, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet_tracing():
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu").eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)))[0].numpy()

    return run


RUNNERS = {"onnx": _onnx_runner, "torchscript": _torchscript_runner}


def load_export(folder: str, threads: Optional[int] = None) -> ExportedModel:
    """Load an export folder: its graph file is read once, its SHA-256 checked against model.json, and only then
    handed to ONNX Runtime or TorchScript. A changed byte, a changed model.json or a missing file: ExportError."""
    info_path = os.path.join(folder, MODEL_INFO)
    try:
        with open(info_path) as f:
            info = json.load(f)
        record = info["export"]
        fmt, name = record["format"], record["file"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{info_path}: not an export's model.json ({type(exc).__name__}: {exc})") from None
    if fmt not in RUNNERS or name != FORMATS[fmt]:
        raise ExportError(f"{info_path}: unknown export format {fmt!r} / file {name!r}")
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read ({exc})") from None
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise ExportError(f"{path}: its SHA-256 differs from {MODEL_INFO}: refusing to load (changed after export?)")
    return ExportedModel(RUNNERS[fmt](blob, threads), info, folder)


# ---------------------------------------------------------------------------
# verification


def split_images(cfg: Config, size: int, rows: int) -> np.ndarray:
    """The first ``rows`` images (uint8 (N, S, S, 3)) of the run's prepared test split (data.* of its config)."""
    from resnet_ray.data.layout import DataError
    from resnet_ray.data.load import read_split
    from resnet_ray.data.prepare import dataset_dir

    prepared = dataset_dir(cfg.data)
    try:
        parts, n = [], 0
        for batch in read_split(cfg.data, "test", prepared):
            parts.append(batch["image"][: rows - n])
            n += len(parts[-1])
            if n >= rows:
                break
    except DataError as exc:
        raise ExportError(f"the export is verified on the run's test split, which is not readable: {exc}") from None
    if not n:
        raise ExportError(f"{prepared}: the test split has no rows to verify the export on")
    images = np.concatenate(parts)
    if images.shape[1:] != (size, size, 3):
        raise ExportError(
            f"{prepared}: test images are {images.shape[1]}x{images.shape[2]}, the model's stored size is {size}"
        )
    return images


@contextlib.contextmanager
def _exact_float32():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def reference_probabilities(predictor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, C) probabilities of the Predictor (built with k = C and probabilities=True) on ``images``."""
    out = []
    for start in range(0, len(images), batch_size):
        answer = predictor({"image": images[start : start + batch_size]})
        full = np.zeros((len(answer["pred"]), predictor.k), dtype=np.float64)
        np.put_along_axis(full, answer["top5"], answer["top_probs"], axis=1)
        out.append(full)
    return np.concatenate(out)


def compare(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, expected: np.ndarray, batch_size: int) -> dict:
    """Run the export at batch size 1 (the first images) and ``batch_size``; raise ExportError unless its top-1
    equals the Predictor's on every image and every probability is within TOLERANCE."""
    got = np.concatenate([run(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])
    ones = np.concatenate([run(images[i : i + 1]) for i in range(min(4, len(images)))])
    if got.shape != expected.shape:
        raise ExportError(f"the export answers shape {got.shape}, PyTorch {expected.shape}")
    diff = float(max(np.abs(got - expected).max(), np.abs(ones - expected[: len(ones)]).max()))
    disagree = int(
        (got.argmax(1) != expected.argmax(1)).sum() + (ones.argmax(1) != expected[: len(ones)].argmax(1)).sum()
    )
    figures = {
        "images": len(images),
        "batch_sizes": [1, batch_size],
        "max_abs_diff": diff,
        "top1_disagreements": disagree,
    }
    if disagree or not diff <= TOLERANCE:
        raise ExportError(
            f"the export does not reproduce PyTorch on {len(images)} test images: top-1 differs on {disagree}, "
            f"probabilities differ by up to {diff:.2e} (tolerance {TOLERANCE:g}); nothing was written"
        )
    return figures


# ---------------------------------------------------------------------------
# the job


def _check_output(output: str) -> None:
    if storage.is_uri(output):
        raise ExportError(f"--output {output}: a local folder (copy the verified export to storage afterwards)")
    if os.path.exists(output) and os.listdir(output):
        if not _is_export(output):
            raise ExportError(f"--output {output}: exists and is not an earlier export; refusing to replace it")


def _is_export(folder: str) -> bool:
    """Whether ``folder`` holds an earlier export of this job (its model.json has an ``export`` record)."""
    try:
        saved = SavedModel.read(folder)
    except CheckpointError:
        return False
    return saved.folder == storage.normalize(folder).rstrip("/") and "export" in saved.info


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def export(
    cfg: Config,
    model_path: str,
    fmt: str,
    output: str,
    rows: int = 256,
    batch_size: int = 64,
) -> dict:
    """Export ``model_path`` (run folder, model/ folder or URI) as ``fmt`` into the local folder ``output``,
    verified on ``rows`` images of the run's test split (``cfg.data`` locates it). Returns model.json's export
    record. Raises ExportError (nothing written) when the export does not reproduce the Predictor."""
    from resnet_ray.predictor import Predictor

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if rows < 1 or batch_size < 1:
        raise ExportError(f"--verify-rows and the batch size must be >= 1, got {rows} and {batch_size}")
    _check_output(output)
    saved = SavedModel.verified(model_path)
    folder, info = storage.normalize(saved.folder), saved.info
    size = saved.resize(cfg).size
    images = split_images(cfg, size, rows)
    predictor = Predictor(folder, amp=False, threads=os.cpu_count(), k=saved.num_classes, probabilities=True)
    with _exact_float32():  # on a GPU: no TF32 either, so that the reference is the CPU's to ~1e-6
        expected = reference_probabilities(predictor, images, batch_size)
    module = pixel_model(saved, predictor.temperature)
    with storage.new_local_folder(output) as tmp:
        graph = os.path.join(tmp, FORMATS[fmt])
        WRITERS[fmt](module, size, graph)
        record = {
            "format": fmt,
            "file": FORMATS[fmt],
            "input": {"name": INPUT, "dtype": "uint8", "shape": ["batch", size, size, 3], "layout": "NHWC RGB"},
            "outputs": {name: {"dtype": "float32", "shape": ["batch", info["num_classes"]]} for name in OUTPUTS},
            "temperature": module.temperature,
            "exporter": f"torch {torch.__version__}"
            + (f", TorchScript-based ONNX, opset {OPSET}" if fmt == "onnx" else ""),
        }
        exported = {
            **{k: v for k, v in info.items() if k != "sha256"},
            "sha256": storage.file_sha256(graph),
            "source_sha256": saved.sha256,
            "export": record,
        }
        _write_json(os.path.join(tmp, MODEL_INFO), exported)
        record["verified"] = compare(load_export(tmp).run, images, expected, batch_size)
        _write_json(os.path.join(tmp, MODEL_INFO), exported)
    log.info("exported %s as %s into %s (%s)", folder, fmt, output, record["verified"])
    return record
