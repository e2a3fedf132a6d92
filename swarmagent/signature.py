"""Portainer's request signature: parse it, verify it, pair with one key, and make one.

Portainer sends two headers on every request:

* ``X-PortainerAgent-PublicKey``: hex of the DER SubjectPublicKeyInfo of its ECDSA P-256 key;
* ``X-PortainerAgent-Signature``: ECDSA over MD5(``Portainer-App``), or MD5(AGENT_SECRET) when
  one is set, as ``r‖s`` (32 bytes each) in unpadded standard base64.

The message never changes, so the pair is a replayable bearer credential: what this module
checks is that the sender holds (or once held) the private key, nothing more.

Without a secret the agent trusts the first key whose signature verifies and keeps it in a
file, so that neither a bad request nor a restart can hand the agent to someone else. Only
the operator re-opens pairing, with a new AGENT_PAIRING_RESET value (one rolling update of
the service re-opens it on every node).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.iweb import IRequest

from swarmagent.errors import error_body
from swarmagent.logs import logger

PUBLIC_KEY_HEADER = "X-PortainerAgent-PublicKey"
SIGNATURE_HEADER = "X-PortainerAgent-Signature"
#: What Portainer signs when no AGENT_SECRET is set.
DEFAULT_MESSAGE = "Portainer-App"
#: The file under DATA_PATH that holds the paired key.
PAIRED_KEY_FILE = "paired-key.hex"
#: The file under DATA_PATH that holds the last AGENT_PAIRING_RESET value applied.
PAIRING_RESET_FILE = "pairing-reset"
#: What the operator runs to re-open pairing on every agent of the service; the verifier
#: does not know the service's name.
REPAIR_COMMAND = "docker service update --env-add AGENT_PAIRING_RESET=$(date +%s) <agent service>"

#: P-256 scalars are 32 bytes; a signature is r‖s.
SCALAR_SIZE = 32
SIGNATURE_SIZE = 2 * SCALAR_SIZE
#: Characters read from a signature header before giving up (64 bytes take 86). Room is
#: left so that a padded signature is named as badly encoded, as Go would, not as too long.
MAX_SIGNATURE_CHARS = 256
#: Hex digits read from a key header before giving up. A P-256 key is 182; the bound leaves
#: room for an RSA-4096 key, so that a wrong key type is named as such rather than "too long".
MAX_KEY_HEX = 2048

_HEX = re.compile(r"[0-9a-fA-F]*")
_BASE64_RAW = re.compile(r"[A-Za-z0-9+/]*")
_ECDSA_MD5 = ec.ECDSA(Prehashed(hashes.MD5()))

_log = logger("swarmagent.signature")


class SignatureError(ValueError):
    """A header that does not decode or parse; ``str(e)`` is a short lower-case reason."""


class SignatureLengthError(SignatureError):
    """A signature that decodes but is not 64 bytes: the reference calls it plain invalid."""


def message_digest(secret: str | bytes = "") -> bytes:
    """MD5 of what Portainer signs: ``secret`` when set, else ``Portainer-App``."""
    if isinstance(secret, str):
        # Go signs the raw bytes of the environment variable; surrogateescape gives them back.
        secret = secret.encode("utf-8", "surrogateescape")
    digest = hashes.Hash(hashes.MD5())
    digest.update(secret or DEFAULT_MESSAGE.encode("ascii"))
    return digest.finalize()


def _text(value: str | bytes) -> str:
    # Header bytes map one to one onto latin-1; the patterns below then reject anything
    # outside ASCII, so no decoding error can escape as something else.
    return value.decode("latin-1") if isinstance(value, bytes) else value


def decode_public_key(hex_text: str | bytes) -> bytes:
    """The DER bytes of a key header; no parsing beyond the hex."""
    text = _text(hex_text)
    if len(text) > MAX_KEY_HEX:
        raise SignatureError("public key is too long")
    if not _HEX.fullmatch(text):
        raise SignatureError("public key is not hexadecimal")
    if len(text) % 2:
        raise SignatureError("public key has an odd number of hex digits")
    return binascii.unhexlify(text)


def load_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parse DER SubjectPublicKeyInfo that must hold a P-256 key in canonical form."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError("public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("public key is not an ECDSA key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise SignatureError(f"public key is on curve {key.curve.name}, not P-256")
    # Go accepts only the uncompressed point and strict DER. Requiring the exact bytes we
    # would write also makes the paired-key comparison a plain byte comparison.
    if _der(key) != der:
        raise SignatureError("public key is not in canonical uncompressed form")
    return key


def parse_public_key(hex_text: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parse a ``X-PortainerAgent-PublicKey`` value; raise SignatureError if it is not P-256."""
    return load_public_key(decode_public_key(hex_text))


