"""arraygpt.viz.figures, ``arraygpt plot`` and ``arraygpt explain``: the data behind each picture equals what
the model computes, the figures draw it (the masked future left empty), each command writes valid
PNG, SVG and HTML files, bad input exits 2 with one line.

Data tests run with ``draw=False`` and need no matplotlib; drawing tests skip without it."""

from __future__ import annotations

import json
import os
import re
import stat
import sys

import numpy as np
import pytest

import arraygpt
from arraygpt import viz
from arraygpt.config import GPTConfig
from arraygpt.generation.generation import generate
from arraygpt.generation.sampling import make_sampler
from arraygpt.nn.params import count_params
from arraygpt.xp import to_numpy

PNG = b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


needs_mpl = pytest.mark.skipif(
    not _has_matplotlib(), reason="matplotlib is not installed (pip install 'arraygpt[viz]')"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained on the names data, saved as a run folder with metrics.jsonl."""
    out = tmp_path_factory.mktemp("viz") / "names"
    arraygpt.train("names", steps=60, out_dir=out, progress=False, samples=0, log_interval=10, eval_interval=30)
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    from arraygpt.io.formats import load

    return load(run_dir)


@pytest.fixture
def model(loaded):
    return loaded.model


@pytest.fixture
def tok(loaded):
    return loaded.tokenizer


def host(x):
    return np.asarray(to_numpy(x))


# ----------------------------------------------------------------------------------------------
# the data


def test_prompt_ids(tok):
    assert viz.prompt_ids(tok, "em", [tok.bos_id]) == [tok.bos_id] + tok.encode("em")
    assert viz.prompt_ids(tok, "") == [tok.bos_id]
    assert viz.prompt_ids(tok, [3, 4]) == [3, 4]
    assert viz.token_label(tok, tok.bos_id) == "<bos>"
    assert viz.token_label(None, 7) == "#7"


def test_prompt_without_bos_is_refused():
    from arraygpt.io.tokenizers import CharTokenizer

    with pytest.raises(ValueError, match="no BOS token"):
        viz.prompt_ids(CharTokenizer("ab", bos=False), "")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        viz.prompt_ids(None, "ab")


def test_attention_values_are_the_models(model, tok, loaded):
    a = viz.plot_attention(model, tok, "emma", prefix=loaded.prompt_prefix, draw=False)
    assert a.figure is None
    assert a.tokens == [tok.bos_id] + tok.encode("emma")
    assert a.labels[0] == "<bos>" and a.labels[1:] == list("emma")
    mine = model.attention_patterns()  # still the forward plot_attention ran
    assert a.patterns.shape == (model.config.n_layer, model.config.n_head, 5, 5)
    for layer, p in enumerate(mine):
        np.testing.assert_array_equal(a.patterns[layer], host(p)[0])
    model.forward([a.tokens])  # an independent forward gives the same values
    for layer, p in enumerate(model.attention_patterns()):
        np.testing.assert_array_equal(a.patterns[layer], host(p)[0])
    T = len(a.tokens)
    assert (a.mask == (np.arange(T)[None, :] > np.arange(T)[:, None])).all()
    assert (a.patterns[..., a.mask] == 0.0).all()  # the masked future is exactly 0
    np.testing.assert_allclose(a.patterns.sum(axis=-1), 1.0, atol=1e-6)


def test_attention_crops_to_block_size(model, tok):
    long = "emmaannaliselotte"
    a = viz.plot_attention(model, tok, long, draw=False)
    assert a.tokens == tok.encode(long)[-model.config.block_size :]


def test_logit_lens_last_entry_is_the_models_prediction(model, tok, loaded):
    lens = viz.plot_logit_lens(model, tok, "anna", prefix=loaded.prompt_prefix, k=3, draw=False)
    L = model.config.n_layer
    assert lens.layer_names == ["embedding"] + [f"block {i + 1}" for i in range(L)]
    assert lens.logits.shape == (L + 1, 5, model.config.vocab_size)
    stream = model.residual_stream([lens.tokens])
    for layer, x in enumerate(stream):  # each entry: the final norm and unembedding of that stream
        np.testing.assert_array_equal(lens.logits[layer], host(model.unembed(x))[0])
    logits, _ = model.forward([lens.tokens])
    own = host(logits)[0].astype(np.float64)  # (T, V)
    np.testing.assert_allclose(lens.logits[-1], own, atol=1e-5)
    expected = np.argsort(-own, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(lens.top_ids[-1], expected)
    probs = np.exp(own - own.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(lens.top_probs[-1], np.take_along_axis(probs, expected, -1), atol=1e-6)
    assert lens.top_labels[-1][0][0] == viz.token_label(tok, expected[0, 0])


def test_pca_components_orthonormal_and_ordered(model):
    wte = host(model.params["wte"]).astype(np.float64)
    components, points, variance, mean = viz.pca(wte, 3)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-10)
    assert variance[0] >= variance[1] >= variance[2] > 0
    np.testing.assert_allclose(points, (wte - wte.mean(0)) @ components.T, atol=1e-12)
    np.testing.assert_allclose(points.var(axis=0, ddof=1), variance, rtol=1e-10)
    eig = np.linalg.eigvalsh(np.cov(wte, rowvar=False))[::-1][:3]  # the covariance's top eigenvalues
    np.testing.assert_allclose(variance, eig, rtol=1e-8)
    np.testing.assert_allclose(mean, wte.mean(0))


def test_pca_refuses_a_vector():
    with pytest.raises(ValueError, match="at least 2 rows"):
        viz.pca(np.ones((1, 4)))


def test_embeddings_and_neighbours(model, tok):
    e = viz.plot_embeddings(model, tok, token="a", k=4, draw=False)
    wte = host(model.params["wte"]).astype(np.float64)
    a = tok.encode("a")[0]
    assert e.token == a and e.points.shape == (model.config.vocab_size, 2)
    assert e.labels[a] == "a" and len(e.labels) == model.config.vocab_size
    cos = wte @ wte[a] / (np.linalg.norm(wte, axis=1) * np.linalg.norm(wte[a]))
    cos[a] = -np.inf
    best = np.argsort(-cos)[:4]
    assert [i for i, _, _ in e.neighbours] == best.tolist()
    np.testing.assert_allclose([c for _, _, c in e.neighbours], cos[best], atol=1e-12)
    assert a not in [i for i, _, _ in e.neighbours]
    assert e.variance_ratio[0] >= e.variance_ratio[1] and e.variance_ratio.sum() <= 1.0 + 1e-12


def test_embeddings_bad_token(model, tok):
    with pytest.raises(ValueError, match="not one"):
        viz.plot_embeddings(model, tok, token="ab", draw=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        viz.nearest_neighbours(np.eye(3), 5)


def test_distributions_equal_generate_and_the_sampler(model, tok, loaded):
    options = dict(temperature=0.8, top_k=5)
    d = viz.plot_distributions(
        model, tok, "em", 6, "top_k", k=6, seed=3, prefix=loaded.prompt_prefix, draw=False, **options
    )
    ends = [tok.bos_id]
    expected = list(
        generate(model, d.prompt, 6, "top_k", seed=3, use_cache=False, eos_id=ends, show_probs=6, **options)
    )
    assert d.candidates == expected
    assert d.tokens == [c.token for c in expected] and d.labels == [viz.token_label(tok, t) for t in d.tokens]
    chain = make_sampler("top_k", **options)
    for c, logits, probs in zip(d.candidates, d.logits, d.sampler_probs):
        model_p = np.exp(logits - logits.max())
        model_p /= model_p.sum()
        top = np.argsort(-model_p, kind="stable")[:6]
        assert [i for i, _ in c.model] == top.tolist()
        np.testing.assert_allclose([p for _, p in c.model], model_p[top], atol=1e-6)
        np.testing.assert_allclose(
            probs, host(chain(model.xp.asarray(logits[None, :].astype(np.float32))))[0], atol=1e-7
        )
        assert (probs > 0).sum() <= 5  # top-5 (ties aside)
        assert probs[c.token] == pytest.approx(c.p_sampler, abs=1e-7)
    for c, panel in zip(d.candidates, d.panels):
        chosen = [row for row in panel if row[4]]
        assert len(chosen) == 1 and chosen[0][0] == c.token  # the chosen token is marked once
        assert [row[0] for row in panel[: len(c.model)]] == [i for i, _ in c.model]


def test_distributions_stop_at_the_end_token(model, tok):
    d = viz.plot_distributions(model, tok, "", 30, draw=False, seed=0)
    assert len(d.tokens) <= 30
    if tok.bos_id in d.tokens:
        assert d.tokens[-1] == tok.bos_id and d.tokens.count(tok.bos_id) == 1


def test_training_curves_are_the_records(run_dir):
    c = viz.plot_training_curves(run_dir, draw=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(train) == 6 and len(evals) >= 2
    np.testing.assert_array_equal(c.steps, [r["step"] for r in train])
    np.testing.assert_array_equal(c.loss, [r["loss"] for r in train])
    np.testing.assert_array_equal(c.lr, [r["lr"] for r in train])
    np.testing.assert_array_equal(c.eval_steps, [r["step"] for r in evals])
    np.testing.assert_array_equal(c.train_loss, [r["train_loss"] for r in evals])
    np.testing.assert_array_equal(c.val_loss, [r["val_loss"] for r in evals])
    same = viz.plot_training_curves(run_dir / "metrics.jsonl", draw=False)  # the file itself works too
    np.testing.assert_array_equal(same.loss, c.loss)


def test_training_curves_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        viz.plot_training_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(ValueError, match="no train or eval records"):
        viz.plot_training_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        viz.plot_training_curves(tmp_path)


@pytest.mark.parametrize("preset", ["gpt3-175b", "gpt2", "microgpt", "gpt3-small"])
def test_param_tally_is_count_params(preset):
    t = viz.plot_param_tally(preset, draw=False)
    config = GPTConfig.preset(preset)
    counts = count_params(config)
    assert t.categories == list(counts.by_category)
    assert t.counts == list(counts.by_category.values())
    assert t.total == counts.total
    # a tied unembedding is drawn (it is a matrix the model multiplies by) but counted once
    assert t.tied == (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    assert sum(t.counts) == t.total + t.tied
    assert t.matrices == sum(t.counts) - counts.by_category["other"]


def test_param_tally_gpt3_as_the_documents_tally_it():
    t = viz.plot_param_tally("gpt3-175b", draw=False)
    by = dict(zip(t.categories, t.counts))
    assert by["embedding"] == by["unembedding"] == 50257 * 12288 == 617_558_016  # "about 617 million" each
    assert by["key"] == by["query"] == 96 * 96 * 128 * 12288  # 96 layers x 96 heads x ~1.5M
    attention = by["key"] + by["query"] + by["value"] + by["output"]
    assert attention == 57_982_058_496  # "just under 58 billion" for all the attention heads
    assert t.matrices == 175_181_291_520  # the documents' running tally: 175 billion


def test_param_tally_of_a_config():
    config = GPTConfig.preset("gpt2", n_layer=2)
    t = viz.plot_param_tally(config, name="tiny", draw=False)
    assert t.name == "tiny" and t.total == count_params(config).total


def test_draw_without_matplotlib_says_how_to_install(monkeypatch, model, tok):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"arraygpt\[viz\]"):
        viz.plot_param_tally("gpt2")
    assert viz.plot_param_tally("gpt2", draw=False).figure is None  # the data needs no matplotlib


def test_save_needs_a_figure_and_a_known_suffix(tmp_path):
    with pytest.raises(ValueError, match="draw=False"):
        viz.plot_param_tally("gpt2", draw=False).save(tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------
# the figures


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


@needs_mpl
def test_attention_figure_leaves_the_future_empty(model, tok, loaded):
    a = viz.plot_attention(model, tok, "emma", prefix=loaded.prompt_prefix)
    images = _images(a.figure)
    L, NH = model.config.n_layer, model.config.n_head
    assert len(images) == L * NH
    for n, im in enumerate(images):
        data = im.get_array()
        assert np.ma.isMaskedArray(data)
        np.testing.assert_array_equal(np.ma.getmaskarray(data), a.mask)  # the future is not painted
        np.testing.assert_array_equal(data.filled(np.nan)[~a.mask], a.patterns[n // NH, n % NH][~a.mask])
    assert im.cmap.get_bad()[3] > 0 and tuple(im.cmap.get_bad()[:3]) == (1.0, 1.0, 1.0)  # drawn white
    titles = [ax.get_title() for ax in a.figure.axes if ax.get_images()]
    assert titles[0] == "layer 1 · head 1" and titles[-1] == f"layer {L} · head {NH}"
    assert [t.get_text() for t in a.figure.axes[0].get_xticklabels()] == a.labels


@needs_mpl
def test_distribution_figure_marks_the_chosen_token(model, tok):
    d = viz.plot_distributions(model, tok, "em", 3, seed=1, eos_id=None)
    axes = [ax for ax in d.figure.axes if ax.patches]
    assert len(axes) == len(d.tokens) == 3
    for ax, panel in zip(axes, d.panels):
        heights = [p.get_width() for p in ax.patches]
        n = len(panel)
        np.testing.assert_allclose(heights[:n], [r[2] for r in panel])  # grey: the model's p
        np.testing.assert_allclose(heights[n:], [r[3] for r in panel])  # blue: the sampler's p
        red = [t.get_text() for t in ax.get_yticklabels() if t.get_color() == "#c0392b"]
        assert red == [r[1] + " ◀" for r in panel if r[4]]


@needs_mpl
def test_logit_lens_figure_writes_the_top_guesses(model, tok):
    lens = viz.plot_logit_lens(model, tok, "emma")
    ax = lens.figure.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == [
        lens.top_labels[layer][t][0] for layer in range(len(lens.layer_names)) for t in range(len(lens.tokens))
    ]
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), lens.top_probs[:, :, 0])


@needs_mpl
def test_tally_and_curve_figures_draw_the_data(run_dir):
    t = viz.plot_param_tally("gpt3-175b")
    bars = t.figure.axes[0].patches
    assert [b.get_width() for b in bars] == t.counts
    assert "175,181,291,520" in t.figure.axes[0].get_title()
    c = viz.plot_training_curves(run_dir)
    line = c.figure.axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), c.steps)
    np.testing.assert_array_equal(line.get_ydata(), c.loss)
    np.testing.assert_array_equal(c.figure.axes[1].get_lines()[0].get_ydata(), c.lr)


@needs_mpl
def test_every_picture_saves_png_and_svg(tmp_path, model, tok, run_dir):
    pictures = {
        "probs": viz.plot_distributions(model, tok, "em", 4),
        "attention": viz.plot_attention(model, tok, "emma"),
        "lens": viz.plot_logit_lens(model, tok, "emma"),
        "embeddings": viz.plot_embeddings(model, tok, token="e"),
        "loss": viz.plot_training_curves(run_dir),
        "params": viz.plot_param_tally("gpt3-175b"),
    }
    for name, picture in pictures.items():
        png = picture.save(tmp_path / f"{name}.png")
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
        svg = picture.save(tmp_path / "svg" / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
        assert picture._repr_html_().startswith('<img alt="')
    with pytest.raises(ValueError, match="image format"):
        pictures["params"].save(tmp_path / "x.jpg")


# ----------------------------------------------------------------------------------------------
# the page's data (the browser test is in test_viz_page.py)


def test_explain_page_is_self_contained(model, tok, loaded, tmp_path):
    page = viz.explain(model, tok, "em", 6, "top_k", top_k=4, temperature=0.9, seed=2, prefix=loaded.prompt_prefix)
    d = page.data
    assert d["settings"] == {"temperature": 0.9, "top_k": 4, "top_p": 1.0, "min_p": 0.0}
    assert d["generated"] == page.distributions.tokens and len(d["steps"]) == len(d["generated"])
    for step, logits in zip(d["steps"], page.distributions.logits):
        assert step["logits"] == logits.tolist() and step["ids"] == list(range(model.config.vocab_size))
    assert d["window"]["tokens"] == page.attention.tokens
    np.testing.assert_allclose(d["attention"], page.attention.patterns, atol=1e-6)
    text = page.html
    assert "<script src" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    start = text.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    assert json.loads(text[start : text.index("</script>", start)]) == json.loads(json.dumps(d))
    path = page.save(tmp_path / "page.html")
    assert path.read_text(encoding="utf-8") == text
    assert page._repr_html_().startswith("<iframe srcdoc=")


def test_explain_truncates_a_large_vocabulary(model, tok):
    page = viz.explain(model, tok, "em", 3, max_vocab=10, seed=0)
    assert page.data["truncated"] is True
    for step, logits in zip(page.data["steps"], page.distributions.logits):
        assert len(step["ids"]) == 10 and step["token"] in step["ids"]
        assert all(logits[i] == v for i, v in zip(step["ids"], step["logits"]))
        top9 = set(np.argsort(-logits, kind="stable")[:9].tolist())
        assert top9 <= set(step["ids"])  # a drawn token outside the top 10 takes the 10th's place only
    drawn_outside = viz.explain(model, tok, "em", 6, max_vocab=2, temperature=50.0, seed=0)
    assert any(  # the test's own premise: some drawn token was outside the top 2
        step["token"] not in np.argsort(-logits, kind="stable")[:2]
        for step, logits in zip(drawn_outside.data["steps"], drawn_outside.distributions.logits)
    )
    for step, logits in zip(drawn_outside.data["steps"], drawn_outside.distributions.logits):
        assert int(np.argmax(logits)) in step["ids"] and step["token"] in step["ids"]


def test_explain_escapes_script_end_in_labels(model):
    class Evil:
        bos_id = eos_id = None

        def decode(self, ids):
            return "</script><b>"

        def encode(self, text):
            return [1]

    page = viz.explain(model, Evil(), [1, 2], 2, seed=0)
    assert page.html.count("</script>") == 2  # the data's and the code's own closing tags only


# ----------------------------------------------------------------------------------------------
# the commands: arraygpt plot KIND and arraygpt explain, through arraygpt.cli.main


def _main(argv, capsys):
    """(exit code, stdout lines, stderr lines) of ``arraygpt ARGV``."""
    from arraygpt.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


def _check_png(path):
    """A PNG: the signature, then an IHDR chunk with a non-empty size, then IEND at the end."""
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    length, kind = int.from_bytes(data[8:12], "big"), data[12:16]
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (length, kind) == (13, b"IHDR") and width > 0 and height > 0
    assert data[-8:-4] == b"IEND"
    return width, height


def _check_svg(path):
    """An SVG: well-formed XML whose root element is <svg> (in the SVG namespace)."""
    from xml.etree import ElementTree

    root = ElementTree.parse(path).getroot()
    assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg"), root.tag
    return root


KIND_ARGS = {
    "probs": ["--checkpoint", "{run}", "--prompt", "em", "--sampler", "top_k", "--top-k", "5", "--max-new-tokens", "4"],
    "attention": ["--checkpoint", "{run}", "--prompt", "emma"],
    "lens": ["--checkpoint", "{run}", "--prompt", "emma"],
    "embeddings": ["--checkpoint", "{run}", "--token", "a"],
    "loss": ["--run", "{run}"],
    "params": ["--preset", "gpt3-175b"],
}


@needs_mpl
@pytest.mark.parametrize("kind", sorted(KIND_ARGS))
def test_plot_writes_a_png_and_an_svg(kind, run_dir, tmp_path, capsys):
    from arraygpt.cli.plot import KINDS

    assert set(KIND_ARGS) == set(KINDS)
    args = [a.format(run=run_dir) for a in KIND_ARGS[kind]]
    for suffix, check in ((".png", _check_png), (".svg", _check_svg)):
        out = tmp_path / "pictures" / f"{kind}{suffix}"
        code, printed, err = _main(["plot", kind, *args, "-o", str(out)], capsys)
        assert (code, printed, err) == (0, [str(out)], [])
        check(out)


@needs_mpl
def test_plot_defaults_to_kind_png_and_reads_a_run_folder_as_checkpoint(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _main(["plot", "loss", "--checkpoint", str(run_dir)], capsys)[:2] == (0, ["loss.png"])
    _check_png(tmp_path / "loss.png")
    assert _main(["plot", "params", "--checkpoint", str(run_dir), "-o", "tally.png"], capsys)[:2] == (0, ["tally.png"])
    _check_png(tmp_path / "tally.png")


def test_explain_writes_the_page_without_matplotlib(run_dir, loaded, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "page.html"
    code, printed, err = _main(
        [
            "explain",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            "em",
            "--max-new-tokens",
            "5",
            "--sampler",
            "top_k",
            "--top-k",
            "4",
            "--temperature",
            "0.9",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert (code, printed, err) == (0, [str(out)], [])
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<script src" not in text
    start = text.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    data = json.loads(text[start : text.index("</script>", start)])
    assert data["settings"] == {"temperature": 0.9, "top_k": 4, "top_p": 1.0, "min_p": 0.0}
    assert 1 <= len(data["generated"]) <= 5
    assert data["prompt"] == list(loaded.prompt_prefix) + loaded.tokenizer.encode("em")


def test_an_output_name_that_is_not_utf8_is_written_and_printed(run_dir, tmp_path, capsys):
    name = os.fsdecode(b"p\xfd.html")  # a byte no UTF-8 text holds: a surrogate in Python's str
    code, printed, err = _main(
        ["explain", "--checkpoint", str(run_dir), "--prompt", "em", "-o", str(tmp_path / name)], capsys
    )
    assert (tmp_path / name).is_file()
    assert (code, err) == (0, []) and printed == [str(tmp_path / "p\ufffd.html")]


def test_arraygpt_explain_is_the_library_function(model, tok, tmp_path):
    page = arraygpt.explain(model, tok, "em", 3, seed=0)
    assert arraygpt.explain is viz.explain and "explain" in arraygpt.__all__
    assert page.save(tmp_path / "p.html").read_text(encoding="utf-8") == page.html
    assert page._repr_html_().startswith("<iframe srcdoc=")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plot"], "say what to draw: arraygpt plot KIND"),
        (["plot", "pictures-of-cats", "--preset", "gpt2"], "unknown KIND 'pictures-of-cats'; choose from probs,"),
        (["plot", "attention"], "attention needs --checkpoint DIR"),
        (["plot", "loss"], "loss needs --run DIR"),
        (["plot", "loss", "--run", "{tmp}"], "no metrics.jsonl at"),
        (["plot", "params"], "params needs --preset NAME"),
        (["plot", "params", "--preset", "gpt-5"], "unknown preset"),
        (["plot", "params", "--preset", "gpt2", "-o", "{tmp}/x.jpg"], "must end in .png or .svg"),
        (["plot", "probs", "--checkpoint", "{tmp}/nope"], "no model at"),
        (
            ["plot", "probs", "--checkpoint", "x", "--top-p", "1.5", "--sampler", "top_p"],
            "--top-p must be a number in (0, 1]",
        ),
        (["plot", "probs", "--checkpoint", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be"),
        (["plot", "embeddings", "--checkpoint", "{run}", "--token", "ab"], "is 2 tokens, not one"),
        (["explain"], "explain needs --checkpoint DIR"),
        (["explain", "--checkpoint", "{run}", "-o", "{tmp}/page.png"], "must end in .html"),
        (["explain", "--checkpoint", "{run}", "--sampler", "no_such_sampler"], "no_such_sampler"),
        (["explain", "--checkpoint", "{tmp}/nope"], "no model at"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, run_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    code, printed, err = _main(argv, capsys)
    assert code == 2 and printed == []
    assert len(err) == 1, err
    assert err[0].startswith(f"arraygpt {argv[0]}: error: ") and message in err[0], err[0]
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.html"))


def test_the_old_viz_command_is_gone():
    from arraygpt.cli import SUBCOMMANDS

    assert "viz" not in SUBCOMMANDS and {"plot", "explain"} <= set(SUBCOMMANDS)
    with pytest.raises(ImportError):
        __import__("arraygpt.cli.viz")


@needs_mpl
def test_the_docs_example_runs(run_dir, tmp_path, monkeypatch):
    """docs/see-inside.md's Python block, run as written against a trained names run."""
    import re
    import shutil
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "see-inside.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    shutil.copytree(run_dir, tmp_path / "runs" / "names")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/see-inside.md", "exec"), namespace)
    assert (tmp_path / "probs.png").read_bytes().startswith(PNG)
    assert (tmp_path / "page.html").stat().st_size > 0
    assert namespace["t"].matrices == 175_181_291_520


def test_explain_starts_the_sliders_at_the_generations_settings(model, tok):
    greedy = viz.explain(model, tok, "em", 2, "greedy", seed=0)
    assert greedy.data["settings"]["temperature"] == 0.0 and greedy.data["page_settings_exact"] is True
    swapped = viz.explain(model, tok, "em", 2, ["top_p", "top_k"], top_p=0.9, top_k=3, seed=0)
    assert swapped.data["settings"] == {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "min_p": 0.0}
    assert swapped.data["page_settings_exact"] is False  # the page applies top-k before top-p
    custom = viz.explain(model, tok, "em", 2, lambda probs: probs, seed=0)
    assert custom.data["page_settings_exact"] is False
    # samplers an option turns on count: a repeat penalty the page does not apply, top_k after top_p
    for sampler, options in (("top_k", dict(top_k=4, repeat_penalty=3.0)), ("top_p", dict(top_p=0.6, top_k=2))):
        assert viz.explain(model, tok, "em", 2, sampler, seed=0, **options).data["page_settings_exact"] is False
    ordered = viz.explain(model, tok, "em", 2, "top_k", top_k=3, top_p=0.9, seed=0)
    assert ordered.data["page_settings_exact"] is True  # top_k then top_p: the page's order


# ----------------------------------------------------------------------------------------------
# the page's package data and escaping (issues 20, 21)


