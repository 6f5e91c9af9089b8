"""The interactive page in a real browser: Playwright driving the system's Chromium (headless).

It loads from a file with no console error and no request beyond the file itself; its JavaScript
sampler math gives the distributions ``make_sampler`` gives for the same logits (1e-6), through
the sliders and directly; choosing a layer and head shows that head's pattern with the masked
future empty. Skips with the reason when Playwright or Chromium is absent
(``pip install playwright``; ``apt-get install -y chromium``; ``ARRAYGPT_CHROMIUM`` names another
executable)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import arraygpt
from arraygpt import viz
from arraygpt.generation.sampling import make_sampler

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

CHROMIUM = os.environ.get("ARRAYGPT_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOL = 1e-6

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set ARRAYGPT_CHROMIUM)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A two-layer model trained briefly on names, and its page saved to a file."""
    out = tmp_path_factory.mktemp("page")
    run = arraygpt.train("names", steps=40, n_layer=2, progress=False, samples=0)
    page = viz.explain(
        run.model, run.tokenizer, "em", 8, "top_k", top_k=6, temperature=0.9, seed=5, prefix=[run.tokenizer.bos_id]
    )
    assert len(page.data["generated"]) >= 2, "the fixture needs at least two generated tokens"
    return page, page.save(out / "page.html")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, explained):
    """The page, opened from its file; after the test: no console error, no request but the file."""
    _, path = explained
    context = browser.new_context()
    tab = context.new_page()
    errors, requests = [], []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("request", lambda r: requests.append(r.url))
    tab.goto(path.as_uri())
    tab.wait_for_selector("#bars .bar")
    yield tab
    context.close()
    assert errors == [], f"console errors: {errors}"
    assert requests == [path.as_uri()], f"the page made requests beyond its file: {requests}"


def python_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """What arraygpt's samplers give: the page's pipeline, make_sampler(["top_k", "top_p", "min_p"])."""
    V = len(logits)
    chain = make_sampler(
        ["top_k", "top_p", "min_p"], temperature=temperature, top_k=top_k or V, top_p=top_p, min_p=min_p
    )
    return np.asarray(chain(np.asarray(logits, dtype=np.float64)[None, :]))[0]


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.6),
    dict(temperature=0.0),
    dict(temperature=1.0, top_k=3),
    dict(temperature=0.8, top_k=5, top_p=0.9),
    dict(temperature=1.2, top_p=0.5),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.5, top_k=10, top_p=0.75, min_p=0.05),
    dict(temperature=2.0, top_k=1),
]


def settings(s):
    return {
        "temperature": s["temperature"],
        "top_k": s.get("top_k", 0),
        "top_p": s.get("top_p", 1.0),
        "min_p": s.get("min_p", 0.0),
    }


def test_page_loads_and_shows_the_generation(page, explained):
    exp, _ = explained
    generated = page.locator("#text .gen")
    assert generated.count() == len(exp.data["generated"])
    assert page.locator("#text .prompt").count() == len(exp.data["prompt"])
    assert page.locator("#bars .bar.prob").count() == exp.data["k"]
    assert page.input_value("#temperature") == "0.9" and page.input_value("#top_k") == "6"


def test_js_distributions_equal_make_sampler(page, explained):
    exp, _ = explained
    for s in SETTINGS:
        for i, step in enumerate(exp.data["steps"]):
            js = np.array(page.evaluate("([i, s]) => window.arraygpt.probs(i, s)", [i, settings(s)]))
            py = python_probs(step["logits"], **s)
            np.testing.assert_allclose(js, py, rtol=0, atol=TOL, err_msg=f"step {i}, settings {s}")
            np.testing.assert_array_equal(js > 0, py > 0, err_msg=f"kept tokens differ at step {i}, {s}")


