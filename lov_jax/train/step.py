"""Train state and the sharded train step (gradient accumulation inside the step).

Loss normalisation: CE is summed over every trained token of every micro-batch
on every device, then divided once by the global count of trained tokens. So
each token weighs the same however the step is split. LLaVA-NeXT instead takes
a per-micro-batch, per-device mean and averages those means (HF Trainer with
DeepSpeed), which over-weights tokens of short samples. With packing, rows
hold unequal numbers of trained tokens, so the global token mean is the one
that stays invariant to the packing and the mesh.

Batch layout seen by the step: the batch contract (`lov_jax.batch`) with a leading
micro-batch axis A (`optim.grad_accum`): tokens int32[A, B, L], pixels
uint8[A, B, N, S, S, 3], ...; rows placed by `sharding.batch_sharding`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lov_jax import batch as batch_contract
from lov_jax import sharding
from lov_jax.config import ModelConfig
from lov_jax.models import ring
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.models.loss import chunked_cross_entropy, gather_trained_positions
from lov_jax.train import optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32[] optimizer steps applied (non-finite steps are not counted)
    params: Any  # nested params, param_dtype (fp32 master weights)
    opt_state: Any  # optimizer state over the trainable flat dict only


def loss_terms(module: LlavaOnevision, batch, chunk: int, z_loss: float, loss_tokens: int = 0):
    """(sum of masked CE, number of trained tokens) for one micro-batch [B, L].

    `loss_tokens > 0`: the vocab projection runs only on the first that many trained
    positions of each row (the loop guarantees no row has more). On a mesh with a context
    axis the rows are first padded and reordered for it (`ring.shard_sequence`): both
    sums are over tokens, so they are the unsharded ones.
    """
    batch = ring.shard_sequence(batch)  # unchanged without a context axis
    hidden = module(
        batch["tokens"], batch["positions"], batch["segment_ids"],
        batch.get("pixels"), batch.get("vis_idx"), batch.get("vis_w"), output="hidden",
        loss_mask=batch["loss_mask"],  # LLaVA-Mini keeps responses out of its pre-fusion
    )  # fmt: skip
    targets, mask = batch["targets"], batch["loss_mask"]
    if loss_tokens:
        hidden, targets, mask = gather_trained_positions(hidden, targets, mask, loss_tokens)
    shards = 1 if loss_tokens else ring.context_size()  # the loss stays sequence-sharded
    return chunked_cross_entropy(
        hidden, module.head_kernel(), targets, mask, chunk_size=chunk, z_loss=z_loss,
        shards=shards,
    )  # fmt: skip


class Trainer:
    """Builds the optimizer, shardings and the jitted step for one model + stage config.

    `lora` (lov_jax.lora.adapters.Lora): params carry adapters beside their kernels, the
    groups holding adapters train only them, frozen leaves are held in its base_dtype and
    the model runs through `lora.apply` (adapter dropout keyed by the step).
    `context` (ring.ContextParallel, `sharding.context_from_config`): attention over the
    mesh's context axis and the rows' layout for it (default ring, zigzag).
    """

    def __init__(
        self, cfg: ModelConfig, optim, mesh: Mesh, total_steps: int, loss_chunk: int,
        loss_tokens_per_row: int = 0, lora=None, context: ring.ContextParallel | None = None,
    ):  # fmt: skip
        self.cfg, self.optim, self.mesh, self.lora = cfg, optim, mesh, lora
        self.context = sharding.context_from_config({}) if context is None else context
        self.model = LlavaOnevision(cfg)
        self.loss_chunk = loss_chunk
        self.loss_tokens = loss_tokens_per_row
        # ShapeDtypeStructs wrapped in LogicallyPartitioned
        boxed, self.labels = self._abstract_boxed()
        self.tx, self.schedules = optimizer.make_optimizer(optim, total_steps, self.labels)
        trainable_boxed, _ = optimizer.split_params(boxed, self.labels)
        abstract_opt = jax.eval_shape(self.tx.init, trainable_boxed)
        self.state_sharding = TrainState(
            step=NamedSharding(mesh, PartitionSpec()),
            params=sharding.params_sharding(boxed, mesh),
            opt_state=sharding.params_sharding(abstract_opt, mesh),
        )
        self.batch_sharding = sharding.batch_sharding(mesh, micro_batched=True)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=(0,),
        )

    def _abstract_boxed(self):
        """(boxed abstract params, optimizer labels), adapters included."""
        from lov_jax.lora.adapters import params_and_labels

        return params_and_labels(self.cfg, self.optim, self.lora)

    # ---- state -------------------------------------------------------------------

    def init_state(self, params) -> TrainState:
        """Place params on the mesh and build a fresh optimizer state.

        The step donates its state: device arrays passed here are consumed.
        """
        if self.lora is not None:  # fresh adapters unless the params hold them
            params = self.lora.prepare(params, self.labels)
        with self._context():
            return fresh_state(params, self.labels, self.tx, self.state_sharding)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        params = _unbox(self._abstract_boxed()[0])
        trainable, _ = optimizer.split_params(params, self.labels)
        state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(self.tx.init, trainable),
        )
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            state,
            self.state_sharding,
        )

    def checkpoint_view(self, state: TrainState) -> TrainState:
        """What a checkpoint stores: the state itself, or with LoRA its params cut to the
        trained leaves (adapters + fully trained modules; the frozen base is init_from's)."""
        if self.lora is None:
            return state
        trainable, _ = optimizer.split_params(state.params, self.labels)
        return state.replace(params=traverse_util.unflatten_dict(trainable))

    def with_frozen(self, trained, base):
        """Trained leaves (a restored `checkpoint_view`) + the frozen leaves of `base`
        params (host) -> full params in the state's dtypes and shardings."""
        return with_frozen_leaves(trained, base, self.labels, self.lora, self.state_sharding)

    def abstract_batch(self, rows: int, length: int, crops: int, micro_batches: int) -> dict:
        """ShapeDtypeStructs of a step's batch [A, B, ...] (`lov_jax.batch`), sharded."""
        return batch_contract.abstract_batch(
            rows, length, crops, self.cfg, micro_batches=micro_batches,
            sharding=self.batch_sharding,
        )  # fmt: skip

    # ---- step --------------------------------------------------------------------

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step over a host batch with leading micro-batch axis A."""
        with self._context():
            return self._step(state, batch)

    def lower(self, state: TrainState, batch: dict) -> jax.stages.Lowered:
        """The jitted step lowered for `state` / `batch` (arrays or ShapeDtypeStructs, e.g.
        `abstract_state()` / `abstract_batch()`): what the planner and benchmarks compile.
        """
        with self._context():
            return self._step.lower(state, batch)

    @contextlib.contextmanager
    def _context(self):
        with sharding.activation_rules(), jax.set_mesh(self.mesh), ring.layout(self.context):
            yield

    def _train_step(self, state: TrainState, batch: dict):
        trainable, frozen = optimizer.split_params(state.params, self.labels)

        def micro_loss(trainable_params, micro, rng):
            params = optimizer.merge_params(trainable_params, frozen)
            args = ({"params": params}, micro, self.loss_chunk, self.optim.z_loss,
                    self.loss_tokens)  # fmt: skip
            if self.lora is None:
                return self.model.apply(*args, method=loss_terms)
            return self.lora.apply(self.model, *args, rngs={"dropout": rng}, method=loss_terms)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, xs):
            grad_sum, loss_sum, count = carry
            micro, rng = xs
            (loss, n), grads = grad_fn(trainable, micro, rng)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        # one dropout key per micro-batch (only LoRA's adapter dropout draws from it)
        seed = 0 if self.lora is None else self.lora.config.seed
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        rngs = jax.random.split(step_key, jax.tree.leaves(batch)[0].shape[0])
        (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, (batch, rngs))

        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = self.tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step changes nothing (params, moments, step): it is skipped.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_params = optimizer.merge_params(keep(new_trainable, trainable), frozen)
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=new_params,
            opt_state=keep(new_opt, state.opt_state),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "trained_tokens": count,
            "finite": finite,
            **{f"lr/{g}": s(state.step) for g, s in self.schedules.items()},
        }
        return new_state, metrics


def with_frozen_leaves(trained, base, labels, lora, shardings: TrainState):
    """Trained leaves + the leaves of `base` (host params) that `labels` freezes -> full
    params, the frozen ones in LoRA's base dtype (`lora` None: as stored), placed by
    `shardings.params`. The one merge for Trainer and DPOTrainer resumes."""
    flat = traverse_util.flatten_dict(base)
    frozen = {k: v for k, v in flat.items() if labels.get(k) == optimizer.FROZEN}
    params = optimizer.merge_params(traverse_util.flatten_dict(trained), frozen)
    if lora is not None:
        params = lora.cast_frozen(params, labels, optimizer.FROZEN)
    return jax.device_put(params, shardings.params)


def fresh_state(params, labels, tx: optax.GradientTransformation, shardings: TrainState):
    """Step 0: `params` placed by `shardings.params`, `tx`'s state over the trainable subset
    (`labels`). Call under the trainer's mesh context."""
    params = jax.device_put(params, shardings.params)
    trainable, _ = optimizer.split_params(params, labels)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def stack_micro_batches(batches: list[dict]) -> dict:
    """[A] host batches of [B, ...] -> one batch of [A, B, ...] (numpy)."""
    import numpy as np

    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)
