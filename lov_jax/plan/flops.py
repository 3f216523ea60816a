"""FLOPs of a compiled program that can be checked against the model's.

XLA's `cost_analysis()` counts a while loop's body once (a scanned layer stack, the
micro-batch scan, the chunked loss) and no custom calls (the Pallas splash kernels), so
for a scanned model it is a small fraction of the work. Here the per-chip optimized HLO
(`compiled.as_text()`) is walked instead:

  * matmul FLOPs only: `dot` = 2 x output elements x contracted size; `convolution` =
    2 x output elements x kernel elements / output features. Elementwise work is not
    counted (the model FLOPs do not count it either).
  * a while loop's body counts `known_trip_count` times (the trip count XLA:CPU's
    while-loop analysis writes into the loop's backend_config), else the N of its
    condition `counter < constant(N)` (the TPU compiler's loops; jax's scans count from
    0 by 1); a loop with neither is counted once and reported in `unknown_trip_loops`.
    Fusions, calls and async wrappers count their called computation once; a
    conditional its costliest branch.
  * a splash kernel (a `tpu_custom_call` the TPU compiler names after the kernel,
    `splash_{mha,mqa}_{fwd,dq,dkv}...`; or that name in its backend config) counts
    its formula from its operand shapes: q float[..., N, T, H], k float[..., K, S, H];
    one T x S x H matmul per query head is 2NTSH, fwd runs 2 (QK^T, PV), dq 3 (QK^T,
    dO V^T, dS K), dkv 4 (QK^T, dO V^T, P^T dO, dS^T Q); with the causal mask the kernel
    skips fully masked blocks, so nb(nb+1)/2 of the nb^2 blocks run (nb = T / the block
    `splash.default_block_sizes` picks). Other custom calls are listed, not counted.

`executed_flops` is what a step must execute by the model's own definitions
(`metrics.step_flops` plus recompute: remat, the chunked loss's head forward, dense
attention's masked half, the splash backward's recomputed scores), so the two can be
compared (`tests/plan/test_plan_flops.py` asserts 5% on CPU compiles).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from functools import cache

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"([\w.\-]+): ([a-z0-9]+)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"^([a-z0-9]+)\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SPLASH = re.compile(r"splash_(?:mha|mqa)_(fwd|dq|dkv)\w*")
# Matmuls per splash kernel phase (each 2 x N x T x S x H FLOPs).
SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


@dataclasses.dataclass
class HloFlops:
    """Matmul FLOPs of one (per-chip) program."""

    dot_flops: float = 0.0
    kernel_flops: float = 0.0  # splash kernels, from their formula
    kernel_calls: dict = dataclasses.field(default_factory=dict)  # kernel -> executions
    uncounted_calls: dict = dataclasses.field(default_factory=dict)  # custom-call target -> n
    unknown_trip_loops: int = 0

    @property
    def total(self) -> float:
        return self.dot_flops + self.kernel_flops

    def scaled(self, n: float) -> HloFlops:
        return HloFlops(
            self.dot_flops * n,
            self.kernel_flops * n,
            {k: v * n for k, v in self.kernel_calls.items()},
            {k: v * n for k, v in self.uncounted_calls.items()},
            self.unknown_trip_loops,
        )

    def add(self, other: HloFlops) -> None:
        self.dot_flops += other.dot_flops
        self.kernel_flops += other.kernel_flops
        for mine, theirs in (
            (self.kernel_calls, other.kernel_calls),
            (self.uncounted_calls, other.uncounted_calls),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.unknown_trip_loops += other.unknown_trip_loops


def _split_type(rest: str) -> tuple[str, str]:
    """('f32[8,32]{1,0}' or a tuple type, the text after it) of an instruction's rhs."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    ty, _, tail = rest.partition(" ")
    return ty, tail


def _dims(ty: str) -> tuple[str, tuple[int, ...]]:
    """(element type, dims) of an array type; ('tuple', ()) otherwise."""
    m = _ARRAY.match(ty)
    if m is None:
        return "tuple", ()
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def _operands(tail: str) -> tuple[str, list[str], str]:
    """(opcode, operand names, attribute text) of 'op(%a, %b), attrs'."""
    op, _, rest = tail.partition("(")
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return op.strip(), _NAME.findall(rest[:end]), rest[end + 1 :]


