"""Benchmarks (issue 5): the JSON contract of every `resnetlab bench` command at tiny settings, and
the reference loop's faithfulness to the D2L chapter."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resnetlab.bench import reference as ref
from resnetlab.bench.engines import ResnetlabTrainer
from resnetlab.bench.tta import EPOCH_LINE, median_or_none
from resnetlab.cli import main
from resnetlab.data import load_dataset
from resnetlab.device import cpu_class

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread: tiny steps are all overhead, and two-thread OpenMP on a shared 2-core box
    next to another job is ~10x slower (threads spin waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the training child process
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-class, 28x28 greyscale image folder (48 train, 16 test): learnable in a few steps."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for k, name in enumerate(("left", "right")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (28, 28), dtype=np.uint8)
                a[:, k * 14 : (k + 1) * 14] += 180
                Image.fromarray(a).save(d / f"{i}.png")
    return f"folder:{root}"


def last_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def output(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    """The lines a command prints (it must exit 0), after checking that the first names the CPU class."""
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("cpu: ") and f" ({cpu_class()}), 1 thread" in lines[0], lines[0]
    return lines


# ----------------------------------------------------------------------------------------------
# The reference is the chapter's loop


def test_reference_config_is_the_chapters(tiny_folder: str) -> None:
    assert ref.CHAPTER["lr"] == 0.05 and ref.CHAPTER["batch_size"] == 256 and ref.CHAPTER["resize"] == 96
    assert ref.CHAPTER["num_workers"] == 4 and ref.CHAPTER["precision"] == "fp32" and ref.CHAPTER["num_epochs"] == 10
    train, _ = load_dataset(tiny_folder)
    r = ref.ReferenceTrainer(train)  # every default is the chapter's
    opt = r.optimizer
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["lr"] == 0.05 and g["momentum"] == 0 and g["weight_decay"] == 0 and not g["nesterov"]
    assert isinstance(r.loss, nn.CrossEntropyLoss) and r.loss.reduction == "mean" and r.loss.label_smoothing == 0
    dl = r.loader
    assert dl.batch_size == 256 and dl.num_workers == 4 and isinstance(dl.sampler, torch.utils.data.RandomSampler)
    assert [type(t) for t in dl.dataset.transform.transforms] == [ref.Resize, ref.ToTensor]
    assert dl.dataset.transform.transforms[0].size == 96
    assert r.net.name == "d2l_resnet18"
    for p in r.net.parameters():
        assert p.dtype == torch.float32
    conv = next(m for m in r.net.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()  # NCHW, not channels_last
    # Xavier-uniform: resnetlab's d2l engine, same seed, starts from the very same weights, and they
    # are not PyTorch's default init
    ours = ResnetlabTrainer(train, channels_last=False)
    for (name, a), (_, b) in zip(r.net.state_dict().items(), ours.net.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    default = ref.create_model("d2l_resnet18", num_classes=2)
    assert not torch.equal(default[0][0].weight, r.net[0][0].weight)
    bound = (6 / (1 * 49 + 64 * 49)) ** 0.5  # xavier_uniform bound of the 7x7 stem conv
    assert r.net[0][0].weight.abs().max() <= bound and r.net[0][0].weight.abs().max() > 0.9 * bound


def test_chapter_transform_is_pil_bilinear_then_to_tensor() -> None:
    a = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    x = ref.chapter_transform(96)(Image.fromarray(a))
    want = np.asarray(Image.fromarray(a).resize((96, 96), Image.BILINEAR), dtype=np.float32) / 255
    assert x.shape == (1, 96, 96) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(want))
    assert ref.Resize(96)(Image.new("L", (28, 56))).size == (96, 192)  # an int matches the shorter edge


def test_train_step_is_train_ch6s_body() -> None:
    calls: list[str] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("forward")
            return self.lin(x)

    net = Spy()
    opt = ref.chapter_optimizer(net)
    orig_zero, orig_step = opt.zero_grad, opt.step
    opt.zero_grad = lambda *a, **k: (calls.append("zero_grad"), orig_zero(*a, **k))[1]  # type: ignore[method-assign]
    opt.step = lambda *a, **k: (calls.append("step"), orig_step(*a, **k))[1]  # type: ignore[method-assign]
    before = net.lin.weight.detach().clone()
    loss_sum, correct, n = ref.train_step(
        net, opt, nn.CrossEntropyLoss(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.device("cpu")
    )
    assert calls == ["zero_grad", "forward", "step"] and n == 5 and 0 <= correct <= 5 and loss_sum > 0
    assert not torch.equal(before, net.lin.weight)


def test_d2l_recipe_trains_bit_identically_to_train_ch6_on_the_same_batches(tiny_folder: str, tmp_path: Path) -> None:
    """The accuracy check's premise: resnetlab's d2l training differs from the chapter's loop only in
    its batch order and pixels. Fed resnetlab's own batches, train_ch6 ends at the very same weights."""
    from resnetlab.checkpoint import prefixed, read_checkpoint
    from resnetlab.data import BatchLoader, Preprocess
    from resnetlab.train import train
    from resnetlab.train.recipes import get_recipe
    from resnetlab.train.step import train_inputs

    train("d2l", out=tmp_path / "run", dataset=tiny_folder, epochs=2, batch_size=16, resize=64, progress=False)
    tensors, _ = read_checkpoint(tmp_path / "run")
    ours = prefixed(tensors, "model.")

    train_split, test_split = load_dataset(tiny_folder)
    order = BatchLoader(train_split, 16, shuffle=True, seed=0)
    recipe, preprocess = get_recipe("d2l", resize=64), Preprocess(64)

    class ResnetlabBatches:  # each iteration is the next epoch, through resnetlab's own input path
        epoch = -1

        def __iter__(self):
            self.epoch += 1
            for images, labels in order.batches(self.epoch):
                yield train_inputs(images, recipe, preprocess, torch.Generator()), labels

    net = ref.chapter_net(num_classes=2, in_chans=1, seed=0)
    _, test_iter = ref.load_data(train_split, test_split, 16, 64, num_workers=0)
    ref.train_ch6(net, ResnetlabBatches(), test_iter, 2, 0.05, torch.device("cpu"), log=lambda _: None)
    assert ours.keys() == net.state_dict().keys()
    for name, value in net.state_dict().items():
        assert torch.equal(ours[name], value), name


