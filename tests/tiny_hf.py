"""A tiny byte-level BPE (GPT-2's, Llama 3's and SmolLM2's kind) trained by the ``tokenizers``
library, for the tests that build a Hugging Face directory of their own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def byte_level_bpe(
    corpus: Iterable[str],
    special_tokens: Sequence[str] = ("<s>", "</s>"),
    vocab_size: int = 300,
    min_frequency: int = 2,
):
    """A ``tokenizers.Tokenizer`` trained on ``corpus``, with every byte in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok
