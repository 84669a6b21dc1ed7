"""Real models from torchvision, timm and Hugging Face ``transformers`` as teachers and students.

The tests marked ``models`` need torchvision, timm and transformers, which the main test
environment (a CPU torch without a matching torchvision) lacks; they run in the second one:

    bash scripts/setup_models.sh && DK_REQUIRE_MODELS=1 .venv-models/bin/python -m pytest -m models

Elsewhere they skip, naming that command; with ``DK_REQUIRE_MODELS=1`` (CI) a missing library
fails them instead. Every model has random weights (nothing is downloaded): a torchvision
ResNet-18 teaches a timm MobileNetV3 with a feature loss by module path (adapters from probed
shapes), live, from the teacher-output cache and under 2-process DDP; ``transformers`` image and
sequence classifiers, built from a config or loaded from a folder written by ``save_pretrained``,
train the same way. The unmarked tests (token ids in the loader, ``hf:`` errors and folders) run
in the main environment.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import darkknowledge as dk
from darkknowledge.config import deep_merge
from darkknowledge.data import BatchLoader, TensorData
from darkknowledge.errors import ConfigError
from darkknowledge.models import create_model, default_taps
from darkknowledge.taps import FeatureTaps, probe_shapes

MODEL_LIBS = ("torchvision", "timm", "transformers")
SETUP = "bash scripts/setup_models.sh && .venv-models/bin/python -m pytest -m models"
IMAGE = (3, 32, 32)
K = 5  # classes
TV_TEACHER, TIMM_STUDENT = "torchvision:resnet18", "timm:mobilenetv3_small_100"
HF_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
HF_VIT = {"patch_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
VOCAB, LENGTH = 40, 12
HF_BERT = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
HF_DISTILBERT = {
    "vocab_size": VOCAB,
    "dim": 8,
    "n_layers": 1,
    "n_heads": 2,
    "hidden_dim": 16,
    "max_position_embeddings": 32,
}
RUN = {"train": {"device": "cpu", "deterministic": True}, "profile": {"enabled": False}}
"""Config of every run here: CPU, deterministic, no latency profile (not under test)."""

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions on shared cores: one thread


def require(*libs: str) -> None:
    """Skip unless ``libs`` import (fail instead when ``DK_REQUIRE_MODELS=1``)."""
    missing = []
    for lib in libs:
        try:
            importlib.import_module(lib)
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
            missing.append(f"{lib} ({exc})"[:160])
    if not missing:
        return
    message = f"needs {', '.join(missing)}; run the models tests in their environment: {SETUP}"
    if os.environ.get("DK_REQUIRE_MODELS") == "1":
        pytest.fail(f"DK_REQUIRE_MODELS=1: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _libraries(request: pytest.FixtureRequest) -> None:
    """Tests marked ``models`` need torchvision, timm and transformers."""
    if request.node.get_closest_marker("models") is not None:
        require(*MODEL_LIBS)


def synthetic(**extra: Any) -> dict[str, Any]:
    """Run config on a few random 3x32x32 images of 5 classes (the ``synthetic`` dataset)."""
    data = {
        "data": {
            "params": {"shape": list(IMAGE), "num_classes": K, "train_samples": 32, "test_samples": 16, "noise": 0.5},
            "batch_size": 16,
        }
    }
    return deep_merge(deep_merge(RUN, data), extra)


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random token sequences ``(n, LENGTH)`` int64; the label is the first token mod K."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, LENGTH), generator=g)  # (n, L)
    return x, x[:, 0] % K


def saved_hf_resnet(folder: Path, seed: int = 0) -> nn.Module:
    """A tiny ``transformers`` ResNet image classifier with random weights, written with save_pretrained."""
    torch.manual_seed(seed)
    model = create_model("hf:resnet", num_classes=K, input_shape=IMAGE, config=HF_RESNET)
    model.save_pretrained(folder)
    return model


def epoch_terms(result: Any, term: str) -> list[float]:
    return [row[term] for row in result.epochs]


# ---------------------------------------------------------------- main environment (no marker)


def test_int64_inputs_are_token_ids_delivered_as_they_are() -> None:
    x, y = tokens(10, seed=0)
    batch = next(iter(BatchLoader(TensorData(x, y), 10, shuffle=False)))
    assert batch.x.dtype == torch.int64 and torch.equal(batch.x, x)  # not cast to float
    small = next(iter(BatchLoader(TensorData(x.to(torch.int32), y), 10, shuffle=False)))
    assert small.x.dtype == torch.float32  # other integer inputs are still values
    with pytest.raises(ConfigError, match=r"int64 token ids \(12,\), which cannot be augmented"):
        BatchLoader(TensorData(x, y), 10, augment={"noise": 0.1})
    with pytest.raises(ConfigError, match="cannot be normalised"):
        BatchLoader(TensorData(x, y), 10, normalize=((0.0,), (1.0,)))


def test_hf_classifiers_from_a_config() -> None:
    require("transformers")
    torch.manual_seed(0)
    image = create_model("hf:resnet", num_classes=K, input_shape=IMAGE, config=HF_RESNET)
    assert type(image).__name__ == "ResNetForImageClassification" and image.training
    assert default_taps(image) == ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    assert image(torch.randn(2, *IMAGE)).logits.shape == (2, K)
    assert image.dk_name == "hf:resnet"
    assert image.dk_params == {"num_classes": K, "input_shape": list(IMAGE), "config": HF_RESNET}
    again = create_model(image.dk_name, **image.dk_params)  # the spec rebuilds the architecture
    assert list(again.state_dict()) == list(image.state_dict())

    vit = create_model("hf:vit", num_classes=K, input_shape=(3, 16, 24), config=HF_VIT)
    assert vit.config.image_size == [16, 24] and vit.config.num_channels == 3  # taken from the data
    assert default_taps(vit) == ["vit.layers.0", "vit.layers.1"]
    assert probe_shapes(vit, torch.randn(2, 3, 16, 24), default_taps(vit)) == {
        "vit.layers.0": (7, 16),
        "vit.layers.1": (7, 16),
    }  # (tokens: 2x3 patches + CLS, hidden)

    bert = create_model("hf:bert", num_classes=K, input_shape=(LENGTH,), config=HF_BERT)
    assert type(bert).__name__ == "BertForSequenceClassification"
    assert default_taps(bert) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert bert(tokens(3, seed=1)[0]).logits.shape == (3, K)
    distil = create_model("hf:distilbert", num_classes=K, input_shape=(LENGTH,), config=HF_DISTILBERT)
    assert default_taps(distil) == ["distilbert.transformer.layer.0"]


def test_hf_classifier_from_a_saved_folder(tmp_path: Path) -> None:
    require("transformers")
    saved = saved_hf_resnet(tmp_path / "resnet")
    name = f"hf:{tmp_path / 'resnet'}"
    loaded = create_model(name, num_classes=K, input_shape=IMAGE)
    assert loaded.training and loaded.dk_name == name
    for (k, a), b in zip(saved.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # the saved weights
    fresh = create_model(name, num_classes=K, input_shape=IMAGE, pretrained=False)
    assert not torch.equal(fresh.classifier[1].weight, saved.classifier[1].weight)  # its architecture at random
    with pytest.raises(ConfigError, match=r"predicts 5 classes but the data has 7; set params.ignore_mismatched"):
        create_model(name, num_classes=7, input_shape=IMAGE)
    head = create_model(name, num_classes=7, input_shape=IMAGE, ignore_mismatched_sizes=True)
    assert head.classifier[1].out_features == 7
    assert torch.equal(
        head.resnet.embedder.embedder.convolution.weight, saved.resnet.embedder.embedder.convolution.weight
    )  # the rest is loaded
    with pytest.raises(ConfigError, match=r"an image classifier reads images \(C, H, W\), but .* shape \(12,\)"):
        create_model(name, num_classes=K, input_shape=(LENGTH,))
    with pytest.raises(ConfigError, match=r"reads 3-channel images but the data's have 1 channels"):
        create_model(name, num_classes=K, input_shape=(1, 32, 32))
    create_model("hf:vit", num_classes=K, input_shape=IMAGE, config=HF_VIT).save_pretrained(tmp_path / "vit")
    assert create_model(f"hf:{tmp_path / 'vit'}", num_classes=K, input_shape=IMAGE).config.image_size == 32
    with pytest.raises(ConfigError, match=r"the saved model reads 32x32 images but the data's are 16x16"):
        create_model(f"hf:{tmp_path / 'vit'}", num_classes=K, input_shape=(3, 16, 16))


def test_a_tap_on_a_module_returning_a_model_output_gets_its_first_field() -> None:
    require("transformers")
    torch.manual_seed(0)
    model = create_model("hf:resnet", num_classes=K, input_shape=IMAGE, config=HF_RESNET).eval()
    x = torch.randn(2, *IMAGE)  # (B, 3, 32, 32)
    paths = ["resnet.encoder", "resnet.encoder.stages.1", "module"]  # "module": the root
    with FeatureTaps(model, paths) as taps:
        out = model(x)
        feats = taps.pop()
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention"
    assert torch.equal(feats["resnet.encoder"], feats["resnet.encoder.stages.1"])  # last_hidden_state (B, 16, 4, 4)
    assert torch.equal(feats["module"], out.logits)  # the whole model: its logits (B, K)
    assert probe_shapes(model, x, ["resnet.encoder"]) == {"resnet.encoder": (16, 4, 4)}


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("hf:bertt", {}, r"'bertt' is neither a folder nor a transformers model type\. Did you mean 'bert'"),
        ("hf:resnet", {"config": {"hiden_sizes": [8]}}, r"params.config.hiden_sizes: not a field .*'hidden_sizes'"),
        ("hf:resnet", {"input_shape": [LENGTH]}, r"no sequence classifier of model type 'resnet'"),
        ("hf:resnet", {"input_shape": [1, 40]}, r"cannot tell the task from input shape \(1, 40\)"),
        ("hf:resnet", {"pretrained": False}, r"pretrained / ignore_mismatched_sizes apply to a saved model"),
        ("hf:resnet", {"task": "text"}, r"task: Input should be 'image' or 'sequence'"),
        ("hf:resnet", {"layers": 3}, r"unknown parameter 'layers'"),
        ("hf:bert", {"input_shape": [1000]}, r"1000 tokens exceed the config's max_position_embeddings=512"),
        ("huggingface:bert", {}, r"unknown model source 'huggingface'.*Valid sources: torchvision, timm, hf"),
    ],
)
def test_hf_bad_specs_name_the_value(name: str, kwargs: dict[str, Any], match: str) -> None:
    require("transformers")
    kwargs = {"num_classes": K, "input_shape": list(IMAGE), **kwargs}
    with pytest.raises(ConfigError, match=match):
        create_model(name, **kwargs)


def test_hf_missing_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match="model 'hf:bert' needs the optional package 'transformers'.*pip install"):
        create_model("hf:bert", num_classes=K, input_shape=(LENGTH,))


# ---------------------------------------------------------------- models environment


@pytest.mark.models
def test_torchvision_and_timm_models_with_their_stage_taps() -> None:
    resnet = create_model(TV_TEACHER, num_classes=K, input_shape=IMAGE)
    assert resnet.dk_name == TV_TEACHER and resnet.dk_params == {"num_classes": K, "input_shape": list(IMAGE)}
    assert default_taps(resnet) == ["layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, *IMAGE)  # (B, 3, 32, 32)
    assert probe_shapes(resnet, x, default_taps(resnet)) == {
        "layer1": (64, 8, 8),
        "layer2": (128, 4, 4),
        "layer3": (256, 2, 2),
        "layer4": (512, 1, 1),
    }
    mobilenet = create_model(TIMM_STUDENT, num_classes=K, input_shape=IMAGE)
    taps = default_taps(mobilenet)  # from timm's feature_info
    assert taps == ["bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5"]
    shapes = probe_shapes(mobilenet, x, taps)
    assert [s[0] for s in shapes.values()] == [16, 16, 24, 48, 576]
    assert mobilenet(x).shape == (2, K)
    gray = create_model("timm:resnet18", num_classes=K, input_shape=(1, 28, 28))  # in_chans from the data
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, K)


@pytest.mark.models
def test_pretrained_weights_are_passed_to_the_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights=`` / ``pretrained=`` reach torchvision / timm (spied on; nothing is downloaded)."""
    import timm
    import torchvision

    calls: list[tuple[str, dict[str, Any]]] = []
    real_get, real_create = torchvision.models.get_model, timm.create_model

    def get_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append((name, dict(kwargs)))
        return real_get(name, **{**kwargs, "weights": None})

    def create(name: str, **kwargs: Any) -> nn.Module:
        calls.append((name, dict(kwargs)))
        return real_create(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    monkeypatch.setattr(timm, "create_model", create)
    tv = create_model(TV_TEACHER, num_classes=1000, input_shape=IMAGE, weights="DEFAULT")
    tm = create_model(TIMM_STUDENT, num_classes=K, input_shape=IMAGE, pretrained=True, drop_rate=0.1)
    assert calls == [
        ("resnet18", {"weights": "DEFAULT", "num_classes": 1000}),
        ("mobilenetv3_small_100", {"pretrained": True, "num_classes": K, "drop_rate": 0.1}),
    ]
    assert tv.dk_params["weights"] == "DEFAULT" and tm.dk_params["pretrained"] is True  # kept in the spec
    # what torchvision makes of "DEFAULT" (without the spy it would download these weights)
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    assert weights.url.startswith("https://") and len(weights.meta["categories"]) == 1000


@pytest.mark.models
@pytest.mark.parametrize(
    ("student_name", "student_kwargs", "student_tap", "teacher_tap"),
    [
        (TIMM_STUDENT, {}, "blocks.3", "layer3"),  # (48, 2, 2) -> (256, 2, 2)
        ("hf:resnet", {"config": HF_RESNET}, "resnet.encoder.stages.1", "layer2"),  # (16, 4, 4) -> (128, 4, 4)
    ],
    ids=["timm", "hf"],
)
def test_fitnet_by_module_path_builds_adapters_from_probed_shapes(
    student_name: str, student_kwargs: dict[str, Any], student_tap: str, teacher_tap: str
) -> None:
    torch.manual_seed(0)
    teacher = create_model(TV_TEACHER, num_classes=K, input_shape=IMAGE).eval()
    student = create_model(student_name, num_classes=K, input_shape=IMAGE, **student_kwargs)
    x = torch.randn(8, *IMAGE)  # (B, 3, 32, 32)
    s_shape = probe_shapes(student, x, [student_tap])[student_tap]
    t_shape = probe_shapes(teacher, x, [teacher_tap])[teacher_tap]
    fitnet = {"student_taps": [student_tap], "teacher_taps": [teacher_tap]}
    distiller = dk.Distiller(student, teacher, {"fitnet": fitnet}, example=x[:4])
    regressor = distiller.objective.terms["fitnet"].regressors[0][0]  # Sequential(conv 1x1, BN), ReLU
    conv = regressor[0]
    assert (conv.in_channels, conv.out_channels) == (s_shape[0], t_shape[0])
    assert s_shape[1:] == t_shape[1:]  # same spatial size here: no resize
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.named_parameters()}
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=0.01)
    losses = []
    for _ in range(4):
        loss, terms = distiller(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(terms["fitnet"]))
    assert losses[-1] < losses[0], losses
    assert any(not torch.equal(p, student_before[k]) for k, p in student.named_parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())  # frozen
    assert any(p is conv.weight for p in distiller.parameters())  # the adapter trains with the student


