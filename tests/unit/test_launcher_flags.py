"""textgen-launcher's flags: TGI's set with env vars, rejected values naming the flag and the
choices, TGI-style --help, and the tritonserver options for TLS and tracing."""
import json
import logging

import pytest

from textgen_backend.config import EngineConfig, from_flags
from textgen_backend.cli.launcher import ServerConfig, build_parser
from textgen_backend.logs import configure_logging
from textgen_backend.cli.runtime_env import runtime_environment
from textgen_backend.cli.tritonserver import tls_options, tracing_options

pytestmark = pytest.mark.unit

TGI_FLAGS = ["--model-id", "--revision", "--validation-workers", "--sharded", "--num-shard",
             "--quantize", "--dtype", "--trust-remote-code", "--max-concurrent-requests",
             "--max-best-of", "--max-stop-sequences", "--max-top-n-tokens", "--max-input-tokens",
             "--max-input-length", "--max-total-tokens", "--waiting-served-ratio",
             "--max-batch-prefill-tokens", "--max-batch-total-tokens", "--max-waiting-tokens",
             "--max-batch-size", "--cuda-graphs", "--hostname", "-p", "--port",
             "--huggingface-hub-cache", "--weights-cache-override", "--disable-custom-kernels",
             "--cuda-memory-fraction", "--rope-scaling", "--rope-factor", "--json-output",
             "--otlp-endpoint", "--tokenizer-config-path", "-e", "--env",
             "--max-client-batch-size", "--download-only", "--tls-cert-path", "--tls-key-path",
             "--tls-client-ca-cert-path", "--master-addr", "--master-port"]


def parse(argv):
    args = build_parser().parse_args(argv)
    return from_flags(EngineConfig, args), from_flags(ServerConfig, args)


def test_tgi_flags_exist():
    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert set(TGI_FLAGS) <= options


def test_flags_and_env_vars(monkeypatch, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("MAX_INPUT_LENGTH", "100")
    monkeypatch.setenv("SHARDED", "false")
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "true")
    monkeypatch.setenv("TLS_CERT_PATH", str(cert))
    monkeypatch.setenv("TLS_KEY_PATH", str(key))
    engine, server = parse(["--model-id", "m", "--num-shard", "1", "--validation-workers", "2"])
    assert (engine.max_input_tokens, engine.sharded, engine.num_shard) == (100, False, 1)
    assert engine.trust_remote_code and engine.validation_workers == 2
    assert (engine.master_addr, engine.master_port) == ("127.0.0.1", 29501)
    assert server.http_port == 9000 and server.tls_cert_path == str(cert)
    assert server.tritonserver_options() == ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}",
                                             f"--grpc-server-key={key}"]
    engine, _ = parse([])
    assert (engine.prefix_caching, engine.chunked_prefill, engine.speculate) == (True, True, None)
    engine, _ = parse(["--no-prefix-caching", "--no-chunked-prefill", "--speculative-tokens",
                       "3", "--adapter-id", "a,b", "--adapter-source", "local",
                       "--max-active-adapters", "7", "--adapter-cycle-time-s", "0.5",
                       "--adapter-memory-fraction", "0.2", "--max-lora-rank", "32"])
    assert (engine.prefix_caching, engine.chunked_prefill, engine.speculate) == (False, False, 3)
    assert (engine.preloaded_adapters, engine.adapter_source, engine.max_active_adapters,
            engine.adapter_cycle_time_s, engine.adapter_memory_fraction,
            engine.max_lora_rank) == (("a", "b"), "local", 7, 0.5, 0.2, 32)
    monkeypatch.setenv("PREFIX_CACHING", "false")
    monkeypatch.setenv("SPECULATE", "2")
    monkeypatch.setenv("MAX_ACTIVE_ADAPTERS", "9")
    engine, _ = parse([])
    assert (engine.prefix_caching, engine.speculate, engine.max_active_adapters) == (
        False, 2, 9)
    _, server = parse(["-p", "7000"])        # a flag wins over its env var
    assert server.http_port == 7000
    _, server = parse(["--port", "7001", "--otlp-endpoint", "http://c:4318/v1/traces"])
    assert server.http_port == 7001
    assert "--trace-config=opentelemetry,url=http://c:4318/v1/traces" in (
        server.tritonserver_options())


