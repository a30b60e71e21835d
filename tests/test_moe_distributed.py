"""latentmoe.nn.MoE under data parallelism (DDP, and FSDP2 with the attention too): two CPU ranks (gloo) in
spawned processes.

DDP broadcasts rank 0's buffers into every rank at each forward (its default): the per-rank
``load_counts`` must survive that, and ``update_bias(group=...)`` must give every rank the update
of the global load."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_helpers import hf_config
from torch.nn.parallel import DistributedDataParallel as DDP

from latentmoe.nn import MoE

WORLD, STEPS, EVERY, GAMMA = 2, 6, 3, 0.05


def _ranks(store: str, rank: int, use_ddp: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        moe = MoE(hf_config("v3"), aux_loss_alpha=0.01, bias_update_speed=GAMMA)
        with torch.no_grad():
            moe.gate.e_score_correction_bias.zero_()
        model = DDP(moe) if use_ddp else moe
        assert "load_counts" not in dict(moe.named_buffers())
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        mine = torch.zeros_like(moe.load_counts)
        for step in range(STEPS):
            x = torch.randn(2, 9, moe.hidden_size, generator=data)
            y = model(x)
            (y.square().mean() + moe.aux_loss).backward()
            opt.step()
            opt.zero_grad()
            mine += moe.last_load
            if (step + 1) % EVERY:
                continue
            # The counts this rank saw, whatever DDP broadcast in between.
            assert torch.equal(moe.load_counts, mine), (step, moe.load_counts, mine)
            total = mine.clone()
            dist.all_reduce(total)
            before = moe.gate.e_score_correction_bias.clone()
            if step == EVERY - 1:  # an explicit load: reduced on a copy, load_counts left as they are
                handed = mine.clone()
                moe.update_bias(handed, group=dist.group.WORLD)
                assert torch.equal(handed, mine)
                moe.load_counts.zero_()
            else:  # the accumulated counts, then reset
                moe.update_bias(group=dist.group.WORLD)
                assert int(moe.load_counts.abs().sum()) == 0
            load = total.float()
            want = before + GAMMA * torch.sign(load.mean() - load)
            assert torch.equal(moe.gate.e_score_correction_bias, want)
            mine.zero_()
            biases = [torch.empty_like(want) for _ in range(WORLD)]
            dist.all_gather(biases, moe.gate.e_score_correction_bias)
            assert torch.equal(biases[0], biases[1])  # every rank applied the same update
            assert torch.count_nonzero(want) > 0
    finally:
        dist.destroy_process_group()


def _run(tmp_path, use_ddp: bool) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), use_ddp), nprocs=WORLD, join=True)


def _worker(rank: int, store: str, use_ddp: bool) -> None:
    torch.set_num_threads(1)
    _ranks(store, rank, use_ddp)


def test_ddp_keeps_each_ranks_load_counts_and_update_bias_uses_the_global_load(tmp_path):
    _run(tmp_path, use_ddp=True)


def test_update_bias_group_without_ddp(tmp_path):
    # Plain data parallelism by hand (or FSDP, which does not broadcast buffers): the same update.
    _run(tmp_path, use_ddp=False)


def test_ddp_without_shared_experts(tmp_path):
    # n_shared_experts=0 (zero-width shared experts, as HF builds them): every parameter must get a
    # gradient, or DDP's next forward raises. One rank in this process is enough to show it.
    cfg = hf_config("v3")
    cfg.n_shared_experts = 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store1'}", rank=0, world_size=1)
    try:
        moe = MoE(cfg)
        model = DDP(moe)
        for _ in range(3):
            model(torch.randn(2, 5, moe.hidden_size)).square().mean().backward()
        assert all(p.grad is not None for p in moe.parameters())
    finally:
        dist.destroy_process_group()


def _fsdp_model():
    """A 2-layer HF DeepseekV3ForCausalLM (layer 1 routed experts) with latentmoe's attention in
    both layers and latentmoe's MoE in layer 1, the same random weights on every rank."""
    from test_mla_common import hf_model_pair
    from transformers import DeepseekV3ForCausalLM

    cfg, _, model = hf_model_pair(DeepseekV3ForCausalLM, "sdpa", moe=True)
    cfg._experts_implementation = "eager"
    layer = model.model.layers[1]
    moe = MoE(cfg)
    moe.load_state_dict(layer.mlp.state_dict(), strict=True)
    layer.mlp = moe
    return model.train()


def _fsdp_batch():
    return torch.randint(0, 64, (4, 11), generator=torch.Generator().manual_seed(5))


def _fsdp_worker(rank: int, store: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _fsdp_model()
        for layer in model.model.layers:  # the decoder layers, so the modules keep their kernels
            fully_shard(layer)
        fully_shard(model)
        ids = _fsdp_batch()[2 * rank: 2 * rank + 2]  # each rank half of the batch
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        counts = model.model.layers[1].mlp.load_counts.clone()
        torch.save({"loss": loss.detach(), "grads": grads, "counts": counts}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp2_matches_one_process(tmp_path):
    # FSDP2 (fully_shard per decoder layer, gloo, 2 ranks): the averaged gradients equal one
    # process's over the whole batch, and each rank's load_counts counts its own tokens.
    out = str(tmp_path / "res")
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    res = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    model = _fsdp_model()
    ids = _fsdp_batch()
    for r in range(WORLD):
        part = ids[2 * r: 2 * r + 2]
        loss = model(input_ids=part, labels=part, use_cache=False).loss
        (loss / WORLD).backward()
        assert torch.allclose(res[r]["loss"], loss.detach(), rtol=1e-6, atol=0)
        assert int(res[r]["counts"].sum()) == part.numel() * model.config.num_experts_per_tok
    assert set(res[0]["grads"]) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        g = res[0]["grads"][n]
        assert torch.equal(g, res[1]["grads"][n]), n
        err = float((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (n, err)
