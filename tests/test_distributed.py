"""Scaling out with torchrun: DDP over gloo on this CPU, as one machine and as two "nodes".

Every multi-process run is a subprocess with a timeout, started in its own session so that a
hang kills the whole group (torchrun and its workers), never anything else. The data set is a
small image folder cut from the real Fashion-MNIST (512 training and 1001 test images, an odd
count so that the evaluation shards are uneven); the model is a width-8 ResNet-10.

The runs compared across world sizes compute in float64 (a test-only patch in DRIVER): in float32
the BatchNorm backward of a freshly initialised network loses up to 1e-2 of the gradient to
rounding, so any two float32 runs (1 vs 2 threads as much as 1 vs 2 processes) drift apart after a
few steps. In float64 what remains is the arithmetic, and 2 processes follow 1 step for step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import resnetlab.train.evaluate as evaluation
import resnetlab.train.step as step_module
from resnetlab.checkpoint import CHECKPOINT_NAME, read_checkpoint
from resnetlab.data import BatchLoader, Split, load_dataset
from resnetlab.errors import UsageError
from resnetlab.train import elastic, load_checkpoint, syncbn, train

PY = sys.executable
TIMEOUT = 300  # seconds for any one launch; a healthy one takes well under a minute on 2 busy cores
N_TRAIN, N_TEST = 512, 1001
# 2 processes x 32 with --scale-lr (lr 0.05 x 2) against 1 process x 64 at lr 0.1: the same global
# batches, the same applied lr, the same BatchNorm statistics (--sync-bn). The rest is the fast
# recipe (one-cycle SGD with Nesterov momentum, label smoothing, weight decay), without augmentation.
COMMON = dict(
    epochs=2,
    model="resnet10",
    width=8,
    stem="small",
    augment="none",
    precision="fp32",
    tta=False,
    device="cpu",
    seed=3,
    eval_every=1,
    whiten_stem=True,  # the whitening and its frozen filters, identical on every rank and through DDP's reducer
)
TWO = dict(COMMON, batch_size=32, lr=0.05, scale_lr=True, sync_bn=True)
ONE = dict(COMMON, batch_size=64, lr=0.1)

DRIVER = """
import json, os, sys
import torch
import resnetlab.train.evaluate as evaluation, resnetlab.train.step as step
from resnetlab.train import train

torch.set_default_dtype(torch.float64)  # the test's float64 mode (see the module docstring)
for module in (step, evaluation):  # the uint8 -> float conversion of the inputs, in training and in the test pass
    module.to_float = (lambda to_float: lambda x, dtype=torch.float64: to_float(x, dtype))(module.to_float)
result = train("fast", progress=False, **json.loads(sys.argv[1]))
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(sys.argv[2], f"result-{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "node": sys.argv[3],
               "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
               "confusion": result.confusion.tolist(), "test_acc": result.test_acc}, f)
"""


@contextlib.contextmanager
def float64():
    """DRIVER's float64 mode, in this process."""
    dtype, to_float = torch.get_default_dtype(), step_module.to_float
    torch.set_default_dtype(torch.float64)
    for module in (step_module, evaluation):
        module.to_float = lambda x, dtype=torch.float64: to_float(x, dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        for module in (step_module, evaluation):
            module.to_float = to_float


def child_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> str:
    """Wait for ``proc`` until ``deadline``; on a hang, kill its whole session and fail."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"timed out: {' '.join(map(str, proc.args))}\n{log.read_text()[-3000:]}")
    return log.read_text()


def position(run_dir: Path) -> tuple[int, int] | None:
    """(epoch, step) of the run's checkpoint, or None before the first one."""
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / CHECKPOINT_NAME), framework="pt") as f:
            pos = json.loads(f.metadata()["resnetlab"])["position"]
    except Exception:  # not written yet (the write itself is atomic)
        return None
    return pos["epoch"], pos["step"]


