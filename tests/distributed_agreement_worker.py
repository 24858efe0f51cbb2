"""One process of the checkpoint-agreement test: ``python distributed_agreement_worker.py RANK WORLD
INIT_FILE OUT``.

Both ranks hold a strategy state made of the same clock and metrics; one plugin's state differs on
rank 1. ``continual.py``'s check must raise on both ranks (no rank left waiting), naming that plugin
only; with equal states it passes.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    path = Path(__file__).resolve().parents[1] / "scripts" / "continual.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("_continual", path)
    continual = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(continual)

    torch.manual_seed(0)  # the same RNG state on both ranks
    def state(scores):
        return {"clock": {"train_iterations": 7}, "evaluator": {"accuracy_matrix": None, "forgetting": []},
                "plugins": [{"class": "ReplayPlugin", "state": {"x": torch.ones(3)}},
                            {"class": "RWalkPlugin", "state": {"scores": scores}}]}

    continual._check_processes_agree(state(torch.zeros(2)))  # equal everywhere: no error
    try:
        continual._check_processes_agree(state(torch.full((2,), float(rank))))
        result = "no error"
    except ValueError as err:
        result = str(err)
    torch.save(result, out)
    dist.barrier()  # neither rank tears the group down while the other is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
