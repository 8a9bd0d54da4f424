"""The structure rows of benchmarks/pruning_coverage.py: Hugging Face models of several families built from tiny
configs (no hub), nn.TransformerEncoder, a ConvLSTM, and the models of tests/pruning_models.py (grouped-conv
residual blocks, a U-Net with transposed convolutions, tuple/dict/dataclass outputs, several inputs).

Each entry: name -> (build, example inputs). Hugging Face models are passed directly (their forward returns a
``ModelOutput``); decoders take input ids only (their second positional argument is the cache).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from pruning_models import COVERAGE_MODELS  # noqa: E402

VOCAB = 1000


def _tokens(pair: bool = True, decoder: bool = False):
    ids = torch.randint(0, VOCAB, (2, 16))
    inputs = (ids, torch.ones(2, 16, dtype=torch.long)) if pair else (ids,)
    return inputs + (torch.randint(0, VOCAB, (2, 8)),) if decoder else inputs


def _hf(kind: str, config: str, example, **fields):
    def build():
        import transformers

        return getattr(transformers, kind)(getattr(transformers, config)(**fields))

    return build, example


_BERT = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=64)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=384, max_position_embeddings=64, use_cache=False)
_VIT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=64,
            patch_size=16)


def _image():
    return torch.randn(2, 3, 64, 64)


HF = {
    "hf BertModel": _hf("BertModel", "BertConfig", _tokens, **_BERT),
    "hf BertForSequenceClassification": _hf("BertForSequenceClassification", "BertConfig", _tokens, **_BERT),
    "hf RobertaModel": _hf("RobertaModel", "RobertaConfig", _tokens, **{**_BERT, "max_position_embeddings": 72}),
    "hf DistilBertModel": _hf("DistilBertModel", "DistilBertConfig", _tokens, vocab_size=VOCAB, dim=128, n_layers=2,
                              n_heads=4, hidden_dim=512, max_position_embeddings=64),
    "hf ElectraModel": _hf("ElectraModel", "ElectraConfig", _tokens, embedding_size=64, **_BERT),
    "hf AlbertModel": _hf("AlbertModel", "AlbertConfig", _tokens, embedding_size=64, **_BERT),
    "hf GPT2LMHeadModel": _hf("GPT2LMHeadModel", "GPT2Config", lambda: _tokens(False), vocab_size=VOCAB, n_layer=2,
                              n_embd=128, n_head=4, n_positions=64, use_cache=False),
    "hf OPTForCausalLM": _hf("OPTForCausalLM", "OPTConfig", lambda: _tokens(False), vocab_size=VOCAB, hidden_size=128,
                             num_hidden_layers=2, num_attention_heads=4, ffn_dim=512, max_position_embeddings=64,
                             word_embed_proj_dim=128, use_cache=False),
    "hf LlamaForCausalLM": _hf("LlamaForCausalLM", "LlamaConfig", lambda: _tokens(False), **_LLAMA),
    "hf Qwen2ForCausalLM": _hf("Qwen2ForCausalLM", "Qwen2Config", lambda: _tokens(False), **_LLAMA),
    "hf MistralForCausalLM": _hf("MistralForCausalLM", "MistralConfig", lambda: _tokens(False), **_LLAMA),
    "hf ViTModel": _hf("ViTModel", "ViTConfig", _image, **_VIT),
    "hf ViTForImageClassification": _hf("ViTForImageClassification", "ViTConfig", _image, num_labels=10, **_VIT),
    "hf DeiTModel": _hf("DeiTModel", "DeiTConfig", _image, **_VIT),
    "hf T5Model": _hf("T5Model", "T5Config", lambda: _tokens(decoder=True), vocab_size=VOCAB, d_model=128, d_kv=32,
                      d_ff=512, num_layers=2, num_heads=4, use_cache=False),
    "hf BartModel": _hf("BartModel", "BartConfig", lambda: _tokens(decoder=True), vocab_size=VOCAB, d_model=128,
                        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=64, use_cache=False),
}


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(32, 128), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(128, 10))


class ConvLSTM(nn.Module):
    """A convolutional LSTM over a short clip (gates from one convolution of [frame, hidden]) and a classifier."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.hidden = hidden
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.gates = nn.Conv2d(16 + hidden, 4 * hidden, 3, padding=1)
        self.head = nn.Linear(hidden, 10)

    def forward(self, clip):
        b, t, _, h, w = clip.shape
        state = cell = clip.new_zeros(b, self.hidden, h, w)
        for step in range(t):
            i, f, g, o = self.gates(torch.cat([self.stem(clip[:, step]), state], 1)).chunk(4, 1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            state = torch.sigmoid(o) * torch.tanh(cell)
        return self.head(state.mean((2, 3)))


STRUCTURES = {
    **{name: (build, example) for name, (build, example) in COVERAGE_MODELS.items()},
    "nn.TransformerEncoder (MHA + FFN)": (transformer_encoder, lambda: torch.randn(2, 16, 32)),
    "ConvLSTM": (ConvLSTM, lambda: torch.randn(2, 3, 3, 16, 16)),
}
