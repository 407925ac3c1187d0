"""Every generation parameter and output of the reference table, through the real server,
against transformers where it defines the semantics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from textgen_backend.sampling import logits_processors as lp
from textgen_client import TextgenError

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over"
QUESTION = json.dumps([{"role": "user", "content": "What is the capital of France?"}])


def test_log_probs_top_n_and_ranks_equal_log_softmax_of_transformers(tiny_server, tiny_reference,
                                                                      client_for):
    client = client_for(tiny_server)
    result = client.generate(PROMPT, max_tokens=12, return_log_probs=True, top_n_tokens=3)
    prompt_ids = tiny_reference.encode(PROMPT)
    log_probs = tiny_reference.log_probs(prompt_ids + result.output_ids)
    expected = [log_probs[len(prompt_ids) - 1 + i] for i in range(12)]
    for i, (token, entry) in enumerate(zip(result.output_ids, result.token_details)):
        assert entry["id"] == token and entry["text"] == tiny_reference.tokenizer.decode([token])
        assert entry["logprob"] == pytest.approx(expected[i][token].item(), abs=1e-4)
        assert entry["rank"] == 1  # greedy picks the most likely
        top = expected[i].topk(3)
        assert [t["id"] for t in entry["top_tokens"]] == top.indices.tolist()
        assert [t["logprob"] for t in entry["top_tokens"]] == pytest.approx(top.values.tolist(),
                                                                             abs=1e-4)
    assert result.output_log_probs == pytest.approx([e["logprob"] for e in result.token_details])
    assert result.cum_log_prob == pytest.approx(sum(result.output_log_probs), abs=1e-4)
    streamed = client.generate_batch([PROMPT], stream=True, max_tokens=12, return_log_probs=True,
                                     top_n_tokens=3)[0]
    assert streamed.token_details == result.token_details
    plain = client.generate(PROMPT, max_tokens=12)
    assert plain.token_details == [] and plain.cum_log_prob is None


def test_decoder_input_details_cover_the_prompt(tiny_server, tiny_reference, client_for):
    result = client_for(tiny_server).generate(PROMPT, max_tokens=2, decoder_input_details=True,
                                              top_n_tokens=2)
    prompt_ids = tiny_reference.encode(PROMPT)
    log_probs = tiny_reference.log_probs(prompt_ids)
    details = result.input_token_details
    assert [d["id"] for d in details] == prompt_ids
    assert details[0]["logprob"] is None
    for j in range(1, len(prompt_ids)):
        row = log_probs[j - 1]
        assert details[j]["logprob"] == pytest.approx(row[prompt_ids[j]].item(), abs=1e-4)
        assert details[j]["rank"] == int((row > row[prompt_ids[j]]).sum()) + 1
        assert [t["id"] for t in details[j]["top_tokens"]] == row.topk(2).indices.tolist()


def test_truncate_input_tokens_keeps_the_last_tokens(tiny_server, tiny_reference, client_for):
    prompt_ids = tiny_reference.encode(PROMPT)
    result = client_for(tiny_server).generate(PROMPT, max_tokens=8, truncate_input_tokens=3)
    assert result.num_input_tokens == 3
    assert result.output_ids == tiny_reference.greedy(prompt_ids[-3:], 8)
    echoed = client_for(tiny_server).generate(PROMPT, max_tokens=2, truncate_input_tokens=3,
                                              exclude_input_in_output=False)
    assert echoed.text.startswith(tiny_reference.tokenizer.decode(prompt_ids[-3:]))
    with pytest.raises(TextgenError, match="truncate_input_tokens must be >= 0, got -1"):
        client_for(tiny_server).generate(PROMPT, truncate_input_tokens=-1)


def test_time_limit_stops_generation(tiny_server, client_for):
    result = client_for(tiny_server).generate(PROMPT, max_tokens=240, ignore_eos=True,
                                              time_limit_ms=1)
    assert result.finish_reason == "time_limit" and result.stop_reason == "time_limit"
    assert result.num_output_tokens < 240


def test_bad_words_are_never_generated(tiny_server, tiny_reference, client_for):
    prompt_ids = tiny_reference.encode(PROMPT)
    plain = tiny_reference.greedy(prompt_ids, 10)
    word = tiny_reference.tokenizer.decode(plain[2:3])
    word_ids = tiny_reference.tokenizer(word, add_special_tokens=False)["input_ids"]
    result = client_for(tiny_server).generate(PROMPT, max_tokens=10, bad_words=[word, ""])
    assert result.output_ids == tiny_reference.greedy(prompt_ids, 10, bad_words_ids=[word_ids])
    assert result.output_ids != plain


def test_watermark_biases_the_green_list_of_the_previous_token(tiny_server, tiny_reference,
                                                               client_for):
    client = client_for(tiny_server)
    prompt_ids = tiny_reference.encode(PROMPT)
    marked = client.generate(PROMPT, max_tokens=10, watermark=True)
    assert marked.output_ids == client.generate(PROMPT, max_tokens=10, watermark=True).output_ids
    logits = tiny_reference.log_probs(prompt_ids)[-1:]  # a shift of logits: same argmax
    biased = lp.watermark(logits, [0], [prompt_ids[-1]], gamma=0.5, delta=2.0)
    assert marked.output_ids[0] == int(biased.argmax())


def test_best_of_returns_the_most_likely_candidates(tiny_server, client_for):
    client = client_for(tiny_server)
    params = dict(max_tokens=8, temperature=1.5, seed=11, return_log_probs=True)
    [two] = client.generate_sequences([PROMPT], best_of=2, num_return_sequences=2, **params)
    assert len(two) == 2 and two[0].cum_log_prob >= two[1].cum_log_prob
    assert two[0].seed_used != two[1].seed_used
    best = client.generate(PROMPT, best_of=2, **params)
    assert best.output_ids == two[0].output_ids
    with pytest.raises(TextgenError, match="best_of must be in \\[1, max_best_of=2\\], got 3"):
        client.generate(PROMPT, best_of=3, **params)
    with pytest.raises(TextgenError, match="best_of=2 cannot be streamed"):
        client.generate_batch([PROMPT], stream=True, best_of=2, **params)


def test_seed_is_echoed_and_reproduces_a_drawn_seed(tiny_server, client_for):
    client = client_for(tiny_server)
    given = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    assert given.seed_used == 1234
    drawn = client.generate(PROMPT, max_tokens=8, temperature=1.0)
    again = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=drawn.seed_used)
    assert again.output_ids == drawn.output_ids


def test_min_p_one_is_greedy_and_typical_p_changes_sampling(tiny_server, tiny_reference,
                                                            client_for):
    client = client_for(tiny_server)
    greedy = tiny_reference.greedy(tiny_reference.encode(PROMPT), 12)
    assert client.generate(PROMPT, max_tokens=12, min_p=1.0, temperature=2.0,
                           seed=3).output_ids == greedy
    sampled = client.generate(PROMPT, max_tokens=12, temperature=2.0, seed=3).output_ids
    typical = client.generate(PROMPT, max_tokens=12, temperature=2.0, seed=3, typical_p=0.3)
    assert typical.output_ids != sampled
    assert client.generate(PROMPT, max_tokens=12, temperature=2.0, seed=3,
                           typical_p=0.3).output_ids == typical.output_ids


def test_length_penalty_ends_sooner_like_transformers(demo_server, demo_reference, client_for):
    ids = demo_reference.tokenizer.apply_chat_template(json.loads(QUESTION),
                                                       add_generation_prompt=True,
                                                       tokenize=True, return_dict=True)["input_ids"]
    result = client_for(demo_server).generate(
        QUESTION, apply_chat_template=True, max_tokens=30, length_penalty_start_index=2,
        length_penalty_decay_factor=10.0)
    expected = demo_reference.greedy(ids, 30, exponential_decay_length_penalty=(2, 10.0))
    assert result.output_ids == expected
    assert result.finish_reason == "eos_token" and len(expected) < 8  # "The capital ..." is 8


def test_include_stop_sequence_false_and_stop_outputs(demo_server, client_for):
    client = client_for(demo_server)
    kept = client.generate(QUESTION, apply_chat_template=True, max_tokens=30,
                           stop_words=["France"])
    assert (kept.text, kept.stop_reason, kept.stop_sequence) == (
        "The capital of France", "stop_sequence", "France")
    dropped = client.generate(QUESTION, apply_chat_template=True, max_tokens=30,
                              stop_words=["France"], include_stop_sequence=False)
    assert dropped.text == "The capital of " and dropped.stop_sequence == "France"
    eos = client.generate(QUESTION, apply_chat_template=True, max_tokens=30)
    assert (eos.finish_reason, eos.stop_reason, eos.stop_sequence) == ("eos_token", "eos_token", "")
    length = client.generate(QUESTION, apply_chat_template=True, max_tokens=3)
    assert (length.finish_reason, length.stop_reason) == ("length", "max_tokens")


def test_tokenize_api(tiny_server, tiny_reference, client_for):
    client = client_for(tiny_server)
    texts = [PROMPT, "Café 日本"]

    def tokenize(**flags):
        inputs = []
        arrays = {"text_input": np.array([[t.encode()] for t in texts], dtype=object)}
        for name, value in flags.items():
            arrays[name] = np.array([[value]] * len(texts),
                                    dtype=np.int32 if isinstance(value, int) and not
                                    isinstance(value, bool) else bool)
        for name, array in arrays.items():
            item = grpcclient.InferInput(name, list(array.shape),
                                         "BYTES" if array.dtype == object else
                                         ("BOOL" if array.dtype == bool else "INT32"))
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [grpcclient.InferRequestedOutput(n)
                   for n in ("token_count", "input_ids", "tokens", "offsets")]
        return client._client.infer("tokenizer", inputs, outputs=outputs)

    result = tokenize(return_tokens=True, return_offsets=True)
    counts = result.as_numpy("token_count").reshape(-1).tolist()
    for row, text in enumerate(texts):
        encoded = tiny_reference.tokenizer(text, return_offsets_mapping=True)
        n = counts[row]
        assert n == len(encoded["input_ids"])
        assert result.as_numpy("input_ids")[row, :n].tolist() == encoded["input_ids"]
        tokens = [t.decode() for t in result.as_numpy("tokens")[row, :n]]
        assert tokens == tiny_reference.tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        assert result.as_numpy("offsets")[row, :n].tolist() == [list(o) for o in
                                                                 encoded["offset_mapping"]]
        assert (result.as_numpy("offsets")[row, n:] == -1).all()
    truncated = tokenize(truncate_input_tokens=2)
    assert truncated.as_numpy("token_count").reshape(-1).tolist() == [2, 2]
    assert truncated.as_numpy("tokens").shape[1] == 0  # not asked for


def test_repetition_penalty_matches_transformers_and_openai_penalties_act(tiny_server,
                                                                         tiny_reference,
                                                                         client_for):
    client = client_for(tiny_server)
    prompt_ids = tiny_reference.encode(PROMPT)
    penalized = client.generate(PROMPT, max_tokens=16, repetition_penalty=1.8)
    assert penalized.output_ids == tiny_reference.greedy(prompt_ids, 16, repetition_penalty=1.8)
    plain = client.generate(PROMPT, max_tokens=16).output_ids
    assert penalized.output_ids != plain
    for name in ("presence_penalty", "frequency_penalty"):
        repeated = client.generate(PROMPT, max_tokens=16, **{name: -2.0}).output_ids
        assert repeated != plain and len(set(repeated)) < len(set(plain)), name  # rewards repeats


def test_min_length_is_min_tokens(demo_server, client_for):
    client = client_for(demo_server)
    a = client.generate(QUESTION, apply_chat_template=True, max_tokens=14, min_tokens=12)
    b = client.generate(QUESTION, apply_chat_template=True, max_tokens=14, min_length=12)
    assert a.output_ids == b.output_ids and len(a.output_ids) >= 12
