"""The shipped GPU suites, ``cifar100-crd`` and ``imagenet-kd``: their protocol as loaded, the
objective of every method, the published numbers, and a smoke run of each through the harness on
synthetic data of the real datasets' shape (CIFAR-100 and ImageNet cannot be downloaded here).

The smoke runs train every teacher and student one epoch on 48 samples: they check that every
pair and every method builds, runs and is recorded, not what they reach.
"""

from __future__ import annotations

import pytest

from darkknowledge.bench.cells import Cell, plan_cells, student_config, teacher_config
from darkknowledge.bench.publish import rows_of
from darkknowledge.bench.runner import Bench, read_result
from darkknowledge.bench.suite import load_suite
from darkknowledge.config import validate_config
from darkknowledge.losses.objective import parse_term

CIFAR_PAIRS = {  # pair -> (teacher, student): CRD Table 1 (same family) and Table 2
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn_40_2-wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "resnet110-resnet20": ("resnet110", "resnet20"),
    "resnet110-resnet32": ("resnet110", "resnet32"),
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "vgg13-vgg8": ("vgg13", "vgg8"),
    "vgg13-mobilenetv2": ("vgg13", "mobilenetv2"),
    "resnet50-mobilenetv2": ("resnet50_cifar", "mobilenetv2"),
    "resnet50-vgg8": ("resnet50_cifar", "vgg8"),
    "resnet32x4-shufflenetv1": ("resnet32x4", "shufflenetv1"),
    "resnet32x4-shufflenetv2": ("resnet32x4", "shufflenetv2"),
    "wrn_40_2-shufflenetv1": ("wrn_40_2", "shufflenetv1"),
}
SAME_FAMILY = list(CIFAR_PAIRS)[:7]
SMALL_LR_STUDENTS = {"mobilenetv2", "shufflenetv1", "shufflenetv2"}  # RepDistiller: lr 0.01
FEATURE_METHODS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")
TWO_STAGE = ("ab", "fsp")  # RepDistiller's init stage, then cross-entropy alone
LATER_METHODS = ("dkd", "dist", "reviewkd", "ofd")
# The authors' weight per pair, set by the pair's `overrides:` (None: they published none, so
# the method's default): DKD's beta from mdistiller's configs/cifar100/dkd/*.yaml, ReviewKD's
# weight from the authors' CIFAR-100/script/reviewKD.sh.
DKD_BETA = {
    "wrn_40_2-wrn_16_2": 6.0,
    "wrn_40_2-wrn_40_1": 6.0,
    "resnet56-resnet20": 2.0,
    "resnet110-resnet20": None,
    "resnet110-resnet32": 2.0,
    "resnet32x4-resnet8x4": 8.0,
    "vgg13-vgg8": 6.0,
    "vgg13-mobilenetv2": 6.0,
    "resnet50-mobilenetv2": 8.0,
    "resnet50-vgg8": None,
    "resnet32x4-shufflenetv1": 8.0,
    "resnet32x4-shufflenetv2": 8.0,
    "wrn_40_2-shufflenetv1": 8.0,
}
REVIEWKD_WEIGHT = {
    "wrn_40_2-wrn_16_2": 5.0,
    "wrn_40_2-wrn_40_1": 5.0,
    "resnet56-resnet20": 0.6,
    "resnet110-resnet20": None,
    "resnet110-resnet32": 1.0,
    "resnet32x4-resnet8x4": 5.0,
    "vgg13-vgg8": None,
    "vgg13-mobilenetv2": None,
    "resnet50-mobilenetv2": None,
    "resnet50-vgg8": None,
    "resnet32x4-shufflenetv1": 5.0,
    "resnet32x4-shufflenetv2": 8.0,
    "wrn_40_2-shufflenetv1": 5.0,
}
PER_PAIR = {  # method -> (its per-pair value, the authors' default, pair -> the authors' value)
    "dkd": ("beta", 8.0, DKD_BETA),  # mdistiller's CFG.DKD.BETA
    "reviewkd": ("weight", 1.0, REVIEWKD_WEIGHT),  # the authors' train.py --kd-loss-weight
}


def smoke_overrides(name: str, shape: list[int], num_classes: int) -> list[str]:
    """Synthetic data of ``shape``, one seed, one epoch for every student and teacher."""
    pairs = load_suite(name).pairs
    data = (
        f"data={{name: synthetic, params: {{shape: {shape}, num_classes: {num_classes}, train_samples: 64, "
        "test_samples: 32}, batch_size: 16, val_fraction: 0.25}"
    )
    return [data, "seeds=[0]", "budget.train.epochs=1", *(f"pairs.{p}.teacher.train.epochs=1" for p in pairs)]


def cell_config(suite, pair: str, method: str):
    """The validated config of a student cell (seed 0, a placeholder teacher file)."""
    return validate_config(student_config(suite, pair, method, 0, "teacher.pt"))


def dotted_get(raw: dict, dotted: str):
    """``raw[a][b][c]`` for ``a.b.c``."""
    for part in dotted.split("."):
        raw = raw[part]
    return raw


def terms(losses: dict) -> dict:
    """``{term: (loss object, schedule)}`` of a config's ``losses``."""
    return {name: parse_term(name, raw) for name, raw in losses.items()}


# ---------------------------------------------------------------- cifar100-crd


def test_cifar_suite_has_crds_pairs_and_protocol():
    suite = load_suite("cifar100-crd")
    assert {p: (v.teacher["name"], v.student["name"]) for p, v in suite.pairs.items()} == CIFAR_PAIRS
    assert suite.seeds == [0, 1, 2, 3, 4]
    assert suite.protocol and "RepDistiller" in suite.protocol
    for pair, (_teacher, student) in CIFAR_PAIRS.items():
        assert suite.pairs[pair].kind == ("same family" if pair in SAME_FAMILY else "different families")
        cfg = validate_config(student_config(suite, pair, "ce", 0, None))
        assert cfg.data.name == "cifar100" and cfg.data.batch_size == 64 and cfg.data.val_fraction == 0.1
        assert cfg.data.augment.crop_padding == 4 and cfg.data.augment.hflip
        for train, lr in (
            (cfg.train, 0.01 if student in SMALL_LR_STUDENTS else 0.05),
            (validate_config(teacher_config(suite, pair)).teacher_train(), 0.05),
        ):
            assert train.epochs == 240, pair
            assert (train.optimizer.name, train.optimizer.lr, train.optimizer.momentum) == ("sgd", lr, 0.9), pair
            assert train.optimizer.weight_decay == 5e-4, pair
            assert train.scheduler.name == "multistep" and train.scheduler.milestones == [150, 180, 210], pair
            assert train.scheduler.gamma == 0.1 and train.scheduler.warmup_epochs == 0, pair


def test_cifar_suite_every_cell_config_is_valid(tmp_path):
    suite = load_suite("cifar100-crd")
    bench = Bench(suite, tmp_path)  # builds and validates every cell's config
    assert len([c for c in bench.cells if c.kind == "teacher"]) == len(CIFAR_PAIRS)
    for pair in CIFAR_PAIRS:  # every pair runs KD, each CRD-table method (FSP: same family only) and
        # each later method once (DKD and ReviewKD with the pair's own weight, not one method per weight)
        ran = {c.method for c in bench.cells if c.pair == pair and c.seed == 0}
        expected = {"ce", "kd", *FEATURE_METHODS, *LATER_METHODS} - (set() if pair in SAME_FAMILY else {"fsp"})
        assert ran == expected, pair


@pytest.mark.parametrize("method", list(PER_PAIR))
def test_cifar_suite_per_pair_weights_reach_the_cells(method, tmp_path):
    suite = load_suite("cifar100-crd")
    key, default, authors = PER_PAIR[method]
    assert set(authors) == set(CIFAR_PAIRS) and suite.pairs_of(method) == list(CIFAR_PAIRS)
    bench = Bench(suite, tmp_path, only=[f"{pair}/{method}/s0" for pair in CIFAR_PAIRS])
    rest = []
    for pair, weight in authors.items():
        losses = bench._raw(Cell(pair, method, 0), None)["losses"]  # what the cell trains
        loss, schedule = terms(losses)[method]
        got = loss.beta if key == "beta" else schedule.weight
        assert got == (default if weight is None else weight), pair
        assert losses[method][key] == got, pair
        rest.append({**losses, method: {k: v for k, v in losses[method].items() if k != key}})
    assert all(r == rest[0] for r in rest), method  # the pair's override changes that value only
    assert schedule.warmup_epochs == 20  # the authors' 20 warm-up epochs on every pair