def worker_pids(agent: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the workers torchrun ``agent`` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent:
            for item in env:
                if item.startswith(b"LOCAL_RANK="):
                    found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return found


def state_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    with float64():  # the runs compared are float64 (DRIVER), and reading checks the weights' dtype against the model's
        tensors, _ = read_checkpoint(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def metrics(run_dir: Path, every_row: bool = False) -> list[dict]:
    """metrics.jsonl's epoch rows, or all its rows (the curve's too)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if every_row else [r for r in rows if r["kind"] == "epoch"]


def step_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Shared runs (module scope: each is paid for once)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """``folder:PATH`` with the first 512 training and 1001 test images of Fashion-MNIST."""
    train_split, test_split = load_dataset("fashion-mnist")
    root = tmp_path_factory.mktemp("fm")
    for name, split, n in (("train", train_split, N_TRAIN), ("test", test_split, N_TEST)):
        for i in range(n):
            d = root / name / split.classes[int(split.labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.images[i, 0].numpy()).save(d / f"{i:05d}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    """One process, batch 64, float64, in this process; with its per-step losses."""
    tmp = tmp_path_factory.mktemp("single")
    os.environ[elastic.STEP_LOSS_ENV] = str(tmp / "losses.jsonl")
    try:
        with float64():
            result = train("fast", out=tmp / "run", dataset=folder, progress=False, **ONE)
    finally:
        del os.environ[elastic.STEP_LOSS_ENV]
    return result, step_log(tmp / "losses.jsonl")


@pytest.fixture(scope="module")
def two_nodes(folder, driver, tmp_path_factory):
    """Two torchrun launches ("machines"), one process each, meeting in a c10d rendezvous on localhost.

    2 x batch 32, float64, a checkpoint every step. Each node names its own --out: only rank 0's
    is used, the other must never appear.
    """
    tmp = tmp_path_factory.mktemp("two_nodes")
    port, job = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    env = child_env(**{elastic.STEP_LOSS_ENV: str(tmp / "losses.jsonl")})
    procs, deadline = [], time.monotonic() + TIMEOUT
    for node in (0, 1):
        kwargs = dict(TWO, dataset=folder, out=str(tmp / f"out{node}"), checkpoint_every=1)
        cmd = [
            PY,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={job}",
            str(driver),
            json.dumps(kwargs),
            str(tmp),
            str(node),
        ]
        procs.append((start(cmd, tmp / f"node{node}.log", env), tmp / f"node{node}.log"))
    logs = [finish(p, log, deadline) for p, log in procs]
    for (p, _), log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp / f"result-{r}.json").read_text()) for r in (0, 1)]
    return {
        "results": results,
        "run_dir": tmp / f"out{results[0]['node']}",
        "other_out": tmp / f"out{results[1]['node']}",
        "losses": step_log(tmp / "losses.jsonl"),
        "logs": logs,
    }


# ----------------------------------------------------------------------------------------------
# Data sharding


@pytest.mark.parametrize("n,ws,bs", [(512, 2, 32), (103, 4, 8), (1000, 3, 7), (64, 8, 2)])
def test_rank_shards_are_disjoint_cover_the_epoch_and_form_the_global_batches(n, ws, bs):
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    split = Split(images, torch.arange(n) % 10, [str(i) for i in range(10)], "toy")
    one = BatchLoader(split, bs * ws, shuffle=True, seed=5).indices(1)
    shards = [BatchLoader(split, bs, shuffle=True, seed=5, drop_last=True, rank=r, world_size=ws) for r in range(ws)]
    ids = [s.indices(1) for s in shards]
    used = (n // (bs * ws)) * bs * ws  # the tail dropped is n mod (global batch), as one process with drop_last
    flat = torch.cat(ids)
    assert len(flat) == used and len(set(flat.tolist())) == used  # disjoint
    assert set(flat.tolist()) == set(one[:used].tolist())  # together: the epoch's first `used` samples
    assert len({len(s) for s in shards}) == 1  # every rank the same number of full batches
    for k in range(len(shards[0])):  # step k of all ranks = step k of one process at the global batch
        union = set(torch.cat([i[k * bs : (k + 1) * bs] for i in ids]).tolist())
        assert union == set(one[k * bs * ws : (k + 1) * bs * ws].tolist())


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm on the CPU


def test_cpu_sync_batchnorm_keeps_batchnorm_state_dict_and_is_plain_without_a_group():
    from resnetlab.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet10", num_classes=10, in_chans=1, width=4, stem="small")
    keys = list(net.state_dict())
    x = torch.randn(8, 1, 28, 28)
    expected = net(x)
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    synced = syncbn.convert_sync_batchnorm(net, torch.device("cpu"))
    assert any(isinstance(m, syncbn.CpuSyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == keys
    for k, v in synced.state_dict().items():  # the same tensors, re-homed
        assert torch.equal(v, plain[k])
    assert torch.equal(synced(x), expected)  # without a process group it is plain BatchNorm, in train mode too
    synced.eval()
    fresh = create_model("resnet10", num_classes=10, in_chans=1, width=4, stem="small")
    fresh.load_state_dict(synced.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), synced(x))


# ----------------------------------------------------------------------------------------------
# Equivalence, rank-0 writes, the full test set once


def test_two_ranks_with_sync_bn_follow_one_process_at_the_global_batch(single, two_nodes):
    result, log1 = single
    log2 = two_nodes["losses"]
    assert len(log1) == len(log2) == 2 * N_TRAIN // 64  # 8 global batches of 64 per epoch either way
    assert [r["count"] for r in log2] == [64] * len(log2)
    # every step's global mean loss agrees to the float32 rounding of the loss itself
    for step, (a, b) in enumerate(zip(log1, log2)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), step
    acc1, acc2 = result.test_acc, two_nodes["results"][0]["test_acc"]
    assert abs(acc2 - acc1) <= 0.005, (acc1, acc2)
    train_loss2 = [r["train_loss"] for r in metrics(two_nodes["run_dir"])]
    assert train_loss2 == pytest.approx([r["train_loss"] for r in result.history], rel=1e-6)
    config = json.loads((two_nodes["run_dir"] / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 64
    assert config["lr_applied"] == pytest.approx(0.1)  # --scale-lr: 0.05 x 2


def test_two_nodes_train_together_and_only_rank_0_writes(two_nodes):
    results = two_nodes["results"]
    assert [r["world_size"] for r in results] == [2, 2]
    assert {r["node"] for r in results} == {"0", "1"}  # one rank on each "machine"
    run_dir = two_nodes["run_dir"]
    assert not two_nodes["other_out"].exists()  # rank 1 never touched its --out
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "curves.png", "confusion.png", CHECKPOINT_NAME} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert [row["epoch"] for row in metrics(run_dir)] == [1, 2]
    assert sum("epoch 2/2" in log for log in two_nodes["logs"]) == 1  # rank 0 alone prints


def test_test_accuracy_covers_the_test_set_exactly_once(two_nodes):
    r0, r1 = two_nodes["results"]
    confusion = torch.tensor(r0["confusion"])
    assert confusion.sum().item() == N_TEST  # 501 + 500 images over two ranks, each counted once
    assert r1["confusion"] == r0["confusion"]  # every rank reports the reduced matrix
    assert r0["test_acc"] == confusion.diag().sum().item() / N_TEST


def test_sync_bn_checkpoint_loads_into_the_plain_model(two_nodes, folder):
    with float64():
        classifier = load_checkpoint(two_nodes["run_dir"])
        assert not any(isinstance(m, syncbn.CpuSyncBatchNorm) for m in classifier.modules())
        assert any(type(m) is nn.BatchNorm2d for m in classifier.modules())
        _, test = load_dataset(folder)
        confusion = evaluation.evaluate(classifier, BatchLoader(test, 128), len(test.classes))
    # one process evaluating the checkpoint agrees with the two ranks' sharded evaluation
    assert confusion.tolist() == two_nodes["results"][0]["confusion"]


# ----------------------------------------------------------------------------------------------
# Fault tolerance and world-size changes


def test_killed_rank_restarts_resumes_and_ends_like_the_uninterrupted_run(two_nodes, folder, driver, tmp_path):
    """SIGKILL one of two ranks mid-epoch under --max-restarts 1: torchrun restarts both, they resume."""
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    kwargs = dict(TWO, dataset=folder, out=str(out), checkpoint_every=1)
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        str(driver),
        json.dumps(kwargs),
        str(tmp_path),
        "0",
    ]
    proc = start(cmd, log, child_env(**{elastic.STEP_LOSS_ENV: str(tmp_path / "losses.jsonl")}))
    deadline, killed = time.monotonic() + TIMEOUT, None
    try:
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            pos = position(out)
            if pos is not None and pos[1] >= 2:  # mid-epoch, a few steps in
                pids = worker_pids(proc.pid)
                if 1 in pids:
                    os.kill(pids[1], signal.SIGKILL)
                    killed = pos
            time.sleep(0.01)
    finally:
        text = finish(proc, log, deadline)
    assert killed is not None, f"the run ended before a rank could be killed\n{text[-3000:]}"
    assert proc.returncode == 0, text[-3000:]
    assert "resuming" in text, text[-3000:]
    assert json.loads((tmp_path / "result-0.json").read_text())["restart"] == 1
    steps = step_log(tmp_path / "losses.jsonl")
    assert steps[0]["restart"] == 0 and steps[-1]["restart"] == 1
    # bit-identical final weights and optimizer state (the uninterrupted run: the two-node one)
    resumed, uninterrupted = state_tensors(out), state_tensors(two_nodes["run_dir"])
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    a, b = metrics(out, every_row=True), metrics(two_nodes["run_dir"], every_row=True)
    assert [(r["kind"], r["step"], r.get("test_acc")) for r in a] == [
        (r["kind"], r["step"], r.get("test_acc")) for r in b
    ]
    for ra, rb in zip(a, b):  # the interrupted epoch's running sums survive the restart, over both ranks
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12)
        assert ra["train_acc"] == rb["train_acc"]


# `resnetlab train` (as `torchrun $(which resnetlab) train` runs it) whose rank 0 SIGKILLs itself right after writing
# the checkpoint at epoch 1, step 3: rank 1 then waits for it in the checkpoint's closing barrier.
DIES_AFTER_STEP_3 = """
import os, signal, sys
import resnetlab.train.state as state
from resnetlab.cli import main

save = state.save_checkpoint
def save_then_die(path, tensors, meta):
    save(path, tensors, meta)
    if meta["position"] == {"epoch": 0, "step": 3}:
        os.kill(os.getpid(), signal.SIGKILL)
state.save_checkpoint = save_then_die
sys.exit(main())
"""


def test_plain_torchrun_worker_that_lost_its_peer_says_so_in_one_line(folder, tmp_path):
    """Plain torchrun (not --nproc), no restarts, rank 0 SIGKILLed mid-epoch: rank 1's barrier fails in gloo with
    a plain RuntimeError ("Connection closed by peer"), which printed a 20-line traceback; now one line saying
    what happened and how to continue. --monitor-interval: torchrun would otherwise SIGTERM rank 1 (silently)
    as soon as it sees rank 0 gone, possibly before rank 1 has said anything."""
    out, log, logs, script = (
        tmp_path / "run",
        tmp_path / "torchrun.log",
        tmp_path / "logs",
        tmp_path / "resnetlab_dies.py",
    )
    script.write_text(DIES_AFTER_STEP_3)
    flags = [
        f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}"
        for k, v in dict(TWO, dataset=folder, out=out, checkpoint_every=1).items()
    ]
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "--monitor-interval=5",
        f"--log-dir={logs}",
        "--redirects=3",
        str(script),
        "train",
        *flags,
    ]
    proc = start(cmd, log, child_env())
    text = finish(proc, log, time.monotonic() + TIMEOUT)
    assert proc.returncode != 0, text[-3000:]
    assert position(out) == (0, 3), text[-3000:]  # rank 0 died where the driver says, after its checkpoint
    [stderr] = logs.glob(
        "*/attempt_0/1/stderr.log"
    )  # rank 1's own stderr (torchrun's report of the failure is its own)
    err = stderr.read_text()
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]  # that one line, nothing else
    assert lines[0].startswith("resnetlab: error: process 1 lost the other processes ("), lines[0]
    assert lines[0].endswith(
        f"one of them died; torchrun stops the job (no restarts left); "
        f"continue from the last checkpoint with: resnetlab train --resume {out} --nproc 2"
    ), lines[0]


def test_lost_peer_line_names_torchelastic_restart(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """gloo's dead-peer errors are plain RuntimeErrors.

    With restarts left, the line says torchrun restarts the group.
    """
    import argparse

    from resnetlab import cli

    def lost(args):  # noqa: ANN001, ANN202
        raise RuntimeError(
            "[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5. This is typically "
            "caused by a remote worker crashing. GLHF!"
        )

    monkeypatch.setattr(cli, "_handler", lambda command: lost)
    for key, value in dict(
        RANK="1", WORLD_SIZE="2", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="1"
    ).items():
        monkeypatch.setenv(key, value)
    assert cli.main(["train", "--out", "R"]) == 1
    assert capsys.readouterr().err == (
        "resnetlab: error: process 1 lost the other processes ([/x/gloo/transport/tcp/pair.cc:553] "
        "Connection closed by peer [127.0.0.1]:5): one of them died; torchrun restarts them all "
        "(restart 2 of 3), resuming from the last checkpoint\n"
    )
    assert not cli._lost_peers(RuntimeError("a plain bug"))  # any other RuntimeError stays a traceback
    assert "starting over" in cli._after_lost_peers(argparse.Namespace(out=None, resume=None))


def test_resume_on_another_world_size_is_refused(single, two_nodes, tmp_path):
    # 2 processes -> 1: refused before anything is written
    copy2 = tmp_path / "two"
    shutil.copytree(two_nodes["run_dir"], copy2)
    # read in the runs' own dtype
    with pytest.raises(UsageError, match=r"trained by 2 process\(es\) but this run has 1"), float64():
        train(resume=copy2)
    # 1 process -> 2 with --nproc: refused once, before torchrun starts (the launcher in float64 too, as the run)
    copy1 = tmp_path / "one"
    shutil.copytree(single[0].run_dir, copy1)
    before = (copy1 / CHECKPOINT_NAME).read_bytes()
    launcher = (
        "import sys, torch; torch.set_default_dtype(torch.float64); from resnetlab.cli import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [PY, "-c", launcher, "train", "--nproc", "2", "--resume", str(copy1)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=TIMEOUT,
        start_new_session=True,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("trained by 1 process(es) but this run has 2") == 1 and proc.stderr.count("\n") == 1
    assert (copy1 / CHECKPOINT_NAME).read_bytes() == before


def test_restarted_worker_resumes_only_its_own_job(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a node restarted for another node's failure
    assert elastic.restarted_run(run_dir) is None  # no config.json: a new run, the usual rules
    (run_dir / "config.json").write_text(json.dumps({"torchelastic_run_id": "job-a"}))
    assert elastic.restarted_run(run_dir) == "restart"  # this job's directory, but it died before its first checkpoint
    (run_dir / CHECKPOINT_NAME).write_bytes(b"")
    assert elastic.restarted_run(run_dir) == "resume"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    assert elastic.restarted_run(run_dir) is None  # another job's directory is never taken over
    (run_dir / "config.json").write_text(json.dumps({"torchelastic_run_id": "none"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id, shared by all jobs
    assert elastic.restarted_run(run_dir) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic.restarted_run(run_dir) == "resume"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # not under torchrun
    assert elastic.restarted_run(run_dir) is None
    assert elastic.restarted_run(None) is None
