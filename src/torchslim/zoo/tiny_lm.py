"""``builtin:tiny-lm``: a GPT-2-style causal language model (5.8 M parameters) trained here on builtin:docs.

A byte-level BPE tokenizer (4,096 tokens) is trained offline on the corpus's train split, then a GPT-2 (6 layers,
width 256, 4 heads, FFN 1,024, context 128, tied input/output embeddings) is trained with
`torchslim.recover.trainer.Trainer` on the train split packed into 128-token blocks: ``EPOCHS`` passes over
its ~1.2 M tokens in batches of 8 blocks, AdamW with warm-up and cosine decay, bf16 autocast where the CPU has
native bf16, seeded. Two CPU cores give a budget of about a million tokens a few times over: a width-384 model
(12.3 M parameters) trained on it for the same 15 minutes reached only perplexity 312 and ignored half of its
block weights (50% magnitude pruning changed nothing), so the smaller model takes more optimiser steps instead.
Training takes about 10-15 minutes on two idle cores with bf16 (twice that in fp32), once; the result is cached
as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files), so it loads like any
``hf:`` folder and shows how torchslim treats a real causal LM: perplexity on the held-out split
(``metric: perplexity``, lower is better) and text through ``generate()``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchslim._cache import cache_dir

VERSION = 3
VOCAB_SIZE = 4096
CONTEXT = 128
MODEL_CONFIG = dict(n_embd=256, n_layer=6, n_head=4, n_inner=1024, n_positions=CONTEXT, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
TRAIN_TOKENS = 1_200_000  # about the whole train split
EPOCHS = 2
BATCH_SIZE = 8
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` starts every encoded text and pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    eos_id = tokenizer.token_to_id(EOS)
    # every passage starts with the boundary token, so its first word is predicted too (as in packed training)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=CONTEXT, padding_side="right")


def packed_blocks(tokenizer, texts: list[str], tokens: int, context: int = CONTEXT) -> list[torch.Tensor]:
    """The texts' tokens, each text after a boundary token, concatenated and cut into blocks of ``context``."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, verbose=False)["input_ids"]
        if len(stream) >= tokens + context:
            break
    usable = min(tokens, len(stream)) // context * context
    return list(torch.tensor(stream[:usable]).view(-1, context))


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every next token where both it and its context are real (not padding)."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train_tiny_lm(folder: Path, seed: int = 0, progress: bool = True, train_tokens: int = TRAIN_TOKENS,
                  model_config: dict | None = None, vocab_size: int = VOCAB_SIZE) -> dict:
    """Train tokenizer and model on builtin:docs and save both to ``folder`` (a Hugging Face folder).

    Returns:
        Facts about the run (parameters, tokens, seconds, validation perplexity), also saved as training.json.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from torchslim.data import resolve_data
    from torchslim.recover.trainer import OptimizerConfig, ScheduleConfig, SplitDataset, TrainConfig, Trainer
    from torchslim.zoo.hub import CausalLMScorer

    started = time.perf_counter()
    torch.manual_seed(seed)
    data = resolve_data("builtin:docs", seed)
    train_texts = list(data.splits["train"])
    tokenizer = train_tokenizer(train_texts, vocab_size)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        **(model_config or MODEL_CONFIG))
    model = GPT2LMHeadModel(config)
    blocks = packed_blocks(tokenizer, train_texts, train_tokens, config.n_positions)

    def collate(items):
        ids = torch.stack([block for block, _ in items])
        return (ids, torch.ones_like(ids)), None

    def loss_fn(outputs, inputs, labels):
        return {"cross_entropy": lm_loss(outputs.logits, *inputs)}

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    from torchslim.core.cpu import cpu_flags

    # bf16 autocast where the CPU multiplies bf16 natively (AMX/AVX512-BF16): about 1.8x the fp32 speed here
    precision = "bf16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"
    train_config = TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, device="cpu", grad_clip=1.0, precision=precision,
                               optimizer=OptimizerConfig(name="adamw", lr=2e-3, weight_decay=0.1),
                               schedule=ScheduleConfig(name="cosine", warmup_fraction=0.03))
    runner = _Forward(model, forward)
    Trainer(runner, loss_fn, SplitDataset(blocks, None), collate, train_config, seed=seed,
            description="training builtin:tiny-lm (once, then cached)", progress=progress).fit()
    model.eval()
    scorer = CausalLMScorer(model).eval()
    nll = tokens = 0.0
    with torch.inference_mode():
        for start in range(0, len(data.splits["val"]), 64):
            encoded = tokenizer(list(data.splits["val"][start:start + 64]), padding=True, truncation=True,
                                max_length=config.n_positions, return_tensors="pt")
            sums = scorer(encoded["input_ids"], encoded["attention_mask"])
            nll, tokens = nll + float(sums[:, 0].sum()), tokens + float(sums[:, 1].sum())
    info = {"version": VERSION, "seed": seed, "precision": precision, "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": len(blocks) * config.n_positions, "epochs": EPOCHS,
            "steps": EPOCHS * (len(blocks) // BATCH_SIZE),
            "seconds": round(time.perf_counter() - started, 1),
            "val_perplexity": round(float(torch.tensor(nll / tokens).exp()), 3), "corpus": data.notes[0]}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(info, indent=1))
    return info


class _Forward(torch.nn.Module):
    """Adapts the Trainer's positional call ``model(input_ids, attention_mask)`` to a transformers model."""

    def __init__(self, model: torch.nn.Module, forward):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, input_ids, attention_mask):
        return self._forward(input_ids, attention_mask)


def tiny_lm_folder(progress: bool = True) -> Path:
    """The cached model folder (tokenizer and model trained on first use, ~15 minutes on two cores)."""
    folder = cache_dir("models") / f"tiny-lm-v{VERSION}"
    if (folder / "training.json").exists():
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        train_tiny_lm(tmp, progress=progress)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
