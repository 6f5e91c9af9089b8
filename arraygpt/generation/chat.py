"""Chat: a conversation with a model, rendered with its own chat template, with the model and its
KV cache kept between turns.

Each turn renders the whole conversation (the system prompt, every user and assistant message so
far, the new user message, and the opening of the assistant's reply) with the tokenizer's chat
template, as transformers' ``apply_chat_template`` does, and encodes it. The KV cache still holds
the previous turn's positions (its prompt and the reply as generated); the new tokens extend them
when the template re-renders the reply as it was generated, so only the new suffix is fed (the
end of the reply, the new user message, the assistant header). Where the new tokens part from the
cached ones (a template that trims the reply, a reply that encodes differently), the cache is cut
back to the longest common prefix and the rest is fed: the cached keys and values of a position
depend only on the tokens up to it, so they stay exact. A conversation that outgrows the model's
context drops its oldest turns (never the system prompt) and is fed anew.

A reply ends at the tokenizer's ``stop_ids`` (EOS and end-of-turn tokens such as ``<|im_end|>``
and ``<|eot_id|>``), at ``max_new_tokens``, or when the context is full.

Not here: the generation loop and the samplers (``arraygpt.generation.generation``,
``arraygpt.generation.sampling``), the template renderer (``arraygpt.io.hf.chat_template``), the
``arraygpt chat`` command (``arraygpt.cli.chat``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from arraygpt.generation.generation import (
    Decoder,
    end_id_set,
    generation_config,
    make_rng,
    resolve_model,
    sample_loop,
    tokenizer_vocab,
)
from arraygpt.generation.sampling import check_number, make_sampler, with_generation_config
from arraygpt.generation.text import StopText, TextStream, end_ids

__all__ = ["TEMPLATES", "Chat", "render_chatml"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """ChatML (Qwen's, SmolLM2's format): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per
    message, then ``<|im_start|>assistant\\n`` to open the reply."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


TEMPLATES = {"chatml": render_chatml}  # templates chosen by name, for a model that ships none

DEFAULT_MAX_NEW_TOKENS = 1024


