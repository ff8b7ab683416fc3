"""The auth-callout responder's pure parts: nkeys and NATS JWTs against the Go libraries' own
vectors (nats-io/nkeys, nats-io/jwt v2), and the answers it builds."""

import time

import pytest

from services.broker_access import jwt
from services.broker_access.access import (
    Authorizer,
    DeviceRow,
    ServicePasswords,
    verify_password,
)
from services.broker_access.callout import (
    SERVICE_GRANTS,
    AuthRequest,
    Grant,
    Refusal,
    device_grant,
    parse_request,
    respond,
)
from services.broker_access.nkeys import (
    KeyPair,
    NkeyError,
    Prefix,
    decode_public,
    decode_seed,
    is_public,
)
from services.common.broker_auth import BrokerFiles, ServiceAccount, hash_password

# nats-io/nkeys creds_utils_test.go: a user seed and the user JWT (issued by an account)
# whose subject is that seed's public key.
CREDS_SEED = "SUAOTBNEUHZDFJT3EUMELT7MQTP24JF3XVCXQNDSCU74G5IU6VAJBKH5LI"
CREDS_USER = "UDE6WTGLTTPCRJRJCKBJRGVNZTLIVR7LEEELR4CYWWWBKJS7XYIKXDUU"
# nats-io/jwt v2 account_claims_test.go TestJetstreamLimitsDeEnCode: an account JWT signed by
# an operator key, which jwt.Decode verifies.
ACCOUNT_JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiI3V0NYQkZKS0lIN1Y0SkdPR0FVTEtTS05a"
    "QUxVTUZMVExZWVgyNTdDSzZORk5OWTdGRVdBIiwiaWF0IjoxNjQ0Mjc5NDY3LCJpc3MiOiJPQk5UUVJFSEVJUFJFVE1B"
    "VlBWUVVDSUdFUktHWkIzRVJBVjVTNUdNM0lPRVFOSFJFQkpPVUFSRiIsIm5hbWUiOiJ0ZXN0Iiwic3ViIjoiQUM2SFFJ"
    "MlVBTVVQREVQN1dTWVFZV1JDTEVZQkxZVlNQTDZBSExDVVBKVEdVMzJUNEtRQktZU0ciLCJuYXRzIjp7ImxpbWl0cyI6"
    "eyJzdWJzIjotMSwiZGF0YSI6LTEsInBheWxvYWQiOi0xLCJpbXBvcnRzIjotMSwiZXhwb3J0cyI6LTEsIndpbGRjYXJk"
    "cyI6dHJ1ZSwiY29ubiI6LTEsImxlYWYiOi0xfSwiZGVmYXVsdF9wZXJtaXNzaW9ucyI6eyJwdWIiOnt9LCJzdWIiOnt9"
    "fSwidHlwZSI6ImFjY291bnQiLCJ2ZXJzaW9uIjoyfX0.73vDu9osNeLKwQ-g1Uu1fAtszMNz_QRZXRJLp0kzZh-0eMBm"
    "t0nb2mMwBwg-fufJs1FqYe9WbWKeXAYStnVnBg"
)
OPERATOR = "OBNTQREHEIPRETMAVPVQUCIGERKGZB3ERAV5S5GM3IOEQNHREBJOUARF"


def test_a_seed_gives_the_public_key_the_go_library_gives() -> None:
    pair = KeyPair.from_seed(CREDS_SEED)
    assert pair.prefix is Prefix.USER
    assert pair.public_key == CREDS_USER
    assert pair.seed == CREDS_SEED


@pytest.mark.parametrize("prefix", list(Prefix))
def test_new_keys_round_trip_and_read_as_their_role(prefix: Prefix) -> None:
    pair = KeyPair.create(prefix)
    letter = {"OPERATOR": "O", "SERVER": "N", "CLUSTER": "C", "ACCOUNT": "A", "USER": "U"}
    assert pair.public_key[0] == letter[prefix.name]
    assert pair.seed[:2] == "S" + letter[prefix.name]
    assert decode_seed(pair.seed)[0] is prefix
    assert KeyPair.from_seed(pair.seed).public_key == pair.public_key
    assert decode_public(pair.public_key, prefix)[0] is prefix


def test_a_changed_character_fails_the_checksum() -> None:
    flipped = CREDS_USER[:10] + ("A" if CREDS_USER[10] != "A" else "B") + CREDS_USER[11:]
    with pytest.raises(NkeyError, match="checksum"):
        decode_public(flipped)
    assert not is_public(flipped, Prefix.USER)
    assert not is_public(CREDS_USER, Prefix.ACCOUNT)


def test_a_jwt_signed_by_the_go_library_verifies_and_its_jti_is_reproduced() -> None:
    claims = jwt.decode(ACCOUNT_JWT, issuer_prefix=Prefix.OPERATOR)
    assert claims["iss"] == OPERATOR
    assert jwt.claim_type(claims) == "account"
    assert jwt.jti(claims) == claims["jti"]
    tampered = ACCOUNT_JWT.replace(".eyJqdGki", ".eyJqdGkj", 1)
    with pytest.raises(jwt.JwtError):
        jwt.decode(tampered)
    with pytest.raises(jwt.JwtError, match="bad issuer"):
        jwt.decode(ACCOUNT_JWT, issuer_prefix=Prefix.ACCOUNT)


