"""textgen-launcher configured by environment variables as in a TGIS deployment: gRPC over
mutual TLS (TLS_CERT_PATH, TLS_KEY_PATH, TLS_CLIENT_CA_CERT_PATH) with a CA and certificates
made here, request traces exported to an OTLP collector (OTLP_ENDPOINT), JSON logs
(JSON_OUTPUT). One server for the module."""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server import free_port, wait_until_ready
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _certificates(directory: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    paths = {}

    def issue(name, issuer_name, issuer_key, key, ca=False, usage=None, san=None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(stem, cert, key=None):
        paths[stem + "_cert"] = directory / f"{stem}.pem"
        paths[stem + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            paths[stem + "_key"] = directory / f"{stem}.key"
            paths[stem + "_key"].write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "textgen test CA")])
    write("ca", issue("textgen test CA", ca_name, ca_key, ca_key, ca=True))
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    write("server", issue("localhost", ca_name, ca_key, server_key,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH,
                          san=[x509.DNSName("localhost"),
                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), server_key)
    write("client", issue("textgen test client", ca_name, ca_key, client_key,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    return paths


class Collector(http.server.ThreadingHTTPServer):
    """Records the OTLP/HTTP exports it receives: (path, content type, body)."""

    def __init__(self):
        self.posts: list[tuple[str, str, bytes]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                collector.posts.append((self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def tls_launcher(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls-launcher")
    certs = _certificates(workdir)
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MODEL_ID": str(tiny_model_dir), "MAX_TOTAL_TOKENS": "256",
           "HOSTNAME": "127.0.0.1", "PORT": str(http_port), "GRPC_PORT": str(grpc_port),
           "METRICS_PORT": str(metrics_port), "MODEL_REPOSITORY": str(workdir / "repository"),
           "TLS_CERT_PATH": str(certs["server_cert"]), "TLS_KEY_PATH": str(certs["server_key"]),
           "TLS_CLIENT_CA_CERT_PATH": str(certs["ca_cert"]),
           "OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}/v1/traces",
           "JSON_OUTPUT": "true", "TOKENIZER_CONFIG_PATH": str(workdir / "tokenizer_config.json")}
    # A chat template of our own, in place of the model's.
    (workdir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE}))
    log_path = workdir / "launcher.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(Path(sys.executable).parent / "textgen-launcher")],
                                   env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until_ready(process, http_port, 300, lambda: log_path.read_text()[-3000:])
        yield dict(certs, grpc_url=f"127.0.0.1:{grpc_port}", http_port=http_port,
                   collector=collector, log=log_path)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        collector.shutdown()


def test_client_trusting_the_ca_with_its_certificate_is_served(tls_launcher, tiny_reference):
    certs = tls_launcher
    client = TextgenClient(certs["grpc_url"], ssl=True,
                           root_certificates=str(certs["ca_cert"]),
                           private_key=str(certs["client_key"]),
                           certificate_chain=str(certs["client_cert"]))
    try:
        result = client.generate("The quick brown fox", max_tokens=8)
        chat = client.generate(json.dumps([{"role": "user", "content": "Paris"}]),
                               apply_chat_template=True, max_tokens=4)
    finally:
        client.close()
    assert result.output_ids == tiny_reference.greedy(
        tiny_reference.encode("The quick brown fox"), 8)
    # TOKENIZER_CONFIG_PATH's template rendered the messages.
    rendered = tiny_reference.tokenizer("[user] Paris\n", add_special_tokens=False)["input_ids"]
    assert chat.num_input_tokens == len(rendered)
    assert chat.output_ids == tiny_reference.greedy(rendered, 4)


@pytest.mark.parametrize("client_options", [
    dict(ssl=True, root_certificates="ca_cert"),   # trusts the server, has no certificate
    dict(ssl=False),                              # plaintext
], ids=["no-client-certificate", "plaintext"])
def test_clients_without_a_certificate_are_refused(tls_launcher, client_options):
    options = {k: str(tls_launcher[v]) if k == "root_certificates" else v
               for k, v in client_options.items()}
    client = grpcclient.InferenceServerClient(tls_launcher["grpc_url"], **options)
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=5)
    finally:
        client.close()


def test_traces_reach_the_otlp_collector_and_logs_are_json(tls_launcher):
    # HTTP stays plain (tritonserver has no TLS for it): the README says to put a proxy before it.
    request = urllib.request.Request(
        f"http://127.0.0.1:{tls_launcher['http_port']}/v2/models/ensemble/generate",
        data=json.dumps({"text_input": "Paris", "max_tokens": 3}).encode())
    assert json.loads(urllib.request.urlopen(request, timeout=60).read())["num_output_tokens"] == 3
    collector = tls_launcher["collector"]
    deadline = time.monotonic() + 30     # the exporter batches spans for ~5 s
    while not collector.posts and time.monotonic() < deadline:
        time.sleep(0.5)
    assert collector.posts, "no trace export reached the collector"
    path, content_type, body = collector.posts[0]
    assert path == "/v1/traces" and content_type == "application/json"
    resource_spans = json.loads(body)["resourceSpans"]
    attributes = {a["key"]: a["value"].get("stringValue")
                  for r in resource_spans for a in r["resource"]["attributes"]}
    assert attributes["service.name"] == "textgen"
    spans = [s for r in resource_spans for scope in r["scopeSpans"] for s in scope["spans"]]
    assert any(s["name"] == "ensemble" for s in spans), [s["name"] for s in spans]
    messages = []
    for line in tls_launcher["log"].read_text().splitlines():
        if line.startswith("{"):
            messages.append(json.loads(line)["fields"]["message"])
    assert any(m.startswith("[textgen] serving ") for m in messages)      # the launcher
    assert any(m.startswith("[textgen] loaded ") for m in messages)       # the generator model