def test_the_page_is_its_package_files_inlined(model, tok):
    """page.html with page.css and page.js inlined verbatim, read from the source tree here, and
    each file listed as package data in pyproject.toml so that a wheel carries it."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    folder = root / "arraygpt" / "viz"
    text = viz.explain(model, tok, "em", 2, seed=0).html
    for name in ("page.css", "page.js"):
        asset = (folder / name).read_text(encoding="utf-8")
        assert asset in text, name
        for unsafe in ("</script", "</style", "<!--", "<script"):  # would end or re-open its element
            assert unsafe not in asset.lower(), (name, unsafe)
    assert "__STYLE__" not in text and "__SCRIPT__" not in text and "__DATA__" not in text
    assert text.count("<script") == 2 and text.count("<style>") == 1
    data_files = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["arraygpt.viz"]
    assert sorted(data_files) == sorted(p.name for p in folder.iterdir() if p.suffix in (".html", ".css", ".js"))


class _Markup:
    """A tokenizer whose tokens are markup, placeholders and mathtext (a vocabulary can hold any text)."""

    TOKENS = ["<!--", "<script>", "</script>", "-->", "&amp;", "<b>x</b>", "__DATA__", "__SCRIPT__", "$}$", "a$^$b"]
    bos_id = eos_id = None

    def decode(self, ids):
        return "".join(self.TOKENS[int(i) % len(self.TOKENS)] for i in ids)

    def encode(self, text):
        return [self.TOKENS.index(text)]


def _data_block(text):
    opening = '<script id="data" type="application/json">'
    start = text.index(opening) + len(opening)
    return text[start : text.index("</script>", start)]


def test_page_data_escapes_lt_gt_and_amp(model):
    """Every <, > and & of the data is a JSON escape (the parse, by the json module, gives the data
    back), so no token can end the data's script element or open a comment in it; the title is
    HTML-escaped and a placeholder in any text stays text."""
    page = viz.explain(model, _Markup(), [0, 1, 2], 3, seed=0, title="__SCRIPT__ <i>t</i> & __DATA__")
    block = _data_block(page.html)
    assert not {"<", ">", "&"} & set(block)
    assert json.loads(block) == json.loads(json.dumps(page.data))
    assert set(_Markup.TOKENS) <= set(page.data["labels"].values())
    assert page.html.count("<script") == 2 and page.html.count("</script>") == 2
    assert "<title>__SCRIPT__ &lt;i&gt;t&lt;/i&gt; &amp; __DATA__</title>" in page.html
    assert "<b>" not in page.html and "<!--" not in page.html


# ----------------------------------------------------------------------------------------------
# outputs are written atomically and errors name the path (issue 21)


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing by arraygpt.io.files takes 100 bytes, then fails with ENOSPC
    (errno 28), as a write on a full disk does."""
    import errno

    import arraygpt.io.files as files

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            room = 100 - self.written
            if len(data) > room:
                self.f.write(data[: max(room, 0)])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(files.os, "fdopen", fdopen)


