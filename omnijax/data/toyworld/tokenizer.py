"""A byte-level BPE for the toy corpus whose ids fit a compact `Vocab` exactly.

Text ids must fill [0, text_size) and the specials must sit at `Vocab.special_tokens`: BPE takes
what merges the corpus supports, reserved filler tokens take the remaining text ids, and the
specials are appended after them in release order.
"""

from __future__ import annotations

from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from omnijax.vocab import SPECIAL_TOKENS, Vocab


def train_bpe(corpus: Iterable[str], vocab: Vocab) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab.text_size < len(alphabet):
    raise ValueError(f"text_size={vocab.text_size} is below the {len(alphabet)} byte tokens")
  trainer = trainers.BpeTrainer(vocab_size=vocab.text_size, initial_alphabet=alphabet,
                                show_progress=False, special_tokens=[])
  tokenizer.train_from_iterator(corpus, trainer)
  learned = tokenizer.get_vocab_size(with_added_tokens=False)
  tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab.text_size - learned)])
  tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  for token, expected in vocab.special_tokens.items():
    if tokenizer.token_to_id(token) != expected:
      raise RuntimeError(f"{token} landed at id {tokenizer.token_to_id(token)}, expected {expected}")
  return tokenizer
