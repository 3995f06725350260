"""The configuration file: validated at start-up, overridable from the environment."""

from pathlib import Path

import pytest

from buildfleet.config import ConfigError, load_config

EXAMPLE = Path(__file__).parent.parent / "config" / "buildfleet.toml"


def test_the_example_configuration_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.buildkit.daemons[0].max_builds == 4
    assert config.worker.backend == "buildkit"


def test_environment_variables_override_the_file() -> None:
    config = load_config(
        EXAMPLE,
        environ={
            "BUILDFLEET_REDIS_URL": "redis://elsewhere:6380/1",
            "BUILDFLEET_WORKER_CONCURRENCY": "3",
            "BUILDFLEET_BUILDKIT_DAEMONS": '[{"address": "tcp://a:1", "max_builds": 2}]',
        },
    )
    assert config.redis.url == "redis://elsewhere:6380/1"
    assert config.worker.concurrency == 3
    assert [d.address for d in config.buildkit.daemons] == ["tcp://a:1"]


def test_an_error_names_the_file_the_field_and_what_was_expected(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text("[worker]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match=r"fleet\.toml.*>= 1.*\$\.worker\.concurrency"):
        load_config(bad, environ={})


def test_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text("[worker]\nconcurency = 4\n")
    with pytest.raises(ConfigError, match="concurency"):
        load_config(bad, environ={})


def test_a_bad_json_override_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="BUILDFLEET_BUILDKIT_DAEMONS"):
        load_config(None, environ={"BUILDFLEET_BUILDKIT_DAEMONS": "[{oops"})
