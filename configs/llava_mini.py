"""LLaVA-Mini instruction tuning (ictnlp/LLaVA-Mini scripts/llavamini/train.sh;
docs/reference_family.md B.8).

From a LLaVA-Mini checkpoint (`--config.init_from`; train.sh starts from
ICTNLP/llava-mini-llama-3-8b) every module but the frozen CLIP trains: the projector
group (with the compressor and the pre-fusion layers, lov_jax/train/optimizer.py) and
the LLM, whose `embed_tokens` never receives a gradient (the model detaches the text
embeddings, B.8.3). train.sh: lr 1e-4 for all, cosine, 3% warmup, no weight decay,
max_grad_norm 0.5, 2 epochs, 4096-token samples, llava_v1_5_mix665k.json, the Llama-3
conversation. One image costs C^2 LLM tokens (1 at C=1) but its pre-fusion runs over
576 + C^2 + the row's tokens, so a row's crop budget, not its token budget, limits it:
8192-token rows of ~150-token samples hold ~50 of them (max_crops 48).

Not copied: train.sh's global batch of 16 samples is the user's (rows_per_host x hosts x
grad_accum); the reference's re-initialisation of the compressor queries and the
projector at every start (B.8.3 2-3) is not done (init_from loads them).
"""

from configs.common import base_config, family_presets


def get_config(preset: str = "llava_mini_llama31_8b"):
    c = base_config(preset, family_presets("llava_mini"))
    c.data.train_path = "llava_v1_5_mix665k.json"
    c.data.template = "llava_llama_3"
    c.data.seq_len = 8192
    c.data.max_crops = 48
    c.optim.lr = 1e-4
    c.optim.max_grad_norm = 0.5
    c.optim.trainable = ("projector", "llm")
    c.train.epochs = 2
    return c
