"""Storage options, secrets and redaction (no network)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from zarr_parallel import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.request.secrets import (
    check_no_secrets,
    expand_env,
    install_log_redaction,
    redact,
    redact_text,
    redact_url,
)
from zarr_parallel.sources.references import open_references
from zarr_parallel.sources.remote import fsspec_options, user_options


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"s3": {"secret": "abcd1234"}}, r"storage_options\.s3\.secret"),
        ({"s3": {"key": "AKIAEXAMPLE"}}, r"storage_options\.s3\.key"),
        ({"https": {"headers": {"Authorization": "Bearer abcd1234"}}}, r"headers\.Authorization"),
        ({"gcs": {"token": "ya29.secret-token"}}, r"storage_options\.gcs\.token"),
        ({"password": "hunter22"}, r"storage_options\.password"),
    ],
)
def test_literal_secrets_are_refused_masked(options: dict[str, object], path: str) -> None:
    with pytest.raises(RequestError, match=path + r"='\*\*\*': is a credential") as e:
        check_no_secrets("s3://bucket/a.json", options)
    assert "abcd1234" not in str(e.value) and "hunter22" not in str(e.value)
    assert "${" in e.value.fix


@pytest.mark.parametrize(
    "options",
    [
        {"s3": {"key": "${MY_KEY}", "secret": "${MY_SECRET}", "endpoint_url": "http://x"}},
        {"https": {"headers": {"Authorization": "Bearer ${ARCHIVE_TOKEN}"}}},
        {"gcs": {"token": "anon"}},
        {"s3": {"anon": True}},
    ],
)
def test_environment_references_and_modes_are_accepted(options: dict[str, object]) -> None:
    check_no_secrets("s3://bucket/a.json", options)


def test_secrets_in_open_options_are_refused() -> None:
    opts = {"backend_kwargs": {"storage_options": {"secret": "abcd1234"}}}
    with pytest.raises(
        RequestError, match=r"open_options\.backend_kwargs\.storage_options\.secret"
    ):
        check_no_secrets("s3://bucket/a.zarr", {}, opts)


def test_urls_with_credentials_are_refused() -> None:
    with pytest.raises(RequestError, match=r"https://\*\*\*@host"):
        check_no_secrets("https://me:pw1234@host/a.json", {})
    with pytest.raises(RequestError, match=r"X-Amz-Signature=\*\*\*"):
        build_request(
            data_uri="https://host/a.json?X-Amz-Signature=deadbeef", cache_store="/tmp/x.zarr"
        )


def test_unknown_secret_field_is_not_echoed() -> None:
    with pytest.raises(RequestError, match=r"aws_secret_access_key='\*\*\*'") as e:
        build_request(data_uri="s3://b/a.json", cache_store="/tmp/x", aws_secret_access_key="zz99")
    assert "zz99" not in str(e.value)


def test_redaction() -> None:
    assert redact_url("s3://bucket/key.nc") == "s3://bucket/key.nc"
    assert redact_url("https://u:p@h/x?token=1&page=2") == "https://***@h/x?token=***&page=2"
    assert redact({"s3": {"secret": "x", "key": "${K}", "endpoint_url": "http://a:b@h"}}) == {
        "s3": {"secret": "***", "key": "${K}", "endpoint_url": "http://***@h"}
    }


def test_env_references_expand_where_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVE_TOKEN", "tok-5678")
    opts = {"https": {"headers": {"Authorization": "Bearer ${ARCHIVE_TOKEN}"}}}
    assert expand_env(user_options(opts, "http"))["headers"]["Authorization"] == "Bearer tok-5678"
    # A referenced value is a secret from now on: masked in text and log records.
    assert redact_text("sent tok-5678") == "sent ***"
    with pytest.raises(RequestError, match="NOT_SET_ANYWHERE, which is not set"):
        expand_env({"key": "${NOT_SET_ANYWHERE}"})


def test_options_per_protocol_or_flat() -> None:
    per = {"s3": {"endpoint_url": "http://e"}, "https": {"headers": {"X": "1"}}}
    assert user_options(per, "s3") == {"endpoint_url": "http://e"}
    assert user_options(per, "http") == {"headers": {"X": "1"}}  # http shares https's
    assert user_options({"anon": True}, "s3") == {"anon": True}  # flat: for every protocol
    s3 = fsspec_options(per, "s3", concurrency=3, retries=4)
    assert s3["config_kwargs"] == {
        "retries": {"max_attempts": 5, "mode": "standard"},
        "max_pool_connections": 3,
    }
    http = fsspec_options(per, "https", concurrency=3, retries=4)
    assert http["client_kwargs"] == {"zp_retries": 4, "zp_concurrency": 3}


def test_log_records_lose_secret_values(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-example")
    install_log_redaction()
    caplog.set_level(logging.INFO)
    logging.getLogger("some.library").info(
        "signing with %s for %s", "wJalrXUtnFEMI-example", "https://u:pw@h/x"
    )
    assert "wJalrXUtnFEMI" not in caplog.text and ":pw@" not in caplog.text
    assert "signing with *** for https://***@h/x" in caplog.text


def test_s3_without_s3fs_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # s3fs is installed here; an install without the [s3] extra lacks it. A None entry in
    # sys.modules makes Python's import of s3fs fail as a missing package does.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(RequestError) as e:
        build_request(data_uri="s3://bucket/era5_*.nc", cache_store=str(tmp_path / "c.zarr"))
    assert e.value.parameter == "data_uri"
    assert e.value.fix == "pip install 'zarr-parallel[s3]'"
    assert "s3fs" in str(e.value)
    # A kerchunk reference (here a local one) to files on S3: refused where they would be opened.
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"version": 1, "refs": {"t2m/0": ["s3://bucket/a.nc", 0, 8]}}))
    req = build_request(data_uri=str(refs), cache_store=str(tmp_path / "c.zarr"))
    with pytest.raises(RequestError) as e:
        open_references(json.loads(refs.read_text()), req)
    assert e.value.fix == "pip install 'zarr-parallel[s3]'"
    # Other protocols need no extra.
    build_request(data_uri="https://host/era5.nc", cache_store=str(tmp_path / "c.zarr"))