class Chat:
    """A conversation with a model: ``send(text)`` streams the reply.

    Args:
        model: an ``arraygpt.GPT``, or a checkpoint from ``arraygpt.load(path)`` (its tokenizer is used).
        tokenizer: the model's tokenizer (default: the checkpoint's); it must have a chat template
            (``chat_template``, rendered by ``apply_chat_template``) unless ``template`` names one.
        system: the system prompt, or None.
        template: None (the tokenizer's own chat template) or a name of :data:`TEMPLATES`
            (``"chatml"``), for a model without one.
        max_new_tokens: the most tokens of one reply (it also ends at a stop token or when the
            model's context is full).
        seed: seed of the sampling coins (or a NumPy Generator); None draws a fresh one.
        show_probs: K > 0: ``send`` yields :class:`~arraygpt.generation.generation.Candidates`
            instead of text.
        sampler, temperature, **sampler_options: as ``arraygpt.generate`` (``top_k=40``,
            ``repeat_penalty=1.1``...; what they leave unchosen, a checkpoint's
            generation_config.json fills in). The repeat penalty sees the whole conversation.

    Attributes:
        messages: the conversation so far, ``[{"role": ..., "content": ...}]``.
        cache: the KV cache, holding the positions of ``cached`` (the tokens fed so far).
        prefilled: the positions fed before the last reply's first token (its prompt's new part).
        dropped: how many of the oldest messages were left out to fit the model's context (whole
            exchanges, never the system prompt); ``messages`` keeps only what the model still sees.

    Raises:
        ValueError: no tokenizer, no chat template (and no ``template``), or an invalid option.

    Example:
        >>> chat = Chat(arraygpt.load("SmolLM2-135M-Instruct"), system="Be brief.", temperature=0)  # doctest: +SKIP
        >>> print("".join(chat.send("What is the capital of France?")))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        system: str | None = None,
        template: str | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        seed: Any = None,
        show_probs: int = 0,
        sampler: Any = None,
        temperature: float | None = None,
        eos_id: Any = None,
        **sampler_options: Any,
    ):
        from arraygpt.nn.core import KVCache

        config = generation_config(model)
        self.model, self.tokenizer, _ = resolve_model(model, tokenizer)
        if self.tokenizer is None:
            raise ValueError(
                "a chat needs the model's tokenizer: pass tokenizer=..., or a checkpoint from arraygpt.load"
            )
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; the named ones: {', '.join(TEMPLATES)}")
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "the model's tokenizer has no chat template (a base model, or tokenizer_config.json without "
                "chat_template): generate plain text instead, or choose a template explicitly, e.g. template='chatml'"
            )
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str or None, got {type(system).__name__}")
        self.template = template
        self.max_new_tokens = check_number("max_new_tokens", max_new_tokens, 1, integer=True)
        self.show_probs = check_number("show_probs", show_probs, 0, integer=True)
        sampler, temperature, sampler_options = with_generation_config(config, sampler, temperature, sampler_options)
        self.chain = make_sampler(sampler, temperature=temperature, **sampler_options)
        self.rng = make_rng(seed)
        ends = set(end_ids(self.tokenizer)) | set(end_id_set(eos_id))
        self.stop_texts: tuple[str, ...] = ()
        if template == "chatml":
            im_end = self.tokenizer.encode(IM_END)
            if len(im_end) == 1:
                ends.add(im_end[0])
            else:  # the tokenizer has no <|im_end|> token: stop at its text, however the tokens split it
                self.stop_texts = (IM_END,)
        self.ends = frozenset(ends)
        self.n_valid = tokenizer_vocab(self.model, self.tokenizer)
        self.block_size = self.model.config.block_size
        self.system = system
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = KVCache(self.model.config)
        self.cached: list[int] = []
        self.prefilled = 0
        self.dropped = 0

    def render(self, messages: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation (default: ``messages``) as the template renders it, ending with the
        opening of the assistant's reply."""
        messages = self.messages if messages is None else list(messages)
        if self.template is not None:
            return TEMPLATES[self.template](messages, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()
        self.cached = []

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
        """(messages, token ids) of the conversation, the oldest turns dropped until it leaves room
        for a reply in the model's context."""
        room = min(self.max_new_tokens, max(self.block_size // 2, 1))
        head = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids = [int(i) for i in self.tokenizer.encode(self.render(messages))]
            if len(ids) + room <= self.block_size or len(messages) - head <= 1:
                break
            # drop the oldest exchange whole (a user message and the replies after it), so that the
            # roles still alternate as templates that check it (raise_exception) require
            cut = head + 1
            while cut < len(messages) - 1 and messages[cut]["role"] != "user":
                cut += 1
            self.dropped += cut - head
            messages = messages[:head] + messages[cut:]
        if len(ids) >= self.block_size:
            raise ValueError(
                f"the message and the system prompt are {len(ids)} tokens, and the model's context holds "
                f"{self.block_size}: send a shorter message"
            )
        return messages, ids

    def send(self, text: str) -> Iterator[Any]:
        """Add a user message and stream the reply: its text in pieces that never split a
        character (the stop token is not part of it), or :class:`Candidates` with ``show_probs``.
        When the iterator is done (or closed early), the reply as far as it got is in ``messages``.

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: the message does not fit the model's context, or the template fails.
        """
        import numpy as np

        if not isinstance(text, str):
            raise TypeError(f"a chat message must be a str, got {type(text).__name__}")
        messages, ids = self._fit([*self.messages, {"role": "user", "content": text}])
        common = 0
        limit = min(len(self.cached), self.cache.length, len(ids) - 1)  # feed at least one token
        while common < limit and self.cached[common] == ids[common]:
            common += 1
        self.cache.length = common  # keys and values of positions < common depend only on those tokens
        self.cached = ids[:common]
        self.prefilled = len(ids) - common
        decoder = Decoder(self.model, True, cache=self.cache)
        n_new = min(self.max_new_tokens, self.block_size - len(ids))
        prompt = np.asarray([ids], dtype=np.int64)  # (1, T)
        steps = sample_loop(
            self.model,
            decoder,
            self.chain,
            prompt,
            True,
            n_new,
            self.show_probs,
            self.ends,
            (),
            self.rng,
            self.n_valid,
        )
        return self._reply(steps, messages, ids)

    def _reply(self, steps: Iterator[Any], messages: list[dict[str, str]], ids: list[int]) -> Iterator[Any]:
        stream = TextStream(self.tokenizer, ids)
        stops = StopText(self.stop_texts) if self.stop_texts else None  # holds back what may begin one
        reply: list[int] = []
        pieces: list[str] = []
        try:
            stopped = False
            for item in steps:
                token = item.token if self.show_probs else item
                reply.append(token)
                if token in self.ends:
                    break
                piece = stream.push(token)
                if stops is not None:
                    piece, stopped = stops.push(piece)
                pieces.append(piece)
                if self.show_probs:
                    yield item
                elif piece:
                    yield piece
                if stopped:  # the stop text is not part of the reply
                    break
            tail = ""
            if not stopped:
                tail = stream.finish()
                if stops is not None:  # the text held back, up to a stop string
                    tail = stops.push(tail)[0] + stops.finish()
            pieces.append(tail)
            if tail and not self.show_probs:
                yield tail
        finally:
            self.cached = (ids + reply)[: self.cache.length]
            self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
