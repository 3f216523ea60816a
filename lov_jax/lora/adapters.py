"""LoRA adapters on the model's dense layers (PEFT's math, docs/reference_video_post.md 5.2).

    y = x W + b + scaling * (dropout(x) A) B,   scaling = alpha / r   (alpha / sqrt(r): rsLoRA)

Layout: an adapted `DenseGeneral` (lov_jax/models/layers.py) with kernel
W: float[*in, *out] gets two leaves beside its kernel in the same params tree,
    lora_a: float[*in, r]    (PEFT lora_A.weight [r, in] transposed, `in` flattened)
    lora_b: float[r, *out]   (PEFT lora_B.weight [out, r] transposed)
with the kernel's leading `layers` axis when the layer is scanned. `in` / `out` are the
kernel's HF split (the key table's Transform: o_proj has two input axes [N, Dh]). Logical
axes are the kernel's plus `lora_rank` (replicated), so adapters shard like their base.

Why the adapter runs as its own two matmuls instead of a merged W + s A B: merging in the
step materialises a second copy of every adapted kernel and, in the backward, the full
float[*in, *out] gradient of each one (for a 7B LLM as large as the weights themselves),
plus a T*in*out weight-gradient matmul per layer. The unmerged path adds
3 * T * r * (in + out) FLOPs and only [T, r] activations; the frozen kernels get no
gradient at all. The merge is only for export (`merge`) and inference after import.

The adapter term enters through a Flax method interceptor (`Lora.apply`): model code stays
unaware of LoRA and any caller (the Trainer, the DPO step) gets it by applying through
`Lora.apply`. Dropout is PEFT's (on the adapter's input only) and runs only when a
`dropout` rng is given (training).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lov_jax.config import ModelConfig

A, B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"
# LLaVA's find_all_linear_names on a Llama / Qwen-2 LLM (reference 5.1): the LLM's
# attention and MLP projections.
LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Canonical HF name prefix (lov_jax/convert/hf_keys.py) -> the module name in the loaded HF
# class (transformers >= 4.52: Llava / LlavaNext / LlavaOnevision ForConditionalGeneration),
# what PEFT's adapter keys are built from (reference 5.4).
HF_MODULE_PREFIXES = (
    ("vision.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("text.", "model.language_model."),
    ("lm_head.", "lm_head."),
    ("image_newline", "model.image_newline"),
)
BASE_DTYPES = ("float32", "bfloat16")
FIELDS = ("enabled", "r", "alpha", "dropout", "targets", "use_rslora", "base_dtype", "seed")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` block of a train config (defaults: LLaVA-1.5's finetune_lora.sh).

    targets: a tuple of module names, matched as suffixes of the LLM's module paths (what
    LLaVA's find_all_linear_names means: never the tower or the projector), or one string,
    a regex full-matched against our module paths ('language_model/layers/mlp/up_proj',
    'vision_tower/encoder/layers/self_attn/q_proj', ...).
    base_dtype: the dtype frozen (non-trained) params are held in.
    """

    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] | str = LLM_PROJECTIONS
    use_rslora: bool = False
    base_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r={self.r!r}: a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r} not in {BASE_DTYPES}")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"lora.targets={self.targets!r}: bad regex ({e})") from None
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"lora.targets={self.targets!r}: module names or one regex")

    @property
    def scaling(self) -> float:
        """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def from_config(block: Mapping | None) -> LoraConfig | None:
    """A train config's `lora` block (ConfigDict or dict) -> LoraConfig, None when absent
    or `enabled` is false. An unknown key is an error naming it."""
    if block is None:
        return None
    block = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    unknown = sorted(set(block) - set(FIELDS))
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; known: {list(FIELDS)}")
    if not block.pop("enabled", True):
        return None
    targets = block.get("targets", LLM_PROJECTIONS)
    if isinstance(targets, list | tuple):
        block["targets"] = tuple(targets)
    return LoraConfig(**block)


def from_stage(config, cfg: ModelConfig) -> Lora | None:
    """A stage config's `lora` block (train, DPO) bound to the model, or None."""
    lcfg = from_config(config.get("lora"))
    return None if lcfg is None else Lora(lcfg, cfg)


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted dense layer: our module path, its kernel's HF split and HF name."""

    path: str  # e.g. "language_model/layers/self_attn/o_proj" (the kernel's parent)
    n_in: int  # leading kernel axes that are the input (o_proj: 2, [N, Dh])
    stacked: bool  # a leading `layers` axis (scanned)
    hf_name: str  # HF module name template, "{layer}" for a stacked layer


def dense_modules(cfg: ModelConfig) -> dict[str, Target]:
    """{module path: Target} for every dense layer of `cfg` (the families' key tables:
    the same rows convert the kernels)."""
    from lov_jax.convert import hf_keys
    from lov_jax.convert.key_tables import Transform

    n_in = {Transform.LINEAR: 1, Transform.HEADS_QKV: 1, Transform.HEADS_O: 2}
    head = hf_keys.llm_leaves(cfg)[0]  # lm_head: a bare kernel, not a DenseGeneral
    out: dict[str, Target] = {}
    for name, path, layer, tf in hf_keys.hf_entries(cfg, "hf"):
        if tf not in n_in or not path.endswith("/kernel") or path == head:
            continue
        module = path[: -len("/kernel")]
        hf = hf_module_name(hf_keys.canonical_name(name)[: -len(".weight")])
        if layer is not None:
            hf = re.sub(rf"\.{layer}\.", ".{layer}.", hf, count=1)
        out.setdefault(module, Target(module, n_in[tf], layer is not None, hf))
    return out


