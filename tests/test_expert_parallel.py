"""Expert parallelism building blocks on 2 CPU processes (gloo): the all-to-all, token dispatch/combine, weight
sharding, gathering for export, expert-shard checkpoints, and the checks of the user's setup.

The distributed checks run in one spawned pair of processes (start-up dominates the cost); each rank compares
its results with a single-process reference computed from the same seed, and any failure is sent back.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minillm.errors import UserError
from minillm.parallel.expert_parallel import validate_expert_parallel

WORLD = 2
E, D, INTER, T, K = 4, 8, 8, 10, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_all_to_all(rank: int) -> None:
    from minillm.parallel.expert_parallel import all_to_all

    # Uneven splits, with an empty one: rank 0 sends 3 rows to itself and 0 to rank 1; rank 1 sends 2 and 4.
    send = {0: [3, 0], 1: [2, 4]}[rank]
    recv = [send_r[rank] for send_r in ([3, 0], [2, 4])]
    x = (torch.arange(sum(send) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank).requires_grad_(True)
    y = all_to_all(x, recv, send)
    if rank == 0:
        expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(4.0).view(2, 2) + 100])
    else:
        expected = torch.arange(4.0, 12.0).view(4, 2) + 100
    torch.testing.assert_close(y, expected)
    # Backward is the reverse exchange: each rank gets back the gradient of the rows it sent.
    (y * (rank + 1)).sum().backward()
    expected_grad = (
        torch.tensor([1.0] * 3 * 2).view(3, 2)
        if rank == 0
        else torch.cat([torch.full((2, 2), 1.0), torch.full((4, 2), 2.0)])
    )
    torch.testing.assert_close(x.grad, expected_grad)


def _reference_experts(seed: int):
    from minillm.models.layers.moe import RoutedExperts

    torch.manual_seed(seed)
    return RoutedExperts(E, D, INTER)  # the default backend: grouped_mm where it applies, else padded bmm


def _rank_batch(rank: int, starve: tuple[int, ...]):
    """Rank-specific tokens and routing; the experts in `starve` get no token from any rank."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g)
    logits[:, list(starve)] = -1e9
    weight, idx = logits.softmax(-1).topk(K, dim=-1)  # (T, K)
    return x, idx, weight


def _moe_out(experts, x, idx, weight, ep=None):
    from minillm.models.layers.moe import combine, dispatch

    plan = dispatch(idx, E)
    x_sorted = x[plan.token_idx]  # (S, D)
    out = experts.compute(x_sorted, plan.counts) if ep is None else ep.compute(experts, x_sorted, plan.counts)
    return combine(out, plan, weight)


