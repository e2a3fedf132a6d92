"""Tests for :mod:`swarmagent.signature`.

Portainer's side is written here from the reference text (MD5 of the message, ECDSA on the
digest, r‖s padded to 32 bytes each, base64 without padding, hex of DER SPKI), apart from
:class:`~swarmagent.signature.Signer`, so that the two cannot agree on a mistake. A fixed
vector made with the ``openssl`` command line pins the scheme down further.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from swarmagent import signature
from swarmagent.signature import (
    ACCEPTED,
    MISSING,
    PAIRING_CLOSED,
    UNAUTHORIZED,
    PairingStore,
    PairingWindow,
    SignatureError,
    Signer,
    Verifier,
    paired_elsewhere,
    parse_public_key,
    parse_signature,
)
from tests.helpers import log_lines, observe_logs

# A P-256 key and two signatures made with OpenSSL's command line:
#   printf 'Portainer-App' | openssl dgst -md5 -binary > d.bin
#   openssl pkeyutl -sign -inkey k.pem -in d.bin -out s.der   (then r‖s, base64, no "=")
VECTOR_KEY = (
    "3059301306072a8648ce3d020106082a8648ce3d030107034200045d7f5f5a2a5d2908fbf35ac83fcf5d9d"
    "36511de140bf99e002caf4e2a469419c7ee1fb44482474591b91a2828ae0edb10eabff4841474cfa0588"
    "5603eabbd423"
)
VECTOR_SIGNATURE = (
    "G2iQvgSQ002zGc5jj5th3gcQVVdz4QQFcpiMSU/fP0boqT1cjyaqApT6usvARJrKWnVLtNP1MrkQ6+2FbX/Aag"
)
VECTOR_SECRET = "s3cret"
VECTOR_SECRET_SIGNATURE = (
    "XGCq2r3MA1D1B4/+BfLq2/bLCRrHYoyVS3nus1ic02JagZ9nyWcwt8GcJoFS1sydZIM5VBGtJowlcd72cC5x5g"
)

INVALID = b'{"message":"Invalid request signature","details":"%s"}'
MISSING_BODY = b'{"message":"Missing request signature headers","details":"Unauthorized"}'
UNAUTHORIZED_BODY = b'{"message":"Invalid request signature","details":"Unauthorized"}'
# The one command the docs give to re-open pairing on every agent of the service.
REPAIR = "docker service update --env-add AGENT_PAIRING_RESET=$(date +%s) <agent service>"


def portainer_key() -> ec.EllipticCurvePrivateKey:
    """A key as Portainer's GenerateKeyPair makes one."""
    return ec.generate_private_key(ec.SECP256R1())


def portainer_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """``hex.EncodeToString(x509.MarshalPKIXPublicKey(pub))``."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.hex()


def portainer_rs(key: ec.EllipticCurvePrivateKey, message: str) -> tuple[int, int]:
    """``ecdsa.Sign(rand, key, md5(message))``."""
    digest = hashlib.md5(message.encode()).digest()
    return decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.MD5()))))


def portainer_encode(r: int, s: int) -> str:
    """r and s left-padded to 32 bytes, then ``base64.RawStdEncoding``."""
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return base64.standard_b64encode(raw).decode().replace("=", "")


def portainer_sign(key: ec.EllipticCurvePrivateKey, message: str = "Portainer-App") -> str:
    """``CreateSignature``: what goes in X-PortainerAgent-Signature."""
    return portainer_encode(*portainer_rs(key, message))


def headers(key: ec.EllipticCurvePrivateKey, message: str = "Portainer-App") -> tuple[str, str]:
    """(public key, signature) header values from Portainer's side."""
    return portainer_public_key(key), portainer_sign(key, message)


def der_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return bytes.fromhex(portainer_public_key(key))


