"""TLS for the gRPC server and its clients, from PEM files named in the settings.

Server: ``tls_cert`` + ``tls_key`` turn TLS on; ``tls_client_ca`` also requires every client to
present a certificate that CA signed (mutual TLS). Clients: ``tls_ca`` (the CA that signed the
server's certificate) turns TLS on; ``tls_client_cert`` + ``tls_client_key`` present a certificate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from flywheel.config import ClientConfig, SecurityConfig


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{setting}: cannot read {path}: {exc.strerror}") from exc


def _pair(cert: str, key: str, names: str) -> tuple[bytes, bytes] | None:
    if bool(cert) != bool(key):
        raise ValueError(f"set both {names} or neither")
    return (_read(key, names), _read(cert, names)) if cert else None


def server_credentials(settings: "SecurityConfig") -> grpc.ServerCredentials | None:
    """TLS credentials of the server, or None to serve plaintext."""
    pair = _pair(settings.tls_cert, settings.tls_key, "tls_cert and tls_key")
    if pair is None:
        if settings.tls_client_ca:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (client certificates are checked over TLS)")
        return None
    client_ca = _read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(settings: "ClientConfig") -> grpc.ChannelCredentials | None:
    """TLS credentials of a client, or None for a plaintext channel."""
    pair = _pair(settings.tls_client_cert, settings.tls_client_key, "tls_client_cert and tls_client_key")
    if not settings.tls_ca:
        if pair is not None:
            raise ValueError("tls_client_cert needs tls_ca (client certificates are sent over TLS)")
        return None
    key, cert = pair if pair is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=_read(settings.tls_ca, "tls_ca"), private_key=key,
                                        certificate_chain=cert)
