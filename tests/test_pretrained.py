"""`load_pretrained`: torchvision/timm ResNet weights (built here, no download), adapted and loaded safely."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from resnetlab import CheckpointError, create_model, load_checkpoint, load_pretrained
from resnetlab.cli import main
from resnetlab.models.pretrained import adapt_input_conv, read_weights


@pytest.fixture(scope="module")
def source():
    """A 1000-class RGB resnet18: its state dict is torchvision's layout (and timm's)."""
    torch.manual_seed(0)
    net = create_model("resnet18", num_classes=1000, in_chans=3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a missed buffer would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def weights(source, tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    sd = source.state_dict()
    files = {"pth": d / "resnet18.pth", "safetensors": d / "resnet18.safetensors", "nested": d / "nested.pt"}
    torch.save(sd, files["pth"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    # nested, as training scripts save it, and without num_batches_tracked, as old torchvision files
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": old, "epoch": 90, "arch": "resnet18"}, files["nested"])
    return files


def _same_state(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["pth", "safetensors", "nested"])
def test_strict_load_reproduces_the_source(kind, source, weights):
    net = load_pretrained(create_model("resnet18", num_classes=1000, in_chans=3), weights[kind], verbose=False).eval()
    _same_state(net, source)
    if kind == "pth":
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(net(x), source(x))
    report = net.pretrained_report
    assert report.in_chans is None and report.reset == [] and report.loaded == len(read_weights(weights[kind]))


def test_model_name_builds_the_matching_model(source, weights):
    net = load_pretrained("resnet18", weights["safetensors"], verbose=False)
    assert net.options["num_classes"] == 1000 and net.options["in_chans"] == 3
    _same_state(net, source)


def test_rgb_stem_summed_for_grey_models(source, weights, capsys):
    grey_net = load_pretrained(create_model("resnet18", num_classes=1000, in_chans=1), weights["pth"]).eval()
    assert "3 to 1 input channels" in capsys.readouterr().out
    assert grey_net.pretrained_report.in_chans == (3, 1)
    _same_state(grey_net, source, skip="conv1.")
    g = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        assert (grey_net(g) - source(g.repeat(1, 3, 1, 1))).abs().max() <= 1e-5


def test_adapt_input_conv_follows_timm():
    w = torch.randn(8, 3, 7, 7)
    assert torch.allclose(adapt_input_conv(1, w), w.sum(1, keepdim=True))
    assert torch.allclose(adapt_input_conv(2, w), w[:, :2] * 1.5)
    assert torch.allclose(adapt_input_conv(4, w), torch.cat([w, w[:, :1]], 1) * 0.75)
    assert torch.equal(adapt_input_conv(3, w), w)
    with pytest.raises(CheckpointError, match="only RGB"):
        adapt_input_conv(2, torch.randn(8, 4, 3, 3))


def test_other_class_count_resets_only_the_classifier(source, weights, capsys):
    torch.manual_seed(1)
    fresh = create_model("resnet18", num_classes=10, in_chans=3)
    torch.manual_seed(1)
    net = load_pretrained(create_model("resnet18", num_classes=10, in_chans=3), weights["safetensors"])
    assert "fc reset" in capsys.readouterr().out
    assert net.pretrained_report.reset == ["fc.weight", "fc.bias"]
    src = source.state_dict()
    for k, v in net.state_dict().items():
        if k.startswith("fc."):
            assert torch.equal(v, fresh.state_dict()[k])  # the model's fresh initialisation
        else:
            assert torch.equal(v, src[k]), k


def test_weights_of_an_uncapped_model_do_not_fit_a_capped_one(tmp_path):
    path = tmp_path / "resnet10.pth"
    torch.save(create_model("resnet10", stem="small", width=16).state_dict(), path)
    net = create_model("resnet10", stem="small", width=16, max_width=64)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(net, path)
    msg = str(info.value)
    assert "do not fit resnet10 (width 16, max width 64, small stem)" in msg and "\n" not in msg
    assert "layer4.0.conv1.weight file (128, 64, 3, 3) vs model (64, 64, 3, 3)" in msg


def test_other_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(create_model("resnet50", num_classes=1000, in_chans=3).state_dict(), path)
    net = create_model("resnet18", num_classes=1000, in_chans=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_pretrained(net, path)
    msg = str(info.value)
    assert "do not fit resnet18" in msg and "looks like resnet50" in msg
    assert "layer1.0.conv1.weight file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    assert "layer1.0.conv3.weight" in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing half-loaded


def test_weights_with_nan_are_refused_before_training(source, tmp_path, capsys):
    # training from them stopped at step 0 with "loss is nan ... Lower --lr", which was not the cause
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    net = create_model("resnet18", num_classes=1000, in_chans=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"holds non-finite \(NaN or inf\) weights in 1 tensor\(s\), e.g. layer2.0.conv1.weight"
    ):
        load_pretrained(net, path)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "resnet18",
                "--width",
                "64",
                "--stem",
                "imagenet",
                "--subset",
                "64",
                "--epochs",
                "1",
                "--init-from",
                str(path),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite" in err and "--lr" not in err and not out.exists()


def test_width_mismatch_names_the_files_width(weights):
    with pytest.raises(
        CheckpointError, match="width 64.*conv1.weight file \\(64, 3, 7, 7\\) vs model \\(8, 3, 7, 7\\)"
    ):
        load_pretrained(create_model("resnet18", num_classes=1000, in_chans=3, width=8), weights["pth"])


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    for pad in range(0, 400, 8):
        save_file({"fc.bias": torch.zeros(3)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    # torch 2.13's torch.load happens to read safetensors too, so it must not be what read it here
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("read as a torch.save file"))
    assert path.read_bytes()[:1] == b"\x80" and list(read_weights(path)) == ["fc.bias"]


def test_pickle_carrying_code_is_refused_and_never_run(source, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="non-weight objects.*refused"):
        load_pretrained(create_model("resnet18", num_classes=1000, in_chans=3), path)
    assert not marker.exists()


def test_unreadable_weights_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match="neither a torch.save nor a safetensors"):
        read_weights(junk)
    truncated = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable torch.save file"):
        read_weights(truncated)
    with pytest.raises(CheckpointError, match="no weights file"):
        read_weights(tmp_path / "missing.pth")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        read_weights(tmp_path / "mixed.pt")


def test_damaged_old_style_pickles_are_one_line(tmp_path):
    path = tmp_path / "w.pt"
    cut = "is not a readable torch.save file .*; it may be truncated"
    for data in (b"\x80\x04junk", pickle.dumps({"a": torch.ones(1).tolist()}, protocol=2)[:14]):
        path.write_bytes(data)  # struct.error and IndexError inside torch.load
        with pytest.raises(CheckpointError, match=cut):
            read_weights(path)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)  # torch.save's pre-1.6 format
    for n in range(2, len(buf.getvalue())):  # cut anywhere: always a CheckpointError, never a traceback
        path.write_bytes(buf.getvalue()[:n])
        with pytest.raises(CheckpointError):
            read_weights(path)


def test_checkpoint_commands_refuse_torch_save_files(source, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    assert main(["predict", str(path), str(image)]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "load_pretrained" in err and len(err.strip().splitlines()) == 1


def test_train_init_from_fine_tunes_from_the_weights(weights, tmp_path):
    """`resnetlab train --init-from` on a 2-class RGB folder dataset starts from the file's weights."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            a = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8) + 64 * c
            Image.fromarray(a.astype(np.uint8), "RGB").save(tmp_path / "data" / name / f"{i}.png")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "train",
                "--dataset",
                f"folder:{tmp_path / 'data'}",
                "--model",
                "resnet18",
                "--stem",
                "imagenet",
                "--width",
                "64",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--lr",
                "1e-6",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--no-tta",
                "--no-compile",
                "--init-from",
                str(weights["pth"]),
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert code == 0
    assert "fc reset: the file has 1000 classes, the model 2" in out.getvalue()
    classifier = load_checkpoint(tmp_path / "run")
    assert classifier.classes == ["cat", "dog"] and classifier.input_shape == (3, 32, 32)
    src = read_weights(weights["pth"])
    trained = classifier.net.state_dict()
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        assert (trained[k] - src[k]).abs().max() < 1e-3, k  # one tiny step away from the file's weights
    assert trained["fc.weight"].shape == (2, 512)


