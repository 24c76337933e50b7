"""Under torch.distributed every rank takes the same skip decision, even when local metrics differ."""
import json
import os

import torch
import torch.distributed as dist

from mindiesd_compile import CacheConfig, StepCache
from conftest import spawn_ranks
from test_partition_cache import LinearBlocks

# Rank 0's timesteps barely move (its probe residual changes ~0.1 % a step: it would skip);
# rank 1's halve every step (its residual changes ~50 %: it must compute).
TIMESTEPS = {0: [1000.0 - s for s in range(6)], 1: [1000.0 / 2 ** s for s in range(6)]}


def _worker(rank, world, store_path, out_dir, agree):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LinearBlocks().eval()
        cache = StepCache(CacheConfig(policy="dynamic", threshold=0.05, max_skips=10))
        if not agree:  # what would happen without the all-reduce
            cache.agree = lambda value: value
        fn = torch.compile(model, backend="mindiesd", options={"target": "eager", "cache": cache}, fullgraph=True)
        decisions = []
        with torch.no_grad():
            for t in TIMESTEPS[rank]:
                fn(torch.ones(1, 3, 8), torch.tensor([t]))
                decisions.append(len([x for x in cache.runners[0].last_call if x.startswith("blocks.")]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(decisions, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, agree):
    spawn_ranks(_worker, (2, str(tmp_path / f"store{agree}"), str(tmp_path), agree), 2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_agree_on_skips(tmp_path):
    alone = _run(tmp_path, agree=False)
    assert alone[0] != alone[1], "the test needs ranks whose local decisions differ"
    together = _run(tmp_path, agree=True)
    assert together[0] == together[1] == [4] * 6  # the max metric wins: nobody skips
