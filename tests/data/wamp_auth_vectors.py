#!/usr/bin/python3
"""Known-answer vectors for src/wamp/auth_crypto.rs, computed with autobahn-python.

Run with the system Python that has python3-autobahn (22.7.1) and python3-nacl:

    /usr/bin/python3 tests/data/wamp_auth_vectors.py

It prints the values pasted as literals into the tests of
src/wamp/auth_crypto.rs. Every value comes from autobahn's own client code
(autobahn.wamp.auth.derive_key / compute_wcs, CryptosignKey.sign_challenge),
so the Rust side is checked against what real WAMP clients send.
"""

import json

import txaio

txaio.use_twisted()  # Twisted Deferreds fire synchronously, no event loop needed

from autobahn.wamp.auth import compute_wcs, derive_key  # noqa: E402
from autobahn.wamp.cryptosign import CryptosignKey  # noqa: E402
from autobahn.wamp.types import Challenge  # noqa: E402


def show(name, value):
    if isinstance(value, bytes):
        value = value.decode("utf8")
    print(f"{name} = {value!r}")


# --- WAMP-CRA ---------------------------------------------------------------

show("derive_key(secret2, salt123, 1000, 32)", derive_key("secret2", "salt123", 1000, 32))
show("derive_key(secret2, salt123, 100, 16)", derive_key("secret2", "salt123", 100, 16))
show("derive_key(pässwörd, sälz, 1000, 32)", derive_key("pässwörd", "sälz", 1000, 32))

# The challenge text exactly as auth_crypto::cra_challenge renders it (serde_json:
# compact, fields in this order, non-ASCII kept as UTF-8).
challenge_obj = {
    "authid": "joe",
    "authrole": "frontend",
    "authmethod": "wampcra",
    "authprovider": "static",
    "nonce": "Fz6ypmmOh0mAmsLuTfPUmHbmcBbIHHFeQNvFHr2zqoVmUd4xTnFYiScVLwhvxMCa",
    "timestamp": "2026-12-06T18:30:00.123Z",
    "session": 4391174163346446,
}
challenge = json.dumps(challenge_obj, separators=(",", ":"), ensure_ascii=False)
show("challenge", challenge)

# Unsalted: the key is the secret's UTF-8 bytes (AuthWampCra.on_challenge).
show("compute_wcs(secret2, challenge)", compute_wcs(b"secret2", challenge.encode("utf8")))

# Salted: the key is derive_key's *base64 text* (bytes), not the raw PBKDF2 output.
salted_key = derive_key(b"secret2", "salt123", 100, 16)
show("salted key", salted_key)
show("compute_wcs(salted key, challenge)", compute_wcs(salted_key, challenge.encode("utf8")))


# --- WAMP-cryptosign ----------------------------------------------------------


def sign(seed, challenge_hex, channel_id=None, channel_id_type=None):
    key = CryptosignKey.from_bytes(seed)
    out = []
    d = key.sign_challenge(
        Challenge("cryptosign", {"challenge": challenge_hex}),
        channel_id=channel_id,
        channel_id_type=channel_id_type,
    )
    d.addCallback(out.append)
    return key.public_key(), out[0]


seed = bytes(range(32))  # 00 01 .. 1f
challenge_hex = bytes(range(0xA0, 0xC0)).hex()  # a0 a1 .. bf
pubkey, signature = sign(seed, challenge_hex)
show("cryptosign seed", seed.hex())
show("cryptosign pubkey", pubkey)
show("cryptosign challenge", challenge_hex)
show("cryptosign signature (96 bytes: sig || challenge)", signature)

other_pubkey, _ = sign(bytes([0x42] * 32), challenge_hex)
show("other pubkey (seed 42 x 32)", other_pubkey)

# With TLS channel binding the client signs challenge XOR tls-unique; tollgate
# does not support channel binding, so this must be rejected.
_, bound_signature = sign(seed, challenge_hex, bytes([0x5A] * 32), "tls-unique")
show("channel-bound signature (channel id 5a x 32)", bound_signature)
