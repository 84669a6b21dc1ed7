"""Exporting a student for deployment: safetensors weights, ONNX, and a ``torch.export`` program.

Deployment is why a student is distilled (Gou et al., "Knowledge Distillation: A Survey", IJCV
2021, Sec. 6 and Sec. 8: compact students for edge devices); :func:`export_student` writes one
folder that serves the common runtimes:

- ``model.safetensors``: the state dict (every key, dtypes as they are), loadable without
  unpickling anything; :func:`load_student_weights` puts it back into a model built from the
  spec.
- ``model.onnx``: ``torch.onnx.export`` with the TorchScript-based (legacy) exporter first
  (``dynamo=False``: about 100x faster than the dynamo one on small models), the
  ``torch.export``-based exporter (``dynamo=True``) when the legacy one fails; the batch axis
  is dynamic, the opset is recorded. With onnxruntime installed the file is run on the example
  and ``max_abs_diff = max |ort(x) - torch(x)|`` recorded, with ``within_tol`` true when it is
  at most ``atol * max(1, max |torch(x)|)``. Tracer warnings (Python control flow on tensor
  values, which a trace freezes) are recorded as ``warnings``.
- ``model.pt2``: ``torch.export.export`` (batch axis ``Dim.AUTO``, traced on a batch of at
  least 2 so it can stay dynamic) saved with ``torch.export.save``; it is loaded back with
  ``torch.export.load`` and compared like the ONNX file.
- ``model.json``: ``{"format", "kind": "student", "spec" (as given: name, params, input?),
  "input": {"shape" (per sample), "example_shape", "dtype"}, "torch" (version), "exports"}``.

Each format is written where the model allows: one that fails is recorded with a one-line
reason and the others are still written. Every file is written atomically.

Shapes: ``example`` is ``(B, *input_shape)`` with ``B >= 1``; the model maps it to logits
``(B, num_classes)`` (or a tuple whose first element is the logits).
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkknowledge.atomic import WriteError, atomic_write
from darkknowledge.errors import CheckpointError, ConfigError
from darkknowledge.students.profile import check_example, cpu_eval, repeat_batch
from darkknowledge.validation import weights_problem

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torch_export": "model.pt2"}
"""The file each export format writes in the output folder."""
FORMATS = tuple(FILES)
MANIFEST = "model.json"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of an exception, at most ``limit`` characters."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"[:limit] if first else type(exc).__name__


def _logits(out: Any) -> torch.Tensor | None:
    """The logits of a forward output: the tensor itself, or the first element of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _compare(got: Any, ref: torch.Tensor | None, atol: float) -> dict[str, Any]:
    """``{max_abs_diff, within_tol}`` of an export's output against the torch logits."""
    got = _logits(got)
    if ref is None or got is None:
        return {"check": "skipped: the model's output is not a tensor (or a tuple starting with one)"}
    got = torch.as_tensor(got).to(ref.dtype)
    if tuple(got.shape) != tuple(ref.shape):
        return {
            "max_abs_diff": None,
            "within_tol": False,
            "check": f"output shape {tuple(got.shape)} differs from torch's {tuple(ref.shape)}",
        }
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0  # max |export(x) - torch(x)|
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return {"max_abs_diff": diff, "within_tol": diff <= atol * scale}


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    bad = [f for f in formats if f not in FILES]
    if bad or not formats:
        raise ConfigError(
            f"export formats {list(formats)!r}: unknown {bad or 'none given'}; valid formats: {', '.join(FORMATS)}"
        )
    return tuple(dict.fromkeys(formats))


