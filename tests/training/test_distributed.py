"""Data-parallel QAT on 2 gloo ranks over loopback, against a single process on the same
global batches (scikit-learn digits, the shipped mnist_cnn weights).

One spawn runs every multi-rank part (starting ranks costs seconds): the observers on their
own, calibration, 2 QAT epochs, and a run stopped after epoch 1 then resumed. The
single-process reference runs here.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat_deploy.deploy.common import errors
from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.data import digits_split
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.quant.histogram_observers import MSEObserver, PercentileObserver
from qat_deploy.deploy.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.quant.sync import ranks_synced
from qat_deploy.deploy.recipe import CHECKPOINT_NAME
from qat_deploy.deploy.training import distributed
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.training.qat import train_qat
from qat_deploy.models import load_model
from tests.app.cli.test_cli_errors import run
from tests.app.test_reliability import deploy, report, start
from tests.ort_outputs import ort_outputs

RANKS = 2
GLOBAL_BATCH = 64
TRAIN_BATCHES = 8
CALIBRATION_BATCHES = 4
EPOCHS = 2
#: observer kinds (per-tensor affine activations, per-channel symmetric weights)
OBSERVERS = {
    "minmax": (MinMaxObserver, QuantSpec(signed=False, symmetric=False)),
    "ema": (MovingAverageMinMaxObserver, QuantSpec(signed=False, symmetric=False)),
    "percentile": (PercentileObserver, QuantSpec(signed=False, symmetric=False)),
    "mse_per_channel": (MSEObserver, QuantSpec(axis=1, narrow_range=True)),
}
#: bit-identical to one process; the histogram observers within float32 rounding
EXACT = ("minmax", "ema")


def _digits():
    d = digits_split()
    usable = TRAIN_BATCHES * GLOBAL_BATCH  # equal shards on every rank
    x, y = torch.from_numpy(d.x_train[:usable]), torch.from_numpy(d.y_train[:usable])
    return x, y, d.x_test, d.y_test


def _global_batches(x, y):
    size = GLOBAL_BATCH
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _prepared(x, calibration_batches):
    """mnist_cnn prepared for onnxruntime with EMA observers (observer-driven QAT) and
    calibrated on `calibration_batches` (inside ranks_synced on a rank)."""
    torch.manual_seed(0)
    model, _ = load_model("mnist_cnn", pretrained=True)
    prepared = prepare(model, "onnxruntime", x[:1], observer="ema")
    calibrate(prepared, calibration_batches, progress=False)
    return prepared


def _qat(prepared, batches, epochs, checkpoint=None, resume=False):
    torch.manual_seed(1)
    return train_qat(
        prepared,
        batches,
        epochs=epochs,
        lr=1e-4,
        freeze_bn_after=0,  # fine-tuning a converged net: running BN statistics
        progress=False,
        checkpoint=checkpoint,
        resume=resume,
    )


def _quantizer_state(prepared) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in prepared.state_dict().items()
        if k.endswith(("scale", "zero_point", "min_val", "max_val"))
    }


def _rank_job(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=RANKS)
    w = distributed.world()
    x, y, _, _ = _digits()
    mine = [distributed.shard(batch, w) for batch in _global_batches(x, y)]
    with ranks_synced():
        calibrated = _prepared(x, [inputs for inputs, _ in mine[:CALIBRATION_BATCHES]])
        observed = {
            name: _observe(name, [distributed.shard(b, w) for b in _observer_data()])
            for name in OBSERVERS
        }
    results = {"calibrated": _quantizer_state(calibrated), "observed": observed}

    trained = copy.deepcopy(calibrated)
    results["history"] = list(_qat(trained, mine, EPOCHS))
    results["trained"] = trained.state_dict()
    results["divergence"] = _divergence_found(copy.deepcopy(trained), rank)
    results["two_outputs"] = _train_two_outputs(w)
    try:
        train_qat(copy.deepcopy(calibrated), mine, sync_batchnorm=True, progress=False)
    except BadInputError as exc:
        results["sync_batchnorm"] = str(exc)
    if rank == 0:
        export(trained, Path(out) / "dp.onnx", x[:1])

    checkpoint = Path(out) / "qat_checkpoint.pt"
    _qat(copy.deepcopy(calibrated), mine, 1, checkpoint)  # as if killed during epoch 2
    resumed = copy.deepcopy(calibrated)
    results["resumed_history"] = list(_qat(resumed, mine, EPOCHS, checkpoint, resume=True))
    results["resumed"] = resumed.state_dict()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


class _TwoOutputs(torch.nn.Module):
    """Like a Hugging Face encoder: a second output (the pooler) the loss never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(16, 4)
        self.pooler = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x), self.pooler(x)


