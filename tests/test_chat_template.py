"""Chat templates on HFTokenizer (arraygpt.io.bpe, arraygpt.io.hf.chat_template): the text and ids of
``apply_chat_template`` equal transformers' ``AutoTokenizer.apply_chat_template`` on tiny tokenizers
with a ChatML template (SmolLM2's, and Qwen2.5's with tools) and a Llama 3 style one that writes
``bos_token``, with and without a system message; the template is read from tokenizer_config.json
(a string, or a list of named templates) or chat_template.jinja; ``stop_ids`` holds the end-of-turn
tokens and generation_config.json's ids; ``read_generation_config`` checks its fields; a template that
loops, explodes, fails or does not compile is one clear ValueError, fast, and a format, ``%`` or
``tojson`` whose widths or arguments could build too much is refused before it allocates (checked
under an address-space cap in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

tokenizers = pytest.importorskip(
    "tokenizers", reason="Hugging Face tokenizers need the extra: pip install 'arraygpt[hf]'"
)
pytest.importorskip("jinja2", reason="chat templates need the extra: pip install 'arraygpt[hf]'")

from arraygpt.errors import CheckpointError
from arraygpt.io.bpe import HFTokenizer, load_hf_tokenizer
from arraygpt.io.hf import chat_template
from arraygpt.io.hf.chat_template import render_chat_template
from arraygpt.io.hf.reader import read_generation_config

# SmolLM2-Instruct's template, as published in its tokenizer_config.json
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's, without its tool-call and tool-response branches
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama 3's shape: bos_token first, a header per turn, a loop variable, trim_blocks/lstrip_blocks at work
LLAMA3 = """{{ bos_token }}
{% for message in messages %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' %}
    {{ content }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>"]
SPECIALS += ["<|end_header_id|>", "<|eot_id|>"]
TEXTS = [
    "Ünïcödé café naïve — “quotes”",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🙂👍🏽👩‍👩‍👧 🇫🇷",
    "def f(x):\n    return {'a': x ** 2}  # code\n",
    "a literal <|im_end|> marker",
]
CONVERSATIONS = [
    [{"role": "user", "content": TEXTS[0]}],
    [
        {"role": "system", "content": "You answer in haiku."},
        {"role": "user", "content": TEXTS[1]},
        {"role": "assistant", "content": TEXTS[2]},
        {"role": "user", "content": TEXTS[3] + TEXTS[4]},
    ],
]


def build(directory, template, *, as_file=False, bos="<|endoftext|>", eos="<|im_end|>"):
    """A tiny byte-level BPE with the chat markers as special tokens, saved with its template."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
    )
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    if as_file:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize("template", [SMOLLM2, QWEN25, LLAMA3], ids=["smollm2", "qwen2.5", "llama3"])
@pytest.mark.parametrize("as_file", [False, True], ids=["tokenizer_config", "jinja_file"])
def test_apply_chat_template_equals_transformers(tmp_path, template, as_file):
    transformers = pytest.importorskip("transformers")
    directory = build(tmp_path / "tok", template, as_file=as_file)
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.chat_template == template
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == text
            ids = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True) == list(ids)
    assert "<|im_end|>" in TEXTS[4] and ours.decode(ours.apply_chat_template(CONVERSATIONS[1], tokenize=True)) == (
        theirs.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
    )


def test_tools_are_passed_to_the_template_as_transformers_passes_them(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = build(tmp_path / "tok", QWEN25)
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "Zürich <b>"}}}]
    expected = theirs.apply_chat_template(CONVERSATIONS[0], tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == expected
    assert '"Zürich <b>"' in expected  # transformers' tojson: no ASCII or HTML escaping


def test_named_templates_take_default_and_a_list_without_default_is_refused(tmp_path):
    directory = build(tmp_path / "tok", SMOLLM2)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": SMOLLM2}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_hf_tokenizer(directory).chat_template == SMOLLM2
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: chat_template is a list without a 'default'"):
        load_hf_tokenizer(directory)
    config["chat_template"] = 7
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="chat_template must be a string or a list"):
        load_hf_tokenizer(directory)


def test_no_template_is_none_and_applying_it_says_so(tmp_path):
    directory = build(tmp_path / "tok", SMOLLM2)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_hf_tokenizer(directory)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_stop_ids_hold_eos_end_of_turn_tokens_and_generation_config_ids(tmp_path):
    directory = build(tmp_path / "tok", SMOLLM2, eos="<|endoftext|>")
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok = load_hf_tokenizer(directory)
    expected = {raw.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>")}
    assert tok.stop_ids == frozenset(expected) and tok.eos_id == raw.token_to_id("<|endoftext|>")
    gen = raw.token_to_id("<|start_header_id|>")  # any id generation_config.json names ends a reply too
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [gen], "temperature": 0.6}))
    assert load_hf_tokenizer(directory).stop_ids == frozenset(expected | {gen})
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id 1000000 is not in the"):
        load_hf_tokenizer(directory)


def test_the_constructor_stays_backward_compatible(tmp_path):
    raw = tokenizers.Tokenizer.from_file(str(build(tmp_path / "tok", SMOLLM2) / "tokenizer.json"))
    tok = HFTokenizer(raw, "x.gguf", bos_id=0, eos_ids=[2], chat_template=SMOLLM2)
    assert tok.stop_ids == {2, raw.token_to_id("<|eot_id|>")}  # <|im_end|> is 2 here
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")
    assert HFTokenizer(raw).chat_template is None


def test_read_generation_config(tmp_path):
    assert read_generation_config(tmp_path) == {}
    path = tmp_path / "generation_config.json"
    path.write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 20,
                "min_p": None,
                "repetition_penalty": 1.05,
                "max_new_tokens": 256,
                "eos_token_id": 7,
                "transformers_version": "4.45.0",
            }
        )
    )
    assert read_generation_config(tmp_path) == {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.05,
        "max_new_tokens": 256,
        "eos_token_id": [7],
    }
    for field, value in [
        ("temperature", "0.6"),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", 2.5),
        ("min_p", True),
        ("repetition_penalty", 0),
        ("max_new_tokens", 0),
        ("eos_token_id", [1, "2"]),
        ("eos_token_id", []),
    ]:
        path.write_text(json.dumps({field: value}))
        with pytest.raises(CheckpointError, match=rf"generation_config.json: {field} must be"):
            read_generation_config(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_generation_config(tmp_path)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "time limit"),
        ("{{ 'a' * 10**10 }}", "over the limit"),
        ("{{ 'a'|center(10**10) }}", "over the size limit"),
        ("{{ '%999999999d' % 1 }}", "width or precision"),
        ("{{ '{:999999999}'.format(1) }}", "width or precision"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "join"),
        ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s }}{% endmacro %}{{ f('ab', 60) }}", "join"),
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output passed the limit"),
        (  # a list holding the last one twice: 2^30 items to tojson, which runs in C past any deadline
            "{% set ns = namespace(l=[1]) %}{% for i in range(30) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
            "{{ ns.l | tojson }}",
            "setting l built a value of over 100000",
        ),
        ("{% macro f(l, n) %}{{ f([l, l], n - 1) if n else l | tojson }}{% endmacro %}{{ f([1], 40) }}", "a call"),
        # C code whose result is the product of its inputs: checked before it runs
        ("{% set s = 'ab' * 40000 %}{{ [s, s, s] | join(s) }}", "the join filter could build"),
        ("{% set s = 'ab' * 40000 %}{{ s.replace('', s) }}", "a call of replace could build"),
        ("{% set s = '\\n' * 90000 %}{{ s | indent(90000) }}", "the indent filter could build"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "failed: Conversation roles must alternate"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages.pop() }}", "failed"),
        ("{{ ().__class__.__base__.__subclasses__() }}", "failed"),
    ],
)
def test_a_template_that_loops_explodes_or_breaks_is_one_clear_error(template, message):
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        render_chat_template(template, [{"role": "user", "content": "hi"}], seconds=1.0, max_chars=100_000)
    assert time.monotonic() - start < 5


# widths, arguments and indents that build gigabytes from a few bytes of template
HOSTILE = {
    "percent-star width": ("{{ '%*s' % (1500000000, 'x') }}", "width or precision from its arguments"),
    "format nested width": ("{{ '{:{}}'.format('x', '1500000000') }}", "width or precision over the size limit"),
    "format six-digit widths": ("{{ ('{0:>999999}' * 1500).format('x') }}", "a format call could build"),
    "percent six-digit widths": ("{{ ('%999999s' * 1500) % (('x',) * 1500) }}", "the % format could build"),
    "format filter six-digit widths": ("{{ ('%999999s' * 1500)|format(*(('x',) * 1500)) }}", "format filter could"),
    "percent precision": ("{{ ('%.999999f' * 1500) % ((1.0,) * 1500) }}", "the % format could build"),
    "percent one key many times": ("{{ ('%(a)s' * 1000) % {'a': 'x' * 100000} }}", "the % format could build"),
    "format one argument many times": ("{{ ('{0}' * 1000).format('x' * 100000) }}", "a format call could build"),
    "format repr": ("{{ ('{0!r}' * 10).format('x' * 1000000) }}", "a format call could build"),
    "tojson indent": ("{% set x = " + "[" * 30 + "1" + "]" * 30 + " %}{{ x|tojson(indent=3000000) }}", "tojson"),
    "tojson separators": ("{{ ([1] * 100000) | tojson(separators=('x' * 100000, ':')) }}", "tojson filter could"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_format_or_tojson_that_could_build_too_much_is_refused_before_it_runs(name):
    template, message = HOSTILE[name]
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status for the address space")
def test_the_refusals_come_before_any_large_allocation():
    # under a cap of 256 MiB more address space, a render that builds its value first dies of MemoryError
    script = textwrap.dedent(
        """
        import json, resource, sys
        from arraygpt.io.hf.chat_template import render_chat_template
        HOSTILE = json.load(sys.stdin)
        render_chat_template("{{ 'warm' }}", [])
        vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
        cap = vm * 1024 + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        for name, (template, message) in HOSTILE.items():
            try:
                render_chat_template(template, [{"role": "user", "content": "hi"}])
            except ValueError as e:
                print(name, "refused:", e)
            except MemoryError:
                print(name, "MemoryError")
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(HOSTILE), capture_output=True, text=True, timeout=60, cwd=root
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(HOSTILE) and all("refused:" in line for line in lines), done.stdout


@pytest.mark.parametrize(
    "template",
    [
        "{{ lipsum(n=100000, html=False, min=100, max=101) }}",  # Jinja's lorem ipsum: left out
        "{% set s = 'ab ' * 1300000 %}{{ s | wordwrap(1) | length }}",  # a filter's own Python loop
        "{% set l = [0] * 1000000 %}{{ l | map('string') | unique | list | length }}",
        "{{ [[1] * 1000] * 1000 | sum(start=[]) }}",  # list additions in C, quadratic: refused
    ],
)
def test_the_deadline_holds_for_the_globals_and_filters_a_template_calls(template):
    start = time.monotonic()
    with pytest.raises(ValueError, match="time limit|undefined|adds only numbers"):
        render_chat_template(template, [{"role": "user", "content": "hi"}], seconds=0.5)
    assert time.monotonic() - start < 2


def test_running_out_of_memory_is_one_clear_error(monkeypatch):
    class Exhausted:  # datetime.now() as called by strftime_now, failing as an allocation would
        @staticmethod
        def now():
            raise MemoryError

    monkeypatch.setattr(chat_template, "datetime", Exhausted)
    with pytest.raises(ValueError, match="ran out of memory"):
        render_chat_template("{{ strftime_now('%d %b %Y') }}", [])


@pytest.mark.parametrize(
    "template",
    [
        "{{ '%s-%d-%05.2f-%r-%a-%%-%x' % ('a', 3, 3.14159, 'q', 'é', 255) }}",
        "{{ '%(a)s/%(b)5d' % {'a': 'x', 'b': 7} }}{{ '%(a)s'|format(a=1) }}{{ '%s and %s'|format('a', messages) }}",
        "{{ '{0}-{0:>10}-{1:.3f}-{0!r}-{2:,}'.format('a', 2.5, 4000000) }}",
        "{{ '{a}{b:{w}}'.format_map({'a': 1, 'b': 'x', 'w': 5}) }}",
        "{{ ('<%s>'|safe) % '<i>' }}{{ ('{:>5}'|safe).format('&') }}{{ '{0[0].role}[{1}]'.format(messages, nothing) }}",
        "{{ '{}'.format(messages) }}{{ '%s' % (messages,) }}{{ '%s' % none }}{{ '%5s' % true }}",
        "{{ [1, 2.5]|sum(start=1) }}",
        "{{ messages|tojson(indent=4) }}{{ messages|tojson(indent='\t', separators=(',', ':'), sort_keys=true) }}",
        "{% set f = '{}!'.format %}{{ f(1) }}{{ f(2) }}{{ cycler('a', 'b').next() }}{{ range(3)|list }}",
    ],
)
def test_formats_within_the_limits_render_as_in_jinja(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    reference = ImmutableSandboxedEnvironment()
    reference.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    messages = [{"role": "user", "content": "hi <b>"}]
    assert render_chat_template(template, messages) == reference.from_string(template).render(messages=messages)


def test_the_limits_apply_through_the_tokenizer(tmp_path):
    tok = load_hf_tokenizer(build(tmp_path / "tok", "{{ 'ab' * 10**12 }}"))
    with pytest.raises(ValueError, match="chat template was stopped"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_messages_must_be_a_list_of_objects():
    with pytest.raises(TypeError, match="messages must be a list"):
        render_chat_template(SMOLLM2, "hello")
    with pytest.raises(TypeError, match="each chat message must be a dict"):
        render_chat_template(SMOLLM2, ["hello"])


def test_keyword_arguments_become_template_variables_as_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = (
        "{{ bos_token }}[{{ date_string | default('no date') }}]{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    directory = build(tmp_path / "tok", template, bos="<|begin_of_text|>")
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    for kwargs in ({}, {"date_string": "26 Jul 2024"}, {"bos_token": "<s>"}):
        expected = theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False, **kwargs)
        assert ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False, **kwargs) == expected
    assert ours.apply_chat_template(CONVERSATIONS[0], date_string="x").startswith("<|begin_of_text|>[x]")