def test_cifar_suite_objectives_are_repdistillers():
    suite = load_suite("cifar100-crd")
    pair = "resnet32x4-resnet8x4"
    kd = terms(cell_config(suite, pair, "kd").losses)
    assert list(kd) == ["kd"]  # 0.1 CE + 0.9 KD at T=4, in one term
    assert (kd["kd"][0].T, kd["kd"][0].alpha, kd["kd"][1].weight) == (4.0, 0.9, 1.0)
    for method in FEATURE_METHODS:
        got = terms(cell_config(suite, pair, method).losses)
        assert set(got) == {"ce", method}, method  # 1 CE + 0 KD + beta * feature: no KD term
        ce, feature = got["ce"][1], got[method][1]
        assert ce.weight == 1.0 and feature.weight > 0, method
        if method in TWO_STAGE:  # the feature loss alone first, then cross-entropy alone
            assert feature.stop_epoch == ce.start_epoch == 30, method
        else:
            assert ce.start_epoch == feature.start_epoch == 0 and feature.stop_epoch is None, method
    assert terms(cell_config(suite, pair, "crd").losses)["crd"][0].nce_k == 16384


def test_cifar_suite_published_numbers():
    suite = load_suite("cifar100-crd")
    teachers: dict[str, set[float]] = {}
    students: dict[str, set[float]] = {}
    for pair, (teacher, student) in CIFAR_PAIRS.items():
        published = suite.pairs[pair].published
        crd_table = {"teacher", "ce", "kd", *FEATURE_METHODS}
        if pair not in SAME_FAMILY or pair == "wrn_40_2-wrn_40_1":  # no FSP number (n/a or not reported)
            crd_table.discard("fsp")
        assert crd_table <= set(published), (pair, crd_table - set(published))
        assert "fsp" not in published or pair in SAME_FAMILY
        for method, pub in published.items():
            assert 50.0 < pub.value < 90.0 and pub.protocol, (pair, method)
            assert method in ("teacher", "ce", *suite.method_names()), (pair, method)
            assert method in ("teacher", "ce") or pair in suite.pairs_of(method), (pair, method)
        if "dkd" in published:  # mdistiller's number, run with its config's beta, which the cell uses
            assert DKD_BETA[pair] is not None, pair
        table = "CRD Table 1" if pair in SAME_FAMILY else "CRD Table 2"
        assert all(published[m].protocol.startswith(table) for m in crd_table), pair
        teachers.setdefault(teacher, set()).add(published["teacher"].value)
        students.setdefault(student, set()).add(published["ce"].value)
    # one number per network wherever CRD's tables repeat it
    assert all(len(values) == 1 for values in teachers.values()), teachers
    assert all(len(values) == 1 for values in students.values()), students


CIFAR_SMOKE = {  # pair -> its cells: every pair with KD, every method once (on a cheap pair where it can)
    "wrn_40_2-wrn_16_2": ["kd", "fsp", "ab"],
    "wrn_40_2-wrn_40_1": ["kd", "dkd", "vid", "fsp"],  # fsp: n/a, it needs equal widths (as in CRD's table)
    "resnet56-resnet20": ["kd", "dkd", "reviewkd"],  # DKD beta 2, ReviewKD weight 0.6
    "resnet110-resnet20": ["kd"],
    "resnet110-resnet32": ["kd"],
    "resnet32x4-resnet8x4": ["kd", "ce", "dkd", "crd", "ft"],
    "vgg13-vgg8": ["kd", "reviewkd", "nst"],
    "vgg13-mobilenetv2": ["kd", "fitnet"],
    "resnet50-mobilenetv2": ["kd"],
    "resnet50-vgg8": ["kd"],
    "resnet32x4-shufflenetv1": ["kd", "ofd", "at"],
    "resnet32x4-shufflenetv2": ["kd", "reviewkd"],
    "wrn_40_2-shufflenetv1": ["kd", "reviewkd", "dist", "pkt", "cc", "rkd", "sp"],
}
CIFAR_SMOKE_NA = {"wrn_40_2-wrn_40_1/fsp/s0": "channels"}  # cell -> a word its reason must contain


