"""Users, roles, API tokens and browser sessions of the review service.

Tokens are 256 random bits, stored as SHA-256 (a slow hash adds nothing at that entropy);
passwords, which people choose, as scrypt (memory-hard), and only once they are long and hard
to guess (`password_problem`). Failed logins lock the name and the client address out for a
while (`LoginThrottle`). Browser sessions live in the database (they survive a restart and end
on logout) behind an HttpOnly, SameSite=Strict cookie, and every form carries the session's
CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from radloop.db import LoginFailure, Store, User, WebSession, insert_ignoring_conflict, utcnow
from radloop.domain import Role

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

READ = frozenset(Role)
CORRECT = frozenset({Role.READER, Role.REVIEWER, Role.ADMIN})
VALIDATE = frozenset({Role.REVIEWER, Role.ADMIN})
ADMINISTER = frozenset({Role.ADMIN})


MIN_PASSWORD = 12
MAX_PASSWORD = 128
# zxcvbn's score 3: an estimated 10^8 guesses or more.
MIN_PASSWORD_SCORE = 3


class UserExists(ValueError):
    pass


class WeakPassword(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user and, for a browser session, its CSRF token."""

    name: str
    role: Role
    csrf_token: str | None = None

    def may(self, roles: frozenset[Role]) -> bool:
        return self.role in roles


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def password_problem(password: str, name: str) -> str | None:
    """Why `password` may not be `name`'s, or None: it has 12 to 128 characters (OWASP ASVS
    2.1.1-2.1.2) and is not guessable (2.1.7). zxcvbn estimates the guesses it needs against
    30,000 passwords of public breaches, dictionaries, keyboard patterns, repeats, sequences,
    dates and the user's own name, and must find 10^8 or more."""
    from zxcvbn import zxcvbn  # its word lists load in 50 ms: only when a password is set

    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters"
    estimate = zxcvbn(password, user_inputs=[name, "radloop"])
    if estimate["score"] >= MIN_PASSWORD_SCORE:
        return None
    warning = estimate["feedback"]["warning"] or "It is easy to guess."
    return f"that password is too easy to guess: {warning.rstrip('.')}."


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, salt, digest = stored.split("$")
    except ValueError:
        return False
    if kind != "scrypt":
        return False
    computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **_SCRYPT)
    return hmac.compare_digest(computed.hex(), digest)


class LoginLocked(Exception):
    """Too many failed logins in a row for this user name or client address."""

    def __init__(self, until: datetime) -> None:
        self.until = until
        # Whole minutes left, for the person at the login page and `Retry-After`.
        self.minutes = max(1, math.ceil((until - utcnow()).total_seconds() / 60))
        super().__init__(f"Too many failed logins: try again in {self.minutes} minutes.")


class LoginKeys(NamedTuple):
    """The hashed keys of a login's failure counts: its user name's and its address's (whose
    limit is 4 times the name's)."""

    name: str
    address: str


@dataclass(frozen=True)
class LoginThrottle:
    """Failed logins in a row, counted in the database per user name (`attempts` lock it) and
    per client address (4 × `attempts`, whatever names it tries) for `lockout`. Unknown names
    count like known ones: the lock-out tells nobody which names exist. A success clears the
    name's count, not the address's."""

    store: Store
    attempts: int = 5
    lockout: timedelta = timedelta(minutes=15)

    @staticmethod
    def keys(name: str, client: str) -> LoginKeys:
        """The rows a login from `client` as `name` counts on."""
        return LoginKeys(_sha256(f"name:{name.casefold()}"), _sha256(f"address:{client}"))

    def check(self, keys: LoginKeys) -> None:
        now = utcnow()
        with self.store.read() as session:
            until = session.scalar(
                select(func.max(LoginFailure.locked_until)).where(
                    LoginFailure.key.in_(keys), LoginFailure.locked_until > now
                )
            )
        if until is not None:
            raise LoginLocked(until)

    def failed(self, keys: LoginKeys) -> None:
        now = utcnow()
        with self.store.transaction() as session:
            for key, factor in ((keys.name, 1), (keys.address, 4)):
                values = {"key": key, "failures": 0, "last_failed_at": now}
                insert_ignoring_conflict(session, LoginFailure.__table__, values)
                row = session.scalars(
                    select(LoginFailure).where(LoginFailure.key == key).with_for_update()
                ).one()
                # Failures further apart than the lock-out are not "in a row".
                recent = row.last_failed_at > now - self.lockout
                row.failures = row.failures + 1 if recent else 1
                row.last_failed_at = now
                if row.failures >= self.attempts * factor:
                    row.locked_until, row.failures = now + self.lockout, 0

    def succeeded(self, keys: LoginKeys) -> None:
        with self.store.transaction() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.key == keys.name))


