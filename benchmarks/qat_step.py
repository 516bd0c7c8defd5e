"""QAT training-step time: fp32 vs QAT in one process, and QAT in 1 vs N data-parallel ranks.

fp32 and QAT steps of the same model, batch and optimizer are timed side by side in
interleaved blocks (deploy.engines.timing), so the QAT/fp32 ratio
is paired; issue 15's goal is a QAT
step of at most 1.3x an fp32 step. Then the same global batch is trained by N gloo ranks (each
its shard, DDP, observers synced) and rank 0's step times are compared with one process's:
the CPU threads are shared out (one process: all of them; N ranks: threads / N each), so on a
CPU the ratio shows the cost of DDP's extra communication, not a speed-up from more hardware.

    python -m benchmarks.qat_step --model digits_resnet --batch 64 --ranks 2
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.data import digits_split
from qat_deploy.deploy.engines.timing import TimingConfig, paired_ratio, summarize, time_interleaved
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.quant.sync import ranks_synced
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.training.distributed import World, data_parallel, shard
from qat_deploy.models import load_model

TIMING = TimingConfig(warmup=5, block=5, min_runs=40, min_time_s=3.0, rewarm=1)


def _batch(spec, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits, resized to the model's input when it is not 16x16 (labels 0-9)."""
    d = digits_split()
    x = torch.from_numpy(d.x_train[:size])
    shape = spec.input_shape[1:]
    if tuple(x.shape[1:]) != tuple(shape):
        x = torch.nn.functional.interpolate(x, size=shape[1:]).expand(-1, shape[0], -1, -1)
    return x.contiguous(), torch.from_numpy(d.y_train[:size]).long()


def _models(name: str, batch: tuple[torch.Tensor, torch.Tensor], world: World):
    torch.manual_seed(0)
    model, _ = load_model(name, pretrained=True)
    prepared = prepare(model, "onnxruntime", batch[0][:1], observer="ema")
    with ranks_synced():
        calibrate(prepared, [shard(batch[0], world)], progress=False)
    for fq in prepared.quantizers():
        fq.enable_observer(True).enable_fake_quant(True)
    return model.train(), prepared.train()


def _step(model, optimizer, x, y):
    def run() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def single_process(name: str, size: int) -> dict:
    batch = _batch(load_model(name)[1], size)
    fp32, qat = _models(name, batch, World())
    fp32 = copy.deepcopy(fp32)
    steps = {
        "fp32": _step(fp32, torch.optim.SGD(fp32.parameters(), 1e-4), *batch),
        "qat": _step(qat, torch.optim.SGD(qat.parameters(), 1e-4), *batch),
    }
    times = time_interleaved(steps, TIMING)
    return {
        "fp32_ms": summarize(times["fp32"]).to_dict(),
        "qat_ms": summarize(times["qat"]).to_dict(),
        "qat_over_fp32_paired": paired_ratio(times["qat"], times["fp32"], TIMING.block),
    }


def _rank(rank: int, ranks: int, name: str, size: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/init", rank=rank, world_size=ranks
    )
    torch.set_num_threads(max(1, torch.get_num_threads() // ranks))
    world = World(rank, ranks)
    batch = _batch(load_model(name)[1], size)
    _, qat = _models(name, batch, world)
    trained = data_parallel(qat)
    optimizer = torch.optim.SGD(qat.parameters(), 1e-4)
    with ranks_synced():
        times = time_interleaved({"qat": _step(trained, optimizer, *shard(batch, world))}, TIMING)
    if rank == 0:
        Path(folder, "rank0.json").write_text(json.dumps(times["qat"]))
    dist.destroy_process_group()


def data_parallel_ranks(name: str, size: int, ranks: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(ranks, name, size, folder), nprocs=ranks, join=True)
        return json.loads(Path(folder, "rank0.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_resnet")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/qat_step_results.json"))
    args = parser.parse_args()
    one = single_process(args.model, args.batch)
    ranked = summarize(data_parallel_ranks(args.model, args.batch, args.ranks)).to_dict()
    result = {
        "model": args.model,
        "global_batch": args.batch,
        "environment": environment(torch.get_num_threads()),
        **one,
        f"qat_{args.ranks}_ranks_ms": ranked,
        f"qat_{args.ranks}_ranks_over_1_process_p50": ranked["p50"] / one["qat_ms"]["p50"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
