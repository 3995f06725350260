"""The message contract: validation names the field, old and new messages still decode."""

import msgspec
import pytest

from producer import jobcodec
from producer.contract import (
    BuildRequest,
    BuildResult,
    ContractError,
    GitSource,
    JibRecipe,
    Log,
    Succeeded,
    decode_event,
    decode_request,
    encode,
    is_terminal,
    request_from_builtins,
    result_of,
)

GIT = {"type": "git", "url": "git://127.0.0.1/app.git", "ref": "main"}


def test_a_request_round_trips_and_gets_a_time_ordered_id() -> None:
    first = request_from_builtins({"source": GIT, "images": ["reg/app:1"]})
    second = request_from_builtins({"source": GIT, "images": ["reg/app:1"]})
    assert decode_request(encode(first)) == first
    assert first.id != second.id
    assert first.id.split("-")[0] <= second.id.split("-")[0]  # milliseconds first


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"images": ["Not/Lower"]}, "$.images[0]"),
        ({"dockerfile": "../../etc/passwd"}, "$.dockerfile"),
        ({"context": "/abs"}, "$.context"),
        ({"source": {"type": "svn", "url": "x"}}, "$.source.type"),
        ({"source": {**GIT, "ref": "--upload-pack=evil"}}, "$.source.ref"),
        ({"source": {**GIT, "commit": "not-a-sha"}}, "$.source.commit"),
        ({"build_args": {"A=B": "c"}}, "$.build_args"),
        ({"priority": "urgent"}, "$.priority"),
        ({"timeout_s": 0}, "$.timeout_s"),
        ({"images": []}, "$.images"),
    ],
)
def test_a_bad_field_is_refused_with_its_path(patch: dict[str, object], names: str) -> None:
    with pytest.raises(ContractError) as caught:
        request_from_builtins({"source": GIT, "images": ["reg/app:1"], **patch})
    assert names in str(caught.value)


def test_a_message_from_a_newer_producer_is_still_read() -> None:
    newer = b'{"source": {"type": "git", "url": "git://h/r.git", "lfs": true},'
    newer += b' "images": ["reg/r:1"], "sbom": {"format": "spdx"}}'
    request = decode_request(newer)
    assert request.source == GitSource(url="git://h/r.git")


def test_a_message_from_an_older_producer_gets_defaults() -> None:
    request = decode_request(b'{"source": {"type": "local", "path": "/src"}, "push": false}')
    assert request.priority == "interactive"
    assert request.build_args == {}


def test_terminal_events_carry_the_result() -> None:
    result = BuildResult(build_id="b1", status="succeeded", digest="sha256:" + "0" * 64)
    event = decode_event(encode(Succeeded(build_id="b1", result=result)))
    assert is_terminal(event)
    assert result_of(event) == result
    log = decode_event(encode(Log(build_id="b1", text="hello")))
    assert not is_terminal(log)
    assert result_of(log) is None


def test_the_cache_key_is_the_repository_and_dockerfile() -> None:
    a = request_from_builtins({"source": GIT, "images": ["r/a:1"], "dockerfile": "a.Dockerfile"})
    b = request_from_builtins(
        {"source": {**GIT, "ref": "dev"}, "images": ["r/b:1"], "dockerfile": "a.Dockerfile"}
    )
    c = request_from_builtins({"source": GIT, "images": ["r/a:1"]})
    assert a.cache_key == b.cache_key != c.cache_key


@pytest.mark.parametrize("label", ["", "x" * 300, "y" * 70_000])  # each msgpack length size
def test_a_job_envelope_around_its_request_is_the_envelope(label: str) -> None:
    request = BuildRequest(
        source=GitSource(url="git://h/r.git"), images=("r/x:1",), labels={"l": label}
    )
    request_json = encode(request)
    head, tail = jobcodec.envelope_around(request_json, 7)
    assert head + request_json + tail == jobcodec.build_envelope(request_json, 7)


def test_the_job_envelope_is_msgpack_and_garbage_still_reaches_the_worker() -> None:
    request = BuildRequest(source=GitSource(url="git://h/r.git"), images=("r/x:1",))
    envelope = jobcodec.deserialize(jobcodec.build_envelope(encode(request), 0, attempt=3))
    assert envelope["f"] == jobcodec.BUILD_FUNCTION
    assert envelope["a"] == [encode(request), 3, [], 0.0]
    garbage = jobcodec.deserialize(b"\x80\x04pickle?")
    assert garbage["f"] == jobcodec.BUILD_FUNCTION
    assert garbage["a"] == [b"\x80\x04pickle?"]
    with pytest.raises(ContractError):
        decode_request(garbage["a"][0])
    # msgpack, not pickle: an exception in a result is carried as its repr.
    assert msgspec.msgpack.decode(jobcodec.serialize({"r": ValueError("x")})) == {
        "r": "ValueError('x')"
    }


JIB = {"type": "jib", "tool": "maven", "module": "services/api"}


def test_a_jib_recipe_round_trips_and_keys_the_cache_by_its_module() -> None:
    request = request_from_builtins(
        {"source": GIT, "images": ["reg/api:1"], "recipe": {**JIB, "main_class": "a.b.Main"}}
    )
    assert request.recipe == JibRecipe(module="services/api", main_class="a.b.Main")
    assert decode_request(encode(request)) == request
    assert request.recipe_kind == "jib"
    assert request.cache_key.endswith("::jib:services/api")


@pytest.mark.parametrize(
    ("recipe", "names"),
    [
        ({**JIB, "module": "../outside"}, "relative module path"),
        ({**JIB, "module": "/abs"}, "$.recipe.module"),
        ({**JIB, "module": "-Dmaven.repo.local=/"}, "$.recipe.module"),
        ({**JIB, "module": "a b"}, "$.recipe.module"),
        ({**JIB, "main_class": "a.B -Dx=y"}, "$.recipe.main_class"),
        ({**JIB, "main_class": "a;rm -rf /"}, "$.recipe.main_class"),
        ({**JIB, "base_image": "busybox,type=local"}, "$.recipe.base_image"),
        ({**JIB, "tool": "ant"}, "$.recipe.tool"),
        ({**JIB, "mainClass": "a.B"}, "unknown field `mainClass`"),
        ({**JIB, "type": "bazel"}, "$.recipe"),
    ],
    ids=[
        "escaping-module", "absolute-module", "option-module", "space-module",
        "option-main-class", "shell-main-class", "option-base-image", "unknown-tool",
        "misspelt-field", "unknown-recipe",
    ],
)  # fmt: skip
def test_a_hostile_jib_recipe_is_refused_naming_the_field(
    recipe: dict[str, str], names: str
) -> None:
    with pytest.raises(ContractError) as caught:
        request_from_builtins({"source": GIT, "images": ["reg/app:1"], "recipe": recipe})
    assert names in str(caught.value)


@pytest.mark.parametrize(
    "patch",
    [{"dockerfile": "Other.Dockerfile"}, {"target": "release"}, {"build_args": {"A": "1"}}],
    ids=["dockerfile", "target", "build-args"],
)
def test_a_jib_request_with_dockerfile_fields_is_refused(patch: dict[str, object]) -> None:
    field = next(iter(patch))
    with pytest.raises(ContractError, match=f"jib recipe builds no Dockerfile: drop `{field}`"):
        request_from_builtins({"source": GIT, "images": ["r/a:1"], "recipe": JIB, **patch})
