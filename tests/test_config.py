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


def test_worker_secrets_say_where_a_value_is_and_nothing_else(tmp_path: Path) -> None:
    good = tmp_path / "fleet.toml"
    good.write_text(
        '[[worker.secrets]]\nid = "npm"\nfile = "/run/secrets/npmrc"\n'
        '[[worker.secrets]]\nid = "tok"\nenv = "NPM_TOKEN"\n'
    )
    config = load_config(good, environ={})
    assert [(s.id, s.file, s.env) for s in config.worker.secrets] == [
        ("npm", "/run/secrets/npmrc", None),
        ("tok", None, "NPM_TOKEN"),
    ]
    from_env = load_config(
        None, environ={"BUILDFLEET_WORKER_SECRETS": '[{"id": "npm", "env": "NPM_TOKEN"}]'}
    )
    assert from_env.worker.secrets[0].env == "NPM_TOKEN"
    for entry, why in (
        ('id = "npm"', "exactly one of `file` or `env`"),
        ('id = "npm"\nfile = "/a"\nenv = "A"', "exactly one of `file` or `env`"),
        ('id = "npm"\nvalue = "hunter2"', "unknown field `value`"),
        ('id = "npm,src=/etc/passwd"\nfile = "/a"', "secrets[0].id"),
        ('id = "npm"\nfile = "relative"', "secrets[0].file"),
        ('id = "npm"\nfile = "/a,src=/etc/shadow"', "secrets[0].file"),
        ('id = "npm"\nenv = "A=B"', "secrets[0].env"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[[worker.secrets]]\n{entry}\n")
        with pytest.raises(ConfigError, match=r"\$\.worker\.secrets\[0\]") as caught:
            load_config(bad, environ={})
        assert why in str(caught.value), entry
    twice = tmp_path / "twice.toml"
    twice.write_text(
        '[[worker.secrets]]\nid = "a"\nenv = "A"\n[[worker.secrets]]\nid = "a"\nenv = "B"\n'
    )
    with pytest.raises(ConfigError, match="id 'a' appears more than once"):
        load_config(twice, environ={})