def _attr_dims(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _splash_flops(phase: str, shapes: list[tuple[str, tuple[int, ...]]]) -> float:
    """One splash call from its float operands q [..., N, T, H], k [..., K, S, H]."""
    from lov_jax.models import splash

    big = [d for ty, d in shapes if ty.startswith(("f", "bf")) and len(d) >= 3]
    if len(big) < 2:
        raise ValueError(f"splash {phase} call without q/k operands: {shapes}")
    q, k = big[0], big[1]
    t, s = q[-2], k[-2]
    sizes = splash.default_block_sizes(t, s)
    nb = t // sizes.block_q
    causal = (nb + 1) / (2 * nb) if t == s else 1.0
    return 2.0 * SPLASH_MATMULS[phase] * math.prod(q) * s * causal


def _kernel_name(attrs: str) -> str | None:
    m = _SPLASH.search(re.sub(r'"body": ?"[^"]*"', "", attrs))
    if m:
        return m.group(0)
    body = re.search(r'"body": ?"([^"]*)"', attrs)
    if body:
        try:
            raw = base64.b64decode(body.group(1))
        except ValueError:
            return None
        m = re.search(rb"splash_(?:mha|mqa)_(?:fwd|dq|dkv)\w*", raw)
        if m:
            return m.group(0).decode()
    return None


def _trip_from_condition(lines: list[str]) -> int | None:
    """N of a loop condition `ROOT compare(counter, s32[] constant(N)), direction=LT`: the
    TPU compiler does not annotate `known_trip_count`; jax's loops count 0, 1, ... N-1."""
    constants = {}
    for line in lines:
        m = _INSTR.match(line)
        if m is None:
            continue
        c = re.match(r"s32\[\]\S* constant\((\d+)\)", m.group(2))
        if c:
            constants[m.group(1)] = int(c.group(1))
        if line.lstrip().startswith("ROOT") and "compare(" in line and "direction=LT" in line:
            names = _NAME.findall(line.split("compare(", 1)[1].split(")", 1)[0])
            if len(names) == 2 and names[1] in constants:
                return constants[names[1]]
    return None


def hlo_flops(text: str) -> HloFlops:
    """Matmul + splash FLOPs of an optimized HLO module's text (module docstring)."""
    comps: dict[str, list[str]] = {}
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            params[current] = {
                name: (dtype, tuple(int(d) for d in dims.split(",") if d))
                for name, dtype, dims in _PARAM.findall(m.group(2))
            }
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("not an HLO module's text: no ENTRY computation")

    @cache
    def of(name: str) -> HloFlops:
        out = HloFlops()
        shapes = dict(params.get(name, {}))
        for line in comps.get(name, []):
            m = _INSTR.match(line)
            if m is None:
                continue
            ty, tail = _split_type(m.group(2))
            shapes[m.group(1)] = _dims(ty)
            dims = shapes[m.group(1)][1]
            op, names, attrs = _operands(tail)
            if op == "dot":
                lhs = shapes.get(names[0], ("?", ()))[1]
                contracted = math.prod(lhs[d] for d in _attr_dims(attrs, "lhs_contracting_dims"))
                out.dot_flops += 2.0 * math.prod(dims) * contracted
            elif op == "convolution":
                rhs = shapes.get(names[1], ("?", ()))[1]
                labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
                o = labels.group(1).index("o") if labels else len(rhs) - 1
                out.dot_flops += 2.0 * math.prod(dims) * math.prod(rhs) / rhs[o]
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", attrs).group(1)
                cond = re.search(r"condition=%?([\w.\-]+)", attrs).group(1)
                trip = _TRIP.search(attrs)
                n = int(trip.group(1)) if trip else _trip_from_condition(comps.get(cond, []))
                if n is None:
                    out.unknown_trip_loops += 1
                out.add(of(body).scaled(1 if n is None else n))
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
                names_b = _NAME.findall(branches.group(1)) if branches else []
                if names_b:
                    out.add(max((of(b) for b in names_b), key=lambda f: f.total))
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', attrs)
                target = target.group(1) if target else "?"
                kernel = None
                if target == "tpu_custom_call":  # the TPU compiler names it after the kernel
                    named = _SPLASH.match(m.group(1))
                    kernel = named.group(0) if named else _kernel_name(attrs)
                if kernel is not None:
                    phase = _SPLASH.match(kernel).group(1)
                    args = [shapes.get(n, ("?", ())) for n in names]
                    out.kernel_flops += _splash_flops(phase, args)
                    out.kernel_calls[kernel] = out.kernel_calls.get(kernel, 0) + 1
                else:
                    out.uncounted_calls[target] = out.uncounted_calls.get(target, 0) + 1
            if op != "while":
                for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", attrs):
                    if op in ("fusion", "call", "async-start", "custom-call") or "start" in op:
                        out.add(of(called))
        return out

    return of(entry)


def executed_flops(
    cfg, segment_lengths, num_crops: int, trainable, *, rows: int, seq_len: int,
    loss_chunk: int, recompute: float = 1.0,
) -> float:  # fmt: skip
    """Matmul FLOPs one step must execute, from the model's definitions (`metrics`).

    `metrics.step_flops` (useful work) times `recompute` (the remat policy's factor,
    `plan.train.REMAT_RECOMPUTE`; > 1 means every block's forward runs twice), with the
    LLM attention term replaced by what the kernel computes, plus the chunked loss:
      * the chunked loss recomputes the head's forward (2 H V per token) in the backward
        when a row has more than one chunk (`models/loss.py`);
      * dense attention ('xla', 'chunked') computes each row's whole T x T scores (masked
        after): fwd 2 + bwd 4 matmuls of 2NTTH over the square, not half of it per
        segment;
      * splash computes the blocks the causal mask does not skip, and its backward
        recomputes the scores: fwd 2 + dq 3 + dkv 4 matmuls (module docstring).
      * the patch embedding (a convolution of the pixels) has no input gradient: its
        backward is the weight gradient only (2 of the model's 4 backward FLOPs/param).
    The attention backward runs whether or not the LLM is trained (activations still
    flow back to the tower / projector). `rows` rows of `seq_len` tokens in all (every
    micro-batch); `segment_lengths` as for `metrics.step_flops`.
    """
    import numpy as np

    from lov_jax.train import metrics

    t = cfg.text
    model = metrics.step_flops(cfg, segment_lengths, num_crops, trainable) * recompute
    llm_factor = 6 if "llm" in set(trainable) else 4
    lengths = np.asarray(segment_lengths, np.float64)
    causal_fwd = t.num_layers * 2 * np.sum(lengths**2) * t.num_heads * t.head_dim
    model_attn = (llm_factor / 2) * causal_fwd * recompute
    # fwd of the whole square: 2 matmuls of 2 N T T H per row and layer
    dense_fwd = t.num_layers * 4 * rows * seq_len**2 * t.num_heads * t.head_dim
    rerun = 1 if recompute > 1 else 0
    extra = 0.0
    if loss_chunk and seq_len > loss_chunk:
        extra += 2 * t.hidden_size * t.vocab_size * rows * seq_len
    v = cfg.vision
    if "vision" in set(trainable):
        patch_params = v.patch_size**2 * v.num_channels * v.hidden_size
        extra -= 2 * patch_params * v.num_patches * num_crops * recompute
    if cfg.attention_impl == "splash":
        from lov_jax.models import splash

        nb = seq_len // splash.default_block_sizes(seq_len, seq_len).block_q
        matmuls = SPLASH_MATMULS["fwd"] * (1 + rerun) + SPLASH_MATMULS["dq"] + SPLASH_MATMULS["dkv"]
        extra += dense_fwd * (nb + 1) / (2 * nb) * matmuls / 2 - model_attn
    else:
        extra += dense_fwd * (3 + rerun) - model_attn
    return float(model + extra)
