"""DPO vs TRL: loss, rewards, logps metrics and the gradient of one step.

Reference: TRL's own `DPOTrainer` (trl 1.16) built on the tiny HF LLaVA-OneVision policy
with a frozen reference model of other weights; its `_prepare_dataset` tokenizes the
pairs (prompt / completion split as TRL makes it), its `_compute_loss` runs the policy
and reference forwards over [chosen; rejected] and gives the loss and the
`rewards/*`, `logps/*` metrics; `loss.backward()` gives the gradient. The only input we
build for TRL is the image placeholder's expansion to the tower's token count (HF's model
refuses a wrong count) and the pixel values from our crops. Ours: the same records through
`lov_jax.post.dpo.process_pair`, packed two pairs per row over two micro-batches (so the
step's normalisation across rows and micro-batches is tested too).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from data_pipelines import chat, packing, records  # noqa: E402
from lov_jax.post import dpo  # noqa: E402
from lov_jax.testing import tokenizers as test_tokenizers  # noqa: E402
from lov_jax.testing.hf_checkpoints import make_tiny_hf, random_image, to_hf_pixels  # noqa: E402

# (prompt, chosen, rejected, image size or None); the image: a non-square anyres grid
# and unpadding (one image pair only: every crop is 729 tokens)
PAIRS = [
    ("What colour is the sky?", "Blue, mostly.", "Green", None),
    ("Count to three.", "one two three", "one two", None),
    ("Describe the picture.", "A grey square.", "It is a cat sitting on a mat.", (200, 310)),
    ("Say hi.", "hi", "hello there friend", None),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from lov_jax.pretrained import load_pretrained, load_tokenizer

    root = tmp_path_factory.mktemp("dpo_trl")
    spec = test_tokenizers.small_bpe(700, style="chatml")
    policy_dir = make_tiny_hf(root / "policy", tokenizer=spec, tie_word_embeddings=False)
    ref_dir = make_tiny_hf(root / "ref", tokenizer=spec, tie_word_embeddings=False, seed=1)
    cfg, params = load_pretrained(policy_dir)
    _, ref_params = load_pretrained(ref_dir)
    tokenizer = load_tokenizer(policy_dir)
    image_paths = {}
    for i, (*_, size) in enumerate(PAIRS):
        if size is not None:
            image_paths[i] = str(root / f"img{i}.png")
            random_image(*size, seed=i).save(image_paths[i])
    hf = {
        "policy": LlavaOnevisionForConditionalGeneration.from_pretrained(policy_dir).float(),
        "ref": LlavaOnevisionForConditionalGeneration.from_pretrained(ref_dir).float(),
        "tokenizer": AutoTokenizer.from_pretrained(policy_dir),
    }
    return dict(cfg=cfg, params=params, ref_params=ref_params, tokenizer=tokenizer,
                images=image_paths, hf=hf, root=root)  # fmt: skip


def _records(setup, which):
    out = []
    for i in which:
        prompt, chosen, rejected, _ = PAIRS[i]
        rec = {"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        if i in setup["images"]:
            rec["image"] = setup["images"][i]
        out.append(rec)
    return out


def _our_samples(setup, options, which):
    cfg = setup["cfg"]
    opts = records.RecordOptions(chat=chat.ChatOptions(template="qwen_1_5", system_prompt=None))

    def process(rec):
        return records.process_record(rec, cfg, setup["tokenizer"], opts)

    return [dpo.process_pair(r, process, options) for r in _records(setup, which)]


def _our_batch(setup, samples, rows=1):
    """[A, B, ...] micro-batches of `rows` rows, pairs packed by the packer (text pairs
    share rows; an image pair fills most of one)."""
    cfg = setup["cfg"]
    sizes = sorted(s.num_tokens for s in samples)
    pack = packing.PackConfig(max_tokens=sizes[-1] + sizes[0] + 8,
                              max_crops=max(s.num_crops for s in samples), window=16)  # fmt: skip
    micro = list(packing.pack_batches(samples, pack, cfg, rows))
    assert len(micro) >= 2 and max(int(m["segment_ids"].max()) for m in micro) >= 4
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def _trl_trainer(setup, which, loss_type, beta, label_smoothing, tmp):
    from datasets import Dataset

    hf = setup["hf"]

    def content(text, image):
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]

    rows = [
        {"prompt": [{"role": "user", "content": content(p, i in setup["images"])}],
         "chosen": [{"role": "assistant", "content": content(c, False)}],
         "rejected": [{"role": "assistant", "content": content(r, False)}]}
        for i, (p, c, r, _) in enumerate(PAIRS) if i in which
    ]  # fmt: skip
    args = trl.DPOConfig(
        output_dir=str(tmp), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
        report_to=[], use_cpu=True, bf16=False, max_length=None,
    )  # fmt: skip
    policy = copy.deepcopy(hf["policy"])
    trainer = trl.DPOTrainer(model=policy, ref_model=copy.deepcopy(hf["ref"]), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=hf["tokenizer"])  # fmt: skip
    return trainer


def _trl_inputs(setup, which, trainer, samples):
    """TRL's padded [chosen; rejected] batch from its tokenized dataset; the <image>
    placeholder expanded to the count our sample holds (HF checks it against the tower)."""
    cfg = setup["cfg"]
    seqs, masks, pixels, sizes = [], [], [], []
    for half in ("chosen_ids", "rejected_ids"):
        for i, (rec, ex) in enumerate(zip(which, trainer.train_dataset, strict=True)):
            chosen_part = samples[i].tokens[: samples[i].parts[0]]
            n_img = int(np.sum(chosen_part == cfg.ids.image))
            prompt = []
            for t in ex["prompt_ids"]:
                prompt += [t] * (n_img if t == cfg.ids.image else 1)
            seqs.append(prompt + ex[half])
            masks.append([0] * len(prompt) + [1] * len(ex[half]))
            if rec in setup["images"]:
                part = samples[i].parts[0]
                crops = samples[i].crops[: len(samples[i].crops) // 2]
                assert len(crops) and part > 0
                pixels.append(to_hf_pixels(crops, cfg.vision))
                sizes.append(samples[i].items[0].image_size)
    longest = max(map(len, seqs))
    pad = cfg.ids.pad
    ids = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs]),
        "completion_mask": torch.tensor([m + [0] * (longest - len(m)) for m in masks]),
    }
    if pixels:  # [images, most crops, 3, S, S] zero padded, as HF's processor batches them
        most = max(len(p) for p in pixels)
        px = np.zeros((len(pixels), most, *pixels[0].shape[1:]), np.float32)
        for k, p in enumerate(pixels):
            px[k, : len(p)] = p
        inputs.update(pixel_values=torch.from_numpy(px), image_sizes=torch.tensor(sizes))
    return inputs, seqs, masks


TEXT = [0, 1, 3]  # text-only pairs
ALL = list(range(len(PAIRS)))  # with the image pair


@pytest.mark.parametrize(
    "loss_type,beta,eps,which",
    [("sigmoid", 0.1, 0.0, ALL), ("ipo", 0.5, 0.0, TEXT), ("hinge", 0.3, 0.0, TEXT),
     ("robust", 0.2, 0.1, TEXT)],
    ids=["sigmoid-images", "ipo-text", "hinge-text", "robust-text"],
)  # fmt: skip
def test_loss_rewards_and_gradient_equal_trl(setup, tmp_path, loss_type, beta, eps, which):
    import jax

    from lov_jax import sharding
    from lov_jax.pretrained import load_pretrained

    options = dpo.DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=eps,
                             max_pairs_per_row=4)  # fmt: skip
    samples = _our_samples(setup, options, which)
    trainer = _trl_trainer(setup, which, loss_type, beta, eps, tmp_path / "trl")
    inputs, seqs, masks = _trl_inputs(setup, which, trainer, samples)
    n = len(which)
    # the same sequences and completion targets on both sides
    for i, s in enumerate(samples):
        c, r = s.parts
        np.testing.assert_array_equal(s.tokens[:c], seqs[i])
        np.testing.assert_array_equal(s.tokens[c:], seqs[n + i])
        np.testing.assert_array_equal(s.loss_mask[: c - 1], masks[i][1:])  # target t = token t+1
        np.testing.assert_array_equal(s.loss_mask[c:-1], masks[n + i][1:])

    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # HF gradient -> our layout through the import table (a linear map), via a saved copy
    grad_model = copy.deepcopy(setup["hf"]["policy"])
    named = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for name, p in grad_model.named_parameters():
            g = named[name].grad
            p.copy_(torch.zeros_like(p) if g is None else g)
    grad_dir = tmp_path / "grads"
    grad_model.save_pretrained(grad_dir)
    _, hf_grads = load_pretrained(grad_dir)

    cfg = setup["cfg"]
    mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
    optim = _optim()
    ours = dpo.DPOTrainer(cfg, optim, options, mesh, total_steps=1, loss_chunk=64)
    batch = _our_batch(setup, samples)
    metrics, grads = ours.loss_and_grads(setup["params"], setup["ref_params"], batch)
    metrics = jax.device_get(metrics)
    assert float(metrics["pairs"]) == n
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), atol=1e-5, rtol=0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], atol=1e-5, rtol=0,
                                   err_msg=key)  # fmt: skip
    for key in ("logps/chosen", "logps/rejected"):  # sums of ~10 log-probs each
        np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], atol=1e-5, rtol=1e-6,
                                   err_msg=key)  # fmt: skip
    from flax import traverse_util

    flat_hf = traverse_util.flatten_dict(hf_grads)
    worst = 0.0
    for path, g in grads.items():
        diff = float(np.max(np.abs(np.asarray(g) - np.asarray(flat_hf[path]))))
        worst = max(worst, diff)
        assert diff <= 1e-5, ("/".join(path), diff)
    assert worst > 0 or loss_type == "hinge"
    assert max(float(np.max(np.abs(np.asarray(g)))) for g in grads.values()) > 1e-3


def _optim():
    import ml_collections

    from configs.common import base_config

    c = base_config("tiny")
    assert isinstance(c.optim, ml_collections.ConfigDict)
    return c.optim


def test_conservative_sigmoid_is_llava_next_vendored_formula():
    """eps > 0 in `sigmoid` = LLaVA-NeXT's vendored TRL (trl/trainer/dpo_trainer.py
    `dpo_loss`): -logsigmoid(b x)(1 - eps) - logsigmoid(-b x) eps; TRL 1.16 dropped it."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    logps, ref = rng.normal(-20, 5, (7, 2)), rng.normal(-20, 5, (7, 2))
    opts = dpo.DPOOptions(beta=0.3, label_smoothing=0.2)
    loss, rewards = dpo.dpo_losses(jnp.asarray(logps), jnp.asarray(ref), None, opts)
    x = torch.tensor((logps[:, 0] - logps[:, 1]) - (ref[:, 0] - ref[:, 1]))
    ls = torch.nn.functional.logsigmoid
    want = -ls(0.3 * x) * (1 - 0.2) - ls(-0.3 * x) * 0.2
    np.testing.assert_allclose(np.asarray(loss), want.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), 0.3 * (logps - ref), atol=1e-6)


def test_bad_options_and_records_are_named():
    from data_pipelines.sample import BadSample

    with pytest.raises(ValueError, match="loss_type"):
        dpo.DPOOptions(loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.DPOOptions(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown dpo config keys"):
        dpo.DPOOptions.from_config({"beta": 0.1, "betta": 0.2})
    with pytest.raises(BadSample, match="'rejected'"):
        dpo.pair_conversations({"prompt": "q", "chosen": "a"})
    chosen, _ = dpo.pair_conversations(
        {"id": "x", "image": "a.png", "prompt": "look <image> here", "chosen": "a",
         "rejected": "b"})  # fmt: skip
    assert chosen["conversations"][0]["value"] == "<image>\nlook  here"
