"""Flags, their environment variables, and start-up refusals."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from predictor.server.request_limits import raise_grpc_message_limits, request_bytes_limit
from predictor.settings import Settings, build_parser

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> Settings:
    return Settings.from_args(build_parser().parse_args(list(argv)))


def test_defaults() -> None:
    settings = parse()
    assert settings.model_name == "qwen-vl"
    assert settings.model_dir == "/mnt/models"
    assert (settings.dtype, settings.device, settings.quantization) == ("auto", "auto", "none")


def test_environment_variables_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_VL_MAX_NEW_TOKENS_LIMIT", "300")
    monkeypatch.setenv("QWEN_VL_DEFAULT_PROMPT", "Caption this.")
    monkeypatch.setenv("QWEN_VL_MODEL_NAME", "captioner")
    monkeypatch.setenv("QWEN_VL_WARMUP", "false")
    settings = parse("--max_new_tokens_limit", "500")
    assert settings.max_new_tokens_limit == 500
    assert settings.default_prompt == "Caption this."
    assert settings.model_name == "captioner"
    assert settings.warmup is False


@pytest.mark.parametrize(
    "argv",
    [
        ("--max_new_tokens", "0"),
        ("--max_new_tokens", "2000"),  # above the limit of 1024
        ("--max_image_bytes", "-1"),
    ],
)
def test_inconsistent_limits_are_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        parse(*argv)


def test_choices_are_enforced() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantization", "2bit"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--generation_config", "greedy"])


def test_generation_config_defaults_to_auto_and_has_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse().generation_config == "auto"
    monkeypatch.setenv("QWEN_VL_GENERATION_CONFIG", "none")
    assert parse().generation_config == "none"
    assert parse("--generation_config", "auto").generation_config == "auto"


def test_grpc_limits_are_raised_to_fit_the_largest_request() -> None:
    settings = Settings(max_images_per_request=4, max_image_bytes=10 * 1024 * 1024)
    kserve_args = argparse.Namespace(
        grpc_max_receive_message_length=8 * 1024 * 1024,
        grpc_max_send_message_length=8 * 1024 * 1024,
    )
    raise_grpc_message_limits(kserve_args, settings)
    assert kserve_args.grpc_max_receive_message_length == request_bytes_limit(settings)
    assert request_bytes_limit(settings) > 4 * 10 * 1024 * 1024


def run_predictor(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "predictor", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_missing_model_is_a_one_line_startup_error(tmp_path: Path) -> None:
    done = run_predictor("--model_dir", str(tmp_path / "missing"), "--http_port", "0")
    assert done.returncode == 2
    assert "cannot start: no checkpoint at --model_dir" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_several_workers_need_the_engine_process(tiny_qwen3_vl: Path) -> None:
    """Several fronts share one engine core; with the engine in the front there would be a
    model per front (tests/test_fronts.py runs two fronts)."""
    args = ("--model_dir", str(tiny_qwen3_vl), "--workers", "2", "--engine_process", "false")
    done = run_predictor(*args)
    assert done.returncode == 2
    assert "--workers above 1 needs --engine_process true" in done.stderr
    done = run_predictor("--model_dir", str(tiny_qwen3_vl), "--workers", "0")
    assert done.returncode == 2
    assert "--workers must be at least 1" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remote_image_allow_networks", "10.0.0.0/8,nonsense"], "not an address or CIDR"),
        (["--remote_image_max_redirects", "-1"], "--remote_image_max_redirects"),
        (["--http_max_header_bytes", "100"], "--http_max_header_bytes"),
        (["--http_body_timeout_s", "0"], "--http_body_timeout_s"),
    ],
)
def test_hardening_flags_are_checked(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_args(build_parser().parse_args(args))


def test_hardening_defaults_are_safe() -> None:
    settings = Settings.from_args(build_parser().parse_args([]))
    assert settings.enable_model_repository is False
    assert settings.remote_image_allow_networks == ()
    assert settings.remote_image_max_redirects == 0
    assert (settings.http_max_header_bytes, settings.http_header_timeout_s) == (65536, 10.0)
    assert settings.http_body_timeout_s == 60.0