def test_control_batches_are_resnetlabs_order_with_pil_pixels(tiny_folder: str) -> None:
    from resnetlab.data import BatchLoader, resize, to_float

    train_split, _ = load_dataset(tiny_folder)
    control = ref.PILBatchesInResnetlabOrder(train_split, batch_size=10, resize=40, seed=3)
    order = BatchLoader(train_split, 10, shuffle=True, seed=3)
    assert len(control) == len(order) == 5
    for epoch in range(2):  # each iteration is the next epoch, as resnetlab's
        pairs = list(zip(control, order.batches(epoch), strict=True))
        for (x, y), (images, labels) in pairs:
            assert torch.equal(y, labels)
            theirs = resize(to_float(images), 40)
            assert x.shape == theirs.shape and (x - theirs).abs().max() <= 1.001 / 255  # PIL: fixed point, uint8
    epoch0 = next(iter(ref.PILBatchesInResnetlabOrder(train_split, 10, 40, 3)))[0]
    assert not torch.equal(epoch0, pairs[0][0][0])  # epochs 0 and 1 are shuffled differently


def test_bench_reference_trains_the_chapters_way(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    r = last_json(
        capsys,
        [
            "bench",
            "reference",
            "--epochs",
            "1",
            "--resize",
            "32",
            "--workers",
            "0",
            "--batch-size",
            "16",
            "--dataset",
            tiny_folder,
            "--json",
        ],
    )
    assert 0 <= r["test_acc"] <= 1 and len(r["history"]) == 1 and r["compute_images_per_s"] > 0


def test_no_python_left_in_top_level_bench() -> None:
    assert not list(ROOT.glob("bench/*.py")), "every benchmark is a module of resnetlab.bench"


# ----------------------------------------------------------------------------------------------
# JSON contracts

PEAKS = ["--peak-size", "128", "--bf16-peak-size", "64"]


def test_bench_train_json(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    r = last_json(
        capsys,
        [
            "bench",
            "train",
            "--dataset",
            tiny_folder,
            "--resize",
            "32",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--levers",
            "channels_last",
            "--lever-batch-size",
            "4",
            "--lever-steps",
            "1",
            *PEAKS,
            "--json",
        ],
    )
    for key in (
        "reference_images_per_s",
        "resnetlab_images_per_s",
        "ratio",
        "gflops_per_s",
        "fp32_peak_gflops",
        "bf16_peak_gflops",
        "fraction_of_fp32_peak",
        "fraction_of_bf16_peak",
        "device",
        "cpu",
        "steps",
        "levers",
    ):
        assert key in r, key
    assert r["reference_images_per_s"] > 0 and r["resnetlab_images_per_s"] > 0 and r["fp32_peak_gflops"] > 0
    assert r["ratio"] == pytest.approx(r["resnetlab_images_per_s"] / r["reference_images_per_s"], rel=0.02)
    assert r["fraction_of_fp32_peak"] == pytest.approx(r["gflops_per_s"] / r["fp32_peak_gflops"], rel=0.02)
    assert r["steps"] == 1 and r["batch_size"] == 8 and r["resize"] == 32 and r["device"] == "cpu"
    assert set(r["levers"]) == {"channels_last"} and r["levers"]["channels_last"] > 0
    # training FLOPs: forward + backward, a little under 3 x forward (the stem needs no input gradient)
    assert 2 * r["forward_gflops_per_image"] < r["train_gflops_per_image"] <= 3 * r["forward_gflops_per_image"]
    assert len(r["step_seconds"]["reference"]) == len(r["step_seconds"]["resnetlab"]) == 1
    assert r["block"] == 1  # on the CPU every step is timed on its own


def test_interleaved_times_runs_of_steps_and_alternates() -> None:
    from resnetlab.bench.engines import interleaved
    from resnetlab.errors import UsageError

    order: list[str] = []

    class Sleeper:
        device = torch.device("cpu")

        def __init__(self, name: str, seconds: float) -> None:
            self.name, self.seconds = name, seconds

        def step(self) -> int:
            order.append(self.name)
            time.sleep(self.seconds)
            return 4

    r = interleaved({"a": Sleeper("a", 0.002), "b": Sleeper("b", 0.006)}, steps=5, warmup=1, block=2)
    # warm-up a b, then runs of 2, 2 and 1 steps, the side going first alternating
    assert "".join(order) == "ab" + "aabb" + "bbaa" + "ab"
    assert [len(r[k]["step_seconds"]) for k in "ab"] == [3, 3]
    assert r["a"]["images_per_s"] > 1.5 * r["b"]["images_per_s"]  # 4 images per 2 ms vs per 6 ms, plus overheads
    assert r["b"]["images_per_s"] <= 4 / 0.006
    with pytest.raises(UsageError, match="block must be >= 1"):
        interleaved({"a": Sleeper("a", 0)}, steps=1, warmup=0, block=0)


def test_bench_train_rejects_unknown_lever(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", "--levers", "warp_drive"]) == 2
    assert "unknown lever" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--peak-size", "0"], "--peak-size must be >= 1, not 0"),  # was a ZeroDivisionError
        (["infer", "--peak-size", "-5"], "--peak-size must be >= 1, not -5"),  # was a negative-dimension RuntimeError
        (["infer", "--bf16-peak-size", "0"], "--bf16-peak-size must be >= 1, not 0"),
        (["infer", "--resize", "-5"], "--resize must be >= 0, not -5"),
        (["train", "--resize", "-1"], "--resize must be >= 0, not -1"),
        (["train", "--lever-batch-size", "0", "--levers", "all"], "--lever-batch-size must be >= 1, not 0"),
        (["train", "--lever-steps", "0", "--levers", "all"], "--lever-steps must be >= 1, not 0"),
        (["train", "--steps", "0"], "--steps must be >= 1, not 0"),
        (["train", "--workers", "-1"], "--workers must be >= 0, not -1"),
        (
            ["train", "--seed", str(10**20)],
            "--seed must be in torch's range [-2**63, 2**64 - 1], not 100000000000000000000",
        ),
        (
            ["infer", "--threads", str(10**20)],
            f"--threads {10**20} is more than 4 per CPU ({os.cpu_count()} here); use at most {4 * os.cpu_count()}",
        ),
        (
            ["train", "--workers", "100000"],  # started 100,000 DataLoader processes of ~350 MB each
            f"--workers 100000 would start 100000 processes on {os.cpu_count()} CPUs; "
            f"use at most {4 * os.cpu_count()} (the chapter uses 4)",
        ),
        (["infer", "--small-reps", "0"], "--small-reps must be >= 1, not 0"),
        (["infer", "--batch-sizes", "0,4"], "--batch-sizes must be positive ints, not '0,4'"),
        (["time-to-accuracy", "--seeds", "0"], "--seeds must be >= 1, not 0"),
        (["train", "--threads", "0"], "--threads must be >= 1, not 0"),
        (["pipeline", "--batches", "0"], "--batches must be >= 1, not 0"),
        (["pipeline", "--size", "0"], "--size must be >= 1, not 0"),
        (["eval-batch", "RUN", "--rounds", "0"], "--rounds must be >= 1, not 0"),
        (["eval-batch", "RUN", "--batch-sizes", "0,4"], "--batch-sizes must be positive ints, not '0,4'"),
        (["conv-backward", "--reps", "0"], "--reps must be >= 1, not 0"),
        (["conv-backward", "--recipe", "zzz"], "unknown recipe 'zzz'; choose one of d2l, fast, accurate, best"),
        (["accuracy-holds", "--epochs", "0"], "--epochs must be >= 1, not 0"),
        (["reference", "--subset", "-1"], "--subset must be >= 0, not -1"),
        (["strided-projection", "--cases", "fast,huge"], "--cases takes a comma list of fast, d2l, not 'fast,huge'"),
    ],
)
def test_bench_size_flags_are_checked_first(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    t0 = time.perf_counter()
    assert main(["bench", *argv]) == 2
    assert capsys.readouterr().err == f"resnetlab: error: {message}\n"
    assert time.perf_counter() - t0 < 5  # refused before any matmul, dataset or model


def test_bench_infer_json(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    r = last_json(
        capsys,
        [
            "bench",
            "infer",
            "--dataset",
            tiny_folder,
            "--resize",
            "32",
            "--batch-sizes",
            "1,4",
            "--reps",
            "1",
            "--small-reps",
            "2",
            *PEAKS,
            "--json",
        ],
    )
    for bs in ("1", "4"):
        b = r[f"batch{bs}"]
        assert b["resnetlab_images_per_s"] > 0 and b["reference_images_per_s"] > 0 and b["resnetlab_latency_ms"] > 0
        assert b["best_variant"] in r["variants"] and b["best_variant"] != "reference"
    assert {"reference", "nchw", "channels_last", "channels_last_bn_folded"} <= set(r["variants"])
    assert r["device"] == "cpu" and r["cpu"] and r["fp32_peak_gflops"] > 0
    assert r["latency_ms_batch1"] == r["batch1"]["resnetlab_latency_ms"] and r["images_per_s_batch4"] > 0


def test_bench_time_to_accuracy_json(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    # --augment none: mirroring swaps this folder's left/right classes, so flips make it unlearnable
    r = last_json(
        capsys,
        [
            "bench",
            "time-to-accuracy",
            "--recipe",
            "fast",
            "--target",
            "0.01",
            "--seeds",
            "1",
            "--train-args",
            f"--dataset {tiny_folder} --epochs 2 --width 8 --batch-size 16 --no-tta --augment none",
            "--json",
        ],
    )
    # fast tests after its last epoch only (eval_every=0): epoch 1 is not measured, so the crossing is epoch 2
    assert r["seeds"] == [0] and r["reached"] == [True] and r["epochs"] == [2]
    assert 0 < r["seconds"][0] <= r["total_seconds"][0] and r["median_seconds"] == r["seconds"][0]
    history = r["runs"][0]["history"]
    assert history[0]["test_acc"] is None and history[1]["test_acc"] == r["accuracies"][0]
    # training time to the crossing: the run's own seconds over both epochs, less than the wall-clock to it
    assert 0 < r["train_seconds"][0] == history[1]["train_seconds"] < r["seconds"][0]
    assert (
        r["median_train_seconds"] == r["train_seconds"][0] and history[1]["train_seconds"] > history[0]["train_seconds"]
    )
    assert r["accuracies"][0] >= 0.01 and len(r["runs"][0]["history"]) == 2
    assert {"seconds", "median_seconds", "epochs", "accuracies", "total_seconds"} <= set(r)


def test_time_to_accuracy_parsing_and_median(capsys: pytest.CaptureFixture[str]) -> None:
    m = EPOCH_LINE.match("epoch 3/5: loss 0.412, train acc 0.861, test acc 0.925, 812.3 examples/sec, 70.2 s")
    assert m and m.groups() == ("3", "5", "0.925")
    m = EPOCH_LINE.match(
        "epoch 1/3: loss 0.905, train acc 0.827, test acc not measured (--eval-every), 1590.6 examples/sec, 37.7 s"
    )
    assert m and m.groups() == ("1", "3", None)
    assert median_or_none([3.0, None, 1.0]) == 3.0 and median_or_none([None, None, 1.0]) is None
    assert main(["bench", "time-to-accuracy", "--train-args", "--seed 3"]) == 2
    assert "may not set --seed" in capsys.readouterr().err
    assert main(["bench", "time-to-accuracy", "--train-args", "--epochs '3"]) == 2
    assert capsys.readouterr().err == "resnetlab: error: --train-args: No closing quotation\n"


def _accuracy_holds_tiny(dataset: str) -> list[str]:
    """`bench accuracy-holds` at the smallest settings, on a tiny image folder."""
    return [
        "bench",
        "accuracy-holds",
        "--epochs",
        "1",
        "--resize",
        "32",
        "--workers",
        "0",
        "--dataset",
        dataset,
        "--tolerance",
        "100",
    ]


def test_bench_accuracy_holds_runs_tiny(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    r = last_json(
        capsys,
        [
            *_accuracy_holds_tiny(tiny_folder),
            "--control",
            "--json",
        ],
    )
    assert (
        r["ok"]
        and r["cpu_class"] == cpu_class()
        and 0 <= r["reference_test_acc"] <= 1
        and 0 <= r["resnetlab_test_acc"] <= 1
    )
    assert (
        r["epochs"] == 1
        and len(r["reference_history"]) == len(r["resnetlab_history"]) == len(r["control_history"]) == 1
    )
    gap = r["gap_from_order_points"] + r["gap_from_pixels_points"]
    assert gap == pytest.approx(r["gap_points"], abs=2e-3)


@pytest.mark.parametrize(
    "argv", [["infer", "--resize", "300000", "--batch-sizes", "1"], ["train", "--resize", "30000"]]
)
def test_bench_resize_larger_than_memory_is_refused_before_pil_fills_it(
    argv: list[str], tiny_folder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # PIL allocates a resized image in blocks: --resize 300000 filled the machine's memory
    t0 = time.perf_counter()
    assert main(["bench", *argv, "--dataset", tiny_folder, *PEAKS]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"--resize {argv[2]} makes a batch of " in err and "choose a smaller --resize" in err
    )
    assert time.perf_counter() - t0 < 10  # before any matmul peak or model


def test_bench_train_refuses_a_batch_batchnorm_cannot_train_on(
    tiny_folder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # batch 1 at a 1x1 map: "Expected more than 1 value per channel when training" traceback at the first step
    assert (
        main(
            [
                "bench",
                "train",
                "--dataset",
                tiny_folder,
                "--model",
                "resnet10",
                "--resize",
                "28",
                "--batch-size",
                "1",
                "--steps",
                "1",
                "--workers",
                "0",
                *PEAKS,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch size 1 gives resnet10's BatchNorm a single value per channel" in err


# ----------------------------------------------------------------------------------------------
# Every command at its smallest: exit 0, its figures, the CPU class it detected


@pytest.mark.parametrize(
    "argv, figures",
    [
        (
            ["train", "--resize", "32", "--steps", "1", "--warmup", "0", "--batch-size", "8", "--workers", "0", *PEAKS],
            ["matmul peaks: fp32 ", "reference (chapter loop): ", "resnetlab:                ", "speed-up: x"],
        ),
        (
            ["infer", "--resize", "32", "--batch-sizes", "2", "--small-reps", "1", *PEAKS],
            ["batch 2:", "  reference ", "  channels_last_bn_folded ", "  resnetlab (", ") vs reference: x"],
        ),
    ],
)
def test_bench_train_and_infer_say_the_cpu_class(
    capsys: pytest.CaptureFixture[str], tiny_folder: str, argv: list[str], figures: list[str]
) -> None:
    text = "\n".join(output(capsys, ["bench", *argv, "--dataset", tiny_folder]))
    for figure in figures:
        assert figure in text, figure


def test_bench_pipeline(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    lines = output(
        capsys,
        [
            "bench",
            "pipeline",
            "--dataset",
            tiny_folder,
            "--size",
            "32",
            "--batch-size",
            "8",
            "--batches",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert lines[1].startswith("resnetlab BatchLoader+to_float+resize(32): ") and lines[1].endswith(" images/s")
    assert lines[2].startswith("chapter DataLoader (PIL resize, 0 workers): ") and lines[3].startswith("speed-up: ")
    r = json.loads(lines[-1])
    assert r["resnetlab_images_per_s"] > 0 and r["reference_images_per_s"] > 0 and r["batches"] == 2 and r["size"] == 32
    assert r["cpu_class"] == cpu_class() and r["device"] == "cpu"


def test_pipeline_reference_side_is_the_chapters_pil_resize(tiny_folder: str) -> None:
    """The pipeline's reference is the reference loop's own dataset: PIL bilinear resize, then /255."""
    train_split, _ = load_dataset(tiny_folder)
    x, y = ref.PILDataset(train_split, ref.chapter_transform(40))[3]
    a = train_split.images[3, 0].numpy()
    want = np.asarray(Image.fromarray(a).resize((40, 40), Image.BILINEAR), dtype=np.float32) / 255.0
    assert torch.equal(x, torch.from_numpy(want).unsqueeze(0)) and y == int(train_split.labels[3])


def test_bench_accuracy_holds_prints_its_figures(capsys: pytest.CaptureFixture[str], tiny_folder: str) -> None:
    lines = output(capsys, _accuracy_holds_tiny(tiny_folder))
    assert lines[1] == "reference (chapter loop), 1 epoch(s), seed 0:"
    assert lines[-1].startswith("test accuracy: reference ") and "(within 100.0 points)" in lines[-1]


def test_bench_conv_backward(capsys: pytest.CaptureFixture[str]) -> None:
    lines = output(capsys, ["bench", "conv-backward", "--recipe", "fast", "--batch-size", "2", "--reps", "1"])
    assert lines[1].startswith("fast: resnet10, batch 2, 24 px, 1 threads; ms per call (median of 1)")
    assert lines[2].split() == ["convolution", "forward", "grad", "in", "grad", "W", "W/fwd", "im2col", "W"]
    assert lines[3].startswith("1->16 3x3/1 @24px") and len(lines[3].split()) == 8
    assert re.match(r"all \d+ convolutions ", lines[-1]) and lines[-1].endswith(
        "(last: the faster weight gradient per layer)"
    )


def test_bench_fast_step(capsys: pytest.CaptureFixture[str], tiny_folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: model)  # the plumbing, not minutes of compiling
    lines = output(capsys, ["bench", "fast-step", "--steps", "1", "--warmup", "0", "--dataset", tiny_folder])
    assert lines[1].startswith("lever compile: x") and "images/s at batch 128, 1 steps" in lines[1]
    r = json.loads(lines[-1])
    assert r["recipe"] == "fast" and r["ratio"] > 0 and r["steps"] == 1 and r["cpu_class"] == cpu_class()


def test_bench_eval_batch(capsys: pytest.CaptureFixture[str], tiny_folder: str, tmp_path: Path) -> None:
    from resnetlab.train import train

    train("fast", out=tmp_path / "run", dataset=tiny_folder, epochs=1, width=8, batch_size=16, progress=False)
    capsys.readouterr()
    lines = output(
        capsys, ["bench", "eval-batch", str(tmp_path / "run"), "--batch-sizes", "4,16", "--rounds", "1", "--json"]
    )
    assert lines[1].startswith("batch     4: ") and "s per evaluation (median of 1), " in lines[1]
    assert lines[2].startswith("batch    16: ") and "test images/s, x" in lines[2]
    r = json.loads(lines[-1])
    assert r["test_images"] == 16 and set(r["median_seconds"]) == {"4", "16"} and r["cpu_class"] == cpu_class()


def test_bench_strided_projection(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["bench", "strided-projection", "--cases", "fast", "--rounds", "1", "--steps", "1", "--precision", "fp32"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["case"] == "fast (resnet10 w16 small @24, batch 128)" and r["cpu_class"] == cpu_class()
    assert set(r["ms_per_step"]) == {"sliced", "strided"} and r["sliced_vs_strided"] > 0 and r["precision"] == "fp32"