def short_fingerprint(key: ec.EllipticCurvePrivateKey) -> str:
    """How logs and 403 details name a key: the start of the SHA-256 of its DER."""
    return hashlib.sha256(der_of(key)).hexdigest()[:16]


def other_curve_key_hex(key: Any) -> str:
    return portainer_public_key(key)


def compressed_key_hex(key: ec.EllipticCurvePrivateKey) -> str:
    """The same key as DER SPKI with a compressed point, which Go refuses."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    prefix = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    return (prefix + point).hex()


class ParseTests(unittest.SynchronousTestCase):
    """The pure parse layer."""

    def test_public_key(self) -> None:
        key = portainer_key()
        parsed = parse_public_key(portainer_public_key(key))
        self.assertEqual(parsed.public_numbers(), key.public_key().public_numbers())

    def test_public_key_upper_case_and_bytes(self) -> None:
        # Go's hex decoder takes either case; Twisted hands over bytes.
        key = portainer_key()
        text = portainer_public_key(key)
        self.assertEqual(
            parse_public_key(text.upper().encode()).public_numbers(),
            key.public_key().public_numbers(),
        )

    def test_public_key_rejects(self) -> None:
        p256 = portainer_key()
        cases = {
            "zz": "public key is not hexadecimal",
            "abc": "public key has an odd number of hex digits",
            " " + VECTOR_KEY: "public key is not hexadecimal",
            "00" * 2000: "public key is too long",
            "3000": "public key is not a DER SubjectPublicKeyInfo",
            VECTOR_KEY + "00": "public key is not a DER SubjectPublicKeyInfo",
            other_curve_key_hex(ec.generate_private_key(ec.SECP384R1())): (
                "public key is on curve secp384r1, not P-256"
            ),
            other_curve_key_hex(rsa.generate_private_key(public_exponent=65537, key_size=2048)): (
                "public key is not an ECDSA key"
            ),
            compressed_key_hex(p256): "public key is not in canonical uncompressed form",
        }
        for text, reason in cases.items():
            with self.subTest(reason=reason):
                e = self.assertRaises(SignatureError, parse_public_key, text)
                self.assertEqual(str(e), reason)

    def test_signature(self) -> None:
        key = portainer_key()
        r, s = portainer_rs(key, "Portainer-App")
        self.assertEqual(parse_signature(portainer_encode(r, s)), (r, s))
        self.assertEqual(len(portainer_encode(r, s)), 86)

    def test_signature_rejects(self) -> None:
        cases = {
            VECTOR_SIGNATURE + "==": signature.SignatureError,
            VECTOR_SIGNATURE.replace("/", "_"): signature.SignatureError,
            VECTOR_SIGNATURE[:-1] + "*": signature.SignatureError,
            "A": signature.SignatureError,  # a lone final character
            base64.b64encode(b"x" * 63).decode().rstrip("="): signature.SignatureLengthError,
            base64.b64encode(b"x" * 65).decode().rstrip("="): signature.SignatureLengthError,
            "": signature.SignatureLengthError,
            "A" * 1000: signature.SignatureLengthError,
        }
        for text, error in cases.items():
            with self.subTest(text=text[:20]):
                e = self.assertRaises(SignatureError, parse_signature, text)
                self.assertIs(type(e), error)

    @given(st.one_of(st.text(max_size=3000), st.binary(max_size=3000)))
    @settings(max_examples=300, deadline=None)
    def test_public_key_only_signature_errors(self, value: str | bytes) -> None:
        with contextlib.suppress(SignatureError):
            parse_public_key(value)

    @given(st.from_regex(r"[0-9a-fA-F]{0,400}", fullmatch=True))
    @settings(max_examples=300, deadline=None)
    def test_hex_only_signature_errors(self, value: str) -> None:
        # Valid hex gets past the first layer, to the DER parser.
        with contextlib.suppress(SignatureError):
            parse_public_key(value)

    @given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
    @settings(max_examples=300, deadline=None)
    def test_signature_only_signature_errors(self, value: str | bytes) -> None:
        try:
            r, s = parse_signature(value)
        except SignatureError:
            return
        self.assertTrue(0 <= r < 2**256 and 0 <= s < 2**256)

    @given(st.from_regex(r"[A-Za-z0-9+/]{80,90}", fullmatch=True))
    @settings(max_examples=300, deadline=None)
    def test_base64_only_signature_errors(self, value: str) -> None:
        with contextlib.suppress(SignatureError):
            parse_signature(value)


class VerifierTests(unittest.SynchronousTestCase):
    """Verdicts, pairing and the secret mode."""

    def test_fixed_vector(self) -> None:
        self.assertEqual(Verifier().verify(VECTOR_KEY, VECTOR_SIGNATURE), ACCEPTED)
        verifier = Verifier(secret=VECTOR_SECRET)
        self.assertEqual(verifier.verify(VECTOR_KEY, VECTOR_SECRET_SIGNATURE), ACCEPTED)
        self.assertEqual(verifier.verify(VECTOR_KEY, VECTOR_SIGNATURE), UNAUTHORIZED)

    def test_round_trip_pairs(self) -> None:
        key = portainer_key()
        verifier = Verifier()
        self.assertFalse(verifier.associated)
        self.assertEqual(verifier.verify(*headers(key)), ACCEPTED)
        self.assertEqual(verifier.paired_key, bytes.fromhex(portainer_public_key(key)))
        self.assertTrue(verifier.associated)
        # Portainer signs anew for each request; every signature is good.
        for _ in range(3):
            self.assertEqual(verifier.verify(*headers(key)), ACCEPTED)

    def test_padding_of_small_scalars(self) -> None:
        # About one signature in 256 has an r (or s) below 2**248, so a leading zero byte.
        key = portainer_key()
        verifier = Verifier()
        for _ in range(3000):
            r, s = portainer_rs(key, "Portainer-App")
            if r < 2**248 or s < 2**248:
                break
        else:
            raise unittest.SkipTest("no small scalar drawn")
        self.assertEqual(
            verifier.verify(portainer_public_key(key), portainer_encode(r, s)), ACCEPTED
        )

    def test_request_headers_any_case(self) -> None:
        key_hex, sig = headers(portainer_key())
        request: Any = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"x-portaineragent-publickey", [key_hex.encode()])
        request.requestHeaders.setRawHeaders(b"X-Portaineragent-Signature", [sig.encode()])
        self.assertEqual(Verifier().verify_request(request), ACCEPTED)

    def test_missing(self) -> None:
        key_hex, sig = headers(portainer_key())
        verifier = Verifier()
        for key_value, sig_value in [(None, sig), (key_hex, None), ("", sig), (key_hex, b"")]:
            verdict = verifier.verify(key_value, sig_value)
            self.assertEqual(verdict, MISSING)
            self.assertEqual(verdict.body(), MISSING_BODY)
            self.assertEqual(verdict.code, 403)
        empty: Any = DummyRequest([b""])
        self.assertEqual(verifier.verify_request(empty).body(), MISSING_BODY)

    def test_bad_encodings(self) -> None:
        key = portainer_key()
        key_hex, sig = headers(key)
        cases = [
            (key_hex, sig + "==", INVALID % b"Signature is not unpadded standard base64"),
            ("xyz" + key_hex[3:], sig, INVALID % b"Public key is not hexadecimal"),
            (key_hex[:-1], sig, INVALID % b"Public key has an odd number of hex digits"),
            (
                other_curve_key_hex(ec.generate_private_key(ec.SECP384R1())),
                sig,
                INVALID % b"Public key is on curve secp384r1, not P-256",
            ),
            (
                other_curve_key_hex(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                sig,
                INVALID % b"Public key is not an ECDSA key",
            ),
            # Decodes, but not to 64 bytes: the reference calls that plain invalid.
            (key_hex, sig[:-3], UNAUTHORIZED_BODY),
            (key_hex, sig + "AAAA", UNAUTHORIZED_BODY),
        ]
        verifier = Verifier()
        for key_value, sig_value, body in cases:
            with self.subTest(body=body):
                verdict = verifier.verify(key_value, sig_value)
                self.assertFalse(verdict.accepted)
                self.assertEqual(verdict.body(), body)
        self.assertIsNone(verifier.paired_key)

    def test_wrong_signature(self) -> None:
        key = portainer_key()
        verifier = Verifier()
        key_hex = portainer_public_key(key)
        for sig in [
            portainer_sign(key, "Something-Else"),
            portainer_sign(portainer_key()),
            portainer_encode(1, 1),
            portainer_encode(0, 0),
        ]:
            self.assertEqual(verifier.verify(key_hex, sig).body(), UNAUTHORIZED_BODY)

    def test_bad_signature_never_pairs(self) -> None:
        folder = self.mktemp()
        verifier = Verifier(store=PairingStore(folder))
        attacker, portainer = portainer_key(), portainer_key()
        self.assertEqual(
            verifier.verify(portainer_public_key(attacker), portainer_encode(1, 2)), UNAUTHORIZED
        )
        self.assertIsNone(verifier.paired_key)
        self.assertFalse(os.path.exists(os.path.join(folder, signature.PAIRED_KEY_FILE)))
        self.assertEqual(verifier.verify(*headers(portainer)), ACCEPTED)
        self.assertEqual(verifier.verify(*headers(attacker)), paired_elsewhere(der_of(portainer)))

    def test_wrong_key_after_pairing(self) -> None:
        first, second = portainer_key(), portainer_key()
        verifier = Verifier()
        self.assertEqual(verifier.verify(*headers(first)), ACCEPTED)
        verdict = verifier.verify(*headers(second))
        self.assertEqual(verdict, paired_elsewhere(der_of(first)))
        # The paired key with someone else's signature: plainly invalid.
        self.assertEqual(
            verifier.verify(portainer_public_key(first), portainer_sign(second)), UNAUTHORIZED
        )
        # Another key, whatever it signed, is told the agent is paired elsewhere.
        self.assertEqual(
            verifier.verify(portainer_public_key(second), portainer_sign(first)),
            paired_elsewhere(der_of(first)),
        )

    def test_second_key_is_told_what_to_do(self) -> None:
        """Portainer reads only the message ("already paired" for it); the details name the
        paired key and the command that re-opens pairing."""
        first, second = portainer_key(), portainer_key()
        verifier = Verifier()
        verifier.verify(*headers(first))
        for _ in range(2):  # refusals are not cached: the same answer each time
            verdict = verifier.verify(*headers(second))
            self.assertFalse(verdict.accepted)
            self.assertEqual(verdict.code, 403)
            self.assertEqual(verdict.message, "Invalid request signature")
            self.assertEqual(
                verdict.details,
                "This agent is paired with another Portainer instance "
                f"(key {short_fingerprint(first)}). To pair again, re-open pairing on every "
                f"agent: {REPAIR}",
            )
            self.assertTrue(
                verdict.body().startswith(b'{"message":"Invalid request signature","details":')
            )
        self.assertEqual(verifier.verify(*headers(first)), ACCEPTED)

    def test_pairing_survives_restart(self) -> None:
        folder = self.mktemp()
        first, second = portainer_key(), portainer_key()
        self.assertEqual(Verifier(store=PairingStore(folder)).verify(*headers(first)), ACCEPTED)
        path = Path(folder) / signature.PAIRED_KEY_FILE
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.assertEqual(path.read_text().strip(), portainer_public_key(first))
        self.assertEqual(os.listdir(folder), [signature.PAIRED_KEY_FILE])

        again = Verifier(store=PairingStore(folder))
        self.assertTrue(again.associated)
        self.assertEqual(again.verify(*headers(second)), paired_elsewhere(der_of(first)))
        self.assertEqual(again.verify(*headers(first)), ACCEPTED)

    def test_corrupt_pairing_file_refuses_to_start(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / signature.PAIRED_KEY_FILE).write_text("not a key\n")
        self.assertRaises(SignatureError, Verifier, store=PairingStore(folder))

    def test_unsaved_pairing_holds_in_memory(self) -> None:
        class ReadOnly(PairingStore):
            def save(self, der: bytes) -> None:
                raise OSError(30, "Read-only file system")

        first, second = portainer_key(), portainer_key()
        verifier = Verifier(store=ReadOnly(self.mktemp()))
        self.assertEqual(verifier.verify(*headers(first)), ACCEPTED)
        self.assertEqual(verifier.verify(*headers(second)), paired_elsewhere(der_of(first)))

    def test_broken_data_path_refuses_to_start(self) -> None:
        blocker = Path(self.mktemp())
        blocker.write_text("a file where the folder should be")
        self.assertRaises(OSError, Verifier, store=PairingStore(blocker / "data"))

    def test_secret(self) -> None:
        folder = self.mktemp()
        verifier = Verifier(secret="shared", store=PairingStore(folder))
        self.assertTrue(verifier.associated)
        one, two = portainer_key(), portainer_key()
        self.assertEqual(verifier.verify(*headers(one, "shared")), ACCEPTED)
        self.assertEqual(verifier.verify(*headers(two, "shared")), ACCEPTED)
        self.assertEqual(verifier.verify(*headers(one)), UNAUTHORIZED)
        self.assertEqual(verifier.verify(*headers(one, "Shared")), UNAUTHORIZED)
        self.assertIsNone(verifier.paired_key)
        self.assertFalse(os.path.exists(folder))

    def test_secret_ignores_pairing_file(self) -> None:
        folder = self.mktemp()
        first, second = portainer_key(), portainer_key()
        Verifier(store=PairingStore(folder)).verify(*headers(first))
        verifier = Verifier(secret="shared", store=PairingStore(folder))
        self.assertEqual(verifier.verify(*headers(second, "shared")), ACCEPTED)

    def test_cache_skips_reverification(self) -> None:
        key = portainer_key()
        verifier = Verifier(cache_size=2)
        a, b, c = (headers(key) for _ in range(3))
        for pair in (a, b):
            self.assertEqual(verifier.verify(*pair), ACCEPTED)

        calls: list[Any] = []

        def counting(r: int, s: int) -> bytes:
            calls.append((r, s))
            return real(r, s)

        real = signature.encode_dss_signature
        self.patch(signature, "encode_dss_signature", counting)
        self.assertEqual(verifier.verify(*a), ACCEPTED)
        self.assertEqual(verifier.verify(*b), ACCEPTED)
        self.assertEqual(calls, [])
        self.assertEqual(verifier.verify(*c), ACCEPTED)  # evicts a, the least recent
        self.assertEqual(len(calls), 1)
        self.assertEqual(verifier.verify(*a), ACCEPTED)
        self.assertEqual(len(calls), 2)

    def test_cache_holds_no_failures(self) -> None:
        key = portainer_key()
        verifier = Verifier()
        verifier.verify(*headers(key))
        bad = (portainer_public_key(key), portainer_sign(key, "nope"))
        self.assertEqual(verifier.verify(*bad), UNAUTHORIZED)
        self.assertEqual(verifier.verify(*bad), UNAUTHORIZED)

    @given(
        st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300)),
        st.one_of(st.none(), st.text(max_size=300), st.binary(max_size=300)),
    )
    @settings(max_examples=300, deadline=None)
    def test_arbitrary_headers_never_raise(
        self, key: str | bytes | None, sig: str | bytes | None
    ) -> None:
        verdict = Verifier().verify(key, sig)
        self.assertFalse(verdict.accepted)
        self.assertEqual(verdict.code, 403)
        self.assertTrue(verdict.body().startswith(b'{"message":"'))

    @given(st.integers(0, 84), st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop+/019"))
    @settings(max_examples=100, deadline=None)
    def test_changed_signature_is_refused(self, index: int, char: str) -> None:
        sig = VECTOR_SIGNATURE
        if sig[index] == char:
            return
        changed = sig[:index] + char + sig[index + 1 :]
        self.assertEqual(Verifier().verify(VECTOR_KEY, changed), UNAUTHORIZED)


class PairingResetTests(unittest.SynchronousTestCase):
    """AGENT_PAIRING_RESET: each new value forgets the stored pairing once, at start."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.first, self.second = portainer_key(), portainer_key()
        self.observer = observe_logs(self)
        self.seen = 0

    @property
    def logs(self) -> list[str]:
        """The log lines since the last :meth:`forget_logs`."""
        return log_lines(self.observer, self.seen)

    def forget_logs(self) -> None:
        self.seen = len(self.observer)

    def start(self, reset: str = "", secret: str = "") -> Verifier:
        """A verifier as a (re)started agent builds it."""
        return Verifier(secret, PairingStore(self.folder), reset=reset)

    def paired_with_first(self) -> None:
        self.assertEqual(self.start().verify(*headers(self.first)), ACCEPTED)

    def key_file(self) -> Path:
        return self.folder / signature.PAIRED_KEY_FILE

    def reset_file(self) -> Path:
        return self.folder / signature.PAIRING_RESET_FILE

    def test_new_value_forgets_the_pairing(self) -> None:
        self.paired_with_first()
        verifier = self.start(reset="1764432000")
        self.assertFalse(verifier.associated)
        self.assertIsNone(verifier.paired_key)
        self.assertFalse(self.key_file().exists())
        self.assertEqual(self.reset_file().read_text(), "1764432000\n")
        # The reinstalled Portainer pairs; the old key is now the other one.
        self.assertEqual(verifier.verify(*headers(self.second)), ACCEPTED)
        self.assertEqual(self.key_file().read_text().strip(), portainer_public_key(self.second))
        self.assertEqual(
            verifier.verify(*headers(self.first)), paired_elsewhere(der_of(self.second))
        )

    def test_same_value_again_keeps_the_new_pairing(self) -> None:
        self.paired_with_first()
        self.start(reset="1764432000").verify(*headers(self.second))
        for reset in ("1764432000", ""):  # a later restart, with the value or without
            with self.subTest(reset=reset):
                again = self.start(reset=reset)
                self.assertEqual(again.paired_key, der_of(self.second))
                self.assertEqual(again.verify(*headers(self.second)), ACCEPTED)
                self.assertEqual(
                    again.verify(*headers(self.first)), paired_elsewhere(der_of(self.second))
                )
        self.assertEqual(self.reset_file().read_text(), "1764432000\n")

    def test_each_new_value_forgets_once(self) -> None:
        self.paired_with_first()
        self.start(reset="1").verify(*headers(self.second))
        verifier = self.start(reset="2")
        self.assertIsNone(verifier.paired_key)
        self.assertEqual(verifier.verify(*headers(self.first)), ACCEPTED)
        self.assertEqual(self.reset_file().read_text(), "2\n")

    def test_no_value_keeps_the_pairing_and_writes_nothing(self) -> None:
        self.paired_with_first()
        verifier = self.start()
        self.assertEqual(verifier.paired_key, der_of(self.first))
        self.assertEqual(os.listdir(self.folder), [signature.PAIRED_KEY_FILE])

    def test_unpaired_agent_records_the_value(self) -> None:
        verifier = self.start(reset="r1")
        self.assertEqual(self.reset_file().read_text(), "r1\n")
        self.assertEqual(verifier.verify(*headers(self.first)), ACCEPTED)
        self.assertEqual(self.start(reset="r1").paired_key, der_of(self.first))
        self.assertIn("AGENT_PAIRING_RESET=r1: forgot no key", "\n".join(self.logs))

    def test_logs_the_forgotten_key(self) -> None:
        self.paired_with_first()
        self.forget_logs()
        self.start(reset="1764432000")
        [line] = [line for line in self.logs if "AGENT_PAIRING_RESET" in line]
        self.assertIn("AGENT_PAIRING_RESET=1764432000", line)
        self.assertIn(f"forgot key {short_fingerprint(self.first)}", line)
        self.assertIn("pairing is open again", line)
        # The same value again: the pairing is kept and only that is logged.
        self.forget_logs()
        self.start(reset="1764432000")
        self.assertFalse([line for line in self.logs if "forgot" in line])

    def test_paired_start_names_the_way_out(self) -> None:
        self.paired_with_first()
        self.forget_logs()
        self.start()
        [line] = [line for line in self.logs if "Paired with key" in line]
        self.assertIn(short_fingerprint(self.first), line)
        self.assertIn("AGENT_PAIRING_RESET", line)

    def test_unreadable_key_file(self) -> None:
        """Corrupt: refused at start as before, unless a new value says to forget it."""
        self.folder.mkdir()
        self.key_file().write_text("not a key\n")
        self.assertRaises(SignatureError, self.start)
        verifier = self.start(reset="1")
        self.assertFalse(self.key_file().exists())
        self.assertIn("forgot an unreadable key file", "\n".join(self.logs))
        self.assertEqual(verifier.verify(*headers(self.first)), ACCEPTED)

    def test_secret_mode_has_nothing_to_reset(self) -> None:
        self.paired_with_first()
        self.forget_logs()
        verifier = self.start(reset="1", secret="shared")
        self.assertEqual(verifier.verify(*headers(self.second, "shared")), ACCEPTED)
        # Nothing touched: dropping the secret later brings the pairing back...
        self.assertEqual(os.listdir(self.folder), [signature.PAIRED_KEY_FILE])
        self.assertIn("with AGENT_SECRET nothing is paired", "\n".join(self.logs))
        # ...unless the reset is still set then: it was never applied.
        self.assertEqual(self.start().paired_key, der_of(self.first))
        self.assertIsNone(self.start(reset="1").paired_key)

    def test_value_is_written_atomically(self) -> None:
        """Like the key: a new file (0600) renamed over the old one, nothing left beside."""
        self.start(reset="1")
        before = self.reset_file().stat().st_ino
        self.start(reset="2")
        after = self.reset_file().stat()
        self.assertNotEqual(after.st_ino, before)
        self.assertEqual(after.st_mode & 0o777, 0o600)
        self.assertEqual(sorted(os.listdir(self.folder)), [signature.PAIRING_RESET_FILE])


