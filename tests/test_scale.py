"""Many processes (issue 20): `difflab sample` / `difflab eval` split over gloo processes write
exactly what one process writes; two "nodes" joined by c10d on 127.0.0.1 train one process's
weights and resume on one node; a killed rank stops the others with one line and no output."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_TOY, SUM_ORDER, assert_same_weights, run_difflab, train_here
from difflab import cli
from difflab.config import ConfigError, apply_overrides, preset
from difflab.evaluation.classifier import Judge, save_judge
from difflab.evaluation.sharded import blocks, check_visible
from difflab.runs import load_run
from difflab.training.distributed import FAULT_EXIT, World

SAMPLE = ["--n", "64", "--steps", "10", "--batch-size", "16", "--quiet"]


def _same_npz(a: Path, b: Path):
    with np.load(a) as fa, np.load(b) as fb:
        assert fa.files == fb.files
        for k in fa.files:
            assert np.array_equal(fa[k], fb[k]), k  # bit for bit


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    train_here(apply_overrides(preset("toy2d"), [*SMALL_TOY, "train.steps=2"]), root / "run")
    return root / "run"


def test_blocks_are_contiguous_whole_batches_covering_every_index():
    assert blocks(64, 2, 16) == [(0, 32), (32, 64)]
    assert blocks(70, 2, 16) == [(0, 32), (32, 70)]  # 5 batches: 2 and 3 of them
    assert blocks(10, 3, 16) == [(0, 3), (3, 6), (6, 10)]  # fewer batches than ranks
    for n, size, batch in ((1, 1, 4), (7, 7, 1), (1000, 3, 64), (5, 4, 2)):
        shares = blocks(n, size, batch)
        assert shares[0][0] == 0 and shares[-1][1] == n and all(a < b for a, b in shares)
        assert all(shares[r][1] == shares[r + 1][0] for r in range(size - 1))
    with pytest.raises(ConfigError, match=r"3 processes for 2 samples.*--nproc 2 or fewer"):
        blocks(2, 3)


def test_a_missing_run_is_the_loaders_message_in_one_process(tmp_path, capsys):
    gone = tmp_path / "gone"
    check_visible(gone, World())  # seen by no rank: no message of its own, load_run's instead
    with pytest.raises(ConfigError) as loader:
        load_run(gone)
    for argv in (["sample", str(gone), "--out", str(tmp_path / "s.npz")], ["eval", str(gone)]):
        assert cli.main([*argv, "--quiet"]) == 2
        assert capsys.readouterr().err == f"difflab: error: {loader.value}\n"
    assert sorted(tmp_path.iterdir()) == []


def test_two_processes_sample_what_one_does(toy, tmp_path, one_thread):
    assert cli.main(["sample", str(toy), "--out", str(tmp_path / "one.npz"), *SAMPLE]) == 0
    two = run_difflab(
        "sample", str(toy), "--out", str(tmp_path / "two.npz"), "--nproc", "2", *SAMPLE
    )
    assert two.returncode == 0, two.stderr
    assert "by 2 processes" in two.stdout
    _same_npz(tmp_path / "one.npz", tmp_path / "two.npz")


def test_two_processes_evaluate_what_one_does(toy, tmp_path, one_thread):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert cli.main(["eval", str(toy), "--out", str(one), *SAMPLE]) == 0
    result = run_difflab("eval", str(toy), "--out", str(two), "--nproc", "2", *SAMPLE)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(path.read_text()) for path in (one, two)]
    assert (rows[0]["processes"], rows[1]["processes"]) == (1, 2)
    timing = ("ms_per_sample", "peak_memory_mb", "processes")  # how it ran, not what it drew
    strip = [{k: v for k, v in row.items() if k not in timing} for row in rows]
    assert strip[0] == strip[1] and "nfe" in strip[0]


def test_a_killed_rank_stops_sampling_with_one_line_and_no_output(toy, tmp_path):
    fault = {"DIFFLAB_FAULT_RANK": "1", "DIFFLAB_FAULT_SAMPLE": "0"}  # after its share
    out = tmp_path / "out" / "s.npz"
    result = run_difflab("sample", str(toy), "--out", str(out), "--nproc", "2", *SAMPLE, env=fault)
    assert result.returncode == 1
    lines = [x for x in result.stderr.splitlines() if x.startswith("difflab:")]
    assert lines == [
        f"difflab: error: process rank 1 failed (exit {FAULT_EXIT}); nothing was written"
    ]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not any(tmp_path.rglob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "2", "--nproc", "3"], "3 processes for 2 samples: each process needs at least"),
        (["--out", "x.png", "--nproc", "2"], "--out must end in .npz"),
    ],
)
def test_bad_input_to_many_processes_is_one_line(toy, tmp_path, argv, message):
    out = ["--out", str(tmp_path / "s.npz")] if "--out" not in argv else []
    result = run_difflab("sample", str(toy), *out, "--quiet", *argv, cwd=tmp_path)
    assert result.returncode == 2
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("difflab: error: ") and message in lines[0]
    assert not list(tmp_path.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(argv: list[str], cwds: list[Path]) -> list[subprocess.CompletedProcess]:
    """One torchrun "node" (one process) per cwd, joined by c10d rendezvous on 127.0.0.1."""
    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = []
    for rank, cwd in enumerate(cwds):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(cwds))]
        torchrun += ["--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d"]
        torchrun += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1"]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(
            subprocess.Popen([*torchrun, "-m", "difflab", *argv], cwd=cwd, env=env, **pipes)
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_nodes_train_one_process_weights_and_resume_on_one(tmp_path, one_thread):
    train_here(apply_overrides(preset("toy2d"), [*SMALL_TOY, "train.steps=4"]), tmp_path / "one")
    argv = ["train", "--preset", "toy2d", "--runs", str(tmp_path), "--name", "two"]
    argv += ["--no-finish", "--quiet", "--set", *SMALL_TOY, "train.steps=2"]
    for node in _nodes(argv, [tmp_path, tmp_path]):
        assert node.returncode == 0, node.stderr
    two = tmp_path / "two/checkpoints"
    assert sorted(p.name for p in two.iterdir()) == ["best", "step-2"]
    assert_same_weights(tmp_path / "one/checkpoints/step-2", two / "step-2", atol=SUM_ORDER)
    resume = ["train", "--resume", str(tmp_path / "two"), "--no-finish", "--quiet"]
    assert cli.main([*resume, "--set", "train.steps=4"]) == 0  # one node, one process
    assert_same_weights(tmp_path / "one/checkpoints/step-4", two / "step-4", atol=SUM_ORDER)


@pytest.mark.slow
def test_a_node_that_cannot_see_the_run_directory_is_told_what_to_mount(toy, tmp_path):
    """Node 0 runs where runs/toy exists, node 1 where it does not (another machine's disk)."""
    here, there = tmp_path / "node0", tmp_path / "node1"
    (here / "runs").mkdir(parents=True)
    there.mkdir()
    (here / "runs" / "toy").symlink_to(toy)
    flags = ["--num-samples", *SAMPLE[1:]]  # torchrun's parser mistakes --n for its own flags
    nodes = _nodes(["sample", "runs/toy", "--out", "s.npz", *flags], [here, there])
    assert [n.returncode for n in nodes] != [0, 0]
    said = [x for n in nodes for x in n.stderr.splitlines() if x.startswith("difflab:")]
    assert len(said) == 1 and "cannot see runs/toy: every node must see" in said[0], said
    assert not (here / "s.npz").exists() and not (there / "s.npz").exists()


def _judge(path: Path) -> Path:
    """A randomly initialised judge for 2 grey classes (fixed seed): features, not quality."""
    torch.manual_seed(0)
    return save_judge(Judge(in_channels=1, num_classes=2).eval(), path, {"dataset": "stripes"})


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from PIL import Image

    from test_image_runs import TINY

    root = tmp_path_factory.mktemp("img")
    for name, axis in (("h", 0), ("v", 1)):  # test_image_runs' stripes, 32 x 32
        (root / "data" / name).mkdir(parents=True)
        for k in range(6):
            stripes = ((np.arange(32) // (2 + k % 3)) % 2 * 255).astype(np.uint8)
            img = np.repeat(stripes[:, None] if axis == 0 else stripes[None, :], 32, 1 - axis)
            Image.fromarray(img).save(root / "data" / name / f"{k}.png")
    sets = [f"data.root={root / 'data'}", *TINY, "data.image_size=32", "train.steps=2"]
    sets += ["data.class_conditional=true", "train.checkpoint_every=2"]
    argv = ["train", "--preset", "imagefolder", "--runs", str(root), "--name", "c", "--quiet"]
    assert cli.main([*argv, "--no-finish", "--set", *sets]) == 0
    return root / "c"


@pytest.mark.slow
def test_two_processes_sample_and_judge_a_guided_image_run_as_one(image_run, tmp_path):
    flags = ["--n", "64", "--guidance", "2.0", "--batch-size", "16", "--quiet"]
    for nproc in ("1", "2"):
        out = tmp_path / f"s{nproc}.npz"
        result = run_difflab("sample", str(image_run), "--out", str(out), "--nproc", nproc, *flags)
        assert result.returncode == 0, result.stderr
    _same_npz(tmp_path / "s1.npz", tmp_path / "s2.npz")
    assert (tmp_path / "s1.png").read_bytes() == (tmp_path / "s2.png").read_bytes()
    judge = _judge(tmp_path / "judge.safetensors")
    metrics = ["--metric", "kid_judge,pr_judge,accuracy", "--judge", str(judge)]
    for nproc in ("1", "2"):
        out = tmp_path / f"e{nproc}.json"
        argv = ["eval", str(image_run), "--out", str(out), "--nproc", nproc, *flags, *metrics]
        result = run_difflab(*argv, env={"DIFFLAB_CACHE": str(tmp_path / f"cache{nproc}")})
        assert result.returncode == 0, result.stderr
    rows = [json.loads((tmp_path / f"e{k}.json").read_text())["rows"] for k in "12"]
    timing = ("ms_per_sample", "peak_memory_mb", "processes")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and rows[1][0]["processes"] == 2
    # the reference features were cached once, by rank 0
    assert len(list((tmp_path / "cache2" / "reference").glob("*.npz"))) == 1
