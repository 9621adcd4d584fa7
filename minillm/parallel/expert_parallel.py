"""Expert parallelism (EP) on DeepSpeed: each rank keeps num_experts / EP routed experts; tokens travel by all-to-all.

How one MoE layer runs with EP = 2 on ranks {0, 1} (experts 0..E/2-1 on rank 0, the rest on rank 1):

    router (data parallel, every rank, its own tokens)
      -> local dispatch: sort the (token, k) slots by global expert id  (`layers.moe.dispatch`)
      -> all-to-all #1: the rows for experts of rank j go to rank j; counts first, then the rows  (`dispatch`)
      -> regroup the received rows by local expert, run the same grouped matmuls on the local experts
      -> all-to-all #2: results go back to the rank that owns the token  (`combine`)
      -> local combine: weight, unsort, sum the K slots  (`layers.moe.combine`)

Notable choices:
- Process groups are DeepSpeed's own (`deepspeed.utils.groups._create_expert_and_data_parallel`): the expert
  parallel group (consecutive ranks, the all-to-all) and the expert-data-parallel group (ranks holding the same
  experts). Expert parameters carry DeepSpeed's marks (`allreduce = False`, `group_name = "ep_size_<EP>"`), and the
  optimizer gets DeepSpeed's MoE parameter groups (`split_params_into_different_moe_groups_for_optimizer`), so
  ZeRO-1/2 partitions and reduces expert gradients only inside the expert-data-parallel group, broadcasts expert
  weights only inside it at start-up, and sums the gradient norm over all experts.
- DeepSpeed switches that machinery on only when the model contains a `deepspeed.moe.layer.MoE` module (the
  engine checks `isinstance(module, MoE)` before it builds the ZeRO optimizer). Our experts are fused HF-named
  tensors, not DeepSpeed's per-expert `MoE` layer, so `attach_deepspeed_moe_marker` adds one parameter-free
  subclass of `MoE` to the model: it tells the engine "this model has expert parameters" and nothing else
  (`MoE.__init__`, which would build DeepSpeed's own gate and experts, is never run).
- The all-to-all is an autograd function whose backward is the reverse all-to-all (split sizes swapped), with
  variable split sizes (routing is uneven; an expert may get no tokens). Split sizes need one host sync per layer.
- Checkpoints: DeepSpeed writes the dense weights (from data-parallel rank 0) and every rank's ZeRO partition
  (expert partitions included); the expert weights themselves are written by `save_expert_shards` (one
  safetensors file per expert-parallel rank) and put back by `load_expert_shards`, because DeepSpeed's per-expert
  checkpoint files assume its own `deepspeed_moe.experts.deepspeed_experts.<i>` module layout.
- Export gathers the expert slices of all ranks (`gather_full_state_dict`) into the ordinary unsharded layout, so
  the exported HF checkpoint loads with EP = 1.
- ZeRO-3 is refused with EP: DeepSpeed 0.19 rejects its native MoE groups under stage 3
  ("Native DeepSpeed MoE is not supported with ZeRO Stage 3"). Without EP, `set_zero3_leaf_moe_blocks` makes each
  MoE block one ZeRO-3 unit, so an expert that gets no tokens on a rank cannot desynchronise the parameter gathers.

Shape legend: S token-slots on this rank (T*K), M rows received from all ranks, E experts, El = E / EP local
experts, D hidden size.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minillm.errors import UserError
from minillm.models.layers.moe import RoutedExperts


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of size `ep_size` (also each expert parameter's `group_name`)."""
    return f"ep_size_{ep_size}"


# ----------------------------------------------------------------------------------------------------------------
# Checks of the user's setup (one clear line each)