def test_js_single_samplers_equal_the_python_ones(page, explained):
    """One filter at a time: the page's extra renormalizations change nothing beyond rounding."""
    exp, _ = explained
    logits = exp.data["steps"][0]["logits"]
    cases = [
        ("temperature", dict(temperature=0.9), {}),
        ("top_k", dict(temperature=1.0, top_k=4), {"top_k": 4}),
        ("top_p", dict(temperature=0.7, top_p=0.8), {"top_p": 0.8}),
        ("min_p", dict(temperature=1.3, min_p=0.2), {"min_p": 0.2}),
        ("greedy", dict(temperature=1.0, top_k=1), {}),
    ]
    for name, s, options in cases:
        py = np.asarray(make_sampler(name, temperature=s["temperature"], **options)(np.asarray(logits)[None, :]))[0]
        js = np.array(page.evaluate("([l, s]) => window.arraygpt.distribution(l, s)", [logits, settings(s)]))
        np.testing.assert_allclose(js, py, rtol=0, atol=TOL, err_msg=name)


def test_js_math_on_ties_and_boundaries(page):
    """Ties at the k-th value and at the nucleus' edge are kept, as the Python filters keep them."""
    rows = [[1.0, 1.0, 1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 2.0, 2.0, -5.0], [5.0, -5.0, -5.0]]
    for logits in rows:
        for s in [
            dict(temperature=1.0, top_k=2),
            dict(temperature=1.0, top_p=0.5),
            dict(temperature=1.0, top_p=0.25),
            dict(temperature=0.0),
            dict(temperature=1.0, min_p=1.0),
            dict(temperature=0.3, top_k=3, top_p=0.6),
        ]:
            js = np.array(page.evaluate("([l, s]) => window.arraygpt.distribution(l, s)", [logits, settings(s)]))
            np.testing.assert_allclose(js, python_probs(logits, **s), rtol=0, atol=TOL, err_msg=f"{logits} {s}")


