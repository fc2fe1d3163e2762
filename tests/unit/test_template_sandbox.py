"""The chat-template sandbox renders like transformers and refuses what the issue found; the character bound per token.

In-process (TemplateRenderer, no worker process) except the last test, which runs the worker script.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tokenizers
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

from splitfuse.entrypoints.openai import template_sandbox
from splitfuse.entrypoints.openai.prompt_workers import max_chars_per_token
from splitfuse.entrypoints.openai.template_sandbox import RenderError, TemplateRenderer

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi <b>there</b>"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
# Every helper transformers gives a template, in one.
RICH_TEMPLATE = (
    "{% set ns = namespace(count=0) %}{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }}{% endgeneration %}{% continue %}{% endif %}{% set ns.count = ns.count + 1 %}"
    "{{ m | tojson(indent=2) }}\n{% endfor %}{{ dict(a=1, b=[ns.count]) | tojson(sort_keys=True) }}"
    "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}{{ bos_token }}")


def transformers_render(template: str, messages: list[dict], **variables) -> str:
    (text,), _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **variables)
    return text


def sandbox_render(template: str, messages: list[dict], max_output_chars: int = 100_000, **variables) -> str:
    context = {**variables, "messages": messages, "tools": None, "documents": None, "add_generation_prompt": True}
    return TemplateRenderer(max_output_chars).render(template, context)


def test_checkpoint_templates_render_as_apply_chat_template_does(tiny_tokenizer, smollm2_bf16_dir):
    smollm2 = transformers.AutoTokenizer.from_pretrained(smollm2_bf16_dir)
    for tokenizer in (tiny_tokenizer, smollm2):
        for messages in (MESSAGES, MESSAGES[1:2]):
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert sandbox_render(tokenizer.get_chat_template(), messages, **tokenizer.special_tokens_map) == expected


def test_every_transformers_helper_renders_the_same():
    expected = transformers_render(RICH_TEMPLATE, MESSAGES, bos_token="<s>")
    assert sandbox_render(RICH_TEMPLATE, MESSAGES, bos_token="<s>") == expected
    assert expected == ('{\n  "role": "system",\n  "content": "Be terse."\n}\n{\n  "role": "user",\n  "content": '
                        '"Hi <b>there</b>"\n}\nHello.{\n  "role": "user",\n  "content": "Again?"\n}\n'
                        '{"a": 1, "b": [3]}<s>')


@pytest.mark.parametrize("template, message, kind", [
    ("{{ 2 ** 100000000 }}", "the template computes an integer of about 200000000 bits; the limit is 65536",
     "invalid"),
    ("{{ ['x'] * 200 }}", "the template builds a string or list of 200 items; the limit is 100", "too_long"),
    ("{{ 'x' * 60 + 'y' * 60 }}", "the template builds a string or list of 120 items; the limit is 100", "too_long"),
    ("{% for i in range(101) %}x{% endfor %}", "its output passes 100 characters", "too_long"),
    ("{{ '\\ud800' }}", "the template produced text with a lone UTF-16 surrogate", "invalid"),
    ("{% set ns = namespace(_secret=1) %}",
     "chat templates cannot store underscore-prefixed attributes on a namespace: '_secret'", "invalid"),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe.", "invalid"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate", "invalid"),
    ("{% for %}", "Expected an expression, got 'end of statement block'", "invalid"),
])
def test_sandbox_limits(template, message, kind):
    with pytest.raises(RenderError) as raised:
        sandbox_render(template, MESSAGES, max_output_chars=100)
    assert (raised.value.message, raised.value.kind) == (message, kind)


def test_the_worker_process_interrupts_a_render_at_its_time_limit():
    worker = subprocess.run(
        [sys.executable, "-I", template_sandbox.__file__, "1000", "0.2"], capture_output=True, timeout=60,
        input=b"\n".join(json.dumps({"template": template, "variables": {"name": "Ann"}}).encode() for template in
                         ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                          "Hi {{ name }}")) + b"\n")
    replies = [json.loads(line) for line in worker.stdout.splitlines()]
    assert replies == [{"error": "the chat template took longer than 0.2 s to render", "kind": "timeout"},
                       {"text": "Hi Ann"}]  # the same process goes on serving


def _with_parts(tokenizer: transformers.PreTrainedTokenizerFast, **parts) -> transformers.PreTrainedTokenizerFast:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.update(parts)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(spec)))


def test_characters_per_token_bound(tiny_tokenizer, byte_fallback_tokenizer):
    # Byte-level BPE: the longest token string ("Ġnalplyrcleangtim", 17 characters, one per byte).
    assert max_chars_per_token(tiny_tokenizer) == max(map(len, tiny_tokenizer.get_vocab())) == 17
    # SentencePiece-style BPE with byte fallback: unknown characters become <0x..> tokens.
    assert max_chars_per_token(byte_fallback_tokenizer) == 16
    # NFC can fold up to 4 code points into one.
    assert max_chars_per_token(_with_parts(tiny_tokenizer, normalizer={"type": "NFC"})) == 4 * 17
    # Anything that can drop text bounds nothing.
    assert max_chars_per_token(_with_parts(tiny_tokenizer, normalizer={"type": "Strip", "strip_left": True,
                                                                       "strip_right": True})) is None
    assert max_chars_per_token(_with_parts(tiny_tokenizer, pre_tokenizer={"type": "WhitespaceSplit"})) is None