def _left_over(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_leaves_the_old_picture_and_page(run_dir, tmp_path, capsys, full_disk):
    old = b"the old file, which must survive\n" * 50
    cases = [
        (["plot", "params", "--preset", "gpt2"], tmp_path / "tally.png"),
        (["explain", "--checkpoint", str(run_dir), "--prompt", "em", "--max-new-tokens", "3"], tmp_path / "p.html"),
    ]
    for argv, out in cases:
        if argv[0] == "plot" and not _has_matplotlib():
            continue
        out.write_bytes(old)
        code, printed, err = _main([*argv, "-o", str(out)], capsys)
        assert (code, printed, len(err)) == (2, [], 1), err
        assert str(out) in err[0] and "No space left on device" in err[0] and "unchanged" in err[0], err[0]
        assert out.read_bytes() == old
    assert _left_over(tmp_path) == []  # no temporary file left behind


def test_a_full_disk_on_a_new_file_writes_nothing(model, tok, tmp_path, full_disk):
    with pytest.raises(OSError, match=r"cannot write the page .*new\.html: No space left on device; nothing"):
        viz.explain(model, tok, "em", 2, seed=0).save(tmp_path / "new.html")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_folder_fifo_or_device_as_output_is_refused(run_dir, tmp_path, capsys):
    folder = tmp_path / "page.html"
    folder.mkdir()
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    (tmp_path / "zero.html").symlink_to("/dev/zero")
    cases = [
        (folder, "is a folder"),
        (fifo, "is a FIFO (named pipe)"),
        (tmp_path / "zero.html", "is a character device"),
    ]
    for out, kind in cases:
        code, printed, err = _main(["explain", "--checkpoint", str(run_dir), "-o", str(out)], capsys)
        assert (code, printed, len(err)) == (2, [], 1), err
        assert (
            err[0]
            == f"arraygpt explain: error: {out} {kind}; the page is written only to a regular file: give a file name"
        )
    assert folder.is_dir() and list(folder.iterdir()) == [] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "d.png").mkdir()
    code, _, err = _main(["plot", "params", "--preset", "gpt2", "-o", str(tmp_path / "d.png")], capsys)
    assert code == 2 and err[0].endswith(
        "d.png is a folder; the picture is written only to a regular file: give a file name"
    )
    assert _left_over(tmp_path) == []