def validate_expert_parallel(
    ep_size: int,
    *,
    world_size: int,
    num_experts: int | None,
    model_name: str,
    uses_deepspeed: bool,
    zero_stage: int | None,
) -> None:
    """Raise UserError when `expert_parallel_size` cannot run with this model and launch.

    `num_experts` is None for a dense model; `zero_stage` is the DeepSpeed ZeRO stage (None without DeepSpeed).
    Checks run from the model to the launch, so each problem can be shown with a single process.
    """
    if ep_size < 1:
        raise UserError(f"expert_parallel_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return
    if not num_experts:
        raise UserError(
            f"expert_parallel_size={ep_size} needs a mixture-of-experts model, but {model_name} is dense "
            "(use mini_deepseekv3 or mini_qwen3_next, or set expert_parallel_size: 1)"
        )
    if num_experts % ep_size != 0:
        raise UserError(
            f"expert_parallel_size={ep_size} must divide the number of routed experts of {model_name} "
            f"({num_experts})"
        )
    if not uses_deepspeed:
        raise UserError(
            f"expert_parallel_size={ep_size} runs on DeepSpeed ZeRO-1/2: launch with "
            "`accelerate launch --config_file accelerate_configs/deepspeed_zero2_ep.yaml ...`"
        )
    if zero_stage == 3:
        raise UserError(
            f"expert_parallel_size={ep_size} is not supported with ZeRO-3 (DeepSpeed rejects expert-parallel "
            "MoE groups under stage 3); use accelerate_configs/deepspeed_zero2_ep.yaml"
        )
    if world_size % ep_size != 0:
        raise UserError(
            f"expert_parallel_size={ep_size} must divide the number of processes ({world_size}); "
            "set num_processes in the accelerate config to a multiple of it"
        )


def routed_expert_count(model_config) -> int | None:
    """Routed experts per MoE layer of a model config (mini_deepseekv3: `n_routed_experts`, mini_qwen3_next:
    `num_experts`); None for a dense model."""
    for attr in ("n_routed_experts", "num_experts"):
        value = getattr(model_config, attr, None)
        if value:
            return int(value)
    return None


def launch_from_env() -> tuple[int, bool, int | None]:
    """(processes, DeepSpeed?, ZeRO stage) of this launch, read from what `accelerate launch` puts in the environment,
    so a bad setup is refused before the accelerator (and DeepSpeed) start."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    uses_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    stage = None
    if uses_deepspeed:
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and Path(config_file).is_file():
            try:
                stage = json.loads(Path(config_file).read_text(encoding="utf-8"))["zero_optimization"][
                    "stage"
                ]
            except (ValueError, KeyError, TypeError):
                stage = None  # unreadable here: DeepSpeed itself will report it
        elif os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            stage = os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
        stage = int(stage) if stage not in (None, "auto") else None
    return world, uses_deepspeed, stage


def check_expert_parallel_launch(
    ep_size: int,
    model_config,
    model_name: str,
    accelerator=None,
    launch: tuple[int, bool, int | None] | None = None,
) -> None:
    """`validate_expert_parallel` for a launch: the Accelerate state when given (authoritative), else `launch`
    (processes, DeepSpeed?, ZeRO stage; e.g. from an accelerate config file before spawning), else the environment
    of `accelerate launch` (`launch_from_env`)."""
    if accelerator is not None:
        plugin = accelerator.state.deepspeed_plugin
        world, uses_deepspeed = accelerator.num_processes, plugin is not None
        zero_stage = plugin.zero_stage if plugin is not None else None
    else:
        world, uses_deepspeed, zero_stage = launch if launch is not None else launch_from_env()
    validate_expert_parallel(
        ep_size,
        world_size=world,
        num_experts=routed_expert_count(model_config),
        model_name=model_name,
        uses_deepspeed=uses_deepspeed,
        zero_stage=zero_stage,
    )


# ----------------------------------------------------------------------------------------------------------------
# All-to-all with variable split sizes, differentiable


class CommTimer:
    """Wall time spent in expert-parallel all-to-alls (forward and backward), for the benchmark.

    Off by default (timing costs a device sync per call on CUDA).
    """

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0


ALL_TO_ALL_TIMER = CommTimer()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_to_all_raw(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Rows [sum(input_splits[:j]), +input_splits[j]) of x go to rank j; rank i's rows land in chunk i."""
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    timing = ALL_TO_ALL_TIMER.enabled
    if timing:
        _sync(x.device)
        start = time.perf_counter()
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits, group=group
    )
    if timing:
        _sync(x.device)
        ALL_TO_ALL_TIMER.seconds += time.perf_counter() - start
        ALL_TO_ALL_TIMER.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single as an autograd op: the gradient of a row goes back to the rank it came from."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all_raw(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # The reverse exchange: what we received we now send back, and vice versa.
        return _all_to_all_raw(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Differentiable all-to-all of the rows of x (N, ...) with per-rank split sizes -> (sum(output_splits), ...)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


# ----------------------------------------------------------------------------------------------------------------
# This rank's share of the experts, and the token exchange


@dataclass
class DispatchHandle:
    """What `combine` needs to send the expert outputs back where their tokens came from."""

    order: torch.Tensor  # (M,) received row -> position in local-expert order
    input_splits: list[int]  # rows this rank sent to each rank
    output_splits: list[int]  # rows this rank received from each rank


@dataclass
class ExpertParallel:
    """This rank's place in expert parallelism: rank `rank` of an EP group of `size` holds experts
    [rank * El, (rank + 1) * El) of `num_experts` (El = num_experts // size)."""

    size: int
    rank: int
    num_experts: int
    group: dist.ProcessGroup | None
    data_parallel_group: dist.ProcessGroup | None  # ranks holding the same experts

    @property
    def name(self) -> str:
        return group_name(self.size)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts)

    def dispatch(
        self, x_sorted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send each row to the rank that owns its expert.

        x_sorted (S, D) rows sorted by global expert id, counts (E,) rows per expert
        -> rows for this rank's experts (M, D) sorted by local expert, their counts (El,), and a handle for `combine`.
        """
        send_counts = counts.view(self.size, self.num_local_experts)  # (EP, El): row j goes to rank j
        ones = [1] * self.size
        recv_counts = _all_to_all_raw(send_counts, ones, ones, self.group)  # (EP, El): row i came from rank i
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync
        input_splits, output_splits = splits[0], splits[1]
        x_recv = all_to_all(x_sorted, output_splits, input_splits, self.group)  # (M, D) source-major
        # Received rows are grouped by source rank, then by local expert; the grouped matmul needs them grouped by
        # local expert only. A stable sort keeps, within an expert, source-rank order then token order.
        local_expert = torch.arange(self.num_local_experts, device=counts.device).repeat(
            self.size
        )  # (EP*El,)
        row_expert = torch.repeat_interleave(
            local_expert, recv_counts.reshape(-1), output_size=x_recv.shape[0]
        )
        order = torch.sort(row_expert, stable=True).indices  # (M,)
        handle = DispatchHandle(order=order, input_splits=input_splits, output_splits=output_splits)
        return x_recv[order], recv_counts.sum(0), handle

    def combine(self, y_local: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Inverse of `dispatch`: y_local (M, D) in local-expert order -> (S, D) in this rank's sorted-slot order."""
        inverse = torch.empty_like(handle.order)
        inverse[handle.order] = torch.arange(handle.order.numel(), device=handle.order.device)
        y_recv = y_local[inverse]  # (M, D) back in source-major order
        return all_to_all(y_recv, handle.input_splits, handle.output_splits, self.group)  # (S, D)

    def compute(self, experts: RoutedExperts, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert-parallel drop-in for `experts.compute`: x_sorted (S, D) sorted by global expert, counts (E,)
        -> (S, D). Runs this rank's experts (the same grouped-matmul path) on the rows all ranks sent them."""
        x_local, local_counts, handle = self.dispatch(x_sorted, counts)  # (M, D), (El,)
        return self.combine(experts.compute(x_local, local_counts), handle)  # (S, D)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All experts' values of a tensor sliced on dim 0: (El, ...) on every rank -> (E, ...)."""
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)


def _ensure_deepspeed_comm() -> None:
    """DeepSpeed's groups use `deepspeed.comm`; wrap an already initialised torch.distributed if needed."""
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        if not dist.is_initialized():
            raise RuntimeError("expert parallelism needs torch.distributed to be initialised first")
        ds_dist.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def init_expert_parallel(ep_size: int, num_experts: int) -> ExpertParallel:
    """Create (or reuse) DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep_size`.

    With world size W: EP groups are consecutive ranks [0..EP-1], [EP..2EP-1], ...; expert-data-parallel groups
    are strided (ranks r, r+EP, r+2EP, ...) and hold the same experts.
    """
    from deepspeed.utils import groups

    _ensure_deepspeed_comm()
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ExpertParallel(
        size=ep_size,
        rank=groups._get_expert_parallel_rank(name),
        num_experts=num_experts,
        group=groups._get_expert_parallel_group(name),
        data_parallel_group=groups._get_expert_data_parallel_group(name),
    )


# ----------------------------------------------------------------------------------------------------------------
# Sharding a model's routed experts, and undoing it


def routed_experts(model: nn.Module) -> list[tuple[str, RoutedExperts]]:
    """The (qualified name, module) of every routed-experts module of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]


def is_expert_param(param: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed treats as an expert parameter (reduced in the expert-data-parallel group)."""
    return getattr(param, "allreduce", True) is False


def shard_experts(model: nn.Module, ep: ExpertParallel) -> int:
    """Keep only this rank's slice of every routed-experts module (fused weights cut on dim 0), in place.

    Every rank must hold the same full initial weights before the call (same seed or loaded checkpoint), so EP
    starts from exactly the weights a data-parallel run would. Returns the number of sharded modules.
    """
    modules = routed_experts(model)
    for name, module in modules:
        if module.num_experts != ep.num_experts:
            raise ValueError(f"{name} has {module.num_experts} experts, expected {ep.num_experts}")
        for pname, param in list(module.named_parameters(recurse=False)):
            local = nn.Parameter(
                param.detach()[ep.local_slice].clone(), requires_grad=param.requires_grad
            )  # (El, ...)
            local.allreduce = False  # DeepSpeed: not reduced over the whole data-parallel group
            local.group_name = ep.name  # ... but over this expert-data-parallel group
            setattr(module, pname, local)
        module.expert_parallel = ep
    return len(modules)


def enable_expert_parallel(model: nn.Module, ep_size: int) -> ExpertParallel:
    """Turn a freshly built (or loaded) MoE model into its expert-parallel form for DeepSpeed, in place: create the
    groups, keep this rank's experts, route tokens by all-to-all, mark the model for the engine.

    Call on every rank, with identical full weights, before building the optimizer and `accelerator.prepare`.
    """
    modules = routed_experts(model)
    if not modules:
        raise UserError(
            f"expert_parallel_size={ep_size} needs a mixture-of-experts model; this one has no experts"
        )
    ep = init_expert_parallel(ep_size, modules[0][1].num_experts)
    shard_experts(model, ep)
    attach_deepspeed_moe_marker(model, ep)
    return ep


def model_expert_parallel(model: nn.Module) -> ExpertParallel | None:
    """The `ExpertParallel` a model was sharded with (None when its experts are whole)."""
    for _, module in routed_experts(model):
        return getattr(module, "expert_parallel", None)
    return None


def gather_full_state_dict(model: nn.Module, ep: ExpertParallel) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to its full (E, ...) shape, on CPU.

    A collective: every rank of the EP group must call it. The result is the ordinary unsharded layout that an
    EP = 1 model (and `save_pretrained`) expects.
    """
    expert_names = {
        f"{name}.{pname}"
        for name, module in routed_experts(model)
        for pname, _ in module.named_parameters(recurse=False)
    }
    state = {}
    for key, value in model.state_dict().items():
        if key in expert_names:
            value = ep.gather(value)
        state[key] = value.detach().cpu()
    return state


def expert_shard_path(directory: str | Path, ep: ExpertParallel) -> Path:
    return Path(directory) / f"experts_ep{ep.rank:02d}-of-{ep.size:02d}.safetensors"


def save_expert_shards(model: nn.Module, directory: str | Path, ep: ExpertParallel) -> Path | None:
    """Write this rank's expert weights to `directory` (one file per EP rank; only the first rank of each
    expert-data-parallel group writes). Returns the path written, or None on ranks that do not write."""
    from safetensors.torch import save_file

    if dist.get_rank(group=ep.data_parallel_group) != 0:
        return None
    tensors = {
        f"{name}.{pname}": p.detach().cpu().contiguous()
        for name, module in routed_experts(model)
        for pname, p in module.named_parameters(recurse=False)
    }
    path = expert_shard_path(directory, ep)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"ep_size": str(ep.size), "ep_rank": str(ep.rank)})
    os.replace(tmp, path)
    return path


def load_expert_shards(model: nn.Module, directory: str | Path, ep: ExpertParallel) -> None:
    """Copy this rank's expert weights back from `save_expert_shards`' file (in place: ZeRO's flat buffers keep
    their storage)."""
    from safetensors import safe_open

    path = expert_shard_path(directory, ep)
    if not path.is_file():
        raise UserError(
            f"{path}: missing expert shard (was this checkpoint saved with expert_parallel_size={ep.size}?)"
        )
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name, module in routed_experts(model):
            for pname, p in module.named_parameters(recurse=False):
                p.copy_(f.get_tensor(f"{name}.{pname}").to(p.device, p.dtype))


# ----------------------------------------------------------------------------------------------------------------
# What DeepSpeed needs to see


def attach_deepspeed_moe_marker(model: nn.Module, ep: ExpertParallel) -> nn.Module:
    """Add a parameter-free `deepspeed.moe.layer.MoE` subclass to the model so the DeepSpeed engine turns on its
    expert-parallel machinery (see the module docstring). Call before `accelerator.prepare`."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine this model has expert parameters in group `expert_group_name`."""

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own gate and experts
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name(ep_size)
            # DeepSpeed's checkpoint loader reads `num_local_experts` per-expert files of its own layout for each
            # MoE module; our expert weights are restored by `load_expert_shards` instead, so it reads none.
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ValueError(
                    "use_data_before_expert_parallel_ is not supported by minillm's expert parallelism"
                )

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedExpertParallelMarker only marks the model; it is never called")

    marker = DeepSpeedExpertParallelMarker(ep.num_experts, ep.size)
    model.add_module("deepspeed_moe_marker", marker)
    return marker


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Split optimizer parameter groups into dense groups and DeepSpeed MoE groups (`moe: True`, named by the
    expert group), as DeepSpeed's ZeRO optimizer requires for a model with expert parameters."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group_{i}")} for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


def set_zero3_leaf_moe_blocks(model: nn.Module) -> list[type]:
    """Make each MoE block (the parent of a routed-experts module) a ZeRO-3 leaf module: its parameters are
    gathered together when the block runs, whichever experts received tokens. Returns the leaf classes."""
    from deepspeed.utils import set_z3_leaf_modules

    names = {name for name, _ in routed_experts(model)}
    parents = {name.rpartition(".")[0] for name in names}
    classes = sorted(
        {type(m) for name, m in model.named_modules() if name in parents}, key=lambda c: c.__name__
    )
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes
