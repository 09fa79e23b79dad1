"""The review service against OWASP ASVS 4.0 level 1 (docs/security.md has the checklist):
login throttling and lock-out, a new session at each login, security headers, HTTPS with the
site's certificate, and an audit log of who viewed, changed or validated which case."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from agents.review.auth import Users, WeakPassword
from radloop.app.supervisor import Child
from radloop.app.supervisor.specs import review_spec
from radloop.db import LoginFailure, Store, Study
from radloop.domain import Role
from radloop.settings import load_settings
from tests.conftest_marks import ONCE
from tests.review_cases import Review
from tests.servers import radloop_json, self_signed_certificate

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"


def _throttled(review: Review, minutes: float) -> Review:
    section = review.settings.review.model_copy(update={"lockout_minutes": minutes})
    return replace(review, settings=review.settings.model_copy(update={"review": section}))


def _login(client: TestClient, name: str, password: str) -> httpx.Response:
    response: httpx.Response = client.post("/login", data={"username": name, "password": password})
    return response


def test_failed_logins_lock_the_name_then_the_address_out_and_tell_nobody_which_names_exist(
    review: Review,
) -> None:
    review = _throttled(review, minutes=0.05)  # 3 s, so the test sees a lock-out end
    users = Users(review.store)
    for name in ("pat", "quinn", "rob"):
        users.add(name, Role.READER, password=PASSWORD)
    client = review.client()

    for _ in range(5):
        assert _login(client, "pat", "guess").status_code == 401
    locked = _login(client, "pat", PASSWORD)  # the right password, too late
    assert locked.status_code == 429 and "Too many failed logins" in locked.text
    assert int(locked.headers["retry-after"]) >= 60
    # A name nobody has is answered the same way: the lock-out names no account.
    for _ in range(5):
        assert _login(client, "nobody", "guess").status_code == 401
    assert _login(client, "nobody", "guess").status_code == 429
    assert _login(client, "quinn", PASSWORD).status_code == 303  # others still log in

    time.sleep(3.5)
    assert _login(client, "pat", PASSWORD).status_code == 303  # the lock-out ended

    # One address trying many names: 20 failures in a row lock the address (failures
    # further apart than the lock-out are not in a row: the 10 above no longer count).
    for index in range(20):
        assert _login(client, f"guess-{index}", "guess").status_code == 401
    assert _login(client, "rob", PASSWORD).status_code == 429
    with review.store.read() as session:
        keys = session.scalars(select(LoginFailure.key)).all()
    assert keys and all(len(key) == 64 and "guess" not in key for key in keys)  # hashed


def test_a_password_has_12_to_128_characters_and_is_not_easy_to_guess(review: Review) -> None:
    users = Users(review.store)
    refused = {
        "short": "12 to 128 characters",
        "x" * 129: "12 to 128 characters",
        "iloveyou1234": "too easy to guess: This is similar to a commonly used password",
        "1q2w3e4r5t6y": "too easy to guess: This is a very common password",  # a breached one
        "abcdefghijklmn": "too easy to guess: Sequences like",
        # Strong for anyone else, but it is the user's own name and a year.
        "Zorvath_2026": "too easy to guess: It is easy to guess",
    }
    for password, reason in refused.items():
        with pytest.raises(WeakPassword, match=reason):
            users.add("zorvath", Role.READER, password=password)
    assert users.find("zorvath") is None
    users.add("zorvath", Role.READER, password=PASSWORD)
    assert users.login("zorvath", PASSWORD, 1.0, "127.0.0.1") is not None


def test_each_login_starts_a_new_session_and_ends_the_one_the_browser_had(
    review: Review,
) -> None:
    Users(review.store).add("pat", Role.READER, password=PASSWORD)
    client = review.client()
    first = _login(client, "pat", PASSWORD).cookies["radloop_session"]
    second = _login(client, "pat", PASSWORD).cookies["radloop_session"]
    assert second != first
    stale = review.client()
    stale.cookies.set("radloop_session", first)
    assert stale.get("/worklist").status_code == 303  # to the login page
    assert client.get("/worklist").status_code == 200


def test_every_answer_carries_the_security_headers(review: Review) -> None:
    client = review.client()
    login = client.get("/login")
    policy = login.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert login.headers["x-content-type-options"] == "nosniff"
    assert login.headers["x-frame-options"] == "DENY"
    assert login.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in login.headers  # plain HTTP here

    api = review.client("ann").get("/api/worklist")
    assert api.status_code == 200 and api.headers["cache-control"] == "no-store"
    refused = client.get("/api/worklist")
    assert refused.status_code == 401 and refused.headers["x-content-type-options"] == "nosniff"
    docs = client.get("/docs")
    assert "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]

    Users(review.store).add("pat", Role.READER, password=PASSWORD)
    _login(client, "pat", PASSWORD)
    viewer = client.get("/segmentation")  # OHIF's page: inline script, WebAssembly codecs
    viewer_policy = viewer.headers["content-security-policy"]
    assert viewer.status_code == 200 and "'wasm-unsafe-eval'" in viewer_policy
    assert "frame-ancestors 'none'" in viewer_policy and "connect-src 'self'" in viewer_policy
    bundle = next(p.name for p in review.settings.ohif_dir.glob("app.bundle.*.js"))
    asset = client.get(f"/{bundle}")
    assert asset.headers["cache-control"] == "no-cache"  # revalidated, not re-sent
    assert asset.headers["content-security-policy"] == viewer_policy  # its workers' policy

    behind_tls = review.settings.review.model_copy(update={"secure_cookies": True})
    proxied = replace(review, settings=review.settings.model_copy(update={"review": behind_tls}))
    answer = _login(proxied.client(), "pat", PASSWORD)
    assert answer.headers["strict-transport-security"] == "max-age=31536000"
    # A Secure session cookie has the `__Host-` prefix (path /, no domain): a browser takes
    # it from this host only, and the bare name a sibling subdomain could set means nothing.
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("__Host-radloop_session=") and "Secure" in cookie
    assert "Path=/;" in cookie and "domain" not in cookie.lower()
    session = cookie.split(";")[0].split("=", 1)[1]
    for name, status in (("__Host-radloop_session", 200), ("radloop_session", 303)):
        page = proxied.client().get("/worklist", headers={"cookie": f"{name}={session}"})
        assert page.status_code == status, name


def test_the_audit_log_says_who_claimed_changed_validated_and_flagged_which_case(
    review: Review,
) -> None:
    case, study = review.drafted(60)
    other, _ = review.drafted(61)
    Users(review.store).add("ada", Role.ADMIN)
    admin = review.client()
    admin.headers["authorization"] = f"Bearer {Users(review.store).rotate_token('ada')}"
    ann, rita = review.client("ann"), review.client("rita")

    assert ann.post(f"/api/annotations/{case}/claim").status_code == 200
    saved = ann.put(f"/api/annotations/{case}/label", content=study.truth.read_bytes())
    assert saved.status_code == 200, saved.text
    assert rita.post(f"/api/annotations/{case}/validate").status_code == 200
    assert rita.put(f"/api/annotations/{other}/urgent", json={"urgent": True}).status_code == 200
    assert ann.post(f"/api/annotations/{other}/claim").status_code == 200
    assert ann.post(f"/api/annotations/{other}/release").status_code == 200

    assert ann.get("/api/audit").status_code == 403  # for admins only
    log = admin.get("/api/audit")
    assert log.status_code == 200
    with review.store.read() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_uid == study.study_uid))
    done = [(e["user"], e["action"], e["annotation_id"]) for e in reversed(log.json())]
    assert done == [
        ("ann", "claim", case),
        ("ann", "correct", case),
        ("rita", "validate", case),
        ("rita", "urgent", other),
        ("ann", "claim", other),
        ("ann", "release", other),
    ]
    assert {e["study_id"] for e in log.json() if e["annotation_id"] == case} == {study_id}
    assert study.study_uid not in log.text  # internal ids only
    assert [e["action"] for e in admin.get("/api/audit?user=rita").json()] == [
        "urgent",
        "validate",
    ]
    assert admin.get("/api/audit?since=2026-01-01T00:00:00").status_code == 422  # no zone


@ONCE
def test_with_the_sites_certificate_the_service_speaks_https_only(
    radloop_env: dict[str, str], store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, certificate = self_signed_certificate(tmp_path, "review")
    tls = {
        "RADLOOP_REVIEW__TLS__CERT_FILE": str(certificate),
        "RADLOOP_REVIEW__TLS__KEY_FILE": str(key),
    }
    for name, value in tls.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    Users(store).add("pat", Role.READER, password=PASSWORD)
    child = Child(review_spec(settings))
    child.start()
    try:
        child.wait_healthy()  # radloop up's own probe, over HTTPS
        url = settings.review.local_url
        assert url.startswith("https://")
        with httpx.Client(base_url=url, verify=str(certificate), timeout=30) as client:
            health = client.get("/api/health")
            assert health.status_code == 200
            assert health.headers["strict-transport-security"] == "max-age=31536000"
            login = client.post("/login", data={"username": "pat", "password": PASSWORD})
            assert login.status_code == 303 and "Secure" in login.headers["set-cookie"]
            assert login.headers["set-cookie"].startswith("__Host-radloop_session=")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
            httpx.get(f"http://{settings.review.host}:{settings.review.port}/api/health")
        # The others are not running here: `status` exits 1, and says the review is healthy.
        status = radloop_json({**radloop_env, **tls}, "status", exit_codes=(1,))
        review = next(s for s in status["services"] if s["name"] == "review")
        assert review["healthy"] and review["url"].startswith("https://"), review
    finally:
        child.stop()