@pytest.mark.parametrize("argv, env, message", [
    (["--quantize", "marlin"], {}, "argument --quantize: invalid choice: 'marlin' (choose "
                                   "from 'gptq', 'awq', 'eetq', 'fp8', 'bitsandbytes', "
                                   "'bitsandbytes-nf4', 'bitsandbytes-fp4')"),
    (["--dtype", "int3"], {}, "argument --dtype: invalid choice: 'int3'"),
    (["--sharded", "maybe"], {}, "argument --sharded: invalid choice: 'maybe' (choose from "
                                 "'true', 'false')"),
    (["--load-format", "gguf"], {}, "(choose from 'safetensors', 'pt', 'dummy')"),
    ([], {"DTYPE": "int3"}, "--dtype: environment variable DTYPE='int3' is not one of float32, "
                            "float16, bfloat16"),
    ([], {"ROPE_SCALING": "yarn"}, "--rope-scaling: environment variable ROPE_SCALING='yarn' "
                                   "is not one of linear, dynamic"),
    ([], {"MAX_TOTAL_TOKENS": "lots"}, "--max-total-tokens: environment variable "
                                       "MAX_TOTAL_TOKENS='lots' is not a valid int"),
])
def test_unsupported_values_name_the_flag_and_the_choices(monkeypatch, capsys, argv, env,
                                                          message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        parse(["--model-id", "m"] + argv)
    assert message in capsys.readouterr().err + str(info.value.code)


@pytest.mark.parametrize("argv, message", [
    (["--num-shard", "2", "--sharded", "false"], "--sharded false contradicts --num-shard 2"),
    (["--num-shard", "1", "--sharded", "true"], "--sharded true needs --num-shard of 2 or more"),
    (["--num-shard", "0"], "num_shard must be >= 1, got 0"),
    (["--tls-key-path", "k.pem"], "give both --tls-cert-path and --tls-key-path"),
    (["--tls-client-ca-cert-path", "ca.pem"], "needs --tls-cert-path and --tls-key-path"),
    (["--tls-cert-path", "/absent.pem", "--tls-key-path", "/absent.pem"],
     "TLS file /absent.pem does not exist"),
])
def test_unsupported_settings_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(["--model-id", "m"] + argv)


def test_help_reads_like_tgi():
    text = build_parser().format_help()
    assert text.startswith("Usage: textgen-launcher [OPTIONS]\n")
    assert "\nOptions:\n" in text
    assert ("  -p, --http-port, --port <HTTP_PORT>\n"
            "          HTTP port (KServe v2 and the generate endpoints).\n\n"
            "          [env: HTTP_PORT=]\n          [env: PORT=]\n          [default: 8000]\n"
            ) in text
    assert "      --quantize <QUANTIZE>\n" in text and ("[possible values: gptq, awq, eetq, "
                                                      "fp8, bitsandbytes, bitsandbytes-nf4, "
                                                      "bitsandbytes-fp4]") in text
    assert "      --trust-remote-code\n" in text and "[env: TLS_CLIENT_CA_CERT_PATH=]" in text


def test_mutual_tls_options(tmp_path):
    files = [tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem")]
    for path in files:
        path.write_text("x")
    assert tls_options(*map(str, files)) == [
        "--grpc-use-ssl=true", f"--grpc-server-cert={files[0]}", f"--grpc-server-key={files[1]}",
        "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={files[2]}"]
    assert tls_options(None, None, None) == [] and tracing_options(None) == []


def test_json_logs_and_runtime_environment(capsys):
    configure_logging(json_output=True, logger_name="textgen-test")
    logging.getLogger("textgen-test").info("[textgen] hello %s", "world")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["fields"]["message"] == "[textgen] hello world" and line["level"] == "INFO"
    assert line["target"] == "textgen-test" and line["timestamp"].endswith("+00:00")
    env = runtime_environment()
    assert env.startswith("Runtime environment:\n")
    assert "\ntorch: " in env and "\ntritonserver: " in env


def test_cuda_graph_lists_are_validated_naming_the_flag():
    config, _ = parse(["--prefill-cuda-graphs", "64,16,16", "--cuda-graphs", "0"])
    assert config.prefill_graph_token_counts == (16, 64)
    assert config.cuda_graph_batch_sizes == ()
    for flag, value in (("--prefill-cuda-graphs", "16,x"), ("--cuda-graphs", "-1")):
        with pytest.raises(ValueError, match=flag.strip("-").replace("-", "_")):
            parse([flag, value])
