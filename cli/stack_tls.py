"""A private certificate authority for SeaweedFS's internal ports, made by `atelier up` once.

SeaweedFS's master, volume and filer servers talk to each other (and the S3 gateway talks to them) over
HTTP and gRPC ports that, left alone, take any local client: the master hands out write tokens, `weed
shell` lists and copies every tenant's files. With this CA every one of those ports is mutual TLS: a
client must present a certificate the CA signed, and only the stack's SeaweedFS process holds one
(0600 files under the servers' state folder, s3/tls/). The S3 gateway's port stays plain HTTP with signed requests:
it is the only door, and it checks each caller's keys.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from atelier.kernel.storage import write_bytes_atomic, write_secret_file

CA_CERT, NODE_CERT, NODE_KEY = "ca.crt", "node.crt", "node.key"


def ensure_certificates(folder: Path, host: str) -> dict[str, Path]:
    """The CA certificate and the node's certificate and key in `folder`, made once (valid ten years)."""
    paths = {"ca": folder / CA_CERT, "cert": folder / NODE_CERT, "key": folder / NODE_KEY}
    if all(p.is_file() for p in paths.values()):
        return paths
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    lifetime = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atelier-seaweedfs-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(lifetime[0])
        .not_valid_after(lifetime[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atelier-seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(lifetime[0])
        .not_valid_after(lifetime[1])
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # the CA's key is not kept: nothing else is ever signed, so a stolen CA key cannot mint a client
    write_bytes_atomic(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), mode=0o600)
    write_bytes_atomic(paths["cert"], node.public_bytes(serialization.Encoding.PEM), mode=0o600)
    write_secret_file(
        paths["key"],
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
    )
    return paths


def security_sections(paths: dict[str, Path]) -> str:
    """security.toml's mutual-TLS sections: gRPC and HTTPS on master, volume and filer, and the client side."""
    ca, cert, key = (str(paths[k]) for k in ("ca", "cert", "key"))
    node = f'cert = "{cert}"\nkey = "{key}"\n'
    grpc = "".join(f"[grpc.{part}]\n{node}" for part in ("master", "volume", "filer", "s3", "client"))
    https = "".join(f'[https.{part}]\n{node}ca = "{ca}"\n' for part in ("master", "volume", "filer"))
    return (
        f'[grpc]\nca = "{ca}"\n{grpc}{https}'
        f'[https.client]\nenabled = true\n{node}ca = "{ca}"\n'
        "[access]\nui = false\n[filer.expose_directory_metadata]\nenabled = false\n"
    )
