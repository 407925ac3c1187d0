"""Structured output through the real server: 50 varied JSON schemas on the demo model parse and
validate, the three request forms give the same output, constrained and unconstrained rows
share a batch (the unconstrained ones token-exact to transformers), streaming equals
non-streaming, and bad grammars are refused while other requests are served."""
from __future__ import annotations

import concurrent.futures as futures
import json
import re

import jsonschema
import pytest

from conftest import generate_rows
from json_schemas import varied_schemas
from textgen_client import TextgenClient, TextgenError

pytestmark = pytest.mark.e2e


def test_fifty_schemas_on_the_demo_model_validate(demo_server):
    schemas = varied_schemas(50)

    def one(schema):
        client = TextgenClient(demo_server.grpc_url)
        try:
            return client.generate("Give the record as JSON:", max_tokens=256,
                                   grammar=json.dumps({"type": "json", "value": schema}))
        finally:
            client.close()

    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, schemas))
    finished = [(s, r) for s, r in zip(schemas, results) if r.finish_reason in ("eos_token",
                                                                                "stop")]
    for schema, result in finished:
        jsonschema.validate(json.loads(result.text), schema)
    assert len(finished) >= 45, [r.text[-60:] for r in results if r.finish_reason == "length"]


def test_forms_agree_batches_mix_and_streams_match(tiny_server, tiny_reference, client_for):
    client = client_for(tiny_server)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}
    prompt = "Hello world: 12345"
    tgi = client.generate(prompt, max_tokens=30, grammar=json.dumps(
        {"type": "json", "value": schema}))
    trt = client.generate(prompt, max_tokens=30, guided_decoding_guide_type="json_schema",
                          guided_decoding_guide=json.dumps(schema))
    vllm = client.generate(prompt, max_tokens=30, sampling_parameters={"guided_json": schema})
    assert tgi.output_ids == trt.output_ids == vllm.output_ids
    assert tgi.finish_reason == "eos_token", tgi.text
    jsonschema.validate(json.loads(tgi.text), schema)
    streamed = [t for c in client.stream(prompt, max_tokens=30, sampling_parameters={
        "guided_regex": "[a-z]{2,5}[0-9]{3}"}) for t in c.output_ids]
    whole = client.generate(prompt, max_tokens=30,
                            sampling_parameters={"guided_regex": "[a-z]{2,5}[0-9]{3}"})
    assert streamed == whole.output_ids and re.fullmatch("[a-z]{2,5}[0-9]{3}", whole.text)
    prompts = ["The quick brown fox", "Paris", "Hello world: 12345"]
    rows = generate_rows(client, prompts, {"grammar": [
        "", json.dumps({"type": "regex", "value": "(yes|no)"}), ""]}, max_tokens=20)
    for row in (0, 2):
        assert rows[row] == tiny_reference.greedy(tiny_reference.encode(prompts[row]), 20)
    assert tiny_reference.decode(rows[1]) in ("yes", "no")


def test_bad_grammars_are_refused_while_others_are_served(tiny_server, tiny_reference,
                                                          client_for):
    client = client_for(tiny_server)
    with futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: client_for(tiny_server).generate(
            "Paris", max_tokens=80, ignore_eos=True))
        for params, words in [
                (dict(sampling_parameters={"guided_regex": "a(b"}), "regex constraint is invalid"),
                (dict(grammar='{"type": "json", "value": {"type": "objekt"}}'), "invalid"),
                (dict(guided_decoding_guide_type="xml", guided_decoding_guide="x"),
                 "guided_decoding_guide_type must be one of")]:
            with pytest.raises(TextgenError, match=words):
                client.generate("Paris", max_tokens=5, **params)
        assert in_flight.result().output_ids == tiny_reference.greedy(
            tiny_reference.encode("Paris"), 80)