def parse_signature(b64_text: str | bytes) -> tuple[int, int]:
    """Parse a ``X-PortainerAgent-Signature`` value into ``(r, s)``.

    Raise SignatureLengthError for well-formed base64 of the wrong size (or text far too long
    to be 64 bytes) and SignatureError for anything that is not unpadded standard base64.
    """
    text = _text(b64_text)
    if len(text) > MAX_SIGNATURE_CHARS:
        raise SignatureLengthError("signature is too long")
    # Go's RawStdEncoding: no "=", no URL alphabet, and a lone trailing character is an error.
    if not _BASE64_RAW.fullmatch(text) or len(text) % 4 == 1:
        raise SignatureError("signature is not unpadded standard base64")
    raw = base64.b64decode(text + "=" * (-len(text) % 4))
    if len(raw) != SIGNATURE_SIZE:
        raise SignatureLengthError(f"signature is {len(raw)} bytes, not {SIGNATURE_SIZE}")
    return int.from_bytes(raw[:SCALAR_SIZE], "big"), int.from_bytes(raw[SCALAR_SIZE:], "big")


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_hex(key: ec.EllipticCurvePublicKey) -> str:
    """The header form of a public key: lower-case hex of its DER SubjectPublicKeyInfo."""
    return _der(key).hex()


def fingerprint(der: bytes) -> str:
    """A short name for a key in logs: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: accepted, or the 403 answer the reference agent gives."""

    accepted: bool
    message: str = ""
    details: str = ""
    code: int = 403
    #: Why it was refused, for the metrics (a reason of ``metrics.AUTH_REFUSALS``).
    reason: str = ""

    def body(self) -> bytes:
        """The JSON error body (meaningless when accepted)."""
        return error_body(self.message, self.details)


ACCEPTED = Verdict(True, code=200)
MISSING = Verdict(
    False, "Missing request signature headers", "Unauthorized", reason="no_credential"
)
# Portainer reads "Invalid request signature" in a snapshot error as "agent already paired
# with another Portainer instance", so the refusals below keep that message and say in
# ``details`` what the operator can do.
UNAUTHORIZED = Verdict(False, "Invalid request signature", "Unauthorized", reason="bad_signature")
PAIRING_CLOSED = Verdict(
    False,
    "Invalid request signature",
    "Pairing is closed: no Portainer instance paired within AGENT_SECRET_TIMEOUT. "
    f"To re-open it, restart the agents or run: {REPAIR_COMMAND}",
    reason="pairing_closed",
)


def paired_elsewhere(der: bytes) -> Verdict:
    """The refusal of any key but the paired one, ``der``."""
    return Verdict(
        False,
        "Invalid request signature",
        f"This agent is paired with another Portainer instance (key {fingerprint(der)}). "
        f"To pair again, re-open pairing on every agent: {REPAIR_COMMAND}",
        reason="other_key",
    )


