import numpy as np
import pytest

from textgen_backend.config import EngineConfig, EngineLimits
from textgen_backend.sampling.params import RequestError
from textgen_backend.serving.request import parse_prompts

pytestmark = pytest.mark.unit

LIMITS = EngineLimits(max_input_tokens=10, max_total_tokens=32, max_batch_prefill_tokens=64,
                      num_kv_blocks=8, block_size=4, max_batch_size=None, max_waiting_tokens=20,
                      waiting_served_ratio=0.3)


def inputs(batch=1, length=3, **params):
    arrays = {"_input_ids": np.arange(batch * length, dtype=np.int32).reshape(batch, length) + 5,
              "_input_lengths": np.full((batch, 1), length, dtype=np.int32),
              "_prompt_text": np.array([[b"p%d" % i] for i in range(batch)], dtype=object)}
    for name, value in params.items():
        arrays[name] = value if isinstance(value, np.ndarray) else np.array([[value]])
    return arrays


CONFIG = EngineConfig(model_id="m", max_stop_sequences=2, max_best_of=3, max_top_n_tokens=4)


def encode_words(word):
    return [ord(c) for c in word]  # one token per character


def parse(**kw):
    return parse_prompts(inputs(**kw), LIMITS, CONFIG, encode_words, lambda *fields: None,
                         lambda prefix_id: None)


def test_defaults_are_greedy_with_tgis_max_tokens():
    [p] = parse()
    assert p.input_ids == [5, 6, 7] and p.text == "p0"
    assert not p.params.sampling.do_sample
    assert p.params.stopping.max_tokens == 20 and p.params.exclude_input_in_output


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": np.array([[-5]], np.int32)}, "max_tokens must be >= 1, got -5"),
    ({"top_p": np.array([[1.5]], np.float32)}, "top_p must be in (0, 1], got 1.5"),
    ({"temperature": np.array([[-1.0]], np.float32)}, "temperature must be >= 0, got -1.0"),
    ({"temperature": np.array([[np.nan]], np.float32)}, "temperature must be a finite number"),
    ({"temperature": np.array([[np.inf]], np.float32)}, "temperature must be a finite number"),
    ({"repetition_penalty": np.array([[np.nan]], np.float32)},
     "repetition_penalty must be a finite number, got nan"),
    ({"top_k": np.array([[-2]], np.int32)}, "top_k must be >= 0"),
    ({"repetition_penalty": np.array([[0.0]], np.float32)}, "repetition_penalty must be > 0"),
    ({"presence_penalty": np.array([[3.0]], np.float32)}, "presence_penalty must be in [-2, 2]"),
    ({"min_tokens": np.array([[9]], np.int32), "max_tokens": np.array([[4]], np.int32)},
     "min_tokens must be in [0, max_tokens=4], got 9"),
    ({"min_tokens": np.array([[1]], np.int32), "min_length": np.array([[1]], np.int32)},
     "give min_tokens or min_length, not both"),
    ({"stop_words": np.array([[b"a", b"b", b"c"]], object)},
     "3 stop sequences given but max_stop_sequences is 2"),
    ({"sampling_parameters": np.array([[b'{"max_tokens": 4, "beam": 2}']], object)},
     "sampling_parameters has unknown keys ['beam']"),
    ({"typical_p": np.array([[0.0]], np.float32)}, "typical_p must be in (0, 1], got 0.0"),
    ({"min_p": np.array([[1.5]], np.float32)}, "min_p must be in [0, 1], got 1.5"),
    ({"length_penalty_start_index": np.array([[2]], np.int32)},
     "length_penalty_start_index and length_penalty_decay_factor must be given together"),
    ({"length_penalty_start_index": np.array([[2]], np.int32),
      "length_penalty_decay_factor": np.array([[11.0]], np.float32)},
     "length_penalty_decay_factor must be in [1, 10], got 11.0"),
    ({"time_limit_ms": np.array([[0]], np.int32)}, "time_limit_ms must be >= 1, got 0"),
    ({"top_n_tokens": np.array([[5]], np.int32)},
     "top_n_tokens must be in [0, max_top_n_tokens=4], got 5"),
    ({"best_of": np.array([[4]], np.int32), "temperature": np.array([[1.0]], np.float32)},
     "best_of must be in [1, max_best_of=3], got 4"),
    ({"best_of": np.array([[2]], np.int32)}, "best_of=2 needs sampling"),
    ({"best_of": np.array([[2]], np.int32), "top_k": np.array([[5]], np.int32),
      "stream": np.array([[True]])}, "best_of=2 cannot be streamed"),
    ({"num_return_sequences": np.array([[3]], np.int32), "best_of": np.array([[2]], np.int32),
      "top_k": np.array([[5]], np.int32)}, "num_return_sequences must be in [1, best_of=2], got 3"),
    ({"stop_words": np.array([[b"x" * 241]], object)},
     "a stop sequence has 241 characters but the limit is 240"),
    ({"sampling_parameters": np.array([[b'{"max_tokens": 4,']], object)},
     "sampling_parameters is not valid JSON"),
    ({"sampling_parameters": np.array([[b'{"max_tokens": [4]}']], object)},
     "max_tokens must be a number, got [4]"),
    ({"sampling_parameters": np.array([[b'{"max_tokens": 4.5}']], object)},
     "max_tokens must be an integer, got 4.5"),
    ({"max_tokens": np.array([[4]], np.int32),
      "sampling_parameters": np.array([[b'{"max_tokens": 4}']], object)},
     "max_tokens is given both as a tensor and in sampling_parameters"),
    ({"max_tokens": np.array([[30]], np.int32)},
     "input tokens + max_tokens = 33 exceeds max_total_tokens 32"),
])
def test_invalid_parameters_name_the_parameter_and_limit(params, message):
    with pytest.raises(RequestError) as info:
        parse(**params)
    assert message in str(info.value)