def test_an_expired_token_is_refused() -> None:
    account = KeyPair.create(Prefix.ACCOUNT)
    token = jwt.encode({"sub": CREDS_USER, "exp": 1000, "nats": {"type": "user"}}, account)
    with pytest.raises(jwt.JwtError, match="expired"):
        jwt.decode(token)


def _request(server: KeyPair, **connect: str) -> str:
    claims = {
        "sub": KeyPair.create(Prefix.ACCOUNT).public_key,
        "aud": "nats-authorization-request",
        "nats": {
            "type": "authorization_request",
            "server_id": {"name": "n1", "host": "127.0.0.1", "id": server.public_key},
            "user_nkey": KeyPair.create(Prefix.USER).public_key,
            "client_info": {"type": "mqtt", "mqtt_id": connect.pop("client_id", "dev-0001")},
            "connect_opts": {"user": connect.get("user", "dev-0001"), "pass": "pw"},
        },
    }
    return jwt.encode(claims, server)


def test_an_answer_is_a_response_for_the_server_holding_a_user_jwt_placed_in_galvani() -> None:
    server = KeyPair.create(Prefix.SERVER)
    issuer = KeyPair.create(Prefix.ACCOUNT)
    request = parse_request(_request(server))
    answer = jwt.decode(respond(request, device_grant("dev-0001"), issuer).decode())
    assert answer["iss"] == issuer.public_key
    assert (answer["sub"], answer["aud"]) == (request.user_nkey, server.public_key)
    assert jwt.claim_type(answer) == "authorization_response"
    user = jwt.decode(answer["nats"]["jwt"], issuer_prefix=Prefix.ACCOUNT)
    assert (user["iss"], user["sub"], user["aud"], user["name"]) == (
        issuer.public_key,
        request.user_nkey,
        "GALVANI",
        "dev-0001",
    )
    assert "exp" not in user  # the server would close the connection at a user JWT's exp
    assert user["nats"]["pub"]["allow"] == [
        f"galvani.v1.d.dev-0001.{c}" for c in ("telemetry", "events", "state", "presence")
    ]
    assert user["nats"]["allowed_connection_types"] == ["MQTT"]
    refused = jwt.decode(respond(request, Refusal("no"), issuer).decode())
    assert refused["nats"]["error"] == "no"
    assert "jwt" not in refused["nats"]


def test_a_request_not_signed_by_a_server_key_is_not_answered() -> None:
    impostor = KeyPair.create(Prefix.ACCOUNT)
    with pytest.raises(ValueError, match="not a valid request"):
        parse_request(_request(impostor))


def test_device_passwords_verify_against_the_mosquitto_hash() -> None:
    encoded = hash_password("s3cret")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert not verify_password("s3cret", "$6$not-pbkdf2")


def _authorizer(rows: dict[str, DeviceRow], tmp_path) -> Authorizer:
    files = BrokerFiles(tmp_path)
    files.write_service_files({ServiceAccount.INGEST: "ingest-pw"})
    return Authorizer(
        lambda ids: {i: rows[i] for i in ids if i in rows}, ServicePasswords(tmp_path)
    )


def _login(user: str, password: str, client_id: str, client_type: str = "mqtt") -> AuthRequest:
    return AuthRequest(
        server_id="N",
        user_nkey="U",
        username=user,
        password=password,
        client_type=client_type,
        mqtt_client_id=client_id,
        host="127.0.0.1",
    )


def test_who_gets_in(tmp_path) -> None:
    good = DeviceRow(hash_password("pw"), decommissioned=False, auth="password", banned=False)
    rows = {
        "dev-good": good,
        "dev-gone": DeviceRow(hash_password("pw"), True, "password", False),
        "dev-cert": DeviceRow(None, False, "certificate", False),
        "dev-banned": DeviceRow(hash_password("pw"), False, "password", True),
    }
    authorizer = _authorizer(rows, tmp_path)
    assert isinstance(authorizer.decide(_login("dev-good", "pw", "dev-good")), Grant)
    refused = {
        "wrong password": _login("dev-good", "px", "dev-good"),
        "another client id": _login("dev-good", "pw", "dev-other"),
        "reserved client id": _login("dev-good", "pw", "galvani-ingest-1"),
        "over NATS": _login("dev-good", "pw", "", client_type="nats"),
        "unknown": _login("dev-none", "pw", "dev-none"),
        "decommissioned": _login("dev-gone", "pw", "dev-gone"),
        "certificate": _login("dev-cert", "pw", "dev-cert"),
        "banned": _login("dev-banned", "pw", "dev-banned"),
        "service with a wrong password": _login("galvani-ingest", "x", "any"),
        "service not in the file": _login("galvani-rules", "ingest-pw", "any"),
    }
    for what, request in refused.items():
        assert isinstance(authorizer.decide(request), Refusal), what
    service = authorizer.decide(_login("galvani-ingest", "ingest-pw", "dev-good", "nats"))
    assert service == SERVICE_GRANTS[ServiceAccount.INGEST]


def test_a_replaced_service_password_file_is_read_again(tmp_path) -> None:
    authorizer = _authorizer({}, tmp_path)
    assert isinstance(authorizer.decide(_login("galvani-ingest", "ingest-pw", "x")), Grant)
    time.sleep(0.01)
    BrokerFiles(tmp_path).write_service_files({ServiceAccount.INGEST: "rotated"})
    assert isinstance(authorizer.decide(_login("galvani-ingest", "ingest-pw", "x")), Refusal)
    assert isinstance(authorizer.decide(_login("galvani-ingest", "rotated", "x")), Grant)
