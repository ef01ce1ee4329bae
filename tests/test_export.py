"""`resnetlab export` (ONNX, verified with onnxruntime) and `resnetlab predict --onnx` (no torch).

One tiny checkpoint (resnet10, width 8, 256 Fashion-MNIST images, one epoch, trained at 16 px so
the preprocessing holds an antialiased downsizing Resize, with flip TTA) is trained and exported
once per module; the other tests reuse the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from resnetlab import export as export_mod
from resnetlab.cli import main
from resnetlab.errors import CheckpointError, UsageError

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _needs_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from resnetlab.train import train

    out = tmp_path_factory.mktemp("export") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(
            "fast",
            out=out,
            subset=256,
            epochs=1,
            model="resnet10",
            width=8,
            resize=16,
            tta=True,
            tta_translate=1,
            device="cpu",
            precision="fp32",
            progress=False,
        )  # bf16: tests/test_precision.py
    return out


@pytest.fixture(scope="module")
def exported(run_dir) -> tuple[Path, str]:
    """`resnetlab export RUN` with the defaults (opset 18, model.onnx in the run directory)."""
    _needs_onnx()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", str(run_dir)])
    assert code == 0, err.getvalue()
    return run_dir / "model.onnx", out.getvalue()


@pytest.fixture(scope="module")
def fashion_test_images() -> np.ndarray:
    from resnetlab.data import load_dataset

    _, test = load_dataset("fashion-mnist", download=False)
    return (test.images[:8].float() / 255).numpy()


def _torch_classifier(run_dir: Path):
    from resnetlab.inference import load_checkpoint

    return load_checkpoint(run_dir)


def test_export_writes_a_verified_file_in_the_run_directory(exported, run_dir):
    path, output = exported
    assert path.is_file() and path.stat().st_size > 0
    assert "first 64 fashion-mnist test images" in output
    diff = float(re.search(r"max abs diff ([0-9.e+-]+)", output).group(1))
    assert diff <= 1e-4
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_onnxruntime_matches_torch_on_real_images_with_dynamic_batch(exported, run_dir, fashion_test_images):
    from resnetlab.onnx_runtime import OnnxClassifier

    model = OnnxClassifier(exported[0])
    assert isinstance(model.session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    assert model.input_name == "images" and model.output_name == "logits"
    classifier = _torch_classifier(run_dir)
    assert classifier.tta and classifier.tta_translate == 1 and classifier.preprocess.size == 16  # in the graph:
    # flip and translation TTA, an antialiased resize
    for n in (1, 7):
        x = fashion_test_images[:n]
        got = model.logits(x)
        with torch.no_grad():
            want = classifier(torch.from_numpy(x)).numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - want).max() <= 1e-4
    with pytest.raises(UsageError, match="1x28x28"):
        model.logits(np.zeros((1, 3, 28, 28), np.float32))


def test_metadata_holds_classes_input_shape_and_model(exported):
    import onnx

    from resnetlab.onnx_runtime import OnnxClassifier

    proto = onnx.load(str(exported[0]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == FASHION
    assert json.loads(props["input_shape"]) == [1, 28, 28]
    assert props["model"] == "resnet10"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert any(n.op_type == "Resize" for n in proto.graph.node)
    model = OnnxClassifier(exported[0])
    assert model.classes == FASHION and model.input_shape == (1, 28, 28) and model.model_name == "resnet10"


def test_mismatch_is_an_error_and_leaves_no_file(exported, run_dir, tmp_path, monkeypatch, capsys):
    good = exported[0]
    # Reuse the exported graph (a real export takes seconds) and perturb PyTorch's reference.
    monkeypatch.setattr(export_mod, "_export_to", lambda classifier, opset, path: shutil.copyfile(good, path))
    real = export_mod._reference_logits
    monkeypatch.setattr(export_mod, "_reference_logits", lambda c, x: real(c, x) + 1e-2)
    dest = tmp_path / "bad.onnx"
    assert main(["export", str(run_dir), "--out", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "export check failed" in err and "tolerance 0.0001" in err
    assert f"{dest} was not written" in err
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # no temporary file left either


def test_opset_below_18_is_refused(run_dir, capsys):
    _needs_onnx()
    assert main(["export", str(run_dir), "--opset", "17", "--out", str(run_dir / "x.onnx")]) == 2
    assert "opset 18" in capsys.readouterr().err
    assert not (run_dir / "x.onnx").exists()


def test_out_that_is_the_checkpoint_is_refused_and_the_checkpoint_kept(run_dir, tmp_path, capsys):
    _needs_onnx()
    ckpt = run_dir / "last.safetensors"
    before = ckpt.read_bytes()
    (tmp_path / "link").symlink_to(run_dir)
    for out in (ckpt, run_dir / ".." / run_dir.name / "last.safetensors", tmp_path / "link" / "last.safetensors"):
        assert main(["export", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"resnetlab: error: --out {out} is the checkpoint being exported and would be lost; "
            f"give another file such as {run_dir / 'model.onnx'}\n"
        )
    assert ckpt.read_bytes() == before
    config = (run_dir / "config.json").read_bytes()
    assert main(["export", str(run_dir), "--out", str(run_dir / "config.json")]) == 2
    assert (
        f"--out {run_dir / 'config.json'} is a file of the run being exported (config.json)" in capsys.readouterr().err
    )
    assert (run_dir / "config.json").read_bytes() == config


def test_out_that_is_any_other_existing_file_is_refused(run_dir, tmp_path, capsys):
    # another run's checkpoint, or a user's notes, were replaced by the ONNX bytes
    _needs_onnx()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["export", str(run_dir), "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"--out {notes} exists and is not an .onnx file; export replaces only an earlier export" in err
    )
    assert notes.read_text() == "mine"
    again = tmp_path / "m.onnx"  # an earlier export is replaced, as re-exporting expects
    assert main(["export", str(run_dir), "--out", str(again)]) == 0
    assert main(["export", str(run_dir), "--out", str(again)]) == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_out_that_is_a_fifo_is_refused_not_replaced(run_dir, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["export", str(run_dir), "--out", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"resnetlab: error: --out {fifo} is not a regular file (a device, FIFO or socket); "
        f"give a file name such as {run_dir / 'model.onnx'}\n"
    )
    (tmp_path / "link").symlink_to(fifo)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "link")]) == 2
    assert f"--out {tmp_path / 'link'} (-> {fifo}) is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]


def test_out_through_a_link_writes_the_target_and_keeps_the_link(exported, run_dir, tmp_path, capsys):
    from resnetlab.onnx_runtime import OnnxClassifier

    target = tmp_path / "real.onnx"
    target.write_text("old")
    (tmp_path / "link.onnx").symlink_to(target)
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "new" / "m.onnx")
    for link in ("link.onnx", "dangling.onnx"):
        assert main(["export", str(run_dir), "--out", str(tmp_path / link)]) == 0, capsys.readouterr().err
        assert (tmp_path / link).is_symlink()
        written = (tmp_path / link).resolve()  # where the link points
        assert (
            written.stat().st_size > 10_000
            and OnnxClassifier(written).input_shape == OnnxClassifier(exported[0]).input_shape
        )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_during_export_leaves_no_temporary_file(run_dir, tmp_path):
    _needs_onnx()
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "export", str(run_dir), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".m.onnx.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before its temporary file was seen"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor a half-written m.onnx


def test_unwritable_out_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    _needs_onnx()
    (tmp_path / "file").write_text("not a directory")
    cases = [
        (tmp_path / "file" / "m.onnx", f"{tmp_path / 'file'} is a file, not a directory"),
        (tmp_path / "file" / "sub" / "m.onnx", f"{tmp_path / 'file'} is a file, not a directory"),
    ]
    if Path("/proc/self").is_dir():  # Linux: a file system where nothing can be created
        cases.append((Path("/proc/m.onnx"), "cannot create files in /proc ("))
    for out, reason in cases:
        assert main(["export", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resnetlab: error: cannot write --out {out}: {reason}") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_missing_onnx_extra_says_what_to_install(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'resnetlab[onnx]'" in err and "onnxscript" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), "x.png"]) == 2
    assert "pip install 'resnetlab[onnx]'" in capsys.readouterr().err
    with pytest.raises(UsageError, match=re.escape("pip install 'resnetlab[onnx]'")):
        from resnetlab.onnx_runtime import OnnxClassifier

        OnnxClassifier(tmp_path / "m.onnx")


def _write_images(tmp_path: Path, fashion_test_images: np.ndarray) -> list[str]:
    from PIL import Image

    grey = (fashion_test_images[0, 0] * 255).round().astype(np.uint8)
    rgb = (fashion_test_images[1, 0] * 255).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("RGB").resize((56, 56)).save(tmp_path / "b.jpg", quality=95)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    return [str(tmp_path / "a.png"), str(tmp_path / "broken.png"), str(tmp_path / "b.jpg")]


def test_predict_onnx_on_image_files(exported, run_dir, tmp_path, fashion_test_images, capsys):
    files = _write_images(tmp_path, fashion_test_images)
    assert main(["predict", "--onnx", str(exported[0]), *files, "--json", "--topk", "2"]) == 2
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert [r["image"] for r in results] == files
    assert "error" in results[1] and "broken.png" in err
    assert all(len(results[i]["top"]) == 2 for i in (0, 2))
    # The torch path on the same files gives the same classes and probabilities.
    good = [files[0], files[2]]
    assert main(["predict", str(run_dir), *good, "--json", "--topk", "2"]) == 0
    torch_results = json.loads(capsys.readouterr().out)
    for o, t in zip([results[0], results[2]], torch_results):
        assert [x["class"] for x in o["top"]] == [x["class"] for x in t["top"]]
        assert np.allclose([x["probability"] for x in o["top"]], [x["probability"] for x in t["top"]], atol=1e-5)


def test_predict_refuses_a_decompression_bomb_in_one_line(exported, run_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this: 784 pixels is a "bomb"
    for model in (["--onnx", str(exported[0])], [str(run_dir)]):
        assert main(["predict", *model, str(bomb)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"resnetlab: error: {bomb}: too large to decode safely (Image size (784 pixels) ")
        assert err.endswith("; downscale it\n") and err.count("\n") == 1


@pytest.mark.filterwarnings("always")  # both commands must show it (by default Python shows it once per process)
def test_pillow_warning_is_one_line(exported, run_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(big)
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 100
    )  # 144 pixels: over the limit (a warning), under twice it (an error)
    shown = warnings.showwarning
    for model in (["--onnx", str(exported[0])], [str(run_dir)]):
        assert main(["predict", *model, str(big)]) == 0
        err = capsys.readouterr().err
        assert err == (
            "resnetlab: warning: Image size (144 pixels) exceeds limit of 100 pixels, could be decompression "
            "bomb DOS attack. (DecompressionBombWarning)\n"
        )
    assert warnings.showwarning is shown  # only the command's own warnings are reworded


@pytest.mark.skipif(sys.platform == "win32", reason="closes the child's fd 2")
def test_a_warning_with_stderr_closed_leaves_json_output_alone(exported, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "big.png")
    code = (
        "from PIL import Image; Image.MAX_IMAGE_PIXELS = 100; from resnetlab.cli import main; "
        f"raise SystemExit(main(['predict', '--onnx', {str(exported[0])!r}, {str(tmp_path / 'big.png')!r}, '--json']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2), timeout=120
    )
    assert done.returncode == 0 and json.loads(done.stdout)[0]["image"] == str(tmp_path / "big.png")


def test_predict_reads_16_bit_images_as_training_does(exported, run_dir, tmp_path, fashion_test_images, capsys):
    from PIL import Image

    grey = (fashion_test_images[0, 0] * 255).round().astype(np.uint16)
    Image.fromarray((grey * 257).astype(np.uint16)).save(tmp_path / "deep.png")  # 16-bit: high byte = the 8-bit value
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for model in (["--onnx", str(exported[0])], [str(run_dir)]):
        assert main(["predict", *model, str(tmp_path / "deep.png"), str(tmp_path / "flat.png"), "--json"]) == 0
        deep, flat = json.loads(capsys.readouterr().out)
        assert deep["top"] == flat["top"]  # Pillow's convert("L") clipped every pixel to 255 (white)


def test_predict_takes_options_between_positionals(exported, run_dir, tmp_path, fashion_test_images, capsys):
    files = _write_images(tmp_path, fashion_test_images)
    assert main(["predict", str(run_dir), files[0], "--topk", "1", files[2]]) == 0  # was "unrecognized arguments"
    assert [line.split(": ")[0] for line in capsys.readouterr().out.splitlines()] == [files[0], files[2]]
    assert main(["predict", "--onnx", str(exported[0]), files[0], "--json", files[2]]) == 0
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [files[0], files[2]]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_predict_refuses_fifos_instead_of_waiting_forever(run_dir, tmp_path):
    from PIL import Image

    image, fifo = tmp_path / "a.png", tmp_path / "fifo.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    os.mkfifo(fifo)
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "last.safetensors")
    code = textwrap.dedent(
        f"""
        from resnetlab.cli import main
        print(main(["predict", {str(run_dir)!r}, {str(fifo)!r}]), """
        f"""main(["predict", {str(tmp_path / "run")!r}, {str(image)!r}]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    # A subprocess with a timeout: before the fix, opening the FIFO blocked forever.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout == "2 2\n"
    assert proc.stderr == (
        f"resnetlab: error: {fifo}: not a regular file (a FIFO, device or directory); give an image file\n"
        f"resnetlab: error: {tmp_path / 'run' / 'last.safetensors'} "
        "is not a regular file (a directory, FIFO or device); "
        "give a run directory or its last.safetensors\n"
    )


def test_predict_onnx_never_imports_torch(exported, tmp_path, fashion_test_images):
    files = _write_images(tmp_path, fashion_test_images)
    code = textwrap.dedent(
        f"""
        import sys
        from resnetlab.cli import main
        rc = main(["predict", "--onnx", {str(exported[0])!r}, {files[0]!r}, {files[2]!r}])
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        sys.exit(rc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(":") == 2


def test_onnx_classifier_refuses_a_non_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    from resnetlab.onnx_runtime import OnnxClassifier

    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a usable ONNX model"):
        OnnxClassifier(bad)
    with pytest.raises(CheckpointError, match="no ONNX model"):
        OnnxClassifier(tmp_path / "missing.onnx")


def _foreign_onnx(path: Path, op: str, metadata: dict[str, str]) -> Path:
    """A one-node ONNX model on a 1 x 1 x 4 x 4 input, as another tool might have made it."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.ir_version = 8
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path


def test_onnx_models_that_are_no_classifier_are_refused_at_load(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from resnetlab.onnx_runtime import OnnxClassifier

    identity = _foreign_onnx(tmp_path / "id.onnx", "Identity", {})  # outputs the image itself
    with pytest.raises(
        CheckpointError, match=r"outputs shape \[1, 1, 4, 4\] for one image; a classifier outputs 1 x 4 logits"
    ):
        OnnxClassifier(identity)
    three_names = _foreign_onnx(tmp_path / "flat.onnx", "Flatten", {"classes": '["a", "b", "c"]'})  # 16 logits, 3 names
    with pytest.raises(
        CheckpointError, match=r"outputs shape \[1, 16\] for one image; a classifier outputs 1 x 3 logits"
    ):
        OnnxClassifier(three_names)
    assert OnnxClassifier(_foreign_onnx(tmp_path / "ok.onnx", "Flatten", {})).classes == [str(i) for i in range(16)]


def test_predict_onnx_takes_the_run_directory_of_an_export(exported, run_dir, tmp_path, fashion_test_images, capsys):
    image = _write_images(tmp_path, fashion_test_images)[0]
    assert main(["predict", "--onnx", str(exported[0]), image]) == 0
    by_file = capsys.readouterr().out
    assert main(["predict", "--onnx", str(run_dir), image]) == 0  # export wrote run_dir/model.onnx
    assert capsys.readouterr().out == by_file


def test_verification_falls_back_to_random_images_and_says_so():
    classifier = SimpleNamespace(meta={"dataset": "folder:/nonexistent/resnetlab-test"}, input_shape=(3, 8, 8))
    images, source = export_mod.verification_images(classifier, n=5)
    assert images.shape == (5, 3, 8, 8) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert source.startswith("5 random images") and "not loaded" in source


def test_double_dash_still_ends_the_options(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # after "--" a positional may start with a dash; intermixed parsing lost it ("checkpoint is required")
    (tmp_path / "-run").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--json", "--", "-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] > 0


def test_options_may_come_before_a_double_dash_that_follows_positionals(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `predict RUN --topk 1 -- IMG` was "unrecognized arguments: -- IMG": "--" turned intermixed parsing off
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "dark.png")
    assert main(["predict", str(run_dir), "--topk", "1", "--json", "--", str(tmp_path / "dark.png")]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rows) == 1 and len(rows[0]["top"]) == 1


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["train", "--epochs", "x"],
            "resnetlab train: error: argument --epochs: invalid int value: 'x'; see resnetlab train --help",
        ),
        (
            ["predict", "RUN", "--topk", "--", "1"],
            "resnetlab predict: error: argument --topk: expected one argument; see",
        ),
        (
            ["predict", "RUN", "--top", "--", "1"],
            "resnetlab predict: error: argument --topk: expected one argument; see",
        ),
        (
            ["bench", "time-to-accuracy", "--seeds", "1", "3"],
            "resnetlab bench time-to-accuracy: error: unrecognized arguments: 3; "
            "see resnetlab bench time-to-accuracy --help",
        ),
        (
            ["bench", "train", "--steps", "x"],
            "resnetlab bench train: error: argument --steps: invalid int value: 'x'; see",
        ),
        ([], "resnetlab: error: the following arguments are required: COMMAND; see resnetlab --help"),
    ],
)
def test_a_usage_error_is_one_line_that_names_help(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # it was the whole usage block first (20 lines for train), then the error
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(says)


def test_torchrun_workers_report_what_every_rank_says_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C under --nproc N printed the same "interrupted ..." line N times; a worker whose peer died printed a
    # 20-line gloo traceback
    import signal as signals

    import torch.distributed

    from resnetlab import cli
    from resnetlab.train import TrainingInterrupted

    def interrupted(args):  # noqa: ANN001, ANN202
        raise TrainingInterrupted("interrupted at epoch 1, step 3; checkpoint saved", signals.SIGINT)

    def lost(args):  # noqa: ANN001, ANN202
        raise torch.distributed.DistBackendError("[../gloo/transport/tcp/pair.cc:538] Connection closed by peer\nmore")

    for rank, handler, code, says in [
        ("1", interrupted, 130, ""),
        ("0", interrupted, 130, "resnetlab: error: interrupted at epoch 1"),
        ("1", lost, 1, "resnetlab: error: process 1 lost the other processes ([../gloo"),
    ]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(cli, "_handler", lambda command, handler=handler: handler)
        assert cli.main(["models"]) == code
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == (1 if says else 0)


@pytest.mark.parametrize(
    "argv", [["models"], ["train", "--subset", "256", "--epochs", "2", "--width", "8", "--out", "OUT"]]
)
def test_stdout_closed_early_stops_quietly(argv: list[str], tmp_path: Path) -> None:
    # `resnetlab models | head -1` ended in a BrokenPipeError traceback (it is an OSError, caught as one first)
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "resnetlab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if argv[0] == "train":
        proc.stdout.readline()  # "training on cpu"; the next line comes after the first checkpoint
    proc.stdout.close()  # no reader left: the next write fails, whatever the pipe's buffer holds
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err
    if argv[0] == "train":
        assert err.count("\n") == 1 and "stdout was closed, so the run stopped" in err
        assert (tmp_path / "run" / "last.safetensors").is_file()  # resumable


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc")
def test_checkpoints_that_cannot_be_read_or_are_not_checkpoints_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # reading /proc/self/mem at offset 0 fails with EIO: it was an OSError traceback
    (tmp_path / "eio").mkdir()
    (tmp_path / "eio" / "last.safetensors").symlink_to("/proc/self/mem")
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "boot.png")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "last.safetensors").write_bytes(
        b""
    )  # what a full disk may leave: truncated, not "another format"
    for target, says in [
        (tmp_path / "eio", "cannot be read (Input/output error); check the disk"),
        (tmp_path / "empty", "it may be truncated"),
        (tmp_path / "boot.png", "is not a resnetlab checkpoint (not a safetensors file)"),
        (tmp_path / "m.onnx", "an ONNX export runs with `resnetlab predict --onnx`"),
    ]:
        assert main(["eval", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
