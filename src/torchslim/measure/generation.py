"""Generation from causal language models: decode speed at batch 1 and a greedy sample of text.

Decoding is what users of a compressed LLM wait for: one token at a time, at batch 1, with a KV cache. Speed is
the median over repeats of ``new_tokens / seconds`` for greedy decoding of exactly ``new_tokens`` tokens after
a fixed prompt (the end-of-text token is suppressed so every run decodes the same number of tokens).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

DEFAULT_PROMPT = "The function returns"


def language_model(module: nn.Module) -> nn.Module | None:
    """The transformers model with ``generate()`` inside a bundle's module (itself or its ``.model``)."""
    for candidate in (module, getattr(module, "model", None)):
        if candidate is not None and callable(getattr(candidate, "generate", None)):
            return candidate
    return None


def _greedy(lm: nn.Module, tokenizer, prompt: str, new_tokens: int) -> torch.Tensor:
    encoded = tokenizer(prompt, return_tensors="pt")  # only what a causal LM takes (BERT-style tokenizers add more)
    encoded = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
    return lm.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, use_cache=True)


def measure_generation(module: nn.Module, tokenizer, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32,
                       repeats: int = 5, warmup: bool = True) -> dict:
    """Decode tokens/s at batch 1 (median of ``repeats`` after one warm-up) and the greedy continuation.

    Args:
        warmup: decode once untimed first (the greedy text comes from the first decode either way).

    Returns:
        ``{"decode_tokens_per_s", "decode_tokens_per_s_spread", "generated_text"}``, or ``{}`` when ``module``
        holds no model with ``generate()``.
    """
    lm = language_model(module)
    if lm is None:
        return {}
    speeds, output = [], None
    with torch.inference_mode():
        if warmup:
            output = _greedy(lm, tokenizer, prompt, new_tokens)
        for _ in range(repeats):
            started = time.perf_counter()
            result = _greedy(lm, tokenizer, prompt, new_tokens)
            speeds.append(new_tokens / (time.perf_counter() - started))
            output = result if output is None else output
    result = {"generated_text": tokenizer.decode(output[0], skip_special_tokens=True)}
    if speeds:  # repeats=0: a warm-up (and the text) only
        result.update(decode_tokens_per_s=round(statistics.median(speeds), 2),
                      decode_tokens_per_s_spread=[round(min(speeds), 2), round(max(speeds), 2)])
    return result