def _set(page, name, value):
    page.eval_on_selector(f"#{name}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def _shown(page):
    return page.eval_on_selector_all(
        "#bars .bar.prob", "els => els.map(e => [Number(e.dataset.id), Number(e.dataset.p)])"
    )


def test_sliders_recompute_the_shown_distribution(page, explained):
    exp, _ = explained
    for step in (0, 1):
        page.click(f"#text .gen >> nth={step}")
        assert page.get_attribute(f"#text .gen >> nth={step}", "class") == "gen sel"
        logits = exp.data["steps"][step]["logits"]
        for s in [
            dict(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0),
            dict(temperature=1.5, top_k=4, top_p=1.0, min_p=0.0),
            dict(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0),
            dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
            dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
        ]:
            for name, value in s.items():
                _set(page, name, value)
            py = python_probs(logits, **s)
            shown = _shown(page)
            assert len(shown) == exp.data["k"]
            for token, p in shown:
                assert abs(p - py[token]) <= TOL, (s, token, p, py[token])
            # the bars are the most likely tokens after the sampler
            assert min(p for _, p in shown) >= np.sort(py)[::-1][len(shown) - 1] - TOL
            kept = page.text_content("#kept")
            assert kept.startswith(f"{int((py > 0).sum())} of {len(py)} tokens kept"), (s, kept)
            assert float(page.text_content("#temperature-out")) == s["temperature"]


def test_the_chosen_token_is_marked(page, explained):
    exp, _ = explained
    _set(page, "top_k", 0)
    _set(page, "temperature", 1)
    step = exp.data["steps"][1]
    page.click("#text .gen >> nth=1")
    chosen = page.locator("#bars .lab.chosen")
    if chosen.count():  # it is shown when it is among the top k
        assert chosen.count() == 1 and chosen.text_content().endswith("◀")
    assert page.text_content("#step-title").startswith("before token 2")
    assert f"p={step['p_sampler']:.3f}" in page.text_content("#step-title")


def test_layer_and_head_selection_shows_that_pattern(page, explained):
    exp, _ = explained
    patterns = exp.attention.patterns
    L, NH, T, _ = patterns.shape
    assert L == 2
    assert page.locator("#layer option").count() == L and page.locator("#head option").count() == NH
    for layer, head in [(0, 0), (1, NH - 1), (0, 2), (1, 1)]:
        page.select_option("#layer", str(layer))
        page.select_option("#head", str(head))
        cells = page.eval_on_selector_all(
            "#grid .cell", "els => els.map(e => [Number(e.dataset.t), Number(e.dataset.s), Number(e.dataset.v)])"
        )
        assert len(cells) == T * (T + 1) // 2
        for t, s, v in cells:
            assert s <= t and abs(v - patterns[layer, head, t, s]) <= TOL
        masked = page.eval_on_selector_all(
            "#grid .masked",
            "els => els.map(e => [Number(e.dataset.t), Number(e.dataset.s), e.dataset.v === undefined,"
            " getComputedStyle(e).backgroundColor])",
        )
        assert len(masked) == T * (T - 1) // 2
        for t, s, no_value, colour in masked:  # the future: no value, nothing painted
            assert s > t and no_value and colour in ("rgba(0, 0, 0, 0)", "transparent")


def test_logit_lens_table(page, explained):
    exp, _ = explained
    rows = page.eval_on_selector_all("table.lens tr", "trs => trs.map(tr => [...tr.children].map(c => c.textContent))")
    lens = exp.lens
    assert rows[0][1:] == [exp.data["labels"][str(i)] for i in lens.tokens]
    for layer, row in enumerate(rows[1:]):
        assert row[0] == lens.layer_names[layer]
        assert row[1:] == [lens.top_labels[layer][t][0] for t in range(len(lens.tokens))]


# ----------------------------------------------------------------------------------------------
# a vocabulary of markup (issue 21): the page renders and shows every token as text

# "<!--" then "<script>" inside a script element hide its end tag (HTML's double-escaped script data
# state) unless "<" is escaped; a "-->" after them would undo that, so it comes first.
MARKUP = ["-->", "<!--", "<script>", "</script>", "&amp;", "<b>bold</b>", "__DATA__", "$}$", "a", "b"]


@pytest.fixture(scope="module")
def markup_page(tmp_path_factory):
    """``arraygpt explain`` of a tiny GPT-2 directory whose tokenizer.json (a WordLevel model built
    with the ``tokenizers`` library) holds markup as ordinary tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from arraygpt.cli import main
    from arraygpt.config import GPTConfig
    from arraygpt.nn.model import GPT

    folder = tmp_path_factory.mktemp("markup")
    vocab = {token: i for i, token in enumerate(["[UNK]", *MARKUP])}
    reference = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    reference.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    model_dir = folder / "model"
    config = GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=8)
    arraygpt.save(GPT(config, seed=0), model_dir, format="gpt2")
    reference.save(str(model_dir / "tokenizer.json"))
    out = folder / "page.html"
    prompt = "<!-- <script> &amp; </script> <b>bold</b> __DATA__"
    code = main(
        ["explain", "--checkpoint", str(model_dir), "--prompt", prompt, "--max-new-tokens", "6", "-o", str(out)]
    )
    assert code == 0
    return reference, prompt, out


def test_a_vocabulary_of_markup_renders_as_text(browser, markup_page):
    reference, prompt, path = markup_page
    context = browser.new_context()
    tab = context.new_page()
    errors = []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    try:
        tab.goto(path.as_uri())
        tab.wait_for_selector("#bars .bar", timeout=5_000)
        assert tab.evaluate("document.scripts.length") == 2  # the data's and the code's
        assert tab.locator("b").count() == 0  # no token became markup
        shown = tab.eval_on_selector_all("#text span", "els => els.map(e => e.textContent)")
        ids = reference.encode(prompt).ids
        assert shown[: len(ids)] == prompt.split() == [reference.id_to_token(i) for i in ids]
        generated = tab.evaluate("window.arraygpt.data.generated")
        assert shown[len(ids) :] == [reference.id_to_token(i) for i in generated] and len(generated) == 6
        labels = tab.evaluate("window.arraygpt.data.labels")
        assert labels == {str(i): reference.id_to_token(i) for i in range(reference.get_vocab_size())}
        assert tab.title() == "arraygpt: inside one generation"
        assert errors == [], f"console errors: {errors}"
    finally:
        context.close()
