"""JWT logins (RFC 7519) through PyJWT: HMAC secrets, PEM public keys, JWKS files.

`build_verifier(config, resolve)` reads the keys named by `auth.jwt` and raises
`ConfigError` naming the key when something is wrong, so `roost serve` stops at
start instead of refusing every token later. `JwtVerifier.is_jwt` tells a token
from a password; `JwtVerifier.decode` returns a valid token's claims.

A password is taken for a token only when it has three base64url parts and the
first is a JSON header whose `alg` is one of the configured algorithms (and
`typ`, when present, says JWT): a password with two dots is still a password,
and a token whose `alg` is not allowed ("none", or HS256 where only RS256 is
configured) is checked as a password and so refused. Each algorithm family is
verified only with its own kind of key (HMAC with the secret, RS/PS with RSA
keys, ES with EC keys of its curve, EdDSA with Ed25519/Ed448 keys): a public key
is never used as an HMAC secret.

Claims: `sub` a string, `exp` and `iat` required, `nbf` optional, each a finite
number (PyJWT alone would take "99999999999" or NaN); `aud`/`iss` checked when
configured. `leeway` is allowed for `iat` and `nbf` (an issuer's clock a little
ahead of ours); `exp` is exact, the same instant at CONNECT and for closing a
connection whose token expired (`broker.mqtt.engine`), so a token is never
accepted only to be cut off at once. The caller checks `sub` and `iat` against
the principal.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.warnings import InsecureKeyLengthWarning

from broker.config import ConfigError

if TYPE_CHECKING:
    from broker.config import JwtConfig

log = logging.getLogger("roost.identity")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA_ALGORITHMS = frozenset({"EdDSA"})
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values()) | EDDSA_ALGORITHMS
# `typ` values of a JWT: plain, and RFC 9068 access tokens (what some IdPs issue)
_JWT_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
# HMAC secrets shorter than this are weak (RFC 7518 3.2 wants the hash size)
_MIN_SECRET_BYTES = 32
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key, the algorithms it may verify, and the one it enables by default."""
    key: Any
    usable: frozenset[str]
    default: str
    kid: str | None = None        # None: a PEM key, used whatever `kid` a token names


@dataclass(frozen=True, slots=True)
class _KeySet:
    """What may change when the JWKS file does, swapped as one object."""
    algorithms: frozenset[str]
    jwks_keys: tuple[VerifyKey, ...]


@dataclass(frozen=True, slots=True)
class _FileStamp:
    mtime_ns: int
    size: int


# ---- telling a token from a password ---------------------------------------------

def _b64url_decode(part: str) -> bytes:
    # strict: urlsafe_b64decode alone skips characters outside the alphabet
    if _B64URL_RE.fullmatch(part) is None or len(part) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(part: str) -> dict[str, Any] | None:
    try:
        value = json.loads(_b64url_decode(part), parse_constant=_no_constant)  # NaN/Infinity refused
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def token_header(token: str, algorithms: Collection[str]) -> dict[str, Any] | None:
    """The JSON header of `token` when it is shaped like a JWT signed with one of
    `algorithms` (`typ` JWT or absent); None for anything else, e.g. a password."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header = _json_object(parts[0])
    if header is None or header.get("alg") not in algorithms:
        return None
    typ = header.get("typ")
    if typ is not None and not (isinstance(typ, str) and typ.lower() in _JWT_TYPES):
        return None
    return header


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim; None when absent; ValueError when not a finite number."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is not a number")
    return float(value)


# ---- keys ----------------------------------------------------------------------------

def _family(key: Any) -> tuple[frozenset[str], str] | None:
    """(algorithms `key` can verify, the one to enable by default); None: no JWS key."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        return (frozenset({alg}), alg) if alg else None
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return EDDSA_ALGORITHMS, "EdDSA"
    return None


def load_pem_key(data: bytes, where: str) -> VerifyKey:
    """A public key or an X.509 certificate (what some IdPs offer for download), PEM."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(where, f"not a PEM public key or certificate ({exc})") from None
    family = _family(key)
    if family is None:
        raise ConfigError(where, f"a {type(key).__name__} cannot verify JWTs (RSA, EC P-256/384/521, Ed25519, Ed448)")
    return VerifyKey(key, *family)


def _jwk(entry: Any, where: str) -> VerifyKey | None:
    """One JWKS entry as a key; None for one that is not for verifying signatures
    (`use` enc, a symmetric `oct` key, a type PyJWT does not know)."""
    if not isinstance(entry, dict):
        raise ConfigError(where, "a key is not a JSON object")
    if entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(where, f"kid {kid!r} is not a string")
    alg = entry.get("alg")
    try:
        key = jwt.PyJWK(entry).key
    except jwt.PyJWTError as exc:
        log.warning("%s: skipping key %s: %s", where, kid, exc)
        return None
    family = _family(key)
    if family is None:
        return None
    usable, default = family
    if alg is not None:
        # a key that names its algorithm is good for that one only (RFC 7517 4.4)
        if alg not in usable:
            raise ConfigError(where, f"key {kid}: alg {alg!r} does not fit its key type")
        usable, default = frozenset({alg}), alg
    return VerifyKey(key, usable, default, kid)


def parse_jwks(text: str, where: str) -> tuple[VerifyKey, ...]:
    """The signature keys of a JWKS document ({"keys": [...]}, RFC 7517 5)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(where, f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(where, 'not a JWKS: expected {"keys": [...]}')
    keys = tuple(k for k in (_jwk(entry, where) for entry in doc["keys"]) if k is not None)
    if not keys:
        raise ConfigError(where, "no RSA, EC or OKP signature key in it")
    return keys


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror or exc}") from None


def _stamp(path: Path) -> _FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_size)


# ---- the verifier -------------------------------------------------------------------

class JwtVerifier:
    """Checks tokens against the configured secret and public keys. Immutable
    but for the JWKS keys (and the algorithms they enable when `algorithms` was
    not configured), which `reload_jwks` replaces as one object, so a check on
    the loop never sees half a key set."""

    def __init__(self, *, secret: bytes | None, algorithms: frozenset[str] | None = None,
                 pem_keys: tuple[VerifyKey, ...] = (), jwks_path: Path | None = None,
                 jwks_keys: tuple[VerifyKey, ...] = (), audience: str | None = None, issuer: str | None = None,
                 leeway: float = 30.0) -> None:
        self.jwks_path = jwks_path
        self._secret = secret
        self._pem_keys = pem_keys
        self._configured = algorithms     # None: each key's own (see default_algorithms)
        self._keys = self._key_set(jwks_keys)
        self._jwks_stamp = _stamp(jwks_path) if jwks_path is not None else None
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    @property
    def algorithms(self) -> frozenset[str]:
        return self._keys.algorithms

    def _key_set(self, jwks_keys: tuple[VerifyKey, ...]) -> _KeySet:
        algorithms = self._configured
        if algorithms is None:
            algorithms = default_algorithms(self._secret is not None, self._pem_keys + jwks_keys)
        return _KeySet(algorithms, jwks_keys)

    def is_jwt(self, token: str) -> bool:
        return token_header(token, self.algorithms) is not None

    def decode(self, token: str, now: float) -> dict[str, Any] | None:
        """The claims of a valid token, else None (see the module's docstring)."""
        keys = self._keys
        header = token_header(token, keys.algorithms)
        if header is None or "crit" in header:   # extensions we would have to understand
            return None
        alg = header["alg"]
        for key in self._keys_for(keys, alg, header.get("kid")):
            claims = self._verified(token, key, alg)
            if claims is not None:
                return claims if self._times_ok(claims, now) else None
        return None

    def _keys_for(self, keys: _KeySet, alg: str, kid: Any) -> list[Any]:
        if alg in HMAC_ALGORITHMS:
            return [self._secret] if self._secret is not None else []
        found = [k.key for k in self._pem_keys if alg in k.usable]
        # a JWKS key is chosen by the token's kid; a token without one may use any of them
        found += [k.key for k in keys.jwks_keys if alg in k.usable and (kid is None or k.kid == kid)]
        return found

    def _verified(self, token: str, key: Any, alg: str) -> dict[str, Any] | None:
        """Signature, `aud`, `iss` and presence of `sub`/`exp`/`iat` (PyJWT); the
        times are checked by `_times_ok`, more strictly than PyJWT would."""
        try:
            with warnings.catch_warnings():
                # a short HMAC secret is reported once at start, not per login
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                return jwt.decode(
                    token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                             "verify_aud": self._audience is not None, "require": ["sub", "exp", "iat"]})
        except jwt.PyJWTError:
            return None

    def _times_ok(self, claims: dict[str, Any], now: float) -> bool:
        if not isinstance(claims.get("sub"), str):
            return False
        try:
            exp, iat, nbf = (_numeric_date(claims, name) for name in ("exp", "iat", "nbf"))
        except ValueError:
            return False
        if exp is None or now >= exp:
            return False
        if iat is None or iat > now + self._leeway:
            return False
        return nbf is None or nbf <= now + self._leeway

    def reload_jwks(self) -> bool:
        """Re-read the JWKS file if it changed (blocking: run it off the loop).
        True when new keys are in use; a file that became unreadable or invalid
        is logged and the keys in use are kept."""
        path = self.jwks_path
        if path is None:
            return False
        stamp = _stamp(path)
        if stamp is None or stamp == self._jwks_stamp:
            return False
        self._jwks_stamp = stamp
        try:
            keys = parse_jwks(_read(path, "auth.jwt.jwks_file").decode("utf-8", "replace"), "auth.jwt.jwks_file")
        except ConfigError as exc:
            log.warning("%s; keeping the %d key(s) in use", exc, len(self._keys.jwks_keys))
            return False
        self._keys = self._key_set(keys)
        log.info("auth.jwt.jwks_file %s changed: %d key(s) in use (%s)", path, len(keys),
                 ", ".join(sorted(self._keys.algorithms)))
        return True


def default_algorithms(with_secret: bool, keys: tuple[VerifyKey, ...]) -> frozenset[str]:
    """HS256 with a secret, plus each key's own algorithm."""
    return frozenset((["HS256"] if with_secret else []) + [k.default for k in keys])


def _algorithms(cfg: JwtConfig, keys: tuple[VerifyKey, ...]) -> frozenset[str] | None:
    """The configured algorithms, checked against the keys; None when none are
    configured (each key's own, see `default_algorithms`)."""
    wanted = list(cfg.algorithms) + ([cfg.algorithm] if cfg.algorithm else [])
    if not wanted:
        return None
    where = "auth.jwt.algorithms" if cfg.algorithms else "auth.jwt.algorithm"
    for alg in wanted:
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(where, f"unknown algorithm {alg!r} (known: {', '.join(sorted(SUPPORTED_ALGORITHMS))})")
        if alg in HMAC_ALGORITHMS and not cfg.secret:
            raise ConfigError(where, f"{alg} needs auth.jwt.secret")
        if alg not in HMAC_ALGORITHMS and not any(alg in k.usable for k in keys):
            raise ConfigError(where, f"{alg} needs a key for it in auth.jwt.public_key_file or jwks_file")
    if cfg.secret and not HMAC_ALGORITHMS & set(wanted):
        raise ConfigError("auth.jwt.secret", f"set, but {where} has no HS256, HS384 or HS512")
    return frozenset(wanted)


def build_verifier(cfg: JwtConfig, resolve: Callable[[str], Path]) -> JwtVerifier:
    """The verifier `auth.jwt` describes; ConfigError (naming the key) when a key
    file is unreadable or invalid, or the algorithms do not fit the keys."""
    if not (cfg.secret or cfg.public_key_file or cfg.jwks_file):
        raise ConfigError("auth.jwt", "set secret, public_key_file or jwks_file")
    pem_keys: tuple[VerifyKey, ...] = ()
    if cfg.public_key_file:
        where = "auth.jwt.public_key_file"
        pem_keys = (load_pem_key(_read(resolve(cfg.public_key_file), where), where),)
    jwks_path = resolve(cfg.jwks_file) if cfg.jwks_file else None
    jwks_keys: tuple[VerifyKey, ...] = ()
    if jwks_path is not None:
        where = "auth.jwt.jwks_file"
        jwks_keys = parse_jwks(_read(jwks_path, where).decode("utf-8", "replace"), where)
    algorithms = _algorithms(cfg, pem_keys + jwks_keys)
    for name, value in (("audience", cfg.audience), ("issuer", cfg.issuer)):
        if value is not None and not value:
            raise ConfigError(f"auth.jwt.{name}", "must not be empty (leave it out to not check it)")
    return JwtVerifier(secret=cfg.secret.encode() if cfg.secret else None, algorithms=algorithms,
                       pem_keys=pem_keys, jwks_path=jwks_path, jwks_keys=jwks_keys,
                       audience=cfg.audience, issuer=cfg.issuer, leeway=cfg.leeway)


def startup_warnings(cfg: JwtConfig) -> list[str]:
    """What `roost serve` should say once about a working but weak `auth.jwt`."""
    out = []
    if cfg.secret and len(cfg.secret.encode()) < _MIN_SECRET_BYTES:
        out.append(f"auth.jwt.secret is shorter than {_MIN_SECRET_BYTES} bytes: easy to guess offline from one token")
    if (cfg.public_key_file or cfg.jwks_file) and cfg.audience is None:
        out.append("auth.jwt.audience is not set: a token the identity provider issued for any other "
                   "application is accepted too")
    return out
