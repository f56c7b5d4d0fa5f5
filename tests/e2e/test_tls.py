"""TLS listeners against a real process: each answers with its configured certificate (the Stripe SDK pays
through it, verifying it), refuses plain HTTP, and serves a rotated certificate to new handshakes
without a restart."""

from __future__ import annotations

import datetime
import hashlib
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import make_deployment, wait_until


def self_signed(directory: Path, name: str) -> bytes:
    """Write ``<name>.crt`` and ``<name>.key`` (a self-signed cert for 127.0.0.1); returns the cert's DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / f"{name}.key").write_bytes(pem_key)
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.public_bytes(serialization.Encoding.DER)


def served_certificate(address: str) -> bytes:
    host, port = address.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def plain_http_answer(address: str) -> bytes:
    host, port = address.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        chunks = []
        try:
            while chunk := raw.recv(4096):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


@pytest.fixture
def tls_deployment(tmp_path: Path) -> Any:
    tls = tmp_path / "tls"
    tls.mkdir()
    agents_der, owner_der = self_signed(tls, "agents"), self_signed(tls, "owner")
    extra = (
        f"tls_cert_file: {tls / 'agents.crt'}\ntls_key_file: {tls / 'agents.key'}\n"
        f"admin_tls_cert_file: {tls / 'owner.crt'}\nadmin_tls_key_file: {tls / 'owner.key'}\n"
    )
    dep = make_deployment(tmp_path, extra_config=extra)
    dep.agent_url = dep.agent_url.replace("http://", "https://")
    dep.admin_url = dep.admin_url.replace("http://", "https://")
    dep.start()
    yield dep, tls, agents_der, owner_der
    dep.stop()


def test_each_listener_answers_with_its_certificate_and_refuses_plain_http(tls_deployment: Any) -> None:
    import stripe

    dep, tls, agents_der, owner_der = tls_deployment
    assert served_certificate(dep.agent_url) == agents_der
    assert served_certificate(dep.admin_url) == owner_der
    trusted = ssl.create_default_context(cafile=str(tls / "owner.crt"))
    with urllib.request.urlopen(f"{dep.admin_url}/livez", context=trusted, timeout=5) as resp:
        assert resp.status == 200
    for address in (dep.agent_url, dep.admin_url):
        answer = plain_http_answer(address)
        assert b"HTTP/1.1 200" not in answer and b"ok" not in answer.lower()
    # the Stripe SDK, verifying the agents' certificate (its CA bundle: this certificate alone)
    previous = stripe.ca_bundle_path
    try:
        stripe.ca_bundle_path = str(tls / "owner.crt")  # not the agents' certificate: refused by the SDK
        with pytest.raises(stripe.APIConnectionError):
            stripe.StripeClient(
                dep.agent_token, base_addresses={"api": dep.agent_url}, max_network_retries=0
            ).v1.payment_intents.create(params={"amount": 1200, "currency": "usd"})
        stripe.ca_bundle_path = str(tls / "agents.crt")
        client = stripe.StripeClient(
            dep.agent_token, base_addresses={"api": dep.agent_url}, max_network_retries=0
        )
        intent = client.v1.payment_intents.create(params={"amount": 1200, "currency": "usd"})
    finally:
        stripe.ca_bundle_path = previous
    assert intent.id.startswith("pi_") and len(dep.mock_payments()) == 1


def test_a_rotated_certificate_reaches_new_handshakes_without_a_restart(tls_deployment: Any) -> None:
    dep, tls, agents_der, _ = tls_deployment
    staged = tls / "staged"
    staged.mkdir()
    fresh = self_signed(staged, "agents")
    (tls / "agents.key").write_bytes((staged / "agents.key").read_bytes())  # cert-manager: key, then cert
    (tls / "agents.crt").write_bytes((staged / "agents.crt").read_bytes())
    wait_until(lambda: served_certificate(dep.agent_url) == fresh)
    assert fresh != agents_der
    assert '"TLS certificate reloaded"' in dep.logs()
    # a broken pair (the key of another certificate) keeps the working one serving
    self_signed(staged, "other")
    (tls / "agents.key").write_bytes((staged / "other.key").read_bytes())
    wait_until(lambda: "TLS certificate reload failed" in dep.logs())
    assert served_certificate(dep.agent_url) == fresh
    assert hashlib.sha256(fresh).hexdigest() == hashlib.sha256(served_certificate(dep.agent_url)).hexdigest()
