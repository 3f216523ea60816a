"""DPO: preference records -> packed pair rows, TRL's losses, the policy/reference step.

Records are LLaVA-NeXT's DPO json layout (docs/reference.md: REFERENCE_VIDEO_POST 4.4),
read by the same sources and loader as SFT data:

    {"id", "image" | "video" (optional), "prompt", "chosen", "rejected",
     "ref_chosen_logps", "ref_rejected_logps" (optional: precomputed, TRL's names)}

Each pair becomes one `Sample` of two parts (`Sample.parts`): prompt+chosen, then
prompt+rejected, side by side in one row as two segments, so the packer never separates
them and segment 2p-1 / 2p of a row is pair p's chosen / rejected. Side by side rather
than a shared prompt prefix computed once: a prefix attended by two continuations needs a
tree mask that the attention kernels (segment ids, causal) do not express; the images are
encoded once per segment, as LLaVA-NeXT's `concatenated_inputs` encodes them twice.

Which targets count (`dpo.completion`): "trl" = every token after the prompt (upstream
TRL's completion_mask: the answer, the template's end-of-turn and trailing newline);
"loss_mask" = the chat template's mask (`data.loss_mask`; "llava_next" keeps LLaVA's
structural prompt tokens, which cancel in the loss but shift `logps/*`).

Losses over x = (pi_c - ref_c) - (pi_r - ref_r), logps summed over those targets:
    sigmoid  -(1 - eps) logsigmoid(beta x) - eps logsigmoid(-beta x)   (eps = 0: TRL's
             `sigmoid`; eps > 0: LLaVA-NeXT's vendored TRL, conservative DPO)
    robust   (-(1 - eps) logsigmoid(beta x) + eps logsigmoid(-beta x)) / (1 - 2 eps)
    hinge    relu(1 - beta x)
    ipo      (x_avg - 1 / (2 beta))^2, x_avg from per-token averaged log-ratios
The loss is the mean over every pair of the step (micro-batches and devices together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.sample import BadSample, Reason, Sample
from lov_jax import sharding
from lov_jax.config import ModelConfig
from lov_jax.models.llava_onevision import LlavaOnevision
from lov_jax.models.loss import gather_trained_positions
from lov_jax.train import optimizer
from lov_jax.train.step import TrainState, fresh_state, with_frozen_leaves

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
REFERENCES = ("step", "precomputed")
COMPLETIONS = ("trl", "loss_mask")
REF_KEY = "ref_logps"  # batch key: a part's precomputed reference logp at its first token
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")  # record fields (TRL's columns)


@dataclasses.dataclass(frozen=True)
class DPOOptions:
    """The objective. beta: KL weight; label_smoothing: eps of sigmoid / robust; reference:
    "step" (frozen reference forward in every step) | "precomputed" (record fields);
    max_pairs_per_row: P, pairs a packed row may hold (static segment count 2P);
    sft_weight: LLaVA-NeXT's `gamma` (CE of the policy on the chosen targets; 0 in its
    scripts)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "step"
    completion: str = "trl"
    max_pairs_per_row: int = 4
    sft_weight: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type {self.loss_type!r} not in {LOSS_TYPES}")
        if self.reference not in REFERENCES:
            raise ValueError(f"dpo.reference {self.reference!r} not in {REFERENCES}")
        if self.completion not in COMPLETIONS:
            raise ValueError(f"dpo.completion {self.completion!r} not in {COMPLETIONS}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must lie in [0, 0.5): {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"dpo.label_smoothing has no meaning for loss_type {self.loss_type!r}")
        if self.max_pairs_per_row < 1:
            raise ValueError(f"dpo.max_pairs_per_row must be >= 1, got {self.max_pairs_per_row}")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")

    @classmethod
    def from_config(cls, section) -> DPOOptions:
        """From a config's `dpo` group (an unknown key is an error)."""
        d = dict(section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown dpo config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---- records -> pair samples ------------------------------------------------------------


def pair_conversations(record: dict) -> tuple[dict, dict]:
    """A DPO record -> (chosen, rejected) single-turn LLaVA records.

    As LLaVA-NeXT's `DPODataset._get_item`: with one image or a video the prompt becomes
    "<image>\\n" + prompt without placeholders; with several images the prompt keeps its
    own placeholders (one per image).
    """
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise BadSample(Reason.MALFORMED_RECORD, f"DPO record needs a string {key!r}")
    prompt = record["prompt"]
    images = record.get("image")
    several = isinstance(images, list | tuple) and len(images) > 1
    if (images is not None or record.get("video") is not None) and not several:
        prompt = "<image>\n" + prompt.replace("<image>", "").strip()
    base = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    base.pop("conversations", None)

    def conv(answer):
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        return {**base, "conversations": turns}

    return conv(record["chosen"]), conv(record["rejected"])


def completion_mask(sample: Sample) -> np.ndarray:
    """TRL's completion targets: every target from the first trained one to the end."""
    trained = np.flatnonzero(sample.loss_mask > 0)
    mask = np.zeros_like(sample.loss_mask)
    if len(trained):
        mask[trained[0] : len(mask) - 1] = 1.0  # the last target is padding
    return mask


def process_pair(record: dict, process, options: DPOOptions) -> Sample:
    """DPO record -> one two-part Sample; `process` is the SFT record -> Sample function
    (`lov_jax.train.run.make_process_fn`), so templates, media and budgets are the same.
    With `completion="trl"` its chat mask must be "assistant" (`post.train.pair_process`):
    the targets then run from the answer's first to the part's end."""
    chosen_rec, rejected_rec = pair_conversations(record)
    parts = [process(chosen_rec), process(rejected_rec)]
    if options.completion == "trl":
        parts = [dataclasses.replace(p, loss_mask=completion_mask(p)) for p in parts]
    for name, p in zip(("chosen", "rejected"), parts, strict=True):
        if not p.loss_mask.any():
            raise BadSample(Reason.MALFORMED_RECORD, f"{name} has no trained token")
    extras = {}
    if options.reference == "precomputed":
        missing = [k for k in REF_FIELDS if not isinstance(record.get(k), int | float)]
        if missing:
            raise BadSample(Reason.MALFORMED_RECORD,
                            f"dpo.reference='precomputed' needs number fields {missing} "
                            "(`lov-jax dpo --precompute-ref` writes them)")  # fmt: skip
        ref = np.zeros(sum(p.num_tokens for p in parts), np.float32)
        ref[0], ref[parts[0].num_tokens] = record[REF_FIELDS[0]], record[REF_FIELDS[1]]
        extras[REF_KEY] = ref
    return Sample(
        id=parts[0].id,
        tokens=np.concatenate([p.tokens for p in parts]),
        targets=np.concatenate([p.targets for p in parts]),
        loss_mask=np.concatenate([p.loss_mask for p in parts]),
        crops=np.concatenate([p.crops for p in parts]),
        items=[it for p in parts for it in p.items],
        source=parts[0].source,
        parts=(parts[0].num_tokens, parts[1].num_tokens),
        extras=extras,
    )


def check_row_budgets(batch: dict, max_pairs: int, loss_tokens: int = 0) -> None:
    """Host check: no row holds more than `max_pairs` pairs (2 segments each) or, with
    `loss_tokens > 0`, more trained targets than that (never cut silently)."""
    most = int(np.asarray(batch["segment_ids"]).max(initial=0))
    if most > 2 * max_pairs:
        raise ValueError(f"a row holds {most // 2} pairs > dpo.max_pairs_per_row={max_pairs}; "
                         "raise it")  # fmt: skip
    trained = int(np.asarray(batch["loss_mask"] > 0).sum(-1).max(initial=0))
    if loss_tokens and trained > loss_tokens:
        raise ValueError(f"a row has {trained} trained targets > train.loss_tokens_per_row="
                         f"{loss_tokens}; raise it (0: every position)")  # fmt: skip


# ---- log-probs and the loss -------------------------------------------------------------


def token_logps(hidden, head_kernel, targets, chunk: int = 1024):
    """float32[B, K] log p(targets) from final-norm hidden float[B, K, H] (chunks of K
    positions, each rematerialised, so [B, K, V] logits never exist at once)."""
    b, k, h = hidden.shape
    c = min(chunk, k)
    pad = (-k) % c
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (k + pad) // c
    hs = hidden.reshape(b, n, c, h).swapaxes(0, 1)
    ts = targets.reshape(b, n, c).swapaxes(0, 1)
    kernel = head_kernel.astype(hidden.dtype)

    @jax.checkpoint
    def one(xs):
        h_c, t_c = xs
        logits = jnp.einsum("BTH,HV->BTV", h_c, kernel, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one, (hs, ts))  # [n, B, c]
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :k]


def segment_sums(values, segment_ids, num_segments: int):
    """float[B, K] summed per segment id 1..S -> float32[B, S]."""
    onehot = segment_ids[..., None] == jnp.arange(1, num_segments + 1)
    return jnp.einsum("BK,BKS->BS", values.astype(jnp.float32), onehot.astype(jnp.float32))


def pair_logps(module: LlavaOnevision, batch, max_pairs: int, chunk: int, loss_tokens: int = 0):
    """Per pair of each row: (logps float32[B, P, 2] summed over the trained targets,
    token counts float32[B, P, 2]); [..., 0] chosen, [..., 1] rejected.

    `loss_tokens > 0`: only the first that many trained positions of a row go through the
    vocab projection (`models.loss.gather_trained_positions`; the host checks the count).
    """
    hidden = module(
        batch["tokens"], batch["positions"], batch["segment_ids"],
        batch.get("pixels"), batch.get("vis_idx"), batch.get("vis_w"), output="hidden",
    )  # fmt: skip
    targets, mask = batch["targets"], batch["loss_mask"]
    with_seg = jnp.stack([targets, batch["segment_ids"]], axis=-1)
    if loss_tokens:
        hidden, with_seg, mask = gather_trained_positions(hidden, with_seg, mask, loss_tokens)
    logp = token_logps(hidden, module.head_kernel(), with_seg[..., 0], chunk)
    seg = with_seg[..., 1]
    sums = segment_sums(logp * mask, seg, 2 * max_pairs)
    counts = segment_sums(mask, seg, 2 * max_pairs)
    b = sums.shape[0]
    return sums.reshape(b, max_pairs, 2), counts.reshape(b, max_pairs, 2)


def pair_values(batch, key: str, max_pairs: int):
    """float32[B, P, 2] per pair from a per-token batch array (e.g. `REF_KEY`)."""
    sums = segment_sums(batch[key], batch["segment_ids"], 2 * max_pairs)
    return sums.reshape(sums.shape[0], max_pairs, 2)


def pair_present(batch, max_pairs: int):
    """float32[B, P]: 1 where the row holds pair p."""
    tokens = segment_sums(jnp.ones(batch["segment_ids"].shape), batch["segment_ids"],
                          2 * max_pairs)  # fmt: skip
    return (tokens.reshape(tokens.shape[0], max_pairs, 2)[..., 0] > 0).astype(jnp.float32)


def dpo_losses(logps, ref_logps, counts, options: DPOOptions):
    """Per-pair loss and rewards from [..., 2] (chosen, rejected) arrays (as TRL's
    `_compute_loss`; rewards = beta * (pi - ref), detached)."""
    ratios = logps - ref_logps  # [..., 2]
    x = ratios[..., 0] - ratios[..., 1]
    beta, eps = options.beta, options.label_smoothing
    if options.loss_type == "sigmoid":
        loss = -(1 - eps) * jax.nn.log_sigmoid(beta * x) - eps * jax.nn.log_sigmoid(-beta * x)
    elif options.loss_type == "robust":
        loss = (-(1 - eps) * jax.nn.log_sigmoid(beta * x)
                + eps * jax.nn.log_sigmoid(-beta * x)) / (1 - 2 * eps)  # fmt: skip
    elif options.loss_type == "hinge":
        loss = jax.nn.relu(1 - beta * x)
    else:  # ipo: log-ratios averaged over each completion's tokens
        avg = ratios / jnp.maximum(counts, 1.0)
        loss = (avg[..., 0] - avg[..., 1] - 1 / (2 * beta)) ** 2
    rewards = jax.lax.stop_gradient(beta * ratios)
    return loss, rewards


# ---- the step -----------------------------------------------------------------------------

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip


def _pair_metric_sums(logps, rewards, present) -> dict:
    """Sums over present pairs of TRL's per-pair metrics (divided by the pair count later)."""
    chosen, rejected = rewards[..., 0], rewards[..., 1]
    per_pair = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),  # strict, as TRL
        "rewards/margins": chosen - rejected,
        "logps/chosen": jax.lax.stop_gradient(logps[..., 0]),
        "logps/rejected": jax.lax.stop_gradient(logps[..., 1]),
    }
    return {k: jnp.sum(v * present) for k, v in per_pair.items()}


