"""DKIM keys: reading and checking private keys, generating them, and the DNS TXT record that publishes one
(RFC 6376 §3.6.1, RFC 8463 for Ed25519). Configuration, the CLI and the signer share these."""

from __future__ import annotations

import base64
import re

import idna
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

MIN_RSA_BITS = 2048

_SELECTOR = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


class DkimError(ValueError):
    """The message cannot be signed, or the key or parameters cannot be used; the text says why."""


# --- keys -------------------------------------------------------------------------------------------------


def load_private_key(pem: bytes | str) -> PrivateKey:
    """Parse an unencrypted PEM private key (PKCS#8 or PKCS#1 RSA); refuse RSA under :data:`MIN_RSA_BITS`
    bits and every other key type."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted PEM and no password
        raise DkimError(f"the DKIM private key must not be encrypted ({e})") from e
    except ValueError as e:
        raise DkimError(f"the DKIM private key is not a PEM private key ({e})") from e
    except Exception as e:  # cryptography raises UnsupportedAlgorithm and others for odd PEM
        raise DkimError(f"the DKIM private key cannot be used ({e})") from e
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimError(
                f"the DKIM RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required (RFC 8301)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError(f"DKIM keys are RSA or Ed25519, not {type(key).__name__}")


def read_private_key(value: str) -> bytes:
    """The PEM text of ``dkimOptions.privateKey``: the value itself when it is inline PEM (it contains
    ``-----BEGIN``), else the contents of the file it names."""
    if "-----BEGIN" in value:
        return value.encode("ascii", "replace")
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise DkimError(f"cannot read the DKIM private key file {value!r}: {e.strerror}") from e


def is_rsa_key(value: str) -> bool:
    """Whether ``dkimOptions.privateKey``-style ``value`` (inline PEM or a file path) holds a usable RSA key;
    False for anything else, an unreadable file included (its own check reports why)."""
    try:
        return isinstance(load_private_key(read_private_key(value)), rsa.RSAPrivateKey)
    except (DkimError, OSError, ValueError):
        return False


def generate_private_key(key_type: str = "rsa", bits: int = MIN_RSA_BITS) -> PrivateKey:
    """A new signing key: ``rsa`` of ``bits`` bits (at least :data:`MIN_RSA_BITS`) or ``ed25519``."""
    if key_type == "rsa":
        if bits < MIN_RSA_BITS:
            raise DkimError(f"RSA keys need at least {MIN_RSA_BITS} bits, not {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise DkimError(f"unknown key type {key_type!r} (rsa or ed25519)")


def private_key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, the form :func:`load_private_key` reads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def dns_txt_value(key: PrivateKey) -> str:
    """The key record's text: ``v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>`` or, per RFC 8463,
    ``v=DKIM1; k=ed25519; p=<the 32 raw public key octets>``, base64."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def dns_txt_record(domain: str, selector: str, key: PrivateKey) -> str:
    """The zone-file line to publish: ``S._domainkey.D. IN TXT "..." "..."``, the text cut into strings of
    at most 255 octets (the limit of one DNS character-string; resolvers join them)."""
    value = dns_txt_value(key)
    strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector_label(selector)}._domainkey.{signing_domain(domain)}. IN TXT {strings}"


def signing_domain(domain: str) -> str:
    """``domain`` as ``d=`` carries it: A-labels, lower case, no trailing dot. Raises DkimError."""
    try:
        return idna.encode(domain.rstrip("."), uts46=True).decode("ascii").lower()
    except idna.IDNAError as e:
        raise DkimError(f"the DKIM domain {domain!r} is not a valid domain name ({e})") from e


def selector_label(selector: str) -> str:
    """``selector`` checked (letters, digits, '-', '.') and lower-cased. Raises DkimError."""
    if not _SELECTOR.match(selector):
        raise DkimError(f"the DKIM selector {selector!r} is not a valid selector (letters, digits, '-', '.')")
    return selector.lower()
