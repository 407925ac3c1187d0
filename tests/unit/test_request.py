import numpy as np
import pytest

from textgen_backend.config import EngineLimits
from textgen_backend.params import RequestError
from textgen_backend.request import parse_prompts

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


def parse(**kw):
    return parse_prompts(inputs(**kw), LIMITS, max_stop_sequences=2)


def test_defaults_are_greedy_with_tgis_max_tokens():
    [p] = parse()
    assert p.input_ids == [5, 6, 7] and p.text == "p0"
    assert not p.params.sampling.do_sample
    assert p.params.stopping.max_tokens == 20 and p.params.exclude_input_in_output


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": np.array([[-5]], np.int32)}, "max_tokens must be >= 1, got -5"),
    ({"top_p": np.array([[1.5]], np.float32)}, "top_p must be in (0, 1], got 1.5"),
    ({"temperature": np.array([[-1.0]], np.float32)}, "temperature must be >= 0, got -1.0"),
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
    ({"sampling_parameters": np.array([[b'{"max_tokens": 4,']], object)},
     "sampling_parameters is not valid JSON"),
    ({"sampling_parameters": np.array([[b'{"max_tokens": "4"}']], object)},
     "max_tokens must be a number, got '4'"),
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
