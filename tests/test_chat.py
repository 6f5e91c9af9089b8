"""Chat: a tiny random Llama-style model with a tiny trained byte-level BPE and a ChatML template,
saved as a transformers directory. The rendered conversation is checked against transformers'
``apply_chat_template``, the second turn is checked to prefill only its own tokens (counting the
positions fed to the model), a reply stops at ``<|im_end|>``, and ``arraygpt chat`` answers lines
of standard input with and without ``--system``."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest

from tiny_hf import byte_level_bpe

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt.cli import main
from arraygpt.generation.chat import Chat, render_chatml
from arraygpt.manager import get_plugin_manager, set_plugin_manager
from arraygpt.xp import namespace, to_numpy

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = [
    "hello there, how are you today? I am fine, thank you.",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital.",
    "user assistant system hello world",
]
REPLY = "hello world"  # what the forcing sampler makes the model say


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = byte_level_bpe(TEXT * 4, SPECIALS)
    directory = tmp_path_factory.mktemp("chat") / "tiny-chat"
    config = dataclasses.replace(
        GPTConfig.preset("llama-tiny"), vocab_size=tokenizer.get_vocab_size() + 5, block_size=256
    )  # a vocabulary padded past the tokenizer's, as Qwen2.5's is
    arraygpt.save(GPT(config, seed=0, dtype="float64"), directory, format="llama")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
            }
        )
    )
    return directory


def _forced(reply_ids, im_start, header):
    """A filter that makes the reply ``reply_ids`` (the last one <|im_end|>): the step is the number
    of tokens after the last ``<|im_start|>`` and the assistant header."""

    def forced(probs, context):
        xp = namespace(probs)
        ctx = to_numpy(context)[0]
        start = int(np.flatnonzero(ctx == im_start)[-1])
        step = len(ctx) - start - 1 - len(header)
        token = reply_ids[min(step, len(reply_ids) - 1)]
        ids = xp.arange(probs.shape[-1], device=probs.device)[None, :]
        return xp.where(ids == token, xp.ones_like(probs), xp.zeros_like(probs))

    return forced


class _Forcing:
    """A sampler plugin ``forced``: the model replies REPLY, then <|im_end|>."""

    def __init__(self, tokenizer):
        self.reply_ids = [*tokenizer.encode(REPLY), tokenizer.encode("<|im_end|>")[0]]
        self.im_start = tokenizer.encode("<|im_start|>")[0]
        self.header = tokenizer.encode("assistant\n")

    @arraygpt.hookimpl
    def arraygpt_register_samplers(self):
        return [{"forced": lambda: _forced(self.reply_ids, self.im_start, self.header)}]


@pytest.fixture
def counted(model_dir):
    """The loaded checkpoint, with a record of the positions each forward is fed."""
    ckpt = arraygpt.load(model_dir)
    fed: list[list[int]] = []
    forward = ckpt.model.forward

    def counting(idx, *args, **kwargs):
        fed.append(np.asarray(to_numpy(ckpt.model.xp.asarray(idx)) if not isinstance(idx, list) else idx)[0].tolist())
        return forward(idx, *args, **kwargs)

    ckpt.model.forward = counting
    return ckpt, fed


def test_the_conversation_is_rendered_and_fed_as_transformers_renders_it(model_dir, counted):
    from transformers import AutoTokenizer

    ckpt, fed = counted
    hf = AutoTokenizer.from_pretrained(model_dir)
    plugin = _Forcing(ckpt.tokenizer)
    pm = get_plugin_manager(autoload=False)
    pm.register(plugin, name="forcing")
    set_plugin_manager(pm)
    try:
        chat = Chat(ckpt, system="You are terse.", sampler="forced", seed=0)
        first = "".join(chat.send("hello there"))
        assert first == REPLY  # stopped at <|im_end|>, which is not part of the reply
        after_first = len(fed)
        second = "".join(chat.send("what is the capital of france?"))
    finally:
        set_plugin_manager(None)
    assert second == REPLY
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "what is the capital of france?"},
    ]
    assert chat.render(conversation) == hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert chat.messages == [*conversation, {"role": "assistant", "content": REPLY}]
    # every position the model was fed, in order, is transformers' tokenization of the conversation
    stream = [t for piece in fed for t in piece]
    expected = hf.apply_chat_template(
        [*conversation, {"role": "assistant", "content": REPLY}], add_generation_prompt=False, tokenize=True
    )
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert stream == expected[: len(stream)] and len(stream) == len(expected) - 2  # all but <|im_end|>\n
    # the second turn's prefill is only its own tokens: the end of the reply, the new user turn, the header
    own = hf.encode("<|im_end|>\n<|im_start|>user\nwhat is the capital of france?<|im_end|>\n<|im_start|>assistant\n")
    assert fed[after_first] == own and chat.prefilled == len(own)
    assert all(len(piece) == 1 for piece in fed[1:after_first] + fed[after_first + 1 :])  # one token per step


def test_a_cache_that_parts_from_the_new_rendering_is_cut_back(counted):
    ckpt, fed = counted
    chat = Chat(ckpt, temperature=0, max_new_tokens=4, seed=0)
    list(chat.send("hello"))
    chat.messages[-1]["content"] = "something else"  # as a template that rewrites the reply would
    before = len(fed)
    reply = "".join(chat.send("again"))
    ids = ckpt.tokenizer.encode(chat.render(chat.messages[:-1]))
    first_turn = ckpt.tokenizer.encode(render_chatml([{"role": "user", "content": "hello"}]))
    assert chat.prefilled == len(ids) - len(first_turn) and fed[before] == ids[len(first_turn) :]
    # the cut-back cache gives the reply of a full recompute of the whole conversation
    tokens = list(arraygpt.generate(ckpt.model, ids, 4, temperature=0, use_cache=False, eos_id=chat.ends))
    assert reply == ckpt.tokenizer.decode([t for t in tokens if t not in chat.ends])


def test_a_reply_never_holds_an_id_past_the_tokenizer_vocabulary(counted):
    ckpt, _ = counted
    V_tok = ckpt.tokenizer.vocab_size
    assert ckpt.model.config.vocab_size > V_tok

    def favour_padding(probs):  # all weight on the padding ids, a little on one real token
        xp = namespace(probs)
        ids = xp.arange(probs.shape[-1], device=probs.device)[None, :]
        return xp.where(ids >= V_tok, probs + 1.0, xp.where(ids == 5, probs, xp.zeros_like(probs)))

    tokens = list(arraygpt.generate(ckpt, "hello", 6, favour_padding, seed=0, eos_id=()))
    assert tokens and "".join(tokens) == ckpt.tokenizer.decode([5] * 6)


def test_a_model_without_a_chat_template_is_a_clear_error(model_dir, tmp_path, capsys, monkeypatch):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--checkpoint", str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no chat template" in err and "--template chatml" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--checkpoint", str(plain), "--template", "chatml", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


@pytest.fixture(scope="module")
def gguf_file(model_dir):
    pytest.importorskip("gguf")
    ckpt = arraygpt.load(model_dir)
    path = model_dir.parent / "tiny-chat.gguf"
    arraygpt.save(ckpt.model, path, format="gguf", tokenizer=ckpt.tokenizer)
    return path


@pytest.mark.parametrize("system", [None, "You are terse."])
@pytest.mark.parametrize("kind", ["directory", "gguf"])
def test_arraygpt_chat_answers_each_line_of_standard_input(model_dir, request, capsys, monkeypatch, system, kind):
    path = model_dir if kind == "directory" else request.getfixturevalue("gguf_file")
    ckpt = arraygpt.load(path)
    pm = get_plugin_manager(autoload=False)
    pm.register(_Forcing(ckpt.tokenizer), name="forcing")
    set_plugin_manager(pm)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nwhat is the capital of france?\n"))
    try:
        args = ["chat", "--checkpoint", str(path), "--sampler", "forced"]
        assert main(args + (["--system", system] if system else [])) == 0
    finally:
        set_plugin_manager(None)
    assert capsys.readouterr().out == f"{REPLY}\n{REPLY}\n"  # one reply per non-blank line, stopped at <|im_end|>


def test_arraygpt_chat_reads_generation_config_once_and_top_k_0_turns_its_top_k_off(
    model_dir, tmp_path, capsys, monkeypatch
):
    """generation_config.json fills in the chat's sampler as it does ``arraygpt sample``'s, and
    ``--top-k 0`` turns the file's top-k off (the chat does not read the file a second time)."""
    import shutil

    folder = tmp_path / "with-config"
    shutil.copytree(model_dir, folder)
    config = {"do_sample": True, "top_k": 5, "repetition_penalty": 1.3}
    (folder / "generation_config.json").write_text(json.dumps(config))
    made = []

    class Recorded(Chat):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr("arraygpt.generation.chat.Chat", Recorded)
    for options, names in (([], {"top_k", "repeat_penalty"}), (["--top-k", "0"], {"repeat_penalty"})):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
        assert main(["chat", "--checkpoint", str(folder), "--max-new-tokens", "2", *options]) == 0
        assert {"top_k", "repeat_penalty"} & set(made[-1].chain.names) == names, options
    capsys.readouterr()


