"""Who may reach the operator-facing servers (`fedmoe serve`, the dashboard, the operator
API), and how: bearer tokens and the TLS rule.

- A token comes from a file (`--token-file`), then an environment variable, then `--token`
  (which other users of the machine see in `ps`); with none, the server makes one and
  prints it once.
- A host other than loopback needs TLS (`--tls-cert` + `--tls-key`): a token must not cross
  a network in the clear. `check_tls` says so in one line.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.network import is_loopback_host


def new_token() -> str:
    # hex: never starts with "-" (which argparse would take for an option in `--token T`)
    return secrets.token_hex(20)


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def read_token(token_file: str | None, env: str, token: str | None, file_flag: str = "--token-file") -> str | None:
    """The token from `token_file`, then $`env`, then `token`; None if none is given.
    An unreadable or empty file, or an empty --token, is a one-line error."""
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise FedmoeError(f"{file_flag} {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise FedmoeError(f"{file_flag} {path} is not a text file") from None
        if not text or len(text.splitlines()) != 1:
            raise FedmoeError(f"{file_flag} {path} must hold one token on one line")
        return text
    if os.environ.get(env):
        return os.environ[env].strip()
    if token is not None and not token.strip():
        raise FedmoeError("the token must not be empty")
    return token or None


def add_token_arguments(p, what: str, env: str, prefix: str = "", dest: str | None = None) -> None:
    """--token / --token-file (with `prefix`, e.g. "dashboard-": --dashboard-token ...);
    args.<dest>token, args.<dest>token_file (dest: the prefix, by default)."""
    dest = prefix.replace("-", "_") if dest is None else dest
    p.add_argument(f"--{prefix}token", dest=f"{dest}token", default=None,
                   help=f"{what} token (visible in `ps`: prefer --{prefix}token-file or ${env})")
    p.add_argument(f"--{prefix}token-file", dest=f"{dest}token_file", default=None,
                   help=f"file holding the {what} token (read before ${env} and --{prefix}token)")


def add_tls_arguments(p, what: str, prefix: str = "", dest: str | None = None) -> None:
    """--tls-cert / --tls-key (with `prefix`: --dashboard-tls-cert ...); args.<dest>tls_cert,
    args.<dest>tls_key."""
    dest = prefix.replace("-", "_") if dest is None else dest
    p.add_argument(f"--{prefix}tls-cert", dest=f"{dest}tls_cert", default=None,
                   help=f"certificate chain (PEM): {what} over TLS (needed off loopback)")
    p.add_argument(f"--{prefix}tls-key", dest=f"{dest}tls_key", default=None, help=f"private key (PEM) of --{prefix}tls-cert")


@dataclass(frozen=True)
class TLSFiles:
    """A server's certificate chain and private key, PEM files that were readable."""

    cert: str
    key: str

    def pem(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain): what grpc.ssl_server_credentials takes."""
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes()


def check_tls(host: str, cert: str | None, key: str | None, host_flag: str = "--host", prefix: str = "") -> TLSFiles | None:
    """The TLS rule, checked before anything listens: cert and key go together, are
    readable, and a non-loopback `host` needs them. None: plaintext on loopback."""
    cert_flag, key_flag = f"--{prefix}tls-cert", f"--{prefix}tls-key"
    if bool(cert) != bool(key):
        raise FedmoeError(f"{cert_flag} and {key_flag} go together")
    if not cert:
        if not is_loopback_host(host):
            raise FedmoeError(f"{host_flag} {host} is not loopback: serving beyond this machine needs TLS "
                              f"({cert_flag}, {key_flag}); the token must not travel in the clear")
        return None
    for flag, path in ((cert_flag, cert), (key_flag, key)):
        try:
            head = Path(path).read_bytes()[:4096]
        except OSError as exc:
            raise FedmoeError(f"{flag} {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN " not in head:
            raise FedmoeError(f"{flag} {path} is not a PEM file")
    return TLSFiles(cert, key)
