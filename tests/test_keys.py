"""`fedmoe keys`: a CA and a coordinator certificate that verify, site key pairs of the
type Flower's SuperNode authentication takes, and clear refusals."""

import subprocess
import sys

import pytest

from fedmoe.server.ops import keys
from fedmoe.shared.errors import FedmoeError


def fedmoe(*args):
    return subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", *args], capture_output=True, text=True, timeout=120)


def test_keys_init_and_site(tmp_path):
    proc = fedmoe("keys", "init", "--out", str(tmp_path), "--host", "127.0.0.1", "--host", "coord.example", "--json")
    assert proc.returncode == 0, proc.stderr
    keys.verify_server_cert(tmp_path / "ca.crt", tmp_path / "server.pem")
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"], capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:coord.example" in text
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0
    assert fedmoe("keys", "init", "--out", str(tmp_path)).returncode == 2  # never overwrite a CA

    proc = fedmoe("keys", "site", "hospital-a", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sites/hospital-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert "already has a key pair" in fedmoe("keys", "site", "hospital-a", "--out", str(tmp_path)).stderr


def test_foreign_certificate_and_bad_key_are_refused(tmp_path):
    keys.make_ca_and_server_cert(tmp_path / "a", ["127.0.0.1"])
    keys.make_ca_and_server_cert(tmp_path / "b", ["127.0.0.1"])
    with pytest.raises(FedmoeError, match="not issued by"):
        keys.verify_server_cert(tmp_path / "a/ca.crt", tmp_path / "b/server.pem")
    bad = tmp_path / "rsa.pub"
    bad.write_text("ssh-rsa AAAA x\n")
    with pytest.raises(FedmoeError, match="ECDSA P-384"):
        keys.register_site(bad, tmp_path, "fedmoe")