def test_cifar_smoke_cells_cover_every_pair_and_method():
    suite = load_suite("cifar100-crd")
    assert set(CIFAR_SMOKE) == set(CIFAR_PAIRS) and all(ms[0] == "kd" for ms in CIFAR_SMOKE.values())
    assert {m for ms in CIFAR_SMOKE.values() for m in ms} == {"ce", *suite.method_names()}  # none left out
    for pair, methods in CIFAR_SMOKE.items():
        assert all(m == "ce" or pair in suite.pairs_of(m) for m in methods), pair


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(CIFAR_PAIRS))
def test_cifar_suite_smoke_run_on_synthetic_data(pair, tmp_path):
    suite = load_suite(
        "cifar100-crd",
        [
            *smoke_overrides("cifar100-crd", [3, 16, 16], 100),
            "methods.ft.overrides.losses.ft.paraphraser_epochs=1",  # 30 passes: the longest part of a 1-epoch FT cell
        ],
    )
    bench = Bench(suite, tmp_path, only=[f"{pair}/{m}" for m in CIFAR_SMOKE[pair]])
    assert {c.id for c in bench.cells} == {f"{pair}/teacher", *(f"{pair}/{m}/s0" for m in CIFAR_SMOKE[pair])}

    status = bench.run()

    assert not status.failed and not status.todo and not status.stale
    for cell in bench.cells:
        result = read_result(cell.result_path(bench.results))
        assert result is not None and result["key"] == bench.task(cell).key, cell.id
        if cell.id in CIFAR_SMOKE_NA:
            assert result["status"] == "n/a" and CIFAR_SMOKE_NA[cell.id] in result["reason"], result
            continue
        assert result["status"] == "done", (cell.id, result.get("reason"))
        assert result["epochs"] == 1 and 0.0 <= result["last_acc"] <= 100.0, cell.id
        if cell.kind == "method":
            assert result["teacher"]["hash"], cell.id  # trained against the pair's teacher cell
            trained = bench.task(cell).config  # what the worker trained: the pair's own weights in it
            for dotted, value in suite.pairs[pair].overrides.get(cell.method, {}).items():
                assert dotted_get(trained, dotted) == value, (cell.id, dotted)
    rows = {r["method"]: r for r in rows_of(bench)}
    for method in ("teacher", "kd"):  # the tables print the published number next to ours
        assert rows[method]["published_value"] == suite.pairs[pair].published[method].value


# ---------------------------------------------------------------- imagenet-kd


def test_imagenet_suite_protocol():
    suite = load_suite("imagenet-kd")
    assert list(suite.pairs) == ["resnet34-resnet18"]
    pair = suite.pairs["resnet34-resnet18"]
    assert (pair.teacher["name"], pair.student["name"]) == ("resnet34", "resnet18")
    assert set(suite.method_names()) == {"kd", "kd-t4", "dkd", "dist", "crd"}
    assert {"teacher", "ce", "kd", "kd-t4", "dkd", "dist"} <= set(pair.published)
    cfg = validate_config(student_config(suite, "resnet34-resnet18", "ce", 0, None))
    assert cfg.data.name == "image_folder" and cfg.data.batch_size == 256 and cfg.data.val_fraction > 0
    for train in (cfg.train, validate_config(teacher_config(suite, "resnet34-resnet18")).teacher_train()):
        assert train.epochs == 100
        assert (train.optimizer.name, train.optimizer.lr, train.optimizer.weight_decay) == ("sgd", 0.1, 1e-4)
        assert train.scheduler.name == "multistep" and train.scheduler.milestones == [30, 60, 90]
    kd = terms(cell_config(suite, "resnet34-resnet18", "kd").losses)["kd"][0]
    assert (kd.T, kd.alpha) == (1.0, 0.5)  # mdistiller: 0.5 CE + 0.5 KD at T=1
    dkd = terms(cell_config(suite, "resnet34-resnet18", "dkd").losses)
    assert (dkd["dkd"][0].beta, dkd["dkd"][0].T, dkd["dkd"][1].warmup_epochs) == (0.5, 1.0, 0.0)


def test_imagenet_suite_takes_a_teacher_file_instead():
    suite = load_suite("imagenet-kd", ["pairs.resnet34-resnet18.teacher.checkpoint=/models/resnet34.pt"])
    cells = plan_cells(suite)
    assert not [c for c in cells if c.kind == "teacher"]  # nothing to train
    assert len(cells) == len(suite.seeds) * (1 + len(suite.method_names()))  # every student cell still runs


@pytest.mark.slow
def test_imagenet_suite_smoke_run_on_synthetic_data(tmp_path):
    suite = load_suite("imagenet-kd", smoke_overrides("imagenet-kd", [3, 32, 32], 1000))
    bench = Bench(suite, tmp_path)  # every cell: the teacher, the student alone and each method

    status = bench.run()

    assert not status.failed and not status.todo and len(status.done) == 1 + 1 + len(suite.method_names())
    for cell in bench.cells:
        result = read_result(cell.result_path(bench.results))
        assert result["status"] == "done", (cell.id, result.get("reason"))
        assert result["epochs"] == 1 and 0.0 <= result["last_acc"] <= 100.0, cell.id
    rows = {r["method"]: r for r in rows_of(bench)}
    for method, pub in suite.pairs["resnet34-resnet18"].published.items():
        assert rows[method]["published_value"] == pub.value, method