def _check_dispatch_combine(rank: int, ep, starve: tuple[int, ...]) -> None:
    """EP forward and gradients equal a single-process run over both ranks' tokens with all experts."""
    from minillm.parallel.expert_parallel import shard_experts

    full = _reference_experts(0)
    ref_out, ref_xgrad = [], []
    for r in range(WORLD):
        x, idx, w = _rank_batch(r, starve)
        x.requires_grad_(True)
        out = _moe_out(full, x, idx, w)
        (out.pow(2).sum() * (r + 1)).backward()
        ref_out.append(out.detach())
        ref_xgrad.append(x.grad)

    model = torch.nn.Module()
    model.experts = _reference_experts(0)
    assert shard_experts(model, ep) == 1
    experts = model.experts
    assert experts.gate_up_proj.shape == (E // WORLD, 2 * INTER, D)
    assert experts.gate_up_proj.allreduce is False and experts.gate_up_proj.group_name == "ep_size_2"
    x, idx, w = _rank_batch(rank, starve)
    x.requires_grad_(True)
    out = _moe_out(experts, x, idx, w, ep)
    (out.pow(2).sum() * (rank + 1)).backward()
    torch.testing.assert_close(out, ref_out[rank], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_xgrad[rank], rtol=1e-5, atol=1e-6)
    # This rank's experts got the gradient from both ranks' tokens: the reference gradient of its slice.
    sl = slice(rank * E // WORLD, (rank + 1) * E // WORLD)
    torch.testing.assert_close(experts.gate_up_proj.grad, full.gate_up_proj.grad[sl], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts.down_proj.grad, full.down_proj.grad[sl], rtol=1e-5, atol=1e-6)
    for expert in starve:
        if sl.start <= expert < sl.stop:
            assert experts.down_proj.grad[expert - sl.start].abs().sum() == 0


def _check_gather_and_shards(rank: int, ep, tmp_dir: str) -> None:
    from minillm.parallel.expert_parallel import (
        expert_shard_path,
        gather_full_state_dict,
        load_expert_shards,
        save_expert_shards,
        shard_experts,
    )

    model = torch.nn.Module()
    model.experts = _reference_experts(3)
    model.dense = torch.nn.Linear(D, D)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    shard_experts(model, ep)
    gathered = gather_full_state_dict(model, ep)
    assert set(gathered) == set(full)
    for key in full:
        torch.testing.assert_close(gathered[key], full[key], rtol=0, atol=0)

    path = save_expert_shards(model, tmp_dir, ep)
    assert path == expert_shard_path(tmp_dir, ep) and path.is_file()
    saved = model.experts.down_proj.detach().clone()
    with torch.no_grad():
        model.experts.down_proj.zero_()
    dist.barrier()
    load_expert_shards(model, tmp_dir, ep)
    torch.testing.assert_close(model.experts.down_proj.detach(), saved, rtol=0, atol=0)


def _worker(rank: int, port: int, tmp_dir: str, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        from minillm.parallel.expert_parallel import init_expert_parallel

        ep = init_expert_parallel(2, E)
        assert (ep.size, ep.rank, ep.num_local_experts) == (2, rank, 2)
        assert ep.local_slice == slice(2 * rank, 2 * rank + 2)
        from deepspeed.utils import groups

        assert list(groups._get_expert_data_parallel_group_ranks("ep_size_2")) == [rank]
        _check_all_to_all(rank)
        _check_dispatch_combine(rank, ep, starve=())
        _check_dispatch_combine(rank, ep, starve=(1,))  # expert 1 (on rank 0) gets no tokens
        _check_dispatch_combine(rank, ep, starve=(0, 1))  # rank 0's experts get nothing: it receives no rows
        _check_gather_and_shards(rank, ep, tmp_dir)
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_primitives_on_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path), errors), nprocs=WORLD, join=True, start_method="spawn"
    )
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "experts_ep00-of-02.safetensors",
        "experts_ep01-of-02.safetensors",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_experts": None, "model_name": "mini_llama3"},
            "needs a mixture-of-experts model, but mini_llama3 is dense",
        ),
        ({"world_size": 3}, "must divide the number of processes (3)"),
        ({"num_experts": 6, "world_size": 4, "ep_size": 4}, "must divide the number of routed experts"),
        ({"uses_deepspeed": False, "zero_stage": None}, "runs on DeepSpeed ZeRO-1/2"),
        ({"zero_stage": 3}, "not supported with ZeRO-3"),
    ],
)
def test_validate_expert_parallel_refuses_bad_setups(kwargs, message):
    args = {
        "ep_size": 2,
        "world_size": 2,
        "num_experts": 8,
        "model_name": "mini_deepseekv3",
        "uses_deepspeed": True,
        "zero_stage": 2,
        **kwargs,
    }
    with pytest.raises(UserError) as err:
        validate_expert_parallel(**args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_expert_parallel_accepts_good_setups():
    validate_expert_parallel(
        2, world_size=4, num_experts=8, model_name="m", uses_deepspeed=True, zero_stage=2
    )
    # EP = 1 is plain data parallelism: nothing to check, whatever the launch.
    validate_expert_parallel(
        1, world_size=3, num_experts=None, model_name="m", uses_deepspeed=False, zero_stage=3
    )


def test_zero3_leaf_marks_each_moe_block_of_both_models():
    from deepspeed.utils import z3_leaf_module

    from minillm.models.registry import build_model
    from minillm.parallel.expert_parallel import set_zero3_leaf_moe_blocks

    for name, block_class in (
        ("mini_deepseekv3", "MiniDeepSeekV3MoE"),
        ("mini_qwen3_next", "MiniQwen3NextSparseMoeBlock"),
    ):
        model = build_model(name, "tiny", num_hidden_layers=2, vocab_size=256)
        classes = set_zero3_leaf_moe_blocks(model)
        assert [c.__name__ for c in classes] == [block_class]
        blocks = [m for m in model.modules() if type(m).__name__ == block_class]
        assert blocks and all(z3_leaf_module(m) for m in blocks)
        # Nothing else becomes a leaf: the rest of the model is still partitioned module by module.
        assert not z3_leaf_module(model.model.layers[0])
