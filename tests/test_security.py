"""Credentials never reach logs, manifests, error rows or messages; weights are never unpickled beyond tensors
(tests/test_weights.py::test_pickle_with_code_is_refused_without_running_it); keys cannot name a path outside
OUTPUT (tests/test_bad_inputs.py, tests/test_schema.py::test_unsafe_ids_are_sanitised_and_hashed)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from pipeline_utils import PROMPTS, write_table
from processes import FEW_STEPS, karlo_env, run_generate

from pipeline import columns as C
from pipeline.redact import REDACTED, redact, secret_values, storage_error
from pipeline.stages import PriorStage

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLE-session-token-0123456789"
PASSWORD = "hunter2-is-not-a-password"


def test_redact_url_user_info_anywhere_in_a_text():
    text = f"GET https://alice:{PASSWORD}@example.com/x failed; retried s3://k:s@bucket/p and http://host/y"
    assert redact(text, ()) == "GET https://example.com/x failed; retried s3://bucket/p and http://host/y"


def test_redact_storage_option_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("SOME_API_KEY", "short")  # too short to be a credential: left alone
    options = {"key": "AKIAEXAMPLEKEYID", "secret": SECRET, "anon": False,
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "nested-token-value"}}
    found = secret_values(options)
    assert {SECRET, "AKIAEXAMPLEKEYID", "nested-token-value", TOKEN} <= found
    assert "http://127.0.0.1:9000" not in found and "short" not in found
    text = f"denied for AKIAEXAMPLEKEYID/{SECRET} with {TOKEN} and nested-token-value at http://127.0.0.1:9000"
    assert redact(text, found) == f"denied for {REDACTED}/{REDACTED} with {REDACTED} and {REDACTED} at " \
                                  "http://127.0.0.1:9000"
    assert storage_error(PermissionError(f"no access for {SECRET}"), options) == (
        f"PermissionError: no access for {REDACTED} (access denied: check the storage credentials and the "
        "permissions on this location)")


def test_stage_error_rows_and_logs_carry_no_credentials(tiny_model, monkeypatch, caplog):
    """A stage exception quoting credentials (as storage and HTTP errors do) is redacted in the error row and
    in the worker's log line."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stage = PriorStage(tiny_model, steps=2, skip_networks=True,
                       storage_options={"client_kwargs": {"aws_session_token": TOKEN}})

    def fail(*args, **kwargs):
        raise OSError(f"GET https://bob:{PASSWORD}@models.example/x: signed with {SECRET} and {TOKEN}")

    monkeypatch.setattr(stage.model, "prior_stage", fail)
    batch = {
        C.KEY: np.array(["k0", "k1"], dtype=object),
        C.PROMPT: np.array(PROMPTS[:2], dtype=object),
        C.SEED: np.array([1, 2]),
        C.NEGATIVE_PROMPT: np.array(["", ""], dtype=object),
        C.PRIOR_GUIDANCE_SCALE: np.array([4.0, 4.0]),
        C.DECODER_GUIDANCE_SCALE: np.array([8.0, 8.0]),
        C.ERROR: np.array(["", ""], dtype=object),
        C.ERROR_STAGE: np.array(["", ""], dtype=object),
    }
    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        out = stage(batch)
    expected = f"OSError: GET https://models.example/x: signed with {REDACTED} and {REDACTED}"
    assert list(out[C.ERROR]) == [expected, expected] and list(out[C.ERROR_STAGE]) == ["prior", "prior"]
    assert caplog.records and all(s not in caplog.text for s in (SECRET, TOKEN, PASSWORD))


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_no_credential_in_any_output_log_or_message(tmp_path, tiny_model, s3_bucket):
    """A real run with debug logging, S3 output, session credentials, an error row and a failing stage: the
    secret key and the session token appear in no line it prints, no object it writes (manifest, error rows,
    metadata, per-sample JSON) and no file of its Ray session's logs."""
    table = write_table(tmp_path / "t.parquet", id=["ok", "bad", "boom"], prompt=[PROMPTS[0], "", PROMPTS[1]])
    env = karlo_env(AWS_ENDPOINT_URL=s3_bucket.endpoint, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=TOKEN,
                    KARLO_FAULTS="prior:boom:raise")
    url = f"{s3_bucket.url}/out"
    # -v: debug logs from every library (botocore's request dumps, which show the session token, excepted).
    rc, output = run_generate([str(table), url, "--model", tiny_model, *FEW_STEPS], tmp_path / "run.log", env,
                              options=("-v",))
    assert rc == 3, output[-5000:]
    assert "DEBUG" in output and re.search(r"error rows\s+2", output)

    secrets = (SECRET.encode(), TOKEN.encode())
    assert not any(s.decode() in output for s in secrets)
    s3_bucket.fs.invalidate_cache()
    objects = s3_bucket.fs.find(url[5:])
    assert any(o.endswith("manifest.json") for o in objects) and any("/errors/" in o for o in objects)
    for o in objects:
        data = s3_bucket.fs.cat_file(o)
        assert not any(s in data for s in secrets), o
    session = re.search(r"Full logs are in (\S+?)/logs", output)
    assert session, output[-3000:]
    logs = _files(Path(session.group(1)) / "logs")
    assert logs
    for path in logs:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