def test_input_length_limit():
    with pytest.raises(RequestError, match="input has 11 tokens but max_input_tokens is 10"):
        parse(length=11, max_tokens=np.array([[1]], np.int32))


def test_batch_rows_broadcast_or_must_match():
    prompts = parse(batch=3, max_tokens=np.array([[2]], np.int32))
    assert [p.params.stopping.max_tokens for p in prompts] == [2, 2, 2]
    prompts = parse(batch=2, max_tokens=np.array([[2], [3]], np.int32))
    assert [p.params.stopping.max_tokens for p in prompts] == [2, 3]
    with pytest.raises(RequestError, match="max_tokens has 2 rows but text_input has 3"):
        parse(batch=3, max_tokens=np.array([[2], [3]], np.int32))


def test_sampling_switches_on_with_a_sampling_parameter_unless_temperature_is_zero():
    assert parse(top_k=np.array([[5]], np.int32))[0].params.sampling.do_sample
    assert not parse(temperature=np.array([[0.0]], np.float32),
                     top_p=np.array([[0.5]], np.float32))[0].params.sampling.do_sample
    assert not parse(repetition_penalty=np.array([[1.2]], np.float32))[0].params.sampling.do_sample


def test_vllm_sampling_parameters_json():
    [p] = parse(sampling_parameters=np.array(
        [[b'{"max_tokens": 5, "temperature": 0.7, "top_k": -1, "stop": "x", "seed": 3, '
          b'"ignore_eos": true, "min_tokens": 2}']], object))
    s = p.params
    assert s.stopping.max_tokens == 5 and s.stopping.min_tokens == 2 and s.stopping.ignore_eos
    assert s.sampling.do_sample and s.sampling.temperature == pytest.approx(0.7)
    assert s.sampling.top_k == 0 and s.sampling.seed == 3 and s.stopping.stop_sequences == ("x",)


def test_empty_stop_words_mean_none():
    [p] = parse(stop_words=np.array([[b""]], object))
    assert p.params.stopping.stop_sequences == ()


def test_new_parameters_reach_the_params():
    [p] = parse(typical_p=np.array([[0.5]], np.float32), min_p=np.array([[0.1]], np.float32),
                length_penalty_start_index=np.array([[3]], np.int32),
                length_penalty_decay_factor=np.array([[1.5]], np.float32),
                bad_words=np.array([[b"ab", b""]], object), watermark=np.array([[True]]),
                time_limit_ms=np.array([[250]], np.int32),
                include_stop_sequence=np.array([[False]]),
                return_log_probs=np.array([[True]]), top_n_tokens=np.array([[2]], np.int32),
                decoder_input_details=np.array([[True]]))
    s, st, d = p.params.sampling, p.params.stopping, p.params.details
    assert s.do_sample and s.typical_p == 0.5 and s.min_p == pytest.approx(0.1)
    assert s.length_penalty == (3, 1.5) and s.bad_words_ids == ((97, 98),) and s.watermark
    assert st.time_limit_ms == 250 and not st.include_stop_sequence
    assert d.log_probs and d.top_n_tokens == 2 and d.input_details


def test_best_of_and_vllm_aliases():
    [p] = parse(sampling_parameters=np.array(
        [[b'{"n": 2, "temperature": 0.5, "include_stop_str_in_output": false, "logprobs": 3}']],
        object))
    assert p.params.best_of == 2 and p.params.num_return_sequences == 2
    assert not p.params.stopping.include_stop_sequence
    assert p.params.details.top_n_tokens == 3 and p.params.details.log_probs


def test_sampling_parameters_numbers_sent_as_strings_are_converted():
    [p] = parse(sampling_parameters=np.array(
        [[b'{"max_tokens": "8", "temperature": "0.5", "ignore_eos": "true"}']], object))
    assert p.params.stopping.max_tokens == 8 and p.params.stopping.ignore_eos
    assert p.params.sampling.temperature == 0.5
    with pytest.raises(RequestError, match="sampling_parameters.max_tokens must be an integer, "
                                           "got 'eight'"):
        parse(sampling_parameters=np.array([[b'{"max_tokens": "eight"}']], object))
