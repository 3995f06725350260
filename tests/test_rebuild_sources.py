"""Manifests and Skaffold configs read into batch entries; pacing (no services needed)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildfleet.rebuild.command import Sources, make_plan
from buildfleet.rebuild.gitread import GitReader
from buildfleet.rebuild.manifest import load_manifest
from buildfleet.rebuild.pacing import Pacer, longest_first
from buildfleet.rebuild.plan import Plan, SourceError
from buildfleet.rebuild.skaffold import SkaffoldOptions, load_skaffold
from buildfleet.rebuild.trees import LocalTree, Tree
from producer.contract import JibRecipe, LocalSource


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# --- manifests ----------------------------------------------------------------------------

GOOD = """
    [defaults]
    build_args = { BASE = "registry.local/base:1" }

    [[build]]
    source = { type = "git", url = "git://forge/app.git", ref = "main" }
    images = ["registry.local/app:nightly"]
"""


LOCAL = '[[build]]\nsource = { type = "local", path = "/x" }\n'


@pytest.mark.parametrize(
    ("extra", "where", "message"),
    [
        (LOCAL + "images = [7]\n", ":10:", "$.images[0]"),
        (LOCAL + 'imagez = ["a"]\n', ":10:", "imagez: no such field"),
        (
            '[[build]]\nid = "mine"\nsource = { type = "local", path = "/x" }\n',
            ":9:",
            "id: a batch",
        ),
        (LOCAL + 'images = ["a"]\npriority = "interactive"\n', ":11:", "batch priority"),
        ('[[build]]\nimages = ["a"]\n\n[build.source]\ntype = "ftp"\n', ":11:", "$.source"),
        (LOCAL + 'images = ["a"]\ndockerfile = "../x"\n', ":11:", "relative path"),
    ],
)
def test_a_bad_entry_names_the_file_the_line_and_the_field(
    tmp_path: Path, extra: str, where: str, message: str
) -> None:
    manifest = write(tmp_path / "nightly.toml", GOOD + "\n" + extra)
    with pytest.raises(SourceError) as refused:
        load_manifest(manifest)
    text = str(refused.value)
    assert text.startswith(f"{manifest}{where}"), text
    assert "build #2" in text and message in text


def test_a_bad_default_names_its_own_line_and_bad_toml_its_position(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "m.toml", GOOD.replace("build_args =", "submitted_at = 1\n    build_args =")
    )
    with pytest.raises(SourceError, match=r"m\.toml:2: defaults: submitted_at"):
        load_manifest(manifest)
    broken = write(tmp_path / "broken.toml", "[[build]]\nimages = [1,,]\n")
    with pytest.raises(SourceError, match=r"broken\.toml: not valid TOML .*line 2"):
        load_manifest(broken)
    with pytest.raises(SourceError, match=r"empty\.toml: build: expected one or more"):
        load_manifest(write(tmp_path / "empty.toml", "[defaults]\npush = false\n"))


def test_defaults_reach_every_entry_and_every_entry_builds_at_batch_priority(
    tmp_path: Path,
) -> None:
    [entry] = load_manifest(write(tmp_path / "m.toml", GOOD))
    assert entry.request.build_args == {"BASE": "registry.local/base:1"}
    assert entry.request.priority == "batch"
    assert entry.origin == f"{tmp_path / 'm.toml'}:4"


# --- Skaffold -----------------------------------------------------------------------------

APP = """
    apiVersion: skaffold/v4beta11
    kind: Config
    metadata:
      name: app
    requires:
      - path: ./lib
        configs: [lib]
        activeProfiles:
          - name: fast
            activatedBy: [prod]
    build:
      artifacts:
        - image: web
          context: web
          docker:
            dockerfile: Dockerfile.web
            buildArgs:
              DEBUG: 1
              VERSION: 1.10
              FLAG: true
              FROM_ENV:
            cacheFrom: [registry.local/web:cache]
        - image: api
          jib:
            project: api
    profiles:
      - name: prod
        build:
          artifacts:
            - image: web
              context: web
              docker:
                target: release
        patches:
          - op: add
            path: /build/artifacts/0/docker/buildArgs
            value: {MODE: prod}
    ---
    apiVersion: skaffold/v4beta13
    kind: Config
    metadata:
      name: worker
    build:
      artifacts:
        - image: registry.other/x/worker
          kaniko:
            cache: {repo: registry.local/cache}
"""

LIB = """
    apiVersion: skaffold/v4beta5
    kind: Config
    metadata:
      name: lib
    build:
      artifacts:
        - image: lib
    profiles:
      - name: fast
        build:
          artifacts:
            - image: lib
              docker: {target: fast}
    ---
    apiVersion: skaffold/v4beta5
    kind: Config
    metadata:
      name: not-required
    build:
      artifacts:
        - image: never