class Users:
    def __init__(self, store: Store, throttle: LoginThrottle | None = None) -> None:
        self.store = store
        self.throttle = throttle or LoginThrottle(store)

    def add(self, name: str, role: Role, password: str | None = None) -> str:
        """Create a user; returns their API token (shown once, stored only as a hash). A
        password must pass `password_problem`: `WeakPassword` with the reason else."""
        if password is not None and (problem := password_problem(password, name)):
            raise WeakPassword(problem)
        token = secrets.token_urlsafe(32)
        try:
            with self.store.transaction() as session:
                session.add(
                    User(
                        name=name,
                        role=role.value,
                        token_hash=_sha256(token),
                        password_hash=hash_password(password) if password else None,
                        created_at=utcnow(),
                    )
                )
        except IntegrityError:
            raise UserExists(f"user {name!r} exists") from None
        return token

    def rotate_token(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        with self.store.transaction() as session:
            user = session.scalars(select(User).where(User.name == name)).first()
            if user is None:
                raise KeyError(name)
            user.token_hash = _sha256(token)
            session.execute(delete(WebSession).where(WebSession.user_id == user.id))
        return token

    def disable(self, name: str) -> None:
        with self.store.transaction() as session:
            user = session.scalars(select(User).where(User.name == name)).first()
            if user is None:
                raise KeyError(name)
            user.disabled_at = utcnow()
            session.execute(delete(WebSession).where(WebSession.user_id == user.id))

    def list(self) -> list[dict[str, str | None]]:
        with self.store.read() as session:
            return [
                {
                    "name": user.name,
                    "role": user.role,
                    "created_at": user.created_at.isoformat(),
                    "disabled_at": user.disabled_at.isoformat() if user.disabled_at else None,
                }
                for user in session.scalars(select(User).order_by(User.name))
            ]

    def find(self, name: str) -> Principal | None:
        """The enabled user called `name`, or None."""
        with self.store.read() as session:
            user = session.scalars(
                select(User).where(User.name == name, User.disabled_at.is_(None))
            ).first()
            return Principal(user.name, Role(user.role)) if user else None

    def by_token(self, token: str) -> Principal | None:
        with self.store.read() as session:
            user = session.scalars(
                select(User).where(User.token_hash == _sha256(token), User.disabled_at.is_(None))
            ).first()
            return Principal(user.name, Role(user.role)) if user else None

    def login(
        self, name: str, secret: str, hours: float, client: str
    ) -> tuple[str, Principal] | None:
        """Check a password (or the API token) and open a session: (cookie value, principal).
        `LoginLocked` while the name or the `client` address is locked out (`throttle`): a
        locked name is not even checked, so guessing gets nowhere while it lasts."""
        keys = self.throttle.keys(name, client)
        self.throttle.check(keys)
        with self.store.read() as session:
            user = session.scalars(
                select(User).where(User.name == name, User.disabled_at.is_(None))
            ).first()
            if user is None:
                hash_password(secret)  # same work as a real check: no user-name oracle by timing
                ok = False
            else:
                ok = (
                    check_password(secret, user.password_hash)
                    if user.password_hash
                    else hmac.compare_digest(_sha256(secret), user.token_hash)
                )
                user_id, role = user.id, Role(user.role)
        if not ok:
            self.throttle.failed(keys)
            return None
        self.throttle.succeeded(keys)
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = utcnow()
        with self.store.transaction() as session:
            session.execute(delete(WebSession).where(WebSession.expires_at < now))
            session.add(
                WebSession(
                    id=_sha256(cookie),
                    user_id=user_id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + timedelta(hours=hours),
                )
            )
        return cookie, Principal(name, role, csrf)

    def by_session(self, cookie: str, *, bearer: bool = False) -> Principal | None:
        """The user of a running session; sent as a bearer token (`bearer`), it needs no CSRF
        token: a cross-site page cannot set that header."""
        with self.store.read() as session:
            row = session.execute(
                select(User.name, User.role, WebSession.csrf_token)
                .join(WebSession, WebSession.user_id == User.id)
                .where(
                    WebSession.id == _sha256(cookie),
                    WebSession.expires_at > utcnow(),
                    User.disabled_at.is_(None),
                )
            ).first()
        if row is None:
            return None
        return Principal(row[0], Role(row[1]), None if bearer else row[2])

    def logout(self, cookie: str) -> None:
        with self.store.transaction() as session:
            session.execute(delete(WebSession).where(WebSession.id == _sha256(cookie)))
