"""Two processes on gloo, each with half of every global batch, compute the gradients that one
process computes on the whole batch; only rank 0 writes the log and the checkpoints.

The comparison needs a forward whose result does not depend on random draws or on how the batch
is split: EViT fine-tuning the host (train="model"), no dropout. DynamicViT would not do: its
Gumbel noise is drawn per process for that process's part of the batch, so a sample's noise (and
its keep decisions) differs between one process and two, and so would the gradients.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_support import EVIT, patched_model, quiet_config, random_dataset

from tokensieve.train import cross_entropy, fit, read_log

WORLD = 2
GLOBAL_BATCH = 8


def _config(directory: str):
    # 2 steps: the second step's gradients also depend on the first update being the same everywhere.
    # No clipping: it would rescale a wrongly scaled average back to the same norm and hide it.
    return quiet_config(train="model", steps=2, batch_size=GLOBAL_BATCH, grad_clip_norm=None,
                        checkpoint_dir=os.path.join(directory, "ckpt"),
                        log_path=os.path.join(directory, "log.jsonl"), distill_weight=0.5)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _rank_main(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    try:
        # Each rank builds its own host with a different seed: fit starts all from rank 0's weights.
        model = patched_model(EVIT, seed=rank)
        fit(model, random_dataset(32), cross_entropy, _config(directory))
        torch.save(_gradients(model), os.path.join(directory, f"grads-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_gradients(tmp_path):
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    model = patched_model(EVIT, seed=0)
    fit(model, random_dataset(32), cross_entropy, _config(str(single_dir)))
    expected = _gradients(model)

    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    mp.spawn(_rank_main, args=(str(ddp_dir),), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        gradients = torch.load(ddp_dir / f"grads-{rank}.pt")
        assert gradients.keys() == expected.keys()
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")
    single_log, ddp_log = read_log(single_dir / "log.jsonl"), read_log(ddp_dir / "log.jsonl")
    assert [line["step"] for line in ddp_log] == [1, 2]  # one writer: no line twice
    for single, ddp in zip(single_log, ddp_log, strict=True):  # logged losses are global-batch means
        for key in ("loss", "loss_task", "loss_distill", "kept_rate", "grad_norm"):
            assert abs(single[key] - ddp[key]) < 1e-5, key
    assert sorted(p.name for p in (ddp_dir / "ckpt").iterdir()) == ["latest", "step-00000002.safetensors"]