@needs_mpl
def test_a_file_size_limit_leaves_the_old_picture(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: EFBIG, no mocking) half-way through the new
    PNG: the old file is intact, the message names it, no temporary file is left."""
    import subprocess

    out = tmp_path / "tally.png"
    old = b"old" * 100
    out.write_bytes(old)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000)); "
        "from arraygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "plot", "params", "--preset", "gpt2", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"arraygpt plot: error: cannot write the picture {out}: File too large"), line
    assert out.read_bytes() == old and _left_over(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# labels are plain text in every figure (issue 21)


@needs_mpl
def test_dollar_signs_in_labels_are_drawn_as_text(model, run_dir, tmp_path):
    """Mathtext would raise on "$}$" when the figure is rendered; each figure renders and shows
    the labels as written."""
    import shutil

    tok = _Markup()
    ids = [8, 9, 0, 8]  # "$}$", "a$^$b", "<!--", "$}$"
    pictures = [
        viz.plot_attention(model, tok, ids),
        viz.plot_logit_lens(model, tok, ids),
        viz.plot_embeddings(model, tok, token=8),
        viz.plot_distributions(model, tok, ids, 2, seed=0, eos_id=None),
        viz.plot_param_tally("gpt2", name="$}$ dollars"),
    ]
    shutil.copytree(run_dir, tmp_path / "run $}$")
    pictures.append(viz.plot_training_curves(tmp_path / "run $}$"))
    for picture in pictures:
        assert picture.png().startswith(PNG)  # rendering parses every text
    attention = pictures[0].figure.axes[0]
    assert [t.get_text() for t in attention.get_xticklabels()] == ["$}$", "a$^$b", "<!--", "$}$"]
    texts = [t.get_text() for ax in pictures[2].figure.axes for t in ax.texts]
    assert "$}$" in texts and "a$^$b" in texts
    assert pictures[4].figure.axes[0].get_title().startswith("$}$ dollars")
    assert pictures[5].figure.axes[0].get_title() == "training curves: run $}$"


# ----------------------------------------------------------------------------------------------
# metrics.jsonl is read as a regular file, bounded, line by line (issue 21)

GOOD = '{"event": "train", "step": 1, "loss": 3.5, "lr": 0.001}\n'


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"event": "train", "step": [1], "loss": 3.0, "lr": 0.1}\n',
            "line 2: the train record's 'step' is [1], not a number",
        ),
        (
            '{"event": "eval", "step": 2, "val_loss": "low"}\n',
            "line 2: the eval record's 'val_loss' is 'low', not a number",
        ),
        ('{"event": "train", "step": true, "loss": 1, "lr": 1}\n', "line 2: the train record's 'step' is True"),
        ('{"event": "train", "step": 1' + "0" * 400 + ', "loss": 1, "lr": 1}\n', "not a number"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "line 2 is nested too deeply"),
        ('{"event": "train", "step": 1, "note": "\xff"}\n'.encode("latin-1"), "line 2 is not UTF-8 text"),
        ("not json\n", "line 2 is not JSON"),
        ("[1, 2]\n", "line 2 is not a JSON object"),
        ('{"pad": "' + "x" * (1024 * 1024) + '"}\n', "line 2 is over 1048576 bytes"),
    ],
    ids=["list-step", "text-loss", "bool-step", "huge-int", "deep", "latin-1", "not-json", "not-object", "long"],
)
def test_a_bad_metrics_line_names_the_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD.encode() + (line if isinstance(line, bytes) else line.encode()) + GOOD.encode())
    with pytest.raises(ValueError, match=re.escape(f"{path} {message}" if "line 2 is" in message else message)):
        viz.plot_training_curves(tmp_path, draw=False)
    code, printed, err = _main(["plot", "loss", "--run", str(tmp_path), "-o", str(tmp_path / "l.png")], capsys)
    assert (code, printed, len(err)) == (2, [], 1) and str(path) in err[0] and message in err[0], err


def test_metrics_skip_a_cut_off_last_line_and_other_events(tmp_path):
    records = [
        {"event": "start", "step": 0, "config": {"n": [1, 2]}},
        {"event": "train", "step": 1, "loss": 3.5, "lr": 0.001},
        {"event": ["odd"], "step": "x"},
        {"event": "eval", "step": 1, "train_loss": None, "val_loss": 3.25},
        {"event": "train", "step": 2, "loss": float("nan"), "lr": 0.002},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"
    (tmp_path / "metrics.jsonl").write_bytes(text.encode() + b'{"event": "train", "step": 3, "lo\xc3')
    c = viz.plot_training_curves(tmp_path, draw=False)
    np.testing.assert_array_equal(c.steps, [1, 2])
    np.testing.assert_array_equal(c.loss, [3.5, np.nan])
    np.testing.assert_array_equal(c.lr, [0.001, 0.002])
    np.testing.assert_array_equal(c.eval_steps, [1])
    np.testing.assert_array_equal(c.train_loss, [np.nan])
    np.testing.assert_array_equal(c.val_loss, [3.25])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_metrics_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, capsys, monkeypatch):
    fifo_run, zero_run, big_run = tmp_path / "fifo", tmp_path / "zero", tmp_path / "big"
    for folder in (fifo_run, zero_run, big_run):
        folder.mkdir()
    os.mkfifo(fifo_run / "metrics.jsonl")  # opened without blocking, so this cannot hang
    (zero_run / "metrics.jsonl").symlink_to("/dev/zero")
    with open(big_run / "metrics.jsonl", "wb") as f:  # sparse: refused from its size, never read
        f.truncate(viz.figures.MAX_METRICS_BYTES + 1)
    for argv, fragment in [
        (["--run", str(fifo_run)], "the metrics file is a FIFO (named pipe), not a regular file"),
        (["--checkpoint", str(fifo_run)], "the metrics file is a FIFO (named pipe), not a regular file"),
        (["--run", str(zero_run)], "the metrics file is a character device, not a regular file"),
        (["--run", str(big_run)], f"bytes; at most {viz.figures.MAX_METRICS_BYTES} are read"),
    ]:
        code, printed, err = _main(["plot", "loss", *argv, "-o", str(tmp_path / "l.png")], capsys)
        assert (code, printed, len(err)) == (2, [], 1), err
        assert f"{argv[1]}/metrics.jsonl: " in err[0] and fragment in err[0], err[0]