def _check_spec(spec: Any) -> str:
    """The spec as JSON text; ConfigError when it is not a dict with a name, or not JSON-able."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ConfigError(f"export spec must be a dict with a model 'name' (and 'params'), got {spec!r:.120}")
    try:
        return json.dumps(spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"export spec {spec!r:.120} cannot be written as JSON ({exc}); use numbers, strings, lists and dicts"
        ) from None


def _write_safetensors(net: nn.Module, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    state = {k: v for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    from safetensors.torch import save

    data = save(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
        metadata={"format": "pt", "darkknowledge": "student", "model": spec["name"]},
    )
    atomic_write(path, lambda f: f.write(data))
    return {"tensors": len(state), "bytes": len(data)}


def _onnx_bytes(net: nn.Module, x: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    """ONNX model bytes: the legacy exporter, else the dynamo one; raises when both fail."""
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    info: dict[str, Any]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            buf: Any = io.BytesIO()  # the legacy exporter writes to a file object (its stubs name paths only)
            torch.onnx.export(
                net, (x,), buf, dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names
            )
            data, info = buf.getvalue(), {"exporter": "torchscript"}
        except Exception as legacy:  # noqa: BLE001 - any exporter failure means: try the other one
            log.info("legacy ONNX export failed (%s); trying the dynamo exporter", one_line(legacy))
            try:
                traced_on = repeat_batch(x, max(2, x.shape[0]))  # a batch of 1 would be specialized
                program = torch.onnx.export(
                    net, (traced_on,), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim.AUTO},), **names
                )
                assert program is not None  # without a file, the dynamo exporter returns the program
                with tempfile.TemporaryDirectory() as tmp:
                    program.save(Path(tmp) / "model.onnx", external_data=False)  # one file (2 GB at most)
                    data = (Path(tmp) / "model.onnx").read_bytes()
            except Exception as dynamo:  # noqa: BLE001
                raise RuntimeError(
                    f"legacy exporter: {one_line(legacy, 200)}; dynamo exporter: {one_line(dynamo, 200)}"
                ) from None
            info = {"exporter": "dynamo", "legacy_reason": one_line(legacy)}
    tracer = sorted(
        {_first_sentence(str(w.message)) for w in caught if issubclass(w.category, torch.jit.TracerWarning)}
    )
    if tracer:
        info["warnings"] = tracer[:3]
    info["opset"] = _opset(data)
    return data, info


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence (or line) of a warning, at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")[:limit]


def _opset(data: bytes) -> int | None:
    """The default-domain opset of an ONNX model (None without the onnx package)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load_from_string(data)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _run_onnx(path: Path, x: torch.Tensor, ref: torch.Tensor | None, atol: float) -> dict[str, Any]:
    """Run the ONNX file on ``x`` with onnxruntime and compare it with ``ref``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"check": "skipped: onnxruntime is not installed (pip install onnxruntime)"}
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        if len(inputs) != 1:
            return {"check": f"skipped: the ONNX model takes {len(inputs)} inputs, the check feeds one"}
        out = session.run(None, {inputs[0].name: x.numpy()})
    except Exception as exc:  # noqa: BLE001 - a file onnxruntime cannot run is a result, not a crash
        return {"check": f"onnxruntime could not run it: {one_line(exc)}", "within_tol": False}
    return _compare([torch.from_numpy(o) for o in out], ref, atol)


def _write_onnx(net: nn.Module, x: torch.Tensor, path: Path, ref: torch.Tensor | None, atol: float) -> dict[str, Any]:
    data, info = _onnx_bytes(net, x)
    atomic_write(path, lambda f: f.write(data))
    return {**info, **_run_onnx(path, x, ref, atol)}


def _write_program(
    net: nn.Module, x: torch.Tensor, path: Path, ref: torch.Tensor | None, atol: float
) -> dict[str, Any]:
    traced_on = repeat_batch(x, max(2, x.shape[0]))  # (max(2, B), *input_shape): a batch of 1 would be specialized
    program = torch.export.export(net, (traced_on,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    atomic_write(path, lambda f: torch.export.save(program, f))
    loaded = torch.export.load(path)
    placeholders = [n for n in loaded.graph.nodes if n.op == "placeholder"]
    shape = getattr(placeholders[-1].meta.get("val"), "shape", None) if placeholders else None
    dynamic = shape is not None and len(shape) > 0 and not isinstance(shape[0], int)
    with torch.inference_mode():
        out = loaded.module()(x)
    return {"dynamic_batch": dynamic, **_compare(out, ref, atol)}


def export_student(
    model: nn.Module,
    spec: dict[str, Any],
    out_dir: str | Path,
    example: torch.Tensor,
    formats: Sequence[str] = FORMATS,
    atol: float = 1e-4,
) -> dict[str, dict[str, Any]]:
    """Write ``model`` in each of ``formats`` (and ``model.json``) into ``out_dir``.

    Args:
        model: The student; exported in eval mode on the CPU (it is left in its mode and place).
        spec: What rebuilds it: ``{"name", "params", "input"?}`` (written as given).
        out_dir: The folder (created).
        example: ``(B, *input_shape)`` inputs the model runs on.
        formats: Any of ``"safetensors"``, ``"onnx"``, ``"torch_export"``.
        atol: Tolerance of the export checks, relative to ``max(1, max |logits|)``.

    Returns:
        ``{format: {"path", "ok", "reason"?, "max_abs_diff"?, "within_tol"?, ...}}``; a format
        that failed has ``ok`` False and a one-line ``reason``. ``model.json`` is always written.

    Raises:
        ConfigError: An unknown format, or a spec that is not a named, JSON-able dict.
        ShapeError: ``example`` is not a batch tensor.
        WriteError: ``out_dir`` cannot be written (a full disk, no permission).
    """
    chosen = _check_formats(formats)
    _check_spec(spec)
    x = check_example(example)
    out = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    with cpu_eval(model) as net:
        with torch.inference_mode():
            ref = _logits(net(x))
        ref = ref.detach().clone() if ref is not None else None
        for fmt in chosen:
            path = out / FILES[fmt]
            try:
                if fmt == "safetensors":
                    extra = _write_safetensors(net, path, spec)
                elif fmt == "onnx":
                    extra = _write_onnx(net, x, path, ref, atol)
                else:
                    extra = _write_program(net, x, path, ref, atol)
                results[fmt] = {"path": str(path), "ok": True, **extra}
            except WriteError:
                raise
            except Exception as exc:  # noqa: BLE001 - a format the model does not allow is recorded, not fatal
                log.warning("export to %s failed: %s", fmt, one_line(exc))
                results[fmt] = {"path": str(path), "ok": False, "reason": one_line(exc)}
    manifest = {
        "format": FORMAT_VERSION,
        "kind": "student",
        "spec": spec,
        "input": {
            "shape": list(x.shape[1:]),
            "example_shape": list(x.shape),
            "dtype": str(x.dtype).replace("torch.", ""),
        },
        "torch": torch.__version__,
        "exports": {fmt: {**r, "path": FILES[fmt]} for fmt, r in results.items()},
    }
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    atomic_write(out / MANIFEST, lambda f: f.write(text), binary=False)
    return results


def load_student_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``model.safetensors`` written by :func:`export_student` into ``model`` (in place).

    Args:
        model: A model built from the export's spec.
        path: The safetensors file.

    Returns:
        ``model``.

    Raises:
        CheckpointError: The file is missing or unreadable, or its keys or shapes do not fit
            the model (the message names the first differences).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"student weights {str(path)!r} do not exist; export the student again")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise CheckpointError(
            f"cannot read student weights {str(path)!r}: {one_line(exc)}; the file is damaged "
            "or not a safetensors file: export the student again"
        ) from None
    problem = weights_problem(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"student weights {str(path)!r} do not fit the {type(model).__name__} model "
            f"({problem}); build the model from the export's model.json spec"
        )
    model.load_state_dict(state)
    return model