def _train_two_outputs(w) -> list[float]:
    """Two QAT steps under DDP with parameters no loss reaches (failed the second step)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.arange(8) % 4
    prepared = prepare(_TwoOutputs().eval(), "onnxruntime", x[:1])
    calibrate(prepared, [x], progress=False)
    batch = distributed.shard((x, y), w)
    return list(train_qat(prepared, [batch, batch], epochs=1, progress=False))


def _divergence_found(prepared, rank: int) -> str:
    """The end-of-epoch check's message after rank 1 alone nudges one scale."""
    quantizer = prepared.quantizers()[-1]
    if rank == 1:
        with torch.no_grad():
            quantizer.scale.mul_(1.001)
    try:
        distributed.check_quantizers_identical(prepared, epoch=0)
    except errors.CheckFailedError as exc:
        return str(exc)
    return ""


def _observer_data() -> list[torch.Tensor]:
    """Three global batches with outliers and a channel axis; batch 2 widens the range."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 4, 5, generator=g) * (1 + 3 * i) + i for i in range(3)]


def _observe(name: str, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    observer_class, spec = OBSERVERS[name]
    observer = observer_class(spec, 4 if spec.per_channel else None)
    for batch in batches:
        observer(batch)
    return observer.compute_qparams()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_job, args=(str(out / "init"), str(out)), nprocs=RANKS, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    return out, ranks


@pytest.fixture(scope="module")
def single():
    """The same recipe in one process on the whole global batches."""
    x, y, _, _ = _digits()
    batches = _global_batches(x, y)
    calibrated = _prepared(x, [inputs for inputs, _ in batches[:CALIBRATION_BATCHES]])
    trained = copy.deepcopy(calibrated)
    history = _qat(trained, batches, EPOCHS)
    return calibrated, trained, history


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_observers_over_shards_equal_one_process_on_the_global_batches(runs, name):
    _, ranks = runs
    expected_scale, expected_zero_point = _observe(name, _observer_data())
    for rank in ranks:
        scale, zero_point = rank["observed"][name]
        assert torch.equal(zero_point, expected_zero_point)
        if name in EXACT:
            assert torch.equal(scale, expected_scale)
        else:  # histogram counts summed over ranks; float32 rounding at most
            torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)


def test_calibration_over_shards_equals_one_process_on_the_global_batches(runs, single):
    _, ranks = runs
    expected = _quantizer_state(single[0])
    for rank in ranks:
        assert rank["calibrated"].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(rank["calibrated"][name], value), name


def test_ranks_hold_identical_quantizers_after_qat(runs):
    _, (first, second) = runs
    quantizers = [k for k in first["trained"] if k.endswith(("scale", "zero_point"))]
    assert quantizers
    for name in quantizers:
        assert torch.equal(first["trained"][name], second["trained"][name]), name


def test_a_quantizer_that_differs_between_ranks_is_named(runs):
    _, ranks = runs
    for rank in ranks:
        assert "differs between rank 0 and rank 1" in rank["divergence"]
        assert rank["divergence"].startswith("after epoch 1 quantizer model.")


def test_parameters_no_loss_reaches_train_on_both_ranks(runs):
    _, (first, second) = runs
    assert first["two_outputs"] == second["two_outputs"]
    assert len(first["two_outputs"]) == 1 and np.isfinite(first["two_outputs"][0])


def test_synced_batchnorm_on_cpu_is_refused_naming_why(runs):
    _, ranks = runs
    for rank in ranks:
        assert "SyncBatchNorm has no CPU kernel" in rank.get("sync_batchnorm", "")


def test_qat_loss_follows_the_single_process_run(runs, single):
    _, (first, second) = runs
    assert first["history"] == second["history"]  # the epoch mean is reduced over ranks
    np.testing.assert_allclose(first["history"], single[2], rtol=1e-3)


def test_deployed_int8_accuracy_matches_single_process_qat(runs, single, tmp_path):
    out, _ = runs
    _, _, xt, yt = _digits()
    export(single[1], tmp_path / "single.onnx", torch.from_numpy(xt[:1]))
    accuracy = {
        name: float((ort_outputs(path, xt).argmax(1) == yt).mean())
        for name, path in (("ddp", out / "dp.onnx"), ("single", tmp_path / "single.onnx"))
    }
    assert accuracy["single"] > 0.9, accuracy
    assert abs(accuracy["ddp"] - accuracy["single"]) <= 0.003, accuracy


def test_resumed_run_ends_where_the_uninterrupted_run_ends(runs):
    _, ranks = runs
    for rank in ranks:
        assert rank["resumed_history"] == rank["history"]
        assert rank["resumed"].keys() == rank["trained"].keys()
        for name, value in rank["trained"].items():
            assert torch.equal(rank["resumed"][name], value), name


def test_shard_deals_rows_like_tensor_split_and_refuses_too_few():
    batch = {"a": torch.arange(5), "b": (torch.arange(5), torch.arange(10).reshape(5, 2))}
    parts = [distributed.shard(batch, distributed.World(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p["a"] for p in parts]), batch["a"])
    assert [len(p["b"][1]) for p in parts] == [3, 2]
    with pytest.raises(distributed.BadInputError, match="cannot be shared by 3 ranks"):
        distributed.shard(torch.zeros(2, 4), distributed.World(0, 3))


def test_no_worker_variables_means_one_process():
    assert not any(name in os.environ for name in ("RANK", "WORLD_SIZE"))
    assert distributed.join() == distributed.World(0, 1)


#: a QAT long enough to kill a rank in the middle of it: 8 steps an epoch on mnist_cnn
CLI_BUILD = [
    "build", "--target", "onnxruntime", "--model", "mnist_cnn", "--export-only",
    "--nproc", "2", "--qat-epochs", "6", "--calibration", "minmax",
]  # fmt: skip


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes the launcher `pid` started."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().split()[3]) == pid:
                env = dict(
                    item.split("=", 1)
                    for item in (proc / "environ").read_text().split("\0")
                    if "=" in item
                )
                ranks[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError):
            continue
    return ranks


def test_a_killed_rank_ends_the_job_naming_it_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    checkpoint = out / CHECKPOINT_NAME
    proc = start([*CLI_BUILD, "--out", str(out)])
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # epoch 1 is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    os.kill(_children(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert proc.returncode == errors.RANK_FAILED, stderr
    assert "rank 1 was stopped by SIGKILL" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert report(out)["status"] != "ok"
    saved = torch.load(checkpoint, weights_only=True)
    assert 1 <= saved["epoch"] < 6

    resumed = deploy([*CLI_BUILD, "--resume", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    finished = report(out)
    assert len(finished["qat"]["loss_per_epoch"]) == 6
    assert finished["qat"]["resumed_from_epoch"] == saved["epoch"]
    assert finished["qat"]["loss_per_epoch"][: saved["epoch"]] == saved["history"]
    assert finished["artifacts"]["qat_checkpoint"]["path"] == str(checkpoint)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--nproc", "2"], "add --qat-epochs"),
        (["--resume"], "add --qat-epochs"),
        (["--nproc", "2", "--qat-epochs", "1", "--tune-latency"], "--tune-latency"),
    ],
)
def test_distributed_options_without_their_partner_are_refused(
    args, words, tmp_path, capsys, monkeypatch
):
    code, err = run([*CLI_BUILD[:6], *args, "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == errors.BAD_INPUT and words in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