def _checkpoint(path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A resnetlab checkpoint of a width-8 resnet10 (no training), its metadata changed or without ``drop``."""
    from resnetlab.checkpoint import save_checkpoint
    from resnetlab.data import Preprocess

    net = create_model("resnet10", width=8, stem="small")
    meta = {
        "model": {"name": net.name, "options": net.options},
        "classes": [str(i) for i in range(10)],
        "input_shape": [1, 28, 28],
        "preprocessing": Preprocess(None, [0.0], [1.0]).config(),
        "dataset": "fashion-mnist",
        "recipe": {},
        "position": {"epoch": 0, "step": 0},
        "sums": {},
        "history": [],
        "optimizer": [],
        **changes,
    }
    save_checkpoint(
        path, {f"model.{k}": v for k, v in net.state_dict().items()}, {k: v for k, v in meta.items() if k not in drop}
    )
    return path


def test_checkpoint_whose_metadata_does_not_fit_its_weights_is_one_line(tmp_path, capsys):
    assert load_checkpoint(_checkpoint(tmp_path / "good.safetensors")).classes[0] == "0"
    options = {**create_model("resnet10", width=8, stem="small").options, "width": 16}
    wide = _checkpoint(tmp_path / "wide.safetensors", model={"name": "resnet10", "options": options})
    with pytest.raises(
        CheckpointError,
        match=r"do not fit the resnet10 .*'width': 16.* \(conv1.weight is \(8, 1, 3, 3\) in "
        r"the file, \(16, 1, 3, 3\) in the model\); the checkpoint is damaged",
    ):
        load_checkpoint(wide)
    bare = _checkpoint(tmp_path / "nomodel.safetensors", drop=("model", "classes"))
    with pytest.raises(CheckpointError, match=r"incomplete resnetlab metadata \(no model, classes\)"):
        load_checkpoint(bare)
    with pytest.raises(CheckpointError, match="model is 'resnet10', not a name and options"):
        load_checkpoint(_checkpoint(tmp_path / "flat.safetensors", model="resnet10"))
    for path in (wide, bare):
        assert main(["eval", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resnetlab: error: {path}") and err.count("\n") == 1


def test_reading_weights_does_not_hide_running_out_of_memory(tmp_path, monkeypatch):
    # damaged bytes are a one-line CheckpointError; running out of memory is not "a damaged file"
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(MemoryError):
        read_weights(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc")
def test_weights_that_cannot_be_read_are_one_line(tmp_path):
    (tmp_path / "w.pth").symlink_to("/proc/self/mem")  # reading it at offset 0 fails with EIO: it was a traceback
    with pytest.raises(CheckpointError, match=r"w.pth cannot be read \(Input/output error\); check the disk"):
        read_weights(tmp_path / "w.pth")