"""


async def _no_git(url: str, ref: str) -> Tree:
    raise AssertionError("no remote config here")


def load(path: Path, *profiles: str, tag: str | None = None) -> tuple[Plan, set[str]]:
    options = SkaffoldOptions(profiles=profiles, default_repo="registry.local/acme", tag=tag)
    return asyncio.run(load_skaffold(LocalTree(), str(path), options, _no_git))


def test_documents_requires_and_builders_become_entries_and_skips(tmp_path: Path) -> None:
    config = write(tmp_path / "skaffold.yaml", APP)
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    plan, profiles = load(config)
    assert profiles == {"prod", "fast"}
    built = {e.name: e.request for e in plan.entries}
    assert list(built) == [
        "registry.local/acme/lib:latest",
        "registry.local/acme/web:latest",
        "registry.local/acme/api:latest",
        "registry.other/x/worker:latest",
    ]
    web = built["registry.local/acme/web:latest"]
    assert web.source == LocalSource(path=str(tmp_path / "web"))
    assert web.dockerfile == "Dockerfile.web"
    # Scalars stay the text written (YAML 1.2 as Skaffold decodes it); a null value is unset.
    assert web.build_args == {"DEBUG": "1", "VERSION": "1.10", "FLAG": "true"}
    assert web.cache.import_refs == ("registry.local/web:cache",)
    worker = built["registry.other/x/worker:latest"]
    assert worker.cache.export_ref == "registry.local/cache"
    api = built["registry.local/acme/api:latest"]
    assert api.recipe == JibRecipe(tool="maven", module="api")
    assert api.source == LocalSource(path=str(tmp_path)) and api.context == "."
    assert plan.refused == []


JIB_ARTIFACT = """
apiVersion: skaffold/v4beta13
kind: Config
build:
  artifacts:
    - image: api
      context: services
      jib:
{jib}
"""


def test_a_jib_artifact_becomes_a_jib_recipe_request(tmp_path: Path) -> None:
    jib = "        project: api/server\n        type: gradle\n        fromImage: base.local/jre:17"
    config = write(tmp_path / "skaffold.yaml", JIB_ARTIFACT.replace("{jib}", jib))
    plan, _ = load(config)
    [entry] = plan.entries
    assert entry.request.source == LocalSource(path=str(tmp_path / "services"))
    assert entry.request.recipe == JibRecipe(
        tool="gradle", module="api/server", base_image="base.local/jre:17"
    )


@pytest.mark.parametrize(
    ("jib", "reason"),
    [
        ("        args: [-Dexec=rm]", "args ['-Dexec=rm'] would reach Maven unvalidated"),
        ("        project: com.example:api", "selects a module by artifact id"),
    ],
    ids=["args", "artifact-id"],
)
def test_a_jib_artifact_the_fleet_cannot_build_safely_is_skipped_saying_why(
    tmp_path: Path, jib: str, reason: str
) -> None:
    config = write(tmp_path / "skaffold.yaml", JIB_ARTIFACT.replace("{jib}", jib))
    plan, _ = load(config)
    [skipped] = plan.refused
    assert plan.entries == [] and skipped.status == "skipped"
    assert reason in skipped.reason and skipped.origin == f"{config}:5"


@pytest.mark.parametrize(
    ("jib", "error"),
    [
        ("        project: ../outside", r"jib: Expected a relative module path inside"),
        ("        project: -Dx=y", r"jib.project: Expected `str` matching regex"),
        ("        fromImage: 'FROM busybox'", r"jib.fromImage: Expected `str` matching"),
        ("        type: ant", r"jib.type: Invalid enum value 'ant'"),
    ],
    ids=["escaping-module", "option-module", "bad-base-image", "unknown-tool"],
)
def test_a_jib_artifact_with_hostile_fields_is_an_error_naming_its_line(
    tmp_path: Path, jib: str, error: str
) -> None:
    config = write(tmp_path / "skaffold.yaml", JIB_ARTIFACT.replace("{jib}", jib))
    with pytest.raises(SourceError, match=rf"skaffold.yaml:[89]: {error}"):
        load(config)


def test_a_profile_overlays_patches_and_activates_profiles_of_required_configs(
    tmp_path: Path,
) -> None:
    config = write(tmp_path / "skaffold.yaml", APP)
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    plan, _ = load(config, "prod", tag="nightly")
    built = {e.name: e.request for e in plan.entries}
    web = built["registry.local/acme/web:nightly"]
    assert (web.target, web.build_args) == ("release", {"MODE": "prod"})
    assert built["registry.local/acme/lib:nightly"].target == "fast"  # activeProfiles
    assert plan.refused == []  # the profile's artifact list replaced the jib artifact


@pytest.mark.parametrize(
    ("version", "hint"),
    [
        ("skaffold/v2beta29", "skaffold fix"),
        ("skaffold/v4beta14", "newer"),
        ("skaffold/v5", "newer"),
    ],
)
def test_older_and_newer_api_versions_are_refused_naming_what_is_read(
    tmp_path: Path, version: str, hint: str
) -> None:
    config = write(tmp_path / "skaffold.yaml", APP.replace("skaffold/v4beta13", version))
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    with pytest.raises(SourceError) as refused:
        load(config)
    text = str(refused.value)
    assert text.startswith(f"{config}:39: apiVersion: '{version}' is not supported"), text
    assert hint in text and "skaffold/v4beta1 to skaffold/v4beta13" in text


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (
            lambda t: t.replace("cacheFrom: [registry.local/web:cache]", "cacheFrom: {a: b}"),
            ":22: build.artifacts[0].docker.cacheFrom: Expected `array`, got `object`",
        ),
        (
            lambda t: t.replace("    - image: api\n", "    - imagez: api\n"),
            ":23: build.artifacts[1]: Object missing required field `image`",
        ),
        (
            lambda t: t.replace("VERSION: 1.10\n", "VERSION: 1.10\n          DEBUG: 2\n"),
            ":20: key 'DEBUG' already defined at line 18",
        ),
        (
            lambda t: t.replace("dockerfile: Dockerfile.web", "dockerfile: ../escape"),
            ":16: docker.dockerfile: Expected a relative path",
        ),
        (
            lambda t: t.replace("  name: app\n", "  name: app\n  bad: [\n"),
            ":7: expected the node content",
        ),
        (
            lambda t: t.replace("requires:", "requires: &loop\n  - *loop\n  -", 1),
            ":5: an alias refers to a value containing it",
        ),
    ],
)
def test_a_bad_config_names_the_file_the_line_and_the_field(
    tmp_path: Path, mangle: object, expected: str
) -> None:
    assert callable(mangle)
    config = write(tmp_path / "skaffold.yaml", mangle(textwrap.dedent(APP).lstrip()))
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    with pytest.raises(SourceError) as refused:
        load(config)
    assert str(refused.value).startswith(f"{config}{expected}"), str(refused.value)


def test_aliases_that_expand_without_end_are_refused(tmp_path: Path) -> None:
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        laughs.append(f"{name}: &{name} [{', '.join(['*' + previous] * 10)}]")
    config = write(
        tmp_path / "skaffold.yaml", "apiVersion: skaffold/v4beta13\n" + "\n".join(laughs)
    )
    with pytest.raises(SourceError, match="more than 200000 values"):
        load(config)


def test_a_requires_of_a_missing_config_or_profile_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    config = write(tmp_path / "skaffold.yaml", APP.replace("configs: [lib]", "configs: [nope]"))
    with pytest.raises(SourceError, match=r"lib/skaffold\.yaml: no config named 'nope'"):
        load(config)


# --- pacing -------------------------------------------------------------------------------


@settings(deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50_000),
    gaps=st.lists(st.floats(min_value=0, max_value=0.2), min_size=1, max_size=200),
    wanted=st.integers(min_value=1, max_value=800),
)
def test_no_window_holds_more_than_rate_times_its_length_plus_the_burst(
    rate: float, gaps: list[float], wanted: int
) -> None:
    """However the caller is held up, submissions never outrun the rate."""
    pacer = Pacer(rate, now=0.0)
    now, times = 0.0, []
    for gap in gaps:
        now += gap
        count = min(pacer.allowance(now), wanted)
        pacer.took(count, now)
        times += [now] * count
        now += pacer.wait_s(now) if count == 0 else 0.0
    # For every pair i <= j: j - i + 1 <= (t_j - t_i) * rate + burst, i.e.
    # g(j) - g(i) <= burst - 1 with g(k) = k - t_k * rate: check against the lowest g so far.
    lowest = float("inf")
    for index, at in enumerate(times):
        g = index - at * rate
        lowest = min(lowest, g)
        assert g - lowest <= pacer.burst - 1 + 1e-6 * max(1.0, rate)


def test_a_pacer_lets_a_steady_caller_go_at_the_rate() -> None:
    pacer = Pacer(10.0, now=0.0)
    now, sent = 0.0, 0
    while now < 10.0:
        count = pacer.allowance(now)
        pacer.took(count, now)
        sent += count
        now += max(pacer.wait_s(now), 0.001)
    assert 99 <= sent <= 101


def test_longest_first_uses_known_durations_and_the_median_for_the_rest() -> None:
    durations = {"a": 1.0, "b": 10.0, "c": 5.0}
    items = ["a", "unknown", "b", "c"]
    # "unknown" counts as the median (5 s) and, tied with c, keeps its place before it.
    assert longest_first(items, str, durations) == ["b", "unknown", "c", "a"]
    assert longest_first(items, str, {}) == items


def test_a_profile_no_config_defines_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "skaffold.yaml", APP)
    write(tmp_path / "lib" / "skaffold.yaml", LIB)
    manifest = write(tmp_path / "m.toml", GOOD)
    reader = GitReader(tmp_path / "git")

    def plan(*paths: Path, profile: str) -> Plan:
        sources = Sources(
            paths=tuple(map(str, paths)), skaffold=SkaffoldOptions(profiles=(profile,))
        )
        return asyncio.run(make_plan(sources, reader))

    with pytest.raises(SourceError, match="--profile nope: no Skaffold config read defines it"):
        plan(config, profile="nope")
    with pytest.raises(SourceError, match="--profile prod: profiles are for Skaffold configs"):
        plan(manifest, profile="prod")