def _invalid(reason: SignatureError) -> Verdict:
    text = str(reason)
    return Verdict(
        False, "Invalid request signature", text[:1].upper() + text[1:], reason="bad_signature"
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) so that a crash leaves the old file or the new
    one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PairingStore:
    """The paired key's DER, as hex in one file that is replaced atomically, and the last
    pairing reset applied, in another."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / PAIRED_KEY_FILE
        self.reset_path = self.folder / PAIRING_RESET_FILE

    def load(self) -> bytes | None:
        """The stored DER, or None when nothing is paired.

        A file that is there but unreadable raises (OSError or SignatureError): starting
        unpaired would hand the agent to the next caller, so the operator must look.
        """
        try:
            with self.path.open("rb") as f:
                text = f.read(MAX_KEY_HEX + 2)
        except FileNotFoundError:
            return None
        der = decode_public_key(text.strip())
        load_public_key(der)
        return der

    def save(self, der: bytes) -> None:
        """Write ``der`` so that a crash leaves the old file or the new one, never half."""
        _write_atomically(self.path, der.hex().encode("ascii") + b"\n")

    def last_reset(self) -> str | None:
        """The reset value last applied, or None if there was none."""
        try:
            text = self.reset_path.read_bytes()
        except FileNotFoundError:
            return None
        return text.decode("utf-8", "surrogateescape").removesuffix("\n")

    def reset(self, value: str) -> None:
        """Forget the paired key and record ``value`` as applied.

        The key goes first: a crash in between leaves ``value`` unrecorded, and the next
        start forgets nothing more.
        """
        self.path.unlink(missing_ok=True)
        _write_atomically(self.reset_path, value.encode("utf-8", "surrogateescape") + b"\n")


class Verifier:
    """Checks the signature headers of each request, as the reference agent's notary does.

    * With ``secret``: any P-256 key that signs MD5(secret) is accepted; nothing is paired.
    * Without: the first key whose signature verifies is paired (and saved in ``store``);
      from then on only that key is accepted. A ``reset`` value that ``store`` has not
      applied yet forgets the stored key first, once.

    Accepted (key, signature) pairs are remembered in a small LRU, so a client that reuses
    its signature (Portainer's Docker client and stack CLI do) is verified once.
    """

    def __init__(
        self,
        secret: str | bytes = "",
        store: PairingStore | None = None,
        cache_size: int = 256,
        reset: str = "",
    ) -> None:
        self._secret = bool(secret)
        self._digest = message_digest(secret)
        self._store = store
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cache_size = cache_size
        self._paired_der: bytes | None = None
        self._paired_key: ec.EllipticCurvePublicKey | None = None
        self._pairing_open = True
        if secret:
            if reset:
                _log.info(
                    "AGENT_PAIRING_RESET is set, but with AGENT_SECRET nothing is paired: "
                    "there is nothing to reset"
                )
        elif store is not None:
            if reset:
                _reset(store, reset)
            der = store.load()
            if der is not None:
                self._paired_der, self._paired_key = der, load_public_key(der)
                _log.info(
                    "Paired with key {fp} (from {path}); a new AGENT_PAIRING_RESET value "
                    "re-opens pairing",
                    fp=fingerprint(der),
                    path=store.path,
                )

    @property
    def paired_key(self) -> bytes | None:
        """DER of the paired key, or None."""
        return self._paired_der

    @property
    def associated(self) -> bool:
        """True once requests can be accepted only from someone known: paired, or a secret."""
        return self._secret or self._paired_der is not None

    @property
    def state(self) -> str:
        """``secret``, ``paired``, ``open`` (a first key may pair) or ``closed``."""
        if self._secret:
            return "secret"
        if self._paired_der is not None:
            return "paired"
        return "open" if self._pairing_open else "closed"

    def verify_request(self, request: IRequest) -> Verdict:
        """Check the signature headers of a request (header names are case-insensitive)."""
        headers = request.requestHeaders
        key = headers.getRawHeaders(PUBLIC_KEY_HEADER.encode("ascii"))
        signature = headers.getRawHeaders(SIGNATURE_HEADER.encode("ascii"))
        # Go's Header.Get reads the first value.
        return self.verify(key[0] if key else None, signature[0] if signature else None)

    def verify(self, public_key: str | bytes | None, signature: str | bytes | None) -> Verdict:
        """Check one pair of header values."""
        if not public_key or not signature:
            return MISSING
        cache_key = (_text(public_key), _text(signature))
        if cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            return ACCEPTED
        try:
            der = decode_public_key(cache_key[0])
            if self._paired_der is not None and self._paired_key is not None:
                if not hmac.compare_digest(der, self._paired_der):
                    return paired_elsewhere(self._paired_der)
                key = self._paired_key
            elif not self._secret and not self._pairing_open:
                return PAIRING_CLOSED
            else:
                key = load_public_key(der)
            r, s = parse_signature(cache_key[1])
        except SignatureLengthError:
            return UNAUTHORIZED
        except SignatureError as e:
            return _invalid(e)
        try:
            key.verify(encode_dss_signature(r, s), self._digest, _ECDSA_MD5)
        except InvalidSignature:
            return UNAUTHORIZED
        if not self._secret and self._paired_der is None:
            self._pair(der, key)
        self._cache[cache_key] = None
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ACCEPTED

    def close_pairing(self) -> None:
        """No key pairs from now on (a no-op once paired or with a secret)."""
        if self.associated or not self._pairing_open:
            return
        self._pairing_open = False
        _log.warn(
            "No Portainer instance paired in time: pairing is closed until a restart or a "
            "new AGENT_PAIRING_RESET value; signed requests are refused (client "
            "certificates still work)"
        )

    def _pair(self, der: bytes, key: ec.EllipticCurvePublicKey) -> None:
        self._paired_der, self._paired_key = der, key
        if self._store is None:
            _log.info("Paired with key {fp} (in memory only)", fp=fingerprint(der))
            return
        try:
            self._store.save(der)
        except OSError as e:
            # The pairing still holds for this process; refusing the request instead would
            # leave an agent on a read-only volume unusable.
            _log.error(
                "Paired with key {fp} but could not save it to {path}: {e}; "
                "a restart will accept a new key",
                fp=fingerprint(der),
                path=self._store.path,
                e=e,
            )
        else:
            _log.info(
                "Paired with key {fp}, saved to {path}", fp=fingerprint(der), path=self._store.path
            )


def _reset(store: PairingStore, value: str) -> None:
    """Forget the pairing in ``store`` unless ``value`` was applied already."""
    if store.last_reset() == value:
        return
    try:
        old = store.load()
    except SignatureError:  # a damaged key file: the operator asked for it to go
        was = "an unreadable key file"
    else:
        was = "no key" if old is None else f"key {fingerprint(old)}"
    store.reset(value)
    _log.info(
        "AGENT_PAIRING_RESET={value}: forgot {was}; pairing is open again, the first "
        "Portainer instance to sign a request pairs",
        value=value,
        was=was,
    )


class Signer:
    """Makes the two signature headers exactly as Portainer does."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, secret: str | bytes = "") -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"Portainer signatures use P-256, not {private_key.curve.name}")
        self._key = private_key
        self._digest = message_digest(secret)
        self.public_key_hex = public_key_hex(private_key.public_key())

    @classmethod
    def generate(cls, secret: str | bytes = "") -> Signer:
        """A signer with a new P-256 key."""
        return cls(ec.generate_private_key(ec.SECP256R1()), secret)

    def sign(self) -> str:
        """A new signature (ECDSA is randomised: each call gives a different valid one)."""
        r, s = decode_dss_signature(self._key.sign(self._digest, _ECDSA_MD5))
        raw = r.to_bytes(SCALAR_SIZE, "big") + s.to_bytes(SCALAR_SIZE, "big")
        return base64.b64encode(raw).decode("ascii").rstrip("=")

    def headers(self) -> dict[str, str]:
        """Both headers, with a new signature."""
        return {PUBLIC_KEY_HEADER: self.public_key_hex, SIGNATURE_HEADER: self.sign()}


class PairingWindow(Service):
    """Closes the verifier's pairing ``seconds`` after start if nobody paired.

    The reference agent stops its HTTP server then (``AGENT_SECRET_TIMEOUT``);
    here only pairing stops, so client certificates and ``/ping`` go on.
    """

    def __init__(self, verifier: Verifier, clock: IReactorTime, seconds: float) -> None:
        self._verifier = verifier
        self._clock = clock
        self._seconds = seconds
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        if self._seconds > 0 and not self._verifier.associated:
            self._call = self._clock.callLater(self._seconds, self._verifier.close_pairing)

    def stopService(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        super().stopService()
