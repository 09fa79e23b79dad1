from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from radloop.settings import load_settings
from radloop.settings_errors import SettingsError
from tests.servers import RADLOOP


def test_environment_overrides_nested_keys(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADLOOP_DICOM__AE_TITLE", "HOSP_AI")
    monkeypatch.setenv(
        "RADLOOP_DICOM__ALLOWED_CALLERS", "PACS@10.1.2.3, CT1@10.1.5.0/24,*@127.0.0.1"
    )
    settings = load_settings()
    assert settings.dicom.ae_title == "HOSP_AI"
    callers = settings.dicom.allowed_callers
    assert [str(rule) for rule in callers] == [
        "PACS@10.1.2.3/32",
        "CT1@10.1.5.0/24",
        "*@127.0.0.1/32",
    ]
    assert callers[0].allows("PACS", "10.1.2.3")
    assert not callers[0].allows("PACS", "10.1.2.4")
    assert callers[1].allows("CT1", "10.1.5.77")
    assert not callers[1].allows("CT2", "10.1.5.77")


def test_database_defaults_to_sqlite_under_data_dir(
    monkeypatch: pytest.MonkeyPatch, radloop_env: dict[str, str]
) -> None:
    monkeypatch.delenv("RADLOOP_DATABASE_URL")
    settings = load_settings()
    assert settings.effective_database_url == f"sqlite:///{settings.data_dir / 'radloop.db'}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RADLOOP_DICOM__PORT", "eleven"),
        ("RADLOOP_DICOM__PORT", "70000"),
        ("RADLOOP_DICOM__AE_TITLE", "A_TITLE_FAR_TOO_LONG"),
        ("RADLOOP_DICOM__ALLOWED_CALLERS", "PACS@not-an-address"),
        ("RADLOOP_DICOM__QUIET_SECONDS", "-1"),
        ("RADLOOP_DATABASE_URL", "mysql://x"),
        ("RADLOOP_DICOM__TLS__CERT_FILE", "/nonexistent/cert.pem"),
        ("RADLOOP_OBJECT_STORE__URL", "/srv/radloop"),
        ("RADLOOP_OBJECT_STORE__URL", "s3://Not_A_Bucket/x"),
        ("RADLOOP_OBJECT_STORE__ENDPOINT_URL", "minio:9000"),
    ],
)
def test_wrong_value_is_refused_naming_the_key(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=key):
        load_settings()


def test_cli_stops_at_start_up_with_the_key_named(radloop_env: dict[str, str]) -> None:
    env = {**radloop_env, "RADLOOP_DICOM__PORT": "eleven"}
    result = subprocess.run(
        [RADLOOP, "listen"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "RADLOOP_DICOM__PORT" in result.stderr


def test_yaml_file_is_read_and_environment_wins(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "site.yaml"
    config.write_text("dicom:\n  ae_title: FROM_YAML\n  quiet_seconds: 45\n")
    monkeypatch.setenv("RADLOOP_CONFIG", str(config))
    monkeypatch.setenv("RADLOOP_DICOM__QUIET_SECONDS", "5")
    settings = load_settings()
    assert settings.dicom.ae_title == "FROM_YAML"
    assert settings.dicom.quiet_seconds == 5


def test_placeholder_secrets_stop_a_production_start_and_are_never_echoed(
    radloop_env: dict[str, str],
) -> None:
    env = {
        **radloop_env,
        "RADLOOP_ENVIRONMENT": "production",
        "RADLOOP_ORTHANC__PASSWORD": "change-me",
        "RADLOOP_DATABASE_URL": "postgresql+psycopg://radloop:secret@db.example/radloop",
    }
    result = subprocess.run([RADLOOP, "listen"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    said = " ".join((result.stderr + result.stdout).split())  # rich wraps long lines
    assert "RADLOOP_ORTHANC__PASSWORD and RADLOOP_DATABASE_URL still hold an example" in said
    assert "change-me" not in said and "secret@" not in said


def test_in_development_a_placeholder_secret_is_a_warning_and_config_hides_secrets(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RADLOOP_ORTHANC__PASSWORD", "change-me")
    settings = load_settings()
    assert settings.orthanc.password is not None
    assert settings.orthanc.password.get_secret_value() == "change-me"
    assert "change-me" not in repr(settings) and "change-me" not in str(settings.orthanc)
    assert "RADLOOP_ORTHANC__PASSWORD holds an example password" in caplog.text

    env = {**radloop_env, "RADLOOP_ORTHANC__PASSWORD": "s3cr3t-for-real"}
    shown = subprocess.run([RADLOOP, "config"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "s3cr3t-for-real" not in shown.stdout


def test_settings_cannot_be_changed_after_start_up(radloop_env: dict[str, str]) -> None:
    settings = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.review.single_reader = True  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.data_dir = Path("/elsewhere")  # type: ignore[misc]


def test_a_site_that_set_its_allow_list_gets_no_demo_unasked(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from radloop.app.cli import first_run_demo
    from radloop.db import Store

    monkeypatch.setenv("RADLOOP_DEMO_ON_FIRST_RUN", "true")
    store = Store.open(load_settings().effective_database_url)
    try:
        assert first_run_demo(load_settings(), store)  # a new user's empty data dir
        monkeypatch.setenv("RADLOOP_DICOM__ALLOWED_CALLERS", "PACS@10.1.2.3")
        assert not first_run_demo(load_settings(), store)  # a configured site
    finally:
        store.close()


def test_an_object_store_and_a_triton_repository_folder_together_are_refused(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADLOOP_OBJECT_STORE__URL", "s3://radloop-site/loop")
    monkeypatch.setenv("RADLOOP_TRITON__REPOSITORY", "/srv/models")
    with pytest.raises(SettingsError, match="unset one"):
        load_settings()


def test_triton_is_given_the_bucket_in_its_own_spelling(
    radloop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADLOOP_OBJECT_STORE__URL", "s3://radloop-site/loop/")
    on_aws = load_settings()
    assert on_aws.triton_repository_location == "s3://radloop-site/loop/model-repository"
    monkeypatch.setenv("RADLOOP_OBJECT_STORE__ENDPOINT_URL", "https://minio.hospital:9000")
    assert load_settings().triton_repository_location == (
        "s3://https://minio.hospital:9000/radloop-site/loop/model-repository"
    )
    monkeypatch.setenv("RADLOOP_OBJECT_STORE__ENDPOINT_URL", "http://10.0.0.5:9000")
    assert load_settings().triton_repository_location == (
        "s3://10.0.0.5:9000/radloop-site/loop/model-repository"
    )
