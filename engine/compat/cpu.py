"""Run megatron-core 0.16.1 on CPU with gloo.

megatron-core assumes CUDA in these ways; each gets one small, named patch:

1. `torch.cuda.*` calls (current_device, synchronize, RNG state, streams, events) in many modules:
   a CPU shim replaces those functions on `torch.cuda` (they raise without CUDA anyway).
2. Tensors created with a hard-coded `device="cuda"` in a known list of modules: each of those
   modules sees a `torch` proxy whose tensor factories put "cuda" tensors on the CPU.
3. Source that names CUDA in a few functions (`tensor.type() == 'torch.cuda.FloatTensor'` in
   the optimizers, `.cuda()` when tied embeddings span pipeline stages): those functions are
   recompiled from their own source with the CPU spelling.
4. Its distributed optimizer mishandles torch.optim's per-parameter Adam `step` (TE/apex
   FusedAdam keep it per group, so GPU clusters never see this): see
   `_patch_distributed_optimizer_torch_state`.
5. The alltoall MoE dispatcher hands split sizes to `all_to_all_single` as tensors when they are
   not on CUDA: `_patch_split_sizes_to_host`.

Everything here names the megatron-core file and symbol it touches. `self_test()` checks each of
them still exists and still needs the patch, so an upgrade fails loudly instead of silently.
Must not import engine modules other than the standard library, torch and megatron-core.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import textwrap
import types

import torch

_APPLIED = False

# (2) modules that create tensors with device="cuda" (megatron-core 0.16.1), and why we need each.
CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens in every schedule
    "megatron.core.transformer.utils",  # get_default_causal_mask / sliding window masks
    "megatron.core.optimizer.optimizer",  # found_inf, _scale, _dummy_overflow_buf
    "megatron.core.optimizer.clip_grads",  # total norm and overflow buffers
    "megatron.core.optimizer.grad_scaler",  # fp16 loss scale tensors
    "megatron.core.optimizer.distrib_optimizer",  # gather buffers for checkpoint state
    "megatron.core.distributed.param_and_grad_buffer",  # warm-up / padding tensors
    "megatron.core.tensor_parallel.data",  # broadcast_data size exchange
    "megatron.core.rerun_state_machine",  # validation-result reductions
    "megatron.core.utils",  # norm and hash helpers
    "megatron.core.transformer.moe.moe_utils",  # per-layer MoE metric trackers
    "megatron.core.dist_checkpointing.exchange_utils",  # load-time shard exchange buffers
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save-plan verification
)

# (3) functions whose source names CUDA: `tensor.type()` compared with CUDA type names, and
# `.cuda()` calls on tensors. Each is recompiled from its source with these replacements.
_TYPE_NAMES = tuple((f"'torch.cuda.{t}'", f"'torch.{t}'")
                    for t in ("FloatTensor", "HalfTensor", "BFloat16Tensor"))
_TO_CURRENT_DEVICE = ((".cuda()", ".to(torch.cuda.current_device())"),)
SOURCE_REWRITES = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__",
     _TYPE_NAMES),
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer._build_model_and_main_param_groups", _TYPE_NAMES),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__", _TYPE_NAMES),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", _TYPE_NAMES),
    # tied embeddings with pipeline parallelism: the last stage's copy is synced from the first
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer", _TO_CURRENT_DEVICE),
    # context parallelism: the rotary angles of this rank's chunks are selected with an index
    # tensor made in pinned memory and moved by .cuda() (pinned memory needs an accelerator)
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",
     (('device="cpu", pin_memory=True', 'device="cpu"'),
      (".cuda(non_blocking=True)", ".to(torch.cuda.current_device())"))),
    # uneven collectives (the alltoall MoE dispatcher with tensor parallelism): gloo requires
    # equal sizes, so these go through padded equivalents below
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
     (("torch.distributed.all_gather(output_tensor_list, input_, group=group)",
       "_engine_cpu.uneven_all_gather(output_tensor_list, input_, group=group)"),)),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
     (("torch.distributed.reduce_scatter(output, input_tensor_list, group=group)",
       "_engine_cpu.uneven_reduce_scatter(output, input_tensor_list, group=group)"),)),
)


def uneven_all_gather(outputs: list, input_: torch.Tensor, group=None) -> None:
    """all_gather of first-dimension chunks of different sizes: pad to the largest, trim."""
    import torch.distributed as dist

    sizes = [o.shape[0] for o in outputs]
    padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    for out, got, n in zip(outputs, gathered, sizes, strict=True):
        out.copy_(got[:n])


def uneven_reduce_scatter(output: torch.Tensor, inputs: list, group=None) -> None:
    """reduce_scatter of chunks of different sizes: a sum over the whole, then this rank's part."""
    import torch.distributed as dist

    total = torch.cat([t.contiguous() for t in inputs])
    dist.all_reduce(total, group=group)
    output.copy_(total.split([t.shape[0] for t in inputs])[dist.get_rank(group)])

