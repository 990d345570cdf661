"""The ledger's signing key and its head witness: what the ledger's database cannot forge.

Every row is signed (Ed25519) over its hash, which covers all its fields and the hash of the row before
it. The private key is the platform's secret (`<keys>/ledger-signing.pem`, 0600, made on the first
write); the public key (`ledger-verify.pem`) is what auditors verify with (`atelier ledger key` prints
it), and it cannot sign. Whoever can write the ledger's database can therefore delete, reorder or
rewrite rows, but cannot make them verify again: a rewritten row with a recomputed hash has no valid
signature.

A signed row can still be removed from the *end* of the chain. The anchor in MLflow names the newest
row, and so does the head witness here, a 0600 file in the platform's keys folder that only the
platform's processes write: neither lives in the ledger's database, so truncating the chain is caught
even by someone who can also write MLflow's database and replays an older anchor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from atelier.kernel.errors import ConfigError
from atelier.kernel.storage import write_bytes_atomic, write_secret_file

SIGNING_FILE, VERIFY_FILE, HEAD_FILE = "ledger-signing.pem", "ledger-verify.pem", "ledger-head"


@dataclass(frozen=True)
class LedgerKey:
    """A verify key, and the signing key where this process is the platform."""

    verify_pem: bytes
    signing_pem: bytes | None = None

    @cached_property
    def _signer(self):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if self.signing_pem is None:
            raise ConfigError(
                "ledger signing key",
                "is not available to this process (only the verify key is)",
                "promote from the platform's account, where ATELIER_LEDGER_KEYS holds ledger-signing.pem",
            )
        return load_pem_private_key(self.signing_pem, password=None)

    @cached_property
    def _verifier(self):  # parsed once: `verify` checks every row with it
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        return load_pem_public_key(self.verify_pem)

    def sign(self, row_hash: str) -> str:
        return self._signer.sign(row_hash.encode()).hex()

    def verifies(self, row_hash: str, signature: str | None) -> bool:
        from cryptography.exceptions import InvalidSignature

        if not signature:
            return False
        try:
            self._verifier.verify(bytes.fromhex(signature), row_hash.encode())
            return True
        except (InvalidSignature, ValueError):
            return False


def load_key(folder: Path, create: bool = True) -> LedgerKey:
    """The key pair in `folder`, made (0600 / 0644) when missing and `create`; with only the verify
    key there (an auditor's copy), a key that verifies but cannot sign."""
    signing, verify = folder / SIGNING_FILE, folder / VERIFY_FILE
    if signing.is_file():
        _require_private(signing)
        pem = signing.read_bytes()
        return LedgerKey(verify.read_bytes() if verify.is_file() else _public_of(pem), pem)
    if verify.is_file():
        return LedgerKey(verify.read_bytes())
    if not create:
        raise ConfigError(
            f"ledger keys in {folder}",
            "are missing",
            "copy the platform's ledger-verify.pem there (`atelier ledger key` prints it) or set ATELIER_LEDGER_KEYS",
        )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    write_secret_file(signing, pem.decode())
    write_bytes_atomic(verify, _public_of(pem), mode=0o644)
    return LedgerKey(_public_of(pem), pem)


def _public_of(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return (
        load_pem_private_key(private_pem, password=None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _require_private(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            str(path),
            f"is readable by others (mode {mode:o}): whoever reads it can sign ledger rows",
            f"chmod 600 {path}, and make a new key if others may have read it",
        )


class HeadWitness:
    """The newest row this platform wrote to one ledger, as `seq:hash`, in a 0600 file beside the signing key
    (one file per ledger database: the URL, without its password, names it)."""

    def __init__(self, folder: Path, ledger_url: str = "") -> None:
        import hashlib

        from atelier.kernel.settings import mask_url

        name = mask_url(ledger_url)
        self.path = folder / (f"{HEAD_FILE}-{hashlib.sha256(name.encode()).hexdigest()[:12]}" if name else HEAD_FILE)

    def read(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write(self, head: str) -> None:
        current = self.read()
        if current is not None and int(current.split(":")[0]) > int(head.split(":")[0]):
            return  # never backwards (a concurrent writer already recorded a newer row)
        write_secret_file(self.path, head + "\n")
