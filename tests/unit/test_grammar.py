"""Grammar-constrained decoding: the request forms (TGI, TensorRT-LLM, vLLM) and their errors,
and an engine batch mixing constraints with unconstrained rows (float32, CPU, tiny model: the
grammar alone must keep a random model's output valid)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.grammar import grammar_from_request
from textgen_backend.sampling.params import RequestError, SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("values", [
    {"grammar": json.dumps({"type": "json", "value": SCHEMA})},
    {"grammar": {"type": "json_schema", "value": json.dumps(SCHEMA)}},
    {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": json.dumps(SCHEMA)},
    {"guided_json": SCHEMA},
    {"structured_outputs": {"json": SCHEMA}},
])
def test_every_request_form_gives_the_same_grammar(values):
    expected = grammar_from_request({"guided_json": json.dumps(SCHEMA)}, True)
    assert grammar_from_request(dict(values), True) == expected
    assert expected.kind == "json_schema"


@pytest.mark.parametrize("values, words", [
    ({"guided_regex": "a(b"}, "regex constraint is invalid"),
    ({"guided_json": "{not json"}, "json_schema constraint is not valid JSON"),
    ({"guided_json": {"type": "objekt"}}, "json_schema constraint is invalid"),
    ({"grammar": '{"type": "yaml", "value": "x"}'}, "grammar must be"),
    ({"grammar": "nope"}, "grammar is not valid JSON"),
    ({"guided_decoding_guide_type": "xml", "guided_decoding_guide": "x"},
     "guided_decoding_guide_type must be one of"),
    ({"guided_decoding_guide_type": "regex"}, "needs guided_decoding_guide"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "give one constraint"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one of"),
    ({"guided_grammar": "start: x\nx: @@@"}, "lark constraint is invalid"),
])
def test_bad_constraints_are_refused_naming_the_problem(values, words):
    with pytest.raises(RequestError, match=re.escape(words)):
        grammar_from_request(values, True)


def test_disabled_grammar_support_refuses_naming_the_flag():
    with pytest.raises(RequestError, match="--disable-grammar-support"):
        grammar_from_request({"guided_regex": "a+"}, False)
    assert grammar_from_request({"max_tokens": 3}, False) is None


def test_a_batch_mixing_constraints_and_free_rows(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(EngineConfig(model_id=str(model_dir)), model_dir)
    constraints = [
        None,
        {"guided_json": SCHEMA},
        {"guided_regex": r"[0-9]{3}-[a-z]{2,4}"},
        {"guided_choice": ["Paris", "Lyon", "Nice"]},
        {"guided_grammar": 'start: NUM OP NUM "=" NUM\nNUM: /[0-9]{1,3}/\nOP: "+" | "*"'},
        None,
    ]
    prompt = tokenizer("The quick brown fox")["input_ids"]
    seqs = [Sequence(i, prompt, SamplingParams(), StoppingParams(max_tokens=40),
                     grammar=grammar_from_request(dict(c), True) if c else None)
            for i, c in enumerate(constraints)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
    texts = [tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    free = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0]
    assert seqs[0].output_ids == seqs[5].output_ids == free[len(prompt):].tolist()
    for seq in seqs[1:5]:
        assert seq.finish_reason == "eos_token", (seq.grammar.kind, texts[seq.seq_id])
    jsonschema.validate(json.loads(texts[1]), SCHEMA)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", texts[2])
    assert texts[3] in ("Paris", "Lyon", "Nice")
    assert re.fullmatch(r"[0-9]{1,3}[+*][0-9]{1,3}=[0-9]{1,3}", texts[4])
    assert engine.stats().kv_blocks_used == 0


def test_a_grammar_the_other_parameters_leave_no_token_for_ends_with_an_error(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    engine = Engine(EngineConfig(model_id=str(model_dir)), model_dir)
    # the choice completes after one word, but min_tokens bans EOS for 10 tokens
    seq = Sequence(1, [5, 6, 7], SamplingParams(), StoppingParams(max_tokens=20, min_tokens=10),
                   grammar=grammar_from_request({"guided_choice": ["yes", "no"]}, True))
    other = Sequence(2, [5, 6, 7], SamplingParams(), StoppingParams(max_tokens=5,
                                                                    ignore_eos=True))
    engine.add(seq)
    engine.add(other)
    errors = {}
    while engine.has_work():
        errors.update({o.seq_id: o.error for o in engine.step() if o.error})
    assert list(errors) == [1] and "the grammar allows no token" in errors[1]
    assert len(other.output_ids) == 5 and engine.stats().kv_blocks_used == 0