class DPOTrainer:
    """The jitted DPO step for one model: policy params in a `TrainState` (trainable subset
    and optimizer by `optim`, as `lov_jax.train.step.Trainer`), the frozen reference params
    passed to every step (`options.reference == "step"`) or its logps read from the batch.

    Batch: the batch contract with a leading micro-batch axis A, plus `REF_KEY` when the
    reference is precomputed. Loss and metrics are means over every pair of the step (the
    SFT term, if any, a mean over the chosen targets), however the step is split.

    `lora` (lov_jax.lora.adapters.Lora): the policy is the base plus adapters, trained as
    `lov_jax.train.step.Trainer` trains them (`adapters.params_and_labels`, `Lora.prepare`,
    `Lora.apply`, adapter dropout keyed by the step). The reference is then the policy's
    own frozen base with the adapters off (TRL's PEFT path, `null_ref_context`): the
    reference params are only the starting copies of the fully trained non-adapter leaves
    (the projector, `reference_view`), so the LLM is held once.
    """

    def __init__(
        self, cfg: ModelConfig, optim, options: DPOOptions, mesh: Mesh, total_steps: int,
        loss_chunk: int = 1024, loss_tokens_per_row: int = 0, lora=None,
    ):  # fmt: skip
        from lov_jax.lora.adapters import params_and_labels

        self.cfg, self.optim, self.options, self.mesh = cfg, optim, options, mesh
        self.model, self.lora = LlavaOnevision(cfg), lora
        self.loss_chunk, self.loss_tokens = loss_chunk, loss_tokens_per_row
        boxed, self.labels = params_and_labels(cfg, optim, lora)
        self._boxed = boxed
        self.tx, self.schedules = optimizer.make_optimizer(optim, total_steps, self.labels)
        trainable_boxed, _ = optimizer.split_params(boxed, self.labels)
        self.params_sharding = sharding.params_sharding(boxed, mesh)
        abstract_opt = jax.eval_shape(self.tx.init, trainable_boxed)
        self.state_sharding = TrainState(
            step=NamedSharding(mesh, PartitionSpec()),
            params=self.params_sharding,
            opt_state=sharding.params_sharding(abstract_opt, mesh),
        )
        self.batch_sharding = sharding.batch_sharding(mesh, micro_batched=True)
        replicated = NamedSharding(mesh, PartitionSpec())
        # a precomputed reference: no reference params travel (None is an empty pytree)
        ref_sharding = None
        if options.reference == "step":
            ref_sharding = self.reference_view(self.params_sharding)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_sharding, ref_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, replicated),
            donate_argnums=(0,),
        )
        self._ref = jax.jit(
            self._ref_logps, in_shardings=(self.params_sharding, self.batch_sharding),
            out_shardings=replicated,
        )  # fmt: skip

    # ---- state -------------------------------------------------------------------------

    def init_state(self, params) -> TrainState:
        """Place params on the mesh with a fresh optimizer state (donated by `step`); with
        LoRA fresh adapters unless `params` hold them."""
        if self.lora is not None:
            params = self.lora.prepare(params, self.labels)
        with self._context():
            return fresh_state(params, self.labels, self.tx, self.state_sharding)

    def reference_view(self, params):
        """What of a (base or policy) params tree the step takes as the reference: all of
        it, or with LoRA the fully trained non-adapter leaves (the frozen leaves are the
        policy's own). Works on trees of arrays or shardings; idempotent."""
        if self.lora is None:
            return params
        from lov_jax.lora.adapters import is_adapter

        flat = traverse_util.flatten_dict(params)
        keep = [p for p, g in self.labels.items() if g != optimizer.FROZEN and not is_adapter(p)]
        return traverse_util.unflatten_dict({p: flat[p] for p in keep})

    def place_reference(self, params):
        """The frozen reference (`reference_view` of the `init_from` params) on the mesh,
        in buffers of their own (the step donates the policy's: they must never alias)."""
        with self._context():
            shardings = self.reference_view(self.params_sharding)
            return jax.device_put(self.reference_view(params), shardings, may_alias=False)

    def checkpoint_view(self, state: TrainState) -> TrainState:
        """What a checkpoint stores (as `Trainer.checkpoint_view`): the state, or with LoRA
        its params cut to the trained leaves (adapters + fully trained modules), the layout
        `lov-jax convert orbax-to-peft` reads."""
        if self.lora is None:
            return state
        trainable, _ = optimizer.split_params(state.params, self.labels)
        return state.replace(params=traverse_util.unflatten_dict(trainable))

    def with_frozen(self, trained, base):
        """Restored trained leaves (`checkpoint_view`) + the frozen leaves of `base` (host
        params) -> full policy params in the state's dtypes and shardings."""
        return with_frozen_leaves(trained, base, self.labels, self.lora, self.state_sharding)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        params = nn.meta.unbox(self._boxed)
        trainable, _ = optimizer.split_params(params, self.labels)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                           opt_state=jax.eval_shape(self.tx.init, trainable))  # fmt: skip
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            state, self.state_sharding)  # fmt: skip

    # ---- step ----------------------------------------------------------------------------

    def step(self, state: TrainState, ref_params, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step; `ref_params` is None with a precomputed reference."""
        if (ref_params is None) != (self.options.reference == "precomputed"):
            raise ValueError(f"dpo.reference={self.options.reference!r}: pass the reference "
                             "params exactly when the reference runs in the step")  # fmt: skip
        with self._context():
            return self._step(state, ref_params, batch)

    def loss_and_grads(self, params, ref_params, batch: dict, step: int = 0) -> tuple[dict, dict]:
        """(metrics with `loss`, gradient {path: array} of the step's loss w.r.t. the
        trainable params) with no update: the same objective the step differentiates
        (`step` keys LoRA's adapter dropout). With LoRA `params` hold the adapters
        (`Lora.prepare`); `ref_params` may be whole (only `reference_view` is read)."""
        trainable, frozen = optimizer.split_params(params, self.labels)
        if ref_params is not None:
            ref_params = self.reference_view(ref_params)
        fn = functools.partial(self._loss_and_grads, frozen=frozen)
        with self._context():
            return jax.jit(fn)(trainable, ref_params, batch, jnp.asarray(step, jnp.int32))

    def reference_logps(self, ref_params, batch: dict):
        """float32[A, B, P, 2] reference logps of a batch (the precompute pass), from whole
        reference params (a trainer without LoRA; with LoRA use one built without it)."""
        if self.lora is not None:
            raise ValueError("reference_logps takes whole params: call it on a DPOTrainer "
                             "built without lora (the reference has no adapters)")  # fmt: skip
        with self._context():
            return self._ref(ref_params, batch)

    def lower(self, state, ref_params, batch) -> jax.stages.Lowered:
        """The jitted step lowered (arrays or ShapeDtypeStructs): planners, benchmarks."""
        with self._context():
            return self._step.lower(state, ref_params, batch)

    @contextlib.contextmanager
    def _context(self):
        with sharding.activation_rules(), jax.set_mesh(self.mesh):
            yield

    def _logps(self, params, micro, rng=None):
        """Without `rng` the plain model (the reference); with it, through LoRA if set."""
        args = ({"params": params}, micro, self.options.max_pairs_per_row, self.loss_chunk,
                self.loss_tokens)  # fmt: skip
        if self.lora is None or rng is None:
            return self.model.apply(*args, method=pair_logps)
        return self.lora.apply(self.model, *args, rngs={"dropout": rng}, method=pair_logps)

    def _ref_logps(self, ref_params, batch):
        return jax.lax.map(lambda micro: self._logps(ref_params, micro)[0], batch)

    def _denominators(self, batch):
        """(pairs, chosen targets) of the whole step: known from the batch alone, so every
        micro-batch's loss is already divided by the step's totals."""
        pairs = self.options.max_pairs_per_row
        keys = ("segment_ids", "loss_mask")
        flat = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in keys}  # [A * B, L]
        n_pairs = jnp.sum(pair_present(flat, pairs))
        chosen = segment_sums(flat["loss_mask"], flat["segment_ids"], 2 * pairs)[:, 0::2]
        return jnp.maximum(n_pairs, 1.0), jnp.maximum(jnp.sum(chosen), 1.0)

    def _objective(self, trainable, frozen, ref_params, micro, rng, denoms):
        """(this micro-batch's share of the step loss, its share of each metric)."""
        opts, pairs = self.options, self.options.max_pairs_per_row
        n_pairs, n_chosen = denoms
        logps, counts = self._logps(optimizer.merge_params(trainable, frozen), micro, rng)
        if opts.reference == "step":
            if self.lora is not None:  # the frozen base + the reference's trained leaves
                ref_params = optimizer.merge_params(traverse_util.flatten_dict(ref_params),
                                                    frozen)  # fmt: skip
            ref = jax.lax.stop_gradient(self._logps(ref_params, micro)[0])
        else:
            ref = pair_values(micro, REF_KEY, pairs)
        present = pair_present(micro, pairs)
        loss, rewards = dpo_losses(logps, ref, counts, opts)
        dpo = jnp.sum(loss * present) / n_pairs
        aux = {k: v / n_pairs for k, v in _pair_metric_sums(logps, rewards, present).items()}
        aux["losses/dpo"] = jax.lax.stop_gradient(dpo)
        total = dpo
        if opts.sft_weight:  # LLaVA-NeXT's gamma: mean CE of the policy on chosen targets
            sft = -jnp.sum(logps[..., 0] * present) / n_chosen
            aux["losses/sft"] = jax.lax.stop_gradient(sft)
            total = total + opts.sft_weight * sft
        return total, aux

    def _loss_and_grads(self, trainable, ref_params, batch, step, *, frozen):
        denoms = self._denominators(batch)
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        # one dropout key per micro-batch, as the Trainer's (only LoRA's dropout draws)
        seed = 0 if self.lora is None else self.lora.config.seed
        step_key = jax.random.fold_in(jax.random.key(seed), step)
        rngs = jax.random.split(step_key, jax.tree.leaves(batch)[0].shape[0])

        def accumulate(carry, xs):
            grad_sum, sums = carry
            micro, rng = xs
            (loss, aux), grads = grad_fn(trainable, frozen, ref_params, micro, rng, denoms)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            sums = jax.tree.map(jnp.add, sums, {"loss": loss, **aux})
            return (grad_sum, sums), None

        first = {k: v[0] for k, v in batch.items()}
        shapes = jax.eval_shape(
            lambda: grad_fn(trainable, frozen, ref_params, first, rngs[0], denoms)
        )
        (_, aux_shape), _ = shapes
        sums0 = {"loss": jnp.zeros((), jnp.float32),
                 **{k: jnp.zeros(v.shape, v.dtype) for k, v in aux_shape.items()}}  # fmt: skip
        init = (jax.tree.map(jnp.zeros_like, trainable), sums0)
        (grads, sums), _ = jax.lax.scan(accumulate, init, (batch, rngs))
        sums["pairs"] = denoms[0]
        return sums, grads

    def _train_step(self, state: TrainState, ref_params, batch: dict):
        trainable, frozen = optimizer.split_params(state.params, self.labels)
        metrics, grads = self._loss_and_grads(trainable, ref_params, batch, state.step,
                                              frozen=frozen)  # fmt: skip
        loss = metrics["loss"]
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        keep = functools.partial(_keep_if, finite)
        new_state = TrainState(
            step=state.step + finite.astype(jnp.int32),
            params=optimizer.merge_params(keep(new_trainable, trainable), frozen),
            opt_state=keep(new_opt, state.opt_state),
        )
        metrics = {**metrics, "grad_norm": grad_norm, "finite": finite,
                   **{f"lr/{g}": s(state.step) for g, s in self.schedules.items()}}  # fmt: skip
        return new_state, metrics


def _keep_if(finite, new, old):
    """A non-finite step changes nothing (as `lov_jax.train.step`)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
