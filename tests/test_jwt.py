"""JWT logins against keys an identity provider would have (issue 15, item 3).

Key pairs are made here (RSA, EC P-256, Ed25519), tokens minted with PyJWT, and
real brokers read the public halves from PEM and JWKS files: good tokens get in,
wrong keys, audiences, issuers, times and algorithms (`none`, HS256 signed with
the public key: key confusion) get CONNACK 4, a connection ends when its token
expires (its will is published), and a changed JWKS file is picked up. Broken
key configuration stops `roost serve` at start with a one-line config error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from broker.config import ConfigError, config_from_dict
from tests.clients import ConnectFailed, MqttClient

ACCEPTED, BAD_CREDENTIALS = 0, 4
ISSUER = "https://idp.example.test/realms/home"
AUDIENCE = "roost"


# ---- keys and tokens --------------------------------------------------------------------

def new_key(alg: str) -> Any:
    if alg.startswith("RS"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    assert alg == "EdDSA"
    return ed25519.Ed25519PrivateKey.generate()


def pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def jwk(private_key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        entry = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        entry = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        entry = OKPAlgorithm.to_jwk(public, as_dict=True)
    entry = dict(entry, kid=kid, use="sig")
    if alg is not None:
        entry["alg"] = alg
    return entry


def claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    now = time.time()
    # fractional iat: a token minted in the second the user was added is not "before" it
    return {"sub": sub, "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE, **extra}


def mint(private_key: Any, alg: str, body: dict[str, Any], kid: str | None = None) -> str:
    return jwt.encode(body, private_key, algorithm=alg, headers={"kid": kid} if kid else None)


def connack(broker: Any, password: str, username: str = "alice") -> int:
    """The CONNACK code paho reports for username/password."""
    client = MqttClient(f"{username}.jwt")
    try:
        client.connect(broker.host, broker.port, username=username, password=password)
    except ConnectFailed as exc:
        return exc.rc
    client.disconnect()
    return ACCEPTED


def jwt_broker(roost_factory: Any, **jwt_config: Any) -> Any:
    broker = roost_factory({"auth": {"jwt": jwt_config, "failure_delay": 0.0}})
    broker.add_user("alice")
    broker.add_user("bob")
    return broker


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


# ---- a PEM public key ----------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_a_pem_key_accepts_its_own_tokens_only(roost_factory, tmp_path, alg):
    key = new_key(alg)
    broker = jwt_broker(roost_factory, public_key_file=write(tmp_path, "idp.pem", pem(key)),
                        issuer=ISSUER, audience=AUDIENCE)
    now = time.time()
    assert connack(broker, mint(key, alg, claims())) == ACCEPTED
    # the issuer's clock may run a little ahead: leeway (30 s) for iat and nbf
    assert connack(broker, mint(key, alg, claims(iat=now + 10, nbf=now + 10))) == ACCEPTED
    refused = {
        "another key": mint(new_key(alg), alg, claims()),
        "expired": mint(key, alg, claims(exp=now - 1)),
        "nbf in an hour": mint(key, alg, claims(nbf=now + 3600)),
        "iat in an hour": mint(key, alg, claims(iat=now + 3600)),
        "no exp": mint(key, alg, {k: v for k, v in claims().items() if k != "exp"}),
        "exp a string": mint(key, alg, claims(exp=str(int(now) + 600))),
        "other audience": mint(key, alg, claims(aud="grafana")),
        "no audience": mint(key, alg, {k: v for k, v in claims().items() if k != "aud"}),
        "other issuer": mint(key, alg, claims(iss="https://evil.example.test")),
        "other sub": mint(key, alg, claims(sub="bob")),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        # key confusion: the public key's PEM text used as an HMAC secret
        "HS256 with the public key": _hs256(claims(), pem(key)),
    }
    codes = {why: connack(broker, token) for why, token in refused.items()}
    assert codes == {why: BAD_CREDENTIALS for why in refused}
    assert connack(broker, "pw-alice") == ACCEPTED    # passwords still work


def _hs256(body: dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses a PEM key as an HMAC
    secret, which is the point: an attacker would not)."""
    import base64
    import hashlib
    import hmac

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{part(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{part(json.dumps(body).encode())}"
    return f"{signing_input}.{part(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# ---- a JWKS file ----------------------------------------------------------------------------

@pytest.fixture
def idp_keys() -> dict[str, Any]:
    return {"RS256": new_key("RS256"), "ES256": new_key("ES256"), "EdDSA": new_key("EdDSA")}


def jwks(keys: dict[str, Any]) -> str:
    return json.dumps({"keys": [jwk(key, kid=f"k-{alg}", alg=alg) for alg, key in keys.items()]})


def test_a_jwks_file_accepts_each_key_chosen_by_kid(roost_factory, tmp_path, idp_keys):
    broker = jwt_broker(roost_factory, jwks_file=write(tmp_path, "jwks.json", jwks(idp_keys)),
                        issuer=ISSUER, audience=AUDIENCE)
    for alg, key in idp_keys.items():
        assert connack(broker, mint(key, alg, claims(), kid=f"k-{alg}")) == ACCEPTED, alg
        assert connack(broker, mint(key, alg, claims())) == ACCEPTED, f"{alg} without kid"
    rsa_key = idp_keys["RS256"]
    refused = {
        "unknown kid": mint(rsa_key, "RS256", claims(), kid="k-other"),
        "kid of another key": mint(rsa_key, "RS256", claims(), kid="k-ES256"),
        "key not in the set": mint(new_key("RS256"), "RS256", claims(), kid="k-RS256"),
        # the RSA key's JWK says RS256: other algorithms of its family are not allowed
        "RS512 with an RS256 key": mint(rsa_key, "RS512", claims(), kid="k-RS256"),
        "expired": mint(rsa_key, "RS256", claims(exp=time.time() - 1), kid="k-RS256"),
        "other audience": mint(rsa_key, "RS256", claims(aud=["grafana"]), kid="k-RS256"),
        "HS256, no secret configured": _hs256(claims(), b"guess"),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
    }
    codes = {why: connack(broker, token) for why, token in refused.items()}
    assert codes == {why: BAD_CREDENTIALS for why in refused}
    # aud may be a list holding Roost's
    assert connack(broker, mint(rsa_key, "RS256", claims(aud=["grafana", AUDIENCE]), kid="k-RS256")) == ACCEPTED


def test_tokens_issued_before_the_user_was_added_or_its_password_changed_are_refused(roost_factory, tmp_path,
                                                                                      idp_keys):
    key = idp_keys["EdDSA"]
    broker = jwt_broker(roost_factory, jwks_file=write(tmp_path, "jwks.json", jwks({"EdDSA": key})),
                        issuer=ISSUER, audience=AUDIENCE)
    old = mint(key, "EdDSA", claims(iat=time.time() - 120), kid="k-EdDSA")
    assert connack(broker, old) == BAD_CREDENTIALS
    issued = mint(key, "EdDSA", claims(iat=time.time()), kid="k-EdDSA")
    assert connack(broker, issued) == ACCEPTED
    broker.cli("user", "passwd", "alice", "--password-stdin", input="new-secret\n")
    deadline = time.monotonic() + 10
    while connack(broker, issued) != BAD_CREDENTIALS:
        assert time.monotonic() < deadline, "a token issued before passwd still works"
    # whole seconds (as IdPs write iat): a token fetched right after `user add` works
    broker.add_user("carol")
    assert connack(broker, mint(key, "EdDSA", claims("carol", iat=int(time.time())), kid="k-EdDSA"),
                   username="carol") == ACCEPTED


def test_a_changed_jwks_file_is_picked_up(roost_factory, tmp_path, idp_keys):
    path = write(tmp_path, "jwks.json", jwks({"RS256": idp_keys["RS256"]}))
    broker = jwt_broker(roost_factory, jwks_file=path, issuer=ISSUER, audience=AUDIENCE)
    rotated = new_key("ES256")
    token = mint(rotated, "ES256", claims(), kid="k-ES256")
    assert connack(broker, token) == BAD_CREDENTIALS     # ES256 is not even allowed yet
    Path(path).write_text(jwks({"ES256": rotated}))
    deadline = time.monotonic() + 20
    while connack(broker, mint(rotated, "ES256", claims(), kid="k-ES256")) != ACCEPTED:
        assert time.monotonic() < deadline, "the new JWKS was not picked up"
    assert connack(broker, mint(idp_keys["RS256"], "RS256", claims(), kid="k-RS256")) == BAD_CREDENTIALS
    Path(path).write_text("{not json")                  # a broken download keeps the keys in use
    deadline = time.monotonic() + 20
    while "keeping the 1 key(s) in use" not in broker.log_tail(200):
        assert time.monotonic() < deadline, broker.log_tail()
        time.sleep(0.2)
    assert connack(broker, mint(rotated, "ES256", claims(), kid="k-ES256")) == ACCEPTED


# ---- expiry while connected ---------------------------------------------------------------

def test_a_connection_is_closed_when_its_token_expires(roost_factory, tmp_path, idp_keys):
    key = idp_keys["RS256"]
    broker = jwt_broker(roost_factory, jwks_file=write(tmp_path, "jwks.json", jwks({"RS256": key})),
                        issuer=ISSUER, audience=AUDIENCE)
    watcher = MqttClient("bob.watch").connect(broker.host, broker.port, username="bob", password="pw-bob")
    watcher.subscribe("home/alice/status")
    forever = MqttClient("alice.long").connect(broker.host, broker.port, username="alice", password="pw-alice")
    short = MqttClient("alice.short")
    expires = time.time() + 2
    short.connect(broker.host, broker.port, username="alice", keepalive=60,
                  password=mint(key, "RS256", claims(exp=expires), kid="k-RS256"),
                  will=("home/alice/status", b"offline", 1, False))
    try:
        assert short.wait_disconnected(timeout=10), "still connected after the token expired"
        assert time.time() >= expires
        assert watcher.wait_message("home/alice/status", timeout=5).payload == b"offline"   # the will
        assert "its login token expired" in broker.log_tail()
        # a password login has no end; the broker is fine
        assert connack(broker, "pw-alice") == ACCEPTED
    finally:
        short.drop()
        forever.disconnect()
        watcher.disconnect()


# ---- configuration ------------------------------------------------------------------------

def _config(tmp_path: Path, **jwt_config: Any) -> None:
    config_from_dict({"storage": {"path": str(tmp_path / "r.db")}, "auth": {"jwt": jwt_config}},
                     base_dir=str(tmp_path))


def test_bad_jwt_configuration_names_the_key(tmp_path):
    rsa_pem = write(tmp_path, "rsa.pem", pem(new_key("RS256")))
    ec_pem = write(tmp_path, "ec.pem", pem(new_key("ES256")))
    cases = {
        "auth.jwt": {},
        "auth.jwt.public_key_file": {"public_key_file": str(tmp_path / "missing.pem")},
        "auth.jwt.jwks_file": {"jwks_file": write(tmp_path, "bad.json", "{not json")},
        "auth.jwt.algorithms": {"secret": "s" * 32, "algorithms": ["none"]},
    }
    more = [
        ("auth.jwt.public_key_file", {"public_key_file": write(tmp_path, "junk.pem", "-----BEGIN JUNK-----")}),
        ("auth.jwt.jwks_file", {"jwks_file": write(tmp_path, "empty.json", '{"keys": []}')}),
        ("auth.jwt.jwks_file", {"jwks_file": write(tmp_path, "list.json", "[]")}),
        ("auth.jwt.algorithms", {"secret": "s" * 32, "algorithms": ["HS257"]}),
        ("auth.jwt.algorithms", {"secret": "s" * 32, "algorithms": ["RS256"]}),     # no RSA key
        ("auth.jwt.algorithms", {"public_key_file": rsa_pem, "algorithms": ["HS256"]}),  # no secret
        ("auth.jwt.algorithms", {"public_key_file": ec_pem, "algorithms": ["RS256"]}),   # wrong key type
        ("auth.jwt.secret", {"secret": "s" * 32, "public_key_file": rsa_pem, "algorithms": ["RS256"]}),
        ("auth.jwt.leeway", {"secret": "s" * 32, "leeway": -1}),
        ("auth.jwt.audience", {"public_key_file": rsa_pem, "audience": ""}),
    ]
    for path, jwt_config in [*cases.items(), *more]:
        with pytest.raises(ConfigError) as caught:
            _config(tmp_path, **jwt_config)
        assert caught.value.path == path, (jwt_config, str(caught.value))
        assert "\n" not in str(caught.value)
    # and good ones
    _config(tmp_path, public_key_file=rsa_pem, algorithms=["RS256", "PS256"], leeway="10s")
    _config(tmp_path, secret="s" * 32, algorithm="HS512")


def test_roost_serve_stops_at_start_on_an_invalid_jwks_file(roost_factory, tmp_path):
    broker = roost_factory({"auth": {"jwt": {"jwks_file": write(tmp_path, "jwks.json", '{"keys": 1}')}}},
                           start=False)
    with pytest.raises(RuntimeError) as caught:
        broker.start()
    assert "config error at 'auth.jwt.jwks_file': not a JWKS" in str(caught.value)