def test_arraygpt_chat_shows_the_distribution_behind_each_reply_token(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    args = ["chat", "--checkpoint", str(model_dir), "--max-new-tokens", "3", "--show-probs", "2", "--top-k", "4"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all("model: " in line and "|  sampler: " in line for line in lines[:-1])
    assert lines[-1].startswith("=> ")


def _read_until(fd, marker, timeout=60.0):
    import os
    import select
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"no {marker!r} in {seen[-300:]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs a pseudo-terminal (POSIX)")
@pytest.mark.parametrize("key", [b"\x04", b"\x03"], ids=["ctrl-d", "ctrl-c"])
def test_on_a_terminal_chat_prompts_and_ctrl_d_or_ctrl_c_end_it_cleanly(model_dir, key):
    import os
    import pty
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: arraygpt chat on the terminal
        # a one-token reply: no merge of the tiny BPE makes "> ", so the next "> " is the prompt
        args = ["chat", "--checkpoint", str(model_dir), "--temperature", "0", "--max-new-tokens", "1"]
        os.execv(sys.executable, [sys.executable, "-m", "arraygpt.cli", *args])
    try:
        _read_until(fd, b"> ")
        os.write(fd, b"hello there\r")
        answer = _read_until(fd, b"> ")  # the reply, then the prompt again
        assert answer.count(b"> ") == 1
        # Python checks a signal only once its blocking read returns, so a key that arrives before
        # input() blocks can wait unseen (a person is never that fast): press it again if so
        for attempt in range(3):
            time.sleep(0.2)
            os.write(fd, key)
            try:
                rest = _read_until(fd, b"\x00", timeout=5)  # until the child closes the terminal
                break
            except AssertionError:
                if attempt == 2:
                    raise
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, rest
    assert b"Traceback" not in rest and b"error" not in rest


def test_a_conversation_that_outgrows_the_context_drops_its_oldest_exchanges(counted):
    ckpt, fed = counted
    chat = Chat(ckpt, system="You are terse.", temperature=0, max_new_tokens=6, seed=0)
    message = "the quick brown fox jumps over the lazy dog " * 3
    for _ in range(8):
        before = len(fed)
        reply = "".join(chat.send(message))
        after = len(fed)
        ids = ckpt.tokenizer.encode(chat.render(chat.messages[:-1]))
        assert len(ids) + 6 <= ckpt.model.config.block_size
        tokens = list(arraygpt.generate(ckpt.model, ids, 6, temperature=0, use_cache=False, eos_id=chat.ends))
        assert reply == ckpt.tokenizer.decode([t for t in tokens if t not in chat.ends])  # as a full recompute
    assert chat.dropped > 0 and chat.dropped % 2 == 0  # whole exchanges
    roles = [m["role"] for m in chat.messages]
    assert roles[0] == "system" and roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
    assert sum(len(piece) for piece in fed[before:after]) <= 6 + chat.prefilled
    assert chat.prefilled < len(ids)


def test_chatml_without_an_im_end_token_stops_at_its_text_and_never_streams_it():
    """A byte tokenizer has no <|im_end|> token: the model writes it byte by byte, and the reply
    stops there; no piece of the stop text is streamed, though its first bytes could not yet be
    told from text ("<" alone), and a "<" that begins no stop text is streamed."""
    import dataclasses
    import itertools

    from arraygpt import GPT, GPTConfig
    from arraygpt.io.tokenizers import ByteTokenizer

    model = GPT(dataclasses.replace(GPTConfig.preset("microgpt"), vocab_size=257, block_size=256), seed=0)
    for written, want in [("a<b hi!<|im_end|>more", "a<b hi!"), ("a <|im", "a <|im")]:
        reply, step = list(written.encode()), itertools.count()

        def forced(probs, reply=reply, step=step):
            xp = namespace(probs)
            token = reply[min(next(step), len(reply) - 1)]
            return xp.astype(xp.arange(probs.shape[-1])[None, :] == token, probs.dtype)

        chat = Chat(model, ByteTokenizer(), template="chatml", sampler=forced, seed=0, max_new_tokens=len(reply))
        pieces = list(chat.send("hello"))
        assert "".join(pieces) == chat.messages[-1]["content"] == want
        assert not any("|im" in piece for piece in pieces[:-1])
