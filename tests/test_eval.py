"""``arraygpt.evaluate`` and ``arraygpt eval``: the sliding-window loss, perplexity and bits per
byte equal transformers' perplexity guide's loop (https://huggingface.co/docs/transformers/perplexity)
run with torch on the same model and text, in float64."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arraygpt
from arraygpt import cli
from arraygpt.training.evaluate import windows
from tiny_hf import byte_level_bpe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

BLOCK = 16
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved. Caf\u00e9 na\u00efve \u65e5\u672c 🙂\n"
)
CORPUS = [TEXT, "the quick brown fox jumps over the lazy dog " * 4, "hello world, hello there"]


# ----------------------------------------------------------------------------------------------
# the reference: transformers' guide, in torch


def guide_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity loop over ``ids``: windows of ``max_length`` ids every ``stride``,
    labels -100 for the part already scored. Its window holds the inputs and the last target, so
    ``max_length = context + 1``; the label shift that ``model(window, labels=...)`` does inside is
    done here by hand, because the window's last id is only a target (the model's n_positions is
    ``context``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny windows: threads only contend
    try:
        return _guide_loop(model, ids, context, stride)
    finally:
        torch.set_num_threads(threads)


def _guide_loop(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    input_ids = torch.tensor([ids])
    seq_len, max_length = input_ids.size(1), context + 1
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(window[:, :-1]).logits  # (1, T, V)
        labels = target_ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum")
        nll_sum += nll.item()
        n_tokens += int((labels != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def train_tokenizer(directory, bos: bool):
    """A tiny byte-level BPE trained on CORPUS, saved through transformers (``<s>`` first when ``bos``)."""
    tok = byte_level_bpe(CORPUS, min_frequency=1)
    processors = [tokenizers.processors.ByteLevel(trim_offsets=False)]
    if bos:  # as Llama 3's tokenizer.json: BOS before every text
        processors.append(
            tokenizers.processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
            )
        )
    tok.post_processor = tokenizers.processors.Sequence(processors)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def random_gpt2(vocab_size: int):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # every weight random (gains and biases too) and large enough to matter
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith(".weight") and p.ndim == 1 else 0.0) + 0.3 * torch.randn_like(p))
    return model


def random_llama(vocab_size: int):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=BLOCK,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    """(directory, transformers model in float64, transformers tokenizer) of a tiny random model."""
    directory = tmp_path_factory.mktemp(request.param)
    fast = train_tokenizer(directory, bos=request.param == "llama")
    model = (random_gpt2 if request.param == "gpt2" else random_llama)(len(fast))
    model.save_pretrained(directory)
    return directory, model.double().eval(), fast


# ----------------------------------------------------------------------------------------------
# the rule


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(2, 12), st.data())
def test_windows_score_every_token_after_the_first_once_with_the_context_before_it(n, context, data):
    stride = data.draw(st.integers(1, context))
    seen: list[int] = []
    previous_end = 0
    for begin, end, skip in windows(n, context, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= context
        assert begin + skip == previous_end  # scores exactly what no window scored before
        targets = list(range(begin + 1 + skip, end + 1))
        seen += targets
        for t in targets:  # predicted from ids[begin:t]: all since the start, or at least context - stride + 1
            assert min(t, context - stride + 1) <= t - begin <= context
        previous_end = end
    assert seen == list(range(1, n))


# ----------------------------------------------------------------------------------------------
# equal to transformers


@pytest.mark.parametrize("context, stride", [(None, None), (BLOCK, 5), (8, 8), (7, 3), (BLOCK, 2), (4, 1)])
def test_evaluate_equals_the_transformers_guide(hf_dir, context, stride):
    directory, hf_model, fast = hf_dir
    ckpt = arraygpt.load(directory, dtype="float64")
    ids = fast(TEXT)["input_ids"]  # the tokenizer's default: BOS first for the Llama one
    assert ckpt.tokenizer.encode(TEXT) == fast(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * BLOCK  # several windows
    ctx = BLOCK if context is None else context
    want_nll, want_n = guide_nll(hf_model, ids, ctx, ctx if stride is None else stride)
    got = arraygpt.evaluate(ckpt.model, ckpt.tokenizer, TEXT, context, stride)
    assert got.tokens == want_n == len(ids) - 1
    # float64 on both sides, but transformers computes Llama's RoPE frequencies in float32 (~1e-9)
    np.testing.assert_allclose(got.loss, want_nll / want_n, rtol=1e-6)
    np.testing.assert_allclose(got.perplexity, math.exp(want_nll / want_n), rtol=1e-6)
    np.testing.assert_allclose(got.bits_per_byte, want_nll / math.log(2) / len(TEXT.encode()), rtol=1e-6)
    assert (got.context, got.stride) == (ctx, ctx if stride is None else stride)


def test_batches_change_nothing_and_stay_small(hf_dir):
    directory, _, _ = hf_dir
    ckpt = arraygpt.load(directory, dtype="float64")
    model, shapes = ckpt.model, []
    forward = model.forward

    def spy(idx, *args, **kwargs):
        shapes.append(tuple(np.asarray(idx).shape))
        return forward(idx, *args, **kwargs)

    model.forward = spy
    one = arraygpt.evaluate(model, ckpt.tokenizer, TEXT, 8, 3, batch_size=1)
    assert shapes and all(s[0] == 1 and s[1] <= 8 for s in shapes)
    shapes.clear()
    calls = []
    three = arraygpt.evaluate(model, ckpt.tokenizer, TEXT, 8, 3, batch_size=3, progress=lambda *a: calls.append(a))
    assert max(s[0] for s in shapes) == 3 and all(s[1] <= 8 for s in shapes)
    np.testing.assert_allclose(three.loss, one.loss, rtol=1e-12)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and calls[-1] == (one.tokens, one.tokens)
    assert not model.training


# ----------------------------------------------------------------------------------------------
# the command


def run_cli(capsys, *argv):
    rc = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_command_json_agrees_with_the_function(hf_dir, tmp_path, capsys):
    directory, _, _ = hf_dir
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    rc, out, err = run_cli(
        capsys, "--checkpoint", directory, "--data", data, "--stride", 5, "--dtype", "float64", "--json"
    )
    assert rc == 0 and err == ""
    got = json.loads(out)
    ckpt = arraygpt.load(directory, dtype="float64")
    want = arraygpt.evaluate(ckpt.model, ckpt.tokenizer, TEXT, stride=5)
    assert set(got) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert got["tokens"] == want.tokens
    for key in ("loss", "perplexity", "bits_per_byte"):
        np.testing.assert_allclose(got[key], getattr(want, key), rtol=1e-12)
    rc, out, err = run_cli(capsys, "--checkpoint", directory, "--data", data, "--progress")
    assert rc == 0 and "perplexity" in out and f"{want.tokens:,}/{want.tokens:,} tokens (100%)" in err


@pytest.mark.parametrize("mode", ["stream", "documents"])
def test_an_arraygpt_checkpoint_trained_briefly_evaluates(tmp_path, capsys, mode):
    data = tmp_path / "tiny.txt"
    data.write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    arraygpt.train(
        str(data),
        mode=mode,
        steps=5,
        out_dir=tmp_path / "run",
        n_layer=1,
        n_embd=16,
        n_head=2,
        block_size=12,
        batch_size=4,
        progress=False,
        samples=0,
    )
    text = "not to be, or to be, that is the question" + ("\nto be or not" if mode == "stream" else "")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(text, encoding="utf-8")
    rc, out, err = run_cli(capsys, "--checkpoint", tmp_path / "run", "--data", held_out, "--json", "--stride", 4)
    assert rc == 0, err
    got = json.loads(out)
    ckpt = arraygpt.load(tmp_path / "run")
    # documents were BOS-wrapped in training, so the text starts at BOS as each document did
    ids = ([ckpt.tokenizer.bos_id] if mode == "documents" else []) + ckpt.tokenizer.encode(text)
    assert got["tokens"] == len(ids) - 1
    # an independent reference: token t is scored by the first window that reaches it, the one
    # starting at k * 4 with k = max(0, ceil((t - 12) / 4)); its log-probability comes from a
    # forward pass over exactly the ids of that window before it
    model, nll = ckpt.model, 0.0
    for t in range(1, len(ids)):
        begin = max(0, -(-(t - 12) // 4)) * 4
        logits, _ = model.forward(np.array([ids[begin:t]]))
        row = np.asarray(logits, dtype=np.float64)[0, -1]
        nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[t]]
    np.testing.assert_allclose(got["loss"], nll / (len(ids) - 1), rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], nll / math.log(2) / len(text.encode()), rtol=1e-5)


@pytest.mark.parametrize(
    "text, options, message",
    [
        (None, [], "the text file is missing"),
        ("", [], "the text file is empty"),
        ("a", [], "the text is 1 token(s); at least 2 are needed"),
        (TEXT, ["--context", 1], "--context must be from 2 to the model's block_size, got 1"),
        (
            TEXT,
            ["--context", BLOCK + 1],
            f"context must be from 2 to {BLOCK} (the model's block_size), got {BLOCK + 1}",
        ),
        (TEXT, ["--stride", 0], "--stride must be from 1 to the context, got 0"),
        (TEXT, ["--context", 8, "--stride", 9], "--stride must be from 1 to the context (8), got 9"),
        (TEXT, ["--stride", BLOCK + 1], f"stride must be from 1 to {BLOCK} (at most the context), got {BLOCK + 1}"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hf_dir, tmp_path, capsys, text, options, message):
    directory, _, fast = hf_dir
    if text == "a" and len(fast(text)["input_ids"]) > 1:
        pytest.skip("this tokenizer puts BOS first, so every non-empty text has 2 tokens")
    data = tmp_path / "text.txt"
    if text is not None:
        data.write_text(text, encoding="utf-8")
    rc, out, err = run_cli(capsys, "--checkpoint", directory, "--data", data, *options)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("arraygpt eval: error: ") and message in err


def test_a_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes("caf\u00e9".encode("latin-1"))
    rc, _, err = run_cli(capsys, "--checkpoint", tmp_path, "--data", data)
    assert rc == 2 and "not UTF-8 text" in err and err.count("\n") == 1


def test_a_folder_or_an_oversized_file_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    from arraygpt.cli import eval as eval_command

    rc, _, err = run_cli(capsys, "--checkpoint", tmp_path, "--data", tmp_path)
    assert rc == 2 and "the text file is a directory" in err and err.count("\n") == 1
    data = tmp_path / "big.txt"
    data.write_text("x" * 101, encoding="utf-8")
    monkeypatch.setattr(eval_command, "MAX_TEXT_BYTES", 100)
    rc, _, err = run_cli(capsys, "--checkpoint", tmp_path, "--data", data)
    assert rc == 2 and "the text file is 101 bytes; at most 100 are read" in err and err.count("\n") == 1
