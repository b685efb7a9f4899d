"""Key material for an authenticated federation: a CA, the coordinator's TLS certificate,
and one OpenSSH ECDSA P-384 key pair per site (the key type Flower's SuperNode
authentication takes). Certificates are made with `cryptography`; site keys with
`ssh-keygen -t ecdsa -b 384`, as Flower documents. Registering a site's public key with a
running SuperLink is `flwr supernode register` (fedmoe.server.federation.coordinator does it for
`--site-public-key`)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from fedmoe.shared.errors import FedmoeError


def _write_private(path: Path, data: bytes) -> None:
    """0600 from the first byte (write-then-chmod leaves a window where others can read
    the key), written to a temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)  # O_CREAT's mode is filtered by the umask only towards stricter
    tmp.replace(path)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmoe federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(out: str | Path, hosts: list[str], days: int = 365) -> dict[str, str]:
    """ca.crt/ca.key and server.pem/server.key for the SuperLink, valid for `hosts`
    (DNS names or IP addresses, all put in subjectAltName)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.key").exists():
        raise FedmoeError(f"{out}/ca.key exists: this folder already holds a federation's CA")
    if not hosts:
        raise FedmoeError("give at least one --host the coordinator is reached at")
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM
    nopass = serialization.NoEncryption()
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedmoe CA")).issuer_name(_name("fedmoe CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    _write_private(out / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    (out / "server.pem").write_bytes(cert.public_bytes(pem))
    return {"ca_certfile": str(out / "ca.crt"), "certfile": str(out / "server.pem"), "keyfile": str(out / "server.key")}


def make_site_keys(out: str | Path, site: str) -> dict[str, str]:
    """sites/<site>(.pub): an OpenSSH ECDSA P-384 key pair for SuperNode authentication."""
    if not site or "/" in site or site.startswith("."):
        raise FedmoeError(f"bad site name {site!r}")
    if shutil.which("ssh-keygen") is None:
        raise FedmoeError("ssh-keygen not found (install openssh-client)")
    folder = Path(out) / "sites"
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / site
    if key.exists():
        raise FedmoeError(f"{key} exists: site {site!r} already has a key pair")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"fedmoe-site-{site}", "-f", str(key)],
                   check=True, capture_output=True)
    return {"private_key": str(key), "public_key": str(key) + ".pub"}


def verify_server_cert(ca_certfile: str | Path, certfile: str | Path) -> None:
    """Raise unless `certfile` is signed by the CA in `ca_certfile`."""
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(Path(ca_certfile).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:
        raise FedmoeError(f"{certfile} is not issued by {ca_certfile}: {exc}") from None


def register_site(public_key: str | Path, flwr_home: str | Path, connection: str) -> str:
    """`flwr supernode register KEY.pub CONNECTION` against a running SuperLink (its
    connection in FLWR_HOME/config.toml, e.g. the one `fedmoe coordinator start` writes)."""
    public_key = Path(public_key)
    if not public_key.is_file() or not public_key.read_text().startswith("ecdsa-sha2-nistp384 "):
        raise FedmoeError(f"{public_key}: not an OpenSSH ECDSA P-384 public key (make one with `fedmoe keys site`)")
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    proc = subprocess.run(["flwr", "supernode", "register", str(public_key.resolve()), connection],
                          capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise FedmoeError(f"registering {public_key} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout.strip()