_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "randn",
    "rand",
    "randint",
    "as_tensor",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _TorchOnCPU(types.ModuleType):
    """`torch` as seen by a megatron-core module that hard-codes `device="cuda"`."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args, _f=value, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _f(*args, **kwargs)

            return factory
        return value


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _shim_torch_cuda():
    """(1) torch.cuda functions megatron-core calls unconditionally."""
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_rng_module():
    """megatron/core/tensor_parallel/random.py: its CUDA RNG helpers index
    torch.cuda.default_generators.

    On CPU the "CUDA" generator is the CPU default generator, so the RNG tracker forks it."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_missing_te_gemm():
    """megatron/core/transformer/moe/moe_utils.py: `te_general_gemm` is undefined without TE."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _resolve(module_name: str, qualname: str):
    """(module, owner, attribute name, raw attribute, function) of a dotted name."""
    module = importlib.import_module(module_name)
    owner_name, _, name = qualname.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    raw = inspect.getattr_static(owner, name)
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    return module, owner, name, raw, func


def _check_rewrite(module_name: str, qualname: str, source: str, replacements) -> None:
    if not any(old in source for old, _ in replacements):
        olds = " or ".join(repr(old) for old, _ in replacements)
        raise RuntimeError(f"compat: {module_name}.{qualname} no longer contains {olds}")


def _recompile(module_name: str, qualname: str, replacements) -> None:
    """(3) Recompile `qualname` from its source with `replacements` (at least one must occur).

    The function is compiled inside a scope that defines `__class__`, so zero-argument `super()`
    keeps working in rewritten methods; it keeps its file and line numbers."""
    module, owner, name, raw, func = _resolve(module_name, qualname)
    module._engine_cpu = sys.modules[__name__]  # replacements may call helpers of this module
    lines, first_line = inspect.getsourcelines(func)
    source = textwrap.dedent("".join(lines))
    _check_rewrite(module_name, qualname, source, replacements)
    for old, new in replacements:
        source = source.replace(old, new)
    # Pad so the recompiled code keeps its line numbers: tracebacks and inspect stay truthful.
    wrapper = "\n" * (first_line - 2) + "def _make(__class__):\n" + textwrap.indent(source, "    ")
    wrapper += f"\n    return {name}\n"
    namespace: dict = {}
    exec(compile(wrapper, inspect.getsourcefile(func), "exec"), module.__dict__, namespace)
    new = namespace["_make"](owner if owner is not module else None)
    new.__qualname__ = func.__qualname__
    if isinstance(raw, staticmethod):
        new = staticmethod(new)
    elif isinstance(raw, classmethod):
        new = classmethod(new)
    setattr(owner, name, new)
    if owner is module:  # module-level functions are also imported by name elsewhere
        for other in list(sys.modules.values()):
            if getattr(other, "__name__", "").startswith("megatron.") and \
                    getattr(other, name, None) is func:
                setattr(other, name, new)


def _patch_split_sizes_to_host():
    """megatron/core/transformer/moe/moe_utils.py `maybe_move_tensor_to_cpu` (imported by name
    into token_dispatcher.py) converts the alltoall dispatcher's split sizes to host numpy only
    when the tensor `is_cuda`; on CPU they stay tensors and `all_to_all_single` rejects them."""

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    for name in ("megatron.core.transformer.moe.moe_utils",
                 "megatron.core.transformer.moe.token_dispatcher"):
        importlib.import_module(name).maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_distributed_optimizer_torch_state():
    """megatron/core/optimizer/distrib_optimizer.py, DistributedOptimizer with torch.optim (no
    TE/apex FusedAdam, i.e. always on CPU) mishandles Adam's per-parameter `step`:

    - `sharded_state_dict(is_loading=True)` calls `state_dict()`, which asserts on `step` of a
      state that only exists after a first step: we give a never-stepped optimizer its states
      first, with megatron's own remedy (a step on zero gradients) run at lr = weight_decay = 0
      so no parameter moves.
    - `load_state_dict` gives every parameter's state the *same* `step` tensor, then overwrites
      it in place with the template's (dummy) step while copying the parameter states; torch's
      Adam also increments it in place once per parameter. After a resume the bias correction
      is wrong and the run silently diverges from an uninterrupted one: we set each state's
      `step` to the saved step (kept in the param groups), as its own tensor.
    - `_set_main_param_and_optimizer_states` copies every state key, `step` included, from a
      dict the fully_reshardable loader builds without `step` (KeyError): `step` is skipped.
    """
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    original_sharded, original_load = cls.sharded_state_dict, cls.load_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kw):
        if is_loading and not self.optimizer.state:
            groups = self.optimizer.param_groups
            saved = [(g["lr"], g["weight_decay"]) for g in groups]
            for g in groups:
                g["lr"], g["weight_decay"] = 0.0, 0.0
            self._init_optimizer_states_with_dummy_values()
            for g, (lr, wd) in zip(groups, saved, strict=True):
                g["lr"], g["weight_decay"] = lr, wd
        return original_sharded(self, model_sharded_state_dict or {}, is_loading, *args, **kw)

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:  # the saved step, one tensor per parameter
            step = float(steps.pop())
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)

    original_set = cls._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        # Copies every key of the parameter's torch.optim state from `tensors`, but the
        # fully_reshardable loader leaves `step` out of `tensors`; load_state_dict sets it.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original_set(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls.sharded_state_dict, cls.load_state_dict = sharded_state_dict, load_state_dict
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


BATCH_P2P_ON_GLOO = False
"""TransformerConfig.batch_p2p_comm on gloo (engine.models.build): interleaved pipeline
parallelism with batched p2p swaps messages on gloo and gives wrong numbers without an error
(measured with megatron-core 0.16.1); tests/dist/worker.py sets it to show the trap."""


def is_applied() -> bool:
    return _APPLIED


def apply() -> bool:
    """Apply every CPU patch once; returns True when patches are in effect."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    _shim_torch_cuda()
    proxy = _TorchOnCPU()
    for module_name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        module.torch = proxy
    _patch_rng_module()
    _patch_missing_te_gemm()
    for module_name, qualname, replacements in SOURCE_REWRITES:
        _recompile(module_name, qualname, replacements)
    _patch_distributed_optimizer_torch_state()
    _patch_split_sizes_to_host()
    _APPLIED = True
    return True


def self_test() -> None:
    """Fail loudly if a megatron-core internal this layer relies on has moved or changed.

    Reads the unpatched sources (inspect reads files), so it works before or after apply()."""
    for module_name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        if "cuda" not in source or not hasattr(module, "torch"):
            raise RuntimeError(f"compat: {module_name} no longer needs the CPU torch proxy")
    for module_name, qualname, replacements in SOURCE_REWRITES:
        source = inspect.getsource(_resolve(module_name, qualname)[4])  # the file's text
        _check_rewrite(module_name, qualname, source, replacements)
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if 's["step"] = step' not in inspect.getsource(distrib):  # the module file, patched or not
        raise RuntimeError(
            "compat: DistributedOptimizer.load_state_dict no longer shares one "
            "`step` tensor; drop _patch_distributed_optimizer_torch_state"
        )
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if "tensor.is_cuda" not in inspect.getsource(moe_utils):
        raise RuntimeError("compat: moe_utils.maybe_move_tensor_to_cpu no longer tests is_cuda; "
                           "drop _patch_split_sizes_to_host")
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker"):
        if not hasattr(random, name):
            raise RuntimeError(f"compat: megatron.core.tensor_parallel.random.{name} is gone")
