"""Start-up checks of the files that the TLS flags name, so that a wrong file is refused by name.

Handed a private key as its certificate, or a file that is not PEM at all,
gRPC says only "Failed to bind to address". These checks read each file once,
before the server binds, and name the flag, the file and what is wrong. They
look at PEM block labels only: `cryptography`, which could also match a key to
its certificate, is a development dependency and not there at run time.
"""

from __future__ import annotations

import re

from nanodist.services.common.errors import ConfigurationError

_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def read_file(flag: str, path: str) -> bytes:
    """The bytes of `path`, or a ConfigurationError naming `flag` and why the file cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "is a directory, not a file"
    except PermissionError:
        problem = "not readable (permission denied)"
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
    raise ConfigurationError(f"{flag} {path}: {problem}")


def _labels(data: bytes) -> list[str]:
    return [label.decode() for label in _LABEL.findall(data)]


def _found(labels: list[str], data: bytes) -> str:
    """What a file holds, in words, for the error message."""
    if not data.strip():
        return "an empty file"
    if not labels:
        return "no PEM block"
    if any(label.endswith("PRIVATE KEY") for label in labels):
        return "a private key"
    return " and ".join(f"a PEM {label.lower()}" for label in dict.fromkeys(labels))


def check_certificate(flag: str, path: str) -> None:
    """`path` holds at least one PEM certificate (a server certificate chain, or CA certificates)."""
    data = read_file(flag, path)
    labels = _labels(data)
    if "CERTIFICATE" not in labels:
        raise ConfigurationError(f"{flag} {path}: not a PEM certificate (found {_found(labels, data)})")


def check_private_key(flag: str, path: str) -> None:
    """`path` holds an unencrypted PEM private key (PKCS#8, or the traditional EC/RSA forms)."""
    data = read_file(flag, path)
    labels = _labels(data)
    if "ENCRYPTED PRIVATE KEY" in labels:
        # gRPC has no way to be given a passphrase.
        raise ConfigurationError(f"{flag} {path}: the private key is encrypted; gRPC needs it unencrypted")
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        raise ConfigurationError(f"{flag} {path}: not a PEM private key (found {_found(labels, data)})")