@pytest.mark.models
@pytest.mark.slow
def test_resnet18_teacher_mobilenet_student_live_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision ResNet-18 teaches a timm MobileNetV3 (kd + fitnet by module path) on random
    images; the teacher-output cache gives the same student as the live teacher."""
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    torch.manual_seed(0)
    teacher = create_model(TV_TEACHER, num_classes=K, input_shape=IMAGE)
    losses = {"kd": {"T": 4.0}, "fitnet": {"student_taps": ["blocks.3"], "teacher_taps": ["layer3"], "weight": 10.0}}

    def run(cache: Any) -> Any:
        return dk.distill(
            TIMM_STUDENT, teacher, "synthetic", losses=losses, epochs=3, lr=0.01, config=synthetic(cache=cache)
        )

    live = run(False)
    assert len(live.epochs) == 3 and 0.0 <= live.accuracy <= 100.0
    fitnet = epoch_terms(live, "fitnet")
    assert fitnet[-1] < fitnet[0], fitnet
    cached = run({"enabled": True, "dtype": "fp32"})
    assert "teacher_cache" not in live.entry and cached.entry["teacher_cache"]["size_mb"] > 0
    assert (tmp_path / "teacher_outputs").is_dir()
    for (k, a), b in zip(live.model.state_dict().items(), cached.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), k


@pytest.mark.models
@pytest.mark.slow
def test_two_process_ddp_with_external_models(tmp_path: Path) -> None:
    """``dk distill`` under torchrun (2 CPU processes, gloo): a ResNet-18 checkpoint teaches a
    MobileNetV3 with a fitnet adapter; rank 0 writes one run whose student evaluates as reported."""
    from darkknowledge.commands import evaluate_checkpoint
    from darkknowledge.engine.checkpoint import export_model, load_exported
    from darkknowledge.runs.build import model_spec
    from helpers import results, torchrun

    torch.manual_seed(0)
    teacher = create_model(TV_TEACHER, num_classes=K, input_shape=IMAGE)
    export_model(teacher, tmp_path / "teacher.pt", model_spec(teacher))
    recipe = {
        "name": "external-ddp",
        "seeds": [0],
        "teacher": {"name": TV_TEACHER, "checkpoint": str(tmp_path / "teacher.pt")},
        "student": {"name": TIMM_STUDENT},
        "losses": {"kd": {"T": 4.0}, "fitnet": {"student_taps": ["blocks.3"], "teacher_taps": ["layer3"]}},
        **synthetic(data={"name": "synthetic"}, train={"epochs": 1, "optimizer": {"lr": 0.01}}),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    ddp = torchrun("distill", str(tmp_path / "r.yaml"), "--out", "ddp", "--quiet", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count("run folder:") == 1  # only rank 0 reports (and writes)
    (entry,) = [m for m in results(tmp_path / "ddp").values() if m.get("role") == "student"]
    spec, state = load_exported(tmp_path / "ddp" / "student.pt")
    assert spec["name"] == TIMM_STUDENT and not any(k.startswith("module.") for k in state)
    assert evaluate_checkpoint(tmp_path / "ddp" / "student.pt")["top1"] == pytest.approx(entry["last_acc"], abs=0.01)


@pytest.mark.models
@pytest.mark.slow
def test_hf_resnet_from_a_folder_teaches_a_hf_vit(tmp_path: Path) -> None:
    """A ``transformers`` ResNet loaded from a save_pretrained folder teaches a ViT built from a
    config (kd + fitnet between their classifier inputs, by module path); the exported student
    rebuilds from its spec."""
    saved_hf_resnet(tmp_path / "teacher")
    teacher = create_model(f"hf:{tmp_path / 'teacher'}", num_classes=K, input_shape=IMAGE)
    losses = {
        "kd": {"T": 4.0},
        "fitnet": {"student_taps": ["classifier:input"], "teacher_taps": ["classifier.1:input"], "relu": False},
    }
    torch.manual_seed(1)
    student = create_model("hf:vit", num_classes=K, input_shape=IMAGE, config=HF_VIT)
    out = dk.distill(
        student, teacher, "synthetic", losses=losses, epochs=3, lr=0.01, out=tmp_path / "run", config=synthetic()
    )
    assert type(out.model).__name__ == "ViTForImageClassification"
    fitnet = epoch_terms(out, "fitnet")
    assert fitnet[-1] < fitnet[0], fitnet
    spec = json.loads(json.dumps(out.spec))
    assert spec["name"] == "hf:vit" and spec["params"]["config"] == HF_VIT
    from darkknowledge.commands import evaluate_checkpoint

    (exported,) = (tmp_path / "run").glob("*/model.pt")  # the stage's weights + spec
    assert evaluate_checkpoint(exported)["top1"] == pytest.approx(out.accuracy, abs=0.01)  # rebuilt from the spec


@pytest.mark.models
@pytest.mark.slow
def test_hf_sequence_classifiers_on_token_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BERT teacher teaches a DistilBERT student on random token ids (int64 through the loader):
    kd + fitnet from the teacher's pooler onto the student's pre-classifier, by module path; the
    teacher-output cache gives the same student."""
    monkeypatch.setenv("DK_CACHE", str(tmp_path))
    torch.manual_seed(0)
    teacher = create_model("hf:bert", num_classes=K, input_shape=(LENGTH,), config=HF_BERT)
    losses = {"kd": {"T": 4.0}, "fitnet": {"student_taps": ["pre_classifier"], "teacher_taps": ["bert.pooler"]}}
    data = (tokens(64, seed=0), tokens(32, seed=1))

    def run(cache: Any) -> Any:
        torch.manual_seed(1)
        student = create_model("hf:distilbert", num_classes=K, input_shape=(LENGTH,), config=HF_DISTILBERT)
        return dk.distill(
            student,
            teacher,
            data,
            losses=losses,
            epochs=3,
            batch_size=16,
            lr=0.01,
            config=deep_merge(RUN, {"cache": cache}),
        )

    live = run(False)
    assert type(live.model).__name__ == "DistilBertForSequenceClassification"
    fitnet = epoch_terms(live, "fitnet")
    assert fitnet[-1] < fitnet[0], fitnet
    assert 0.0 <= live.accuracy <= 100.0
    cached = run({"enabled": True, "dtype": "fp32"})
    assert cached.entry["teacher_cache"]["size_mb"] > 0
    for (k, a), b in zip(live.model.state_dict().items(), cached.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), k
