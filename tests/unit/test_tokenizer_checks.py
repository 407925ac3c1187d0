"""The tokenizer model's refusals that need no tokenizer: request parameters, a missing
text_input (the server-side behaviour is in tests/e2e/test_request_errors.py)."""
import numpy as np
import pytest

from textgen_backend.sampling.params import RequestError
from textgen_backend.serving.tokenizer import check_parameters, tokenize_request

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("parameters", ["", "{}", '{"id": "req-7"}'])
def test_no_parameters_and_the_generate_request_id_pass(parameters):
    check_parameters(parameters)


@pytest.mark.parametrize("parameters, message", [
    ('{"max_token": 5}', "unknown parameter 'max_token' (did you mean 'max_tokens'?): "),
    ('{"lora_rank": 8}', "unknown parameter 'lora_rank': "),
    ('{"adapter_id": "my-lora"}',
     "unknown parameter 'adapter_id' (an input tensor: send it as an input): "),
    ('{"temprature": 0.5, "id": "x", "lora_rank": 8}',
     "unknown parameters 'lora_rank', 'temprature' (did you mean 'temperature'?): "),
])
def test_unknown_parameters_are_named(parameters, message):
    with pytest.raises(RequestError) as refused:
        check_parameters(parameters)
    assert str(refused.value).startswith(message)


def test_a_request_without_text_input_is_refused_naming_it():
    with pytest.raises(RequestError, match="text_input is required"):
        tokenize_request(tokenizer=None, inputs={"apply_chat_template": np.array([[False]])})