class PairingWindowTests(unittest.SynchronousTestCase):
    """AGENT_SECRET_TIMEOUT: an agent nobody paired stops accepting a first key."""

    HOURS_72 = 72 * 3600

    def window(self, verifier: Verifier, seconds: float = HOURS_72) -> Clock:
        clock = Clock()
        service = PairingWindow(verifier, clock, seconds)
        service.startService()
        self.addCleanup(service.stopService)
        return clock

    def test_closes_when_nobody_paired(self) -> None:
        verifier = Verifier()
        clock = self.window(verifier)
        clock.advance(self.HOURS_72 - 1)
        key = portainer_key()
        clock.advance(1)
        verdict = verifier.verify(*headers(key))
        self.assertEqual(verdict, PAIRING_CLOSED)
        self.assertIsNone(verifier.paired_key)
        self.assertEqual(verdict.message, "Invalid request signature")
        self.assertEqual(
            verdict.details,
            "Pairing is closed: no Portainer instance paired within AGENT_SECRET_TIMEOUT. "
            f"To re-open it, restart the agents or run: {REPAIR}",
        )
        # Only the signed path is closed: an undecodable key is still named as such.
        self.assertEqual(verifier.verify("zz", portainer_sign(key)).details[:10], "Public key")

    def test_open_until_then(self) -> None:
        verifier = Verifier()
        clock = self.window(verifier)
        clock.advance(self.HOURS_72 - 1)
        self.assertEqual(verifier.verify(*headers(portainer_key())), ACCEPTED)

    def test_a_paired_agent_keeps_its_key(self) -> None:
        verifier = Verifier()
        key = portainer_key()
        self.assertEqual(verifier.verify(*headers(key)), ACCEPTED)
        clock = self.window(verifier)
        self.assertEqual(clock.getDelayedCalls(), [])
        verifier.close_pairing()
        self.assertEqual(verifier.verify(*headers(key)), ACCEPTED)

    def test_the_secret_mode_has_no_window(self) -> None:
        verifier = Verifier(secret="s3cret")
        clock = self.window(verifier)
        clock.advance(self.HOURS_72 * 2)
        self.assertEqual(verifier.verify(*headers(portainer_key(), "s3cret")), ACCEPTED)

    def test_zero_means_always_open(self) -> None:
        verifier = Verifier()
        clock = self.window(verifier, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stopping_cancels(self) -> None:
        clock = Clock()
        service = PairingWindow(Verifier(), clock, self.HOURS_72)
        service.startService()
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class SignerTests(unittest.SynchronousTestCase):
    """The signer agrees with Portainer's side, not just with the verifier."""

    def test_headers_verify_independently(self) -> None:
        key = portainer_key()
        out = Signer(key).headers()
        self.assertEqual(set(out), {signature.PUBLIC_KEY_HEADER, signature.SIGNATURE_HEADER})
        self.assertEqual(out[signature.PUBLIC_KEY_HEADER], portainer_public_key(key))
        sig = out[signature.SIGNATURE_HEADER]
        self.assertRegex(sig, r"^[A-Za-z0-9+/]{86}$")
        raw = base64.b64decode(sig + "==")
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        key.public_key().verify(
            encode_dss_signature(r, s),
            hashlib.md5(b"Portainer-App").digest(),
            ec.ECDSA(Prehashed(hashes.MD5())),
        )
        self.assertEqual(Verifier().verify(*out.values()), ACCEPTED)

    def test_secret(self) -> None:
        signer = Signer.generate(secret="shared")
        self.assertEqual(Verifier(secret="shared").verify(*signer.headers().values()), ACCEPTED)
        self.assertEqual(Verifier().verify(*signer.headers().values()), UNAUTHORIZED)

    def test_p256_only(self) -> None:
        self.assertRaises(ValueError, Signer, ec.generate_private_key(ec.SECP384R1()))


class OpenSSLTests(unittest.TestCase):
    """The ``openssl`` command line as a third, independent implementation."""

    def setUp(self) -> None:
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("no openssl command")
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.key = portainer_key()
        (self.dir / "key.pem").write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (self.dir / "pub.pem").write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (self.dir / "digest").write_bytes(hashlib.md5(b"Portainer-App").digest())

    def openssl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["openssl", *args], cwd=self.dir, capture_output=True, check=False)

    def test_openssl_signature_accepted(self) -> None:
        done = self.openssl("pkeyutl", "-sign", "-inkey", "key.pem", "-in", "digest")
        self.assertEqual(done.returncode, 0, done.stderr)
        sig = portainer_encode(*decode_dss_signature(done.stdout))
        self.assertEqual(
            Verifier().verify(portainer_public_key(self.key), sig), ACCEPTED, "openssl"
        )

    def test_signer_signature_verified_by_openssl(self) -> None:
        raw = base64.b64decode(Signer(self.key).sign() + "==")
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        (self.dir / "sig").write_bytes(der)
        done = self.openssl(
            "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-in", "digest", "-sigfile", "sig"
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
