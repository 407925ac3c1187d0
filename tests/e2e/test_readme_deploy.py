"""The README's deployment commands, run exactly as written from the repository root: build.py
renders a repository, `textgen tritonserver` serves it (ports 8000-8002), the LoRA and soft-prompt
walkthroughs train with PEFT and ask, Ctrl-C drains and stops the server."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import readme_block
from server import wait_until_ready
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def peft_answer(model_dir: Path, ask: str, store: Path) -> str:
    """What PEFT itself answers to the walkthrough's question with what it trained (store: the
    rendered repository's prefix store)."""
    from transformers import AutoTokenizer

    from lora_adapters import PeftReference
    from soft_prompts import peft_prompt_tuning_greedy

    words = shlex.split(ask)
    prompt, tokens = words[1], int(words[words.index("--max-tokens") + 1])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    if "--adapter-id" in words:
        answer = PeftReference(model_dir).greedy(Path(words[words.index("--adapter-id") + 1]),
                                                 ids, tokens)
    else:
        answer = peft_prompt_tuning_greedy(model_dir, store / words[words.index("--prefix-id") + 1],
                                           ids, tokens)
    return tokenizer.decode(answer, skip_special_tokens=True)


def _readme_clients_answer(expected: list[str]) -> None:
    """The README's front end command, then its Python block of clients (OpenAI, huggingface_hub,
    TGI's, LoRAX's): they print `expected`, one answer each."""
    [serve_api] = readme_block("textgen serve-api")
    front_end = subprocess.Popen(["bash", "-c", f"exec {serve_api.rstrip(' &')}"], cwd=ROOT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen("http://localhost:3000/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        [block] = [b for b in re.findall(r"```python\n(.*?)```",
                                          (ROOT / "README.md").read_text(), re.S)
                   if "from openai import OpenAI" in b]
        done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == "".join(answer + "\n" for answer in expected)
    finally:
        os.killpg(front_end.pid, signal.SIGTERM)
        front_end.wait(timeout=10)


def test_readme_deployment_commands_serve_the_demo_model(demo_model_dir, tmp_path):
    render, serve = readme_block("textgen tritonserver --model-repository")
    rendered = subprocess.run(render, shell=True, cwd=ROOT, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # exec: the command itself leads its process group, as a terminal's job does, so the
        # SIGINT below is a Ctrl-C that no intermediate shell turns into its own death.
        process = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(process, 8000, 300, lambda: log_path.read_text()[-3000:])
        client = TextgenClient("localhost:8001")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        result = client.generate(json.dumps(question), apply_chat_template=True, max_tokens=30)
        berlin = client.generate("The capital of Germany is", max_tokens=12).text
        client.close()
        assert result.text == "The capital of France is Paris."
        paris = "The capital of France is Paris."
        _readme_clients_answer([paris, berlin, paris, berlin, berlin])
        render_words = shlex.split(render)
        store = Path(render_words[render_words.index("--prefix-store-path") + 1])
        for walkthrough, option in [("train_peft.py lora", " --adapter-id"),
                                    ("train_peft.py prompt-tuning", " --prefix-id")]:
            train, ask = readme_block(walkthrough)
            outputs = []
            # the walkthrough's commands, then the question without the adapter / soft prompt
            for command in (train, ask, ask.split(option)[0]):
                done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True,
                                      text=True)
                assert done.returncode == 0, done.stderr[-3000:]
                outputs.append(done.stdout)
            _, tuned, base_model = outputs
            assert tuned.startswith(" swordfish"), (walkthrough, tuned)
            assert "swordfish" not in base_model, base_model
            assert tuned == peft_answer(demo_model_dir, ask, store) + "\n", walkthrough
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:  # a failed assertion: stop tritonserver too, not only the
            os.killpg(process.pid, signal.SIGINT)  # command (a SIGKILL would orphan it on :8001)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