def hf_module_name(canonical: str) -> str:
    for prefix, module in HF_MODULE_PREFIXES:
        if canonical.startswith(prefix):
            return module + canonical[len(prefix) :]
    raise ValueError(f"{canonical}: no HF module prefix")


def select_targets(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, Target]:
    """The dense layers `lcfg.targets` names; none matched is an error."""
    modules = dense_modules(cfg)
    if isinstance(lcfg.targets, str):
        pattern = re.compile(lcfg.targets)
        chosen = {p: t for p, t in modules.items() if pattern.fullmatch(p)}
    else:
        chosen = {
            p: t
            for p, t in modules.items()
            if p.startswith("language_model/") and p.rsplit("/", 1)[-1] in lcfg.targets
        }
        missing = set(lcfg.targets) - {p.rsplit("/", 1)[-1] for p in chosen}
        if missing:
            raise ValueError(f"lora.targets {sorted(missing)}: no such LLM module")
    if not chosen:
        raise ValueError(f"lora.targets={lcfg.targets!r} matches no dense layer; have {modules}")
    return chosen


def _path(module: str, leaf: str) -> tuple[str, ...]:
    return (*module.split("/"), leaf)


def is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in (A, B)


class Lora:
    """A LoRA setup bound to one model config: which layers, their adapter shapes, and
    the transforms every consumer (Trainer, DPO step, export) applies to a params tree."""

    def __init__(self, lcfg: LoraConfig, cfg: ModelConfig):
        self.config, self.cfg = lcfg, cfg
        self.targets = select_targets(cfg, lcfg)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    # ---- params trees ----------------------------------------------------------------

    def adapter_shapes(self, kernel_shape: tuple[int, ...], target: Target):
        lead = 1 if target.stacked else 0
        ins, outs = kernel_shape[lead : lead + target.n_in], kernel_shape[lead + target.n_in :]
        layers = kernel_shape[:lead]
        return (*layers, *ins, self.config.r), (*layers, self.config.r, *outs)

    def abstract(self, boxed: Mapping) -> dict:
        """Boxed abstract params (`abstract_params(cfg)`) -> the same with the adapters."""
        flat = traverse_util.flatten_dict(boxed)
        for module, t in self.targets.items():
            kernel = flat[_path(module, "kernel")]
            names, lead = kernel.names, 1 if t.stacked else 0
            a_shape, b_shape = self.adapter_shapes(kernel.value.shape, t)
            a_names = (*names[: lead + t.n_in], RANK_AXIS)
            b_names = (*names[:lead], RANK_AXIS, *names[lead + t.n_in :])
            dtype = jnp.float32
            flat[_path(module, A)] = nn.LogicallyPartitioned(
                jax.ShapeDtypeStruct(a_shape, dtype), a_names
            )
            flat[_path(module, B)] = nn.LogicallyPartitioned(
                jax.ShapeDtypeStruct(b_shape, dtype), b_names
            )
        return traverse_util.unflatten_dict(flat)

    def init(self, params: Mapping, key: jax.Array | None = None) -> dict:
        """Params with fresh adapters where absent (numpy fp32): PEFT's default init,
        A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch kaiming_uniform_(a=sqrt(5)) on [r, in]),
        B = 0, so the adapted model starts equal to the base."""
        key = jax.random.key(self.config.seed) if key is None else key
        flat = traverse_util.flatten_dict(params)
        for i, (module, t) in enumerate(sorted(self.targets.items())):
            if _path(module, A) in flat:
                continue
            a_shape, b_shape = self.adapter_shapes(tuple(flat[_path(module, "kernel")].shape), t)
            fan_in = math.prod(a_shape[(1 if t.stacked else 0) : -1])
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
            flat[_path(module, A)] = np.asarray(a)
            flat[_path(module, B)] = np.zeros(b_shape, np.float32)
        return traverse_util.unflatten_dict(flat)

    def labels(self, labels: Mapping[tuple[str, ...], str], frozen: str) -> dict:
        """Optimizer labels (`train.optimizer.param_labels` over params incl. adapters) ->
        a group that holds adapters trains only its adapters; other groups unchanged
        (LLaVA: LoRA on the LLM, the projector trained fully)."""
        idle = sorted("/".join(p[:-1]) for p, g in labels.items() if is_adapter(p) and g == frozen)
        if idle:
            raise ValueError(
                f"lora.targets {idle[:3]}... sit in a group optim.trainable does not train; "
                "add the group (vision / llm) or narrow lora.targets"
            )
        with_adapters = {g for p, g in labels.items() if is_adapter(p)}
        return {
            p: (frozen if g in with_adapters and not is_adapter(p) else g)
            for p, g in labels.items()
        }

    def cast_frozen(self, tree: Mapping, labels: Mapping[tuple[str, ...], str], frozen: str):
        """Frozen leaves in `base_dtype` (arrays, ShapeDtypeStructs, or boxed)."""
        dtype = jnp.dtype(self.config.base_dtype)

        def cast(x):
            if isinstance(x, nn.LogicallyPartitioned):
                return x.replace_boxed(cast(x.value))
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
            return x.astype(dtype)

        flat = traverse_util.flatten_dict(tree)
        return traverse_util.unflatten_dict(
            {p: (cast(x) if labels[p] == frozen else x) for p, x in flat.items()}
        )

    def prepare(self, params: Mapping, labels: Mapping[tuple[str, ...], str]) -> dict:
        """Base params (host) -> a step's starting params: fresh adapters where absent,
        frozen leaves in base_dtype (labels from `params_and_labels`)."""
        from lov_jax.train.optimizer import FROZEN

        return self.cast_frozen(self.init(params), labels, FROZEN)

    def split(self, params: Mapping) -> tuple[dict, dict]:
        """(base params, adapters) as nested trees."""
        flat = traverse_util.flatten_dict(params)
        base = {p: x for p, x in flat.items() if not is_adapter(p)}
        adapters = {p: x for p, x in flat.items() if is_adapter(p)}
        return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)

    def delta(self, a: np.ndarray, b: np.ndarray, target: Target) -> np.ndarray:
        """scaling * A B in the kernel's layout (float32, numpy)."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = self.config.r
        if target.stacked:
            n = a.shape[0]
            d = np.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1))
            shape = (a.shape[0], *a.shape[1:-1], *b.shape[2:])
        else:
            d = a.reshape(-1, r) @ b.reshape(r, -1)
            shape = (*a.shape[:-1], *b.shape[1:])
        return np.float32(self.scaling) * d.reshape(shape)

    def merge(self, params: Mapping) -> dict:
        """Base params with every adapter folded in: W + scaling * A B (numpy, the
        kernel's dtype); no adapter leaves left (what orbax-to-hf / generate read)."""
        base, _ = self.split(params)
        flat = traverse_util.flatten_dict(params)
        out = traverse_util.flatten_dict(base)
        for module, t in self.targets.items():
            kernel = np.asarray(flat[_path(module, "kernel")])
            d = self.delta(flat[_path(module, A)], flat[_path(module, B)], t)
            out[_path(module, "kernel")] = (kernel.astype(np.float32) + d).astype(kernel.dtype)
        return traverse_util.unflatten_dict(out)

    # ---- the forward -------------------------------------------------------------------

    def apply(self, module: nn.Module, variables: Mapping, *args, rngs=None, **kwargs):
        """`module.apply(variables, *args, **kwargs)` with the adapter term on every
        adapted dense layer; `rngs={'dropout': key}` turns on the adapter dropout."""
        with nn.intercept_methods(self._intercept):
            return module.apply(variables, *args, rngs=rngs, **kwargs)

    def _intercept(self, next_fun, args, kwargs, context):
        from lov_jax.models.layers import DenseGeneral

        m = context.module
        y = next_fun(*args, **kwargs)
        if not (isinstance(m, DenseGeneral) and context.method_name == "__call__"):
            return y
        if not m.has_variable("params", A):
            return y
        x = args[0] if args else kwargs["x"]
        a = m.get_variable("params", A).astype(m.dtype)  # [*in, r] (one layer)
        b = m.get_variable("params", B).astype(m.dtype)  # [r, *out]
        h = x.astype(m.dtype)
        rate = self.config.dropout
        if rate > 0 and m.has_rng("dropout"):
            keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - rate, h.shape)
            h = jnp.where(keep, h / (1.0 - rate), 0).astype(m.dtype)
        n_in = m.n_in
        contract = tuple(range(h.ndim - n_in, h.ndim))
        xa = jax.lax.dot_general(h, a, ((contract, tuple(range(n_in))), ((), ())))
        delta = jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))
        return y + (self.scaling * delta).astype(y.dtype)


def params_and_labels(cfg: ModelConfig, optim, lora: Lora | None = None):
    """(boxed abstract params, optimizer labels) of a step that trains `optim.trainable`,
    through `lora`'s adapters when given: the seam every train step builds on (the
    Trainer, the DPO step). With LoRA the params carry the adapters, groups holding
    adapters train only them, and frozen leaves are in `base_dtype`; a step then runs
    the model through `lora.apply` and starts from `lora.prepare(params, labels)`."""
    from lov_jax.models.llava_onevision import abstract_params
    from lov_jax.train import optimizer

    boxed = abstract_params(cfg)
    if lora is None:
        return boxed, optimizer.param_labels(nn.meta.unbox(boxed), optim)
    boxed = lora.abstract(boxed)
    labels = lora.labels(optimizer.param_labels(nn.meta.unbox(boxed), optim), optimizer.FROZEN)
    return lora.cast_frozen(boxed, labels, optimizer.FROZEN), labels
