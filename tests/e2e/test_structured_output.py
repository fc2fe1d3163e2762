"""Structured output on the default model (SmolLM2-135M-Instruct): JSON schemas, JSON objects, regex, choice
and grammars, offline and through the server with the official openai client.

Every output under a JSON schema is validated with ``jsonschema``; regex and choice outputs are checked
exactly. In a batch, free requests get the tokens they get alone (the masks touch only their own rows).
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import openai
import pytest

from random_schemas import random_object
from splitfuse.config import EngineConfig
from splitfuse.engine.async_engine import AsyncLLMEngine
from splitfuse.entrypoints.llm import LLM
from splitfuse.entrypoints.openai.server import ServerThread, build_app
from splitfuse.sampling_params import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.timeout(600)

MODEL = "smollm2"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def constrained(max_tokens: int = 150, temperature: float = 0.0, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=7 if temperature else None,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module")
def llm(smollm2_default_dir) -> LLM:
    return LLM(model=smollm2_default_dir)


def test_random_schemas_greedy_and_sampled_all_valid_and_free_requests_unchanged(llm):
    rng = random.Random(0)
    schemas = [random_object(rng) for _ in range(12)]
    prompts = [ask(f"Fill in a JSON object for this schema: {json.dumps(s)}") for s in schemas]
    free_prompts = [ask("Name three colors."), ask("What is 2 + 2?")]
    free = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.chat(free_prompts, free, use_tqdm=False)]

    # One batch: greedy and sampled constrained requests, with free greedy requests between them.
    params = [constrained(json=s, temperature=0.0 if i % 2 else 0.8) for i, s in enumerate(schemas)]
    outputs = llm.chat(prompts[:6] + free_prompts[:1] + prompts[6:] + free_prompts[1:],
                       params[:6] + [free] + params[6:] + [free], use_tqdm=False)
    free_outputs = [outputs[6], outputs[13]]
    assert [o.outputs[0].token_ids for o in free_outputs] == alone
    for schema, output in zip(schemas, outputs[:6] + outputs[7:13]):
        choice = output.outputs[0]
        assert choice.finish_reason == "stop", choice.text  # ended by EOS once the object closed
        jsonschema.validate(json.loads(choice.text), schema)
    assert not llm.engine.has_unfinished_requests()


def test_a_schema_is_compiled_once_and_n_choices_each_follow_it(llm):
    compiler = llm.engine.engine_core.scheduler.grammar_compiler
    before = compiler.num_compiled
    outputs = llm.chat([ask("Describe a person as JSON.")] * 2,
                       SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=60,
                                      structured_outputs=StructuredOutputsParams(json=PERSON)), use_tqdm=False)
    assert compiler.num_compiled == before + 1
    choices = [c for o in outputs for c in o.outputs]
    assert len(choices) == 6
    for choice in choices:
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_json_object_regex_choice_and_grammars_are_obeyed_exactly(llm):
    question = ask("What is the capital of France?")
    cases = [
        (dict(json_object=True), lambda text: isinstance(json.loads(text), dict)),
        (dict(regex=r"[A-Z][a-z]{2,9}, [A-Z]{2}"), lambda text: re.fullmatch(r"[A-Z][a-z]{2,9}, [A-Z]{2}", text)),
        (dict(choice=["Paris", "Lyon", "Marseille"]), lambda text: text in ("Paris", "Lyon", "Marseille")),
        (dict(grammar='root ::= "The answer is " ("yes" | "no") "."'),
         lambda text: text in ("The answer is yes.", "The answer is no.")),
        (dict(grammar='start: "capital: " /[A-Z][a-z]+/'), lambda text: re.fullmatch(r"capital: [A-Z][a-z]+", text)),
    ]
    for temperature in (0.0, 1.0):
        outputs = llm.chat([question] * len(cases), [constrained(temperature=temperature, **c) for c, _ in cases],
                           use_tqdm=False)
        for (constraint, obeys), output in zip(cases, outputs):
            choice = output.outputs[0]
            assert choice.finish_reason == "stop" and obeys(choice.text), (constraint, choice.text)


def test_a_core_in_its_own_process_gets_the_constraint_and_gives_the_same_tokens(llm, smollm2_default_dir):
    params = [constrained(max_tokens=60, json=PERSON), constrained(regex="[0-9]{3}-[0-9]{4}")]
    prompts = [ask("Describe a person as JSON."), ask("A phone number?")]
    expected = [o.outputs[0].token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    separate = LLM(model=smollm2_default_dir, core_process=True)
    try:
        assert [o.outputs[0].token_ids for o in separate.chat(prompts, params, use_tqdm=False)] == expected
    finally:
        separate.engine.shutdown()


def test_speculation_under_a_grammar_drafts_only_what_it_allows_and_changes_no_token(llm, smollm2_default_dir):
    people = {"type": "array", "items": PERSON, "minItems": 3, "maxItems": 3}
    params = [constrained(max_tokens=120, json=people), constrained(max_tokens=40, regex="(ab|cd){3,12}"),
              SamplingParams(temperature=0, max_tokens=40)]
    prompts = [ask("Three people as JSON."), ask("Letters?"), ask("Count to ten.")]
    expected = [o.outputs[0].token_ids for o in llm.chat(prompts, params, use_tqdm=False)]
    spec = LLM(model=smollm2_default_dir, speculative_method="ngram", prompt_lookup_min=1)
    outputs = spec.chat(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    jsonschema.validate(json.loads(outputs[0].outputs[0].text), people)
    # The constrained requests alone: their drafts were proposed and some accepted.
    stats = spec.engine.engine_core.scheduler.speculator.stats
    before = stats.accepted_tokens
    assert [o.outputs[0].token_ids for o in spec.chat(prompts[:2], params[:2], use_tqdm=False)] == expected[:2]
    assert stats.accepted_tokens > before
    assert not spec.engine.has_unfinished_requests()


def test_max_tokens_cuts_a_structure_and_says_length(llm):
    output = llm.chat(ask("List many numbers as JSON."), constrained(max_tokens=5, json={"type": "array", "items": {
        "type": "integer"}, "minItems": 50}), use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 5 and output.text.startswith("[")


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "frobnicate"}), "invalid JSON schema: Invalid type: frobnicate"),
    (dict(json='{"type": '), "the JSON schema is not valid JSON: Expecting value: line 1 column 10 (char 9)"),
    (dict(json={"$ref": "#/$defs/missing"}), "invalid JSON schema: Pointer '/$defs/missing' does not exist"),
    (dict(regex="a(b"), "invalid regex: "),
    (dict(grammar="start: missing_rule"), "invalid grammar: "),
])
def test_a_bad_schema_regex_or_grammar_is_refused_and_nothing_is_queued(llm, constraint, message):
    with pytest.raises(ValueError) as error:
        llm.generate("Hello", constrained(**constraint), use_tqdm=False)
    assert str(error.value).startswith(message)
    assert not llm.engine.has_unfinished_requests()
    kv_cache = llm.engine.engine_core.scheduler.kv_cache
    assert kv_cache.num_free_blocks == kv_cache.num_blocks


def test_exactly_one_constraint_per_request():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar or json_object; got regex, "
                                         "choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list of non-empty strings"):
        StructuredOutputsParams(choice=[])


# ----- through the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_default_dir):
    engine = AsyncLLMEngine.from_config(EngineConfig.from_kwargs(model=smollm2_default_dir))
    with ServerThread(build_app(engine, [MODEL])) as running:
        with openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120) as api:
            yield api


def test_response_format_json_schema_streamed_or_not_equals_offline(client, llm):
    messages = ask("Describe a person as JSON.")
    expected = llm.chat(messages, constrained(max_tokens=60, json=PERSON), use_tqdm=False)[0].outputs[0].text
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60,
                                           response_format=response_format)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(expected), PERSON)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60,
                                            response_format=response_format, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected


def test_vllm_extras_on_chat_and_completions(client):
    chat = client.chat.completions.create(model=MODEL, messages=ask("Capital of France?"), temperature=0,
                                          max_tokens=10, extra_body={"guided_choice": ["Paris", "Rome"]})
    assert chat.choices[0].message.content == "Paris"
    completion = client.completions.create(model=MODEL, prompt="The year the war ended:", temperature=0.7,
                                           max_tokens=10, extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", completion.choices[0].text)
    completion = client.completions.create(model=MODEL, prompt="A person:", temperature=0, max_tokens=60,
                                           extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    # A prompt whose greedy object closes in bf16 and fp32 alike ("Data:" loops inside a key in fp32).
    completion = client.completions.create(model=MODEL, prompt="Alice is 30 years old. As JSON: ", temperature=0,
                                           max_tokens=60, extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict) and json.loads(completion.choices[0].text)


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format", "invalid JSON schema: Invalid type: frobnicate"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format of type json_schema needs json_schema.schema"),
    ({"guided_regex": "a(b"}, "guided_regex", "invalid regex: "),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "invalid grammar (read as GBNF): Rule 'missing' not found"),
    ({"guided_choice": []}, "guided_choice", "structured output choice must be a non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice",
     "give one output constraint, not guided_regex and guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "give one output constraint, not response_format and structured_outputs"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400s_naming_the_field(client, extra, param, message, stream):
    with pytest.raises(openai.BadRequestError) as error:
        response = client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=5, stream=stream,
                                                  extra_body=extra)
        list(response) if stream else None
    body = error.value.body
    assert body["param"] == param and body["message"].startswith(message), body
