"""buildctl's rawjson progress, turned into Step and Log events."""

import base64
import json

from producer.contract import Log, Step
from worker.progress import TRUNCATION_MARKER, LogBudget, ProgressBuffer, ProgressParser

RUN = "sha256:" + "a" * 64
FROM = "sha256:" + "b" * 64


def line(**status: object) -> bytes:
    return json.dumps(status).encode() + b"\n"


def log_entry(vertex: str, text: str, stream: int = 1) -> dict[str, object]:
    return {
        "vertex": vertex,
        "stream": stream,
        "data": base64.b64encode(text.encode()).decode(),
        "timestamp": "2026-11-25T10:00:01.5Z",
    }


def test_vertices_merge_by_digest_and_emit_only_on_change() -> None:
    parser = ProgressParser("b1", attempt=2)
    started = {"digest": RUN, "name": "[2/2] RUN make", "started": "2026-11-25T10:00:00Z"}
    first = parser.feed(line(vertexes=[started]))
    again = parser.feed(line(vertexes=[started]))
    done = parser.feed(line(vertexes=[{**started, "completed": "2026-11-25T10:00:03Z"}]))
    assert [type(e) for e in first] == [Step]
    assert again == []
    [step] = done
    assert isinstance(step, Step)
    assert (step.build_id, step.attempt, step.name) == ("b1", 2, "[2/2] RUN make")
    assert step.completed is not None and step.started is not None
    assert step.completed - step.started == 3.0


def test_the_push_is_a_step_of_its_own_and_other_statuses_are_not() -> None:
    export = "sha256:" + "c" * 64
    pushing = {"id": "pushing layers", "vertex": export, "started": "2026-11-25T10:00:04Z"}
    manifest = "pushing manifest for 127.0.0.1:5000/app:1@sha256:" + "d" * 64
    parser = ProgressParser("b1", attempt=1)
    events = parser.feed(
        line(
            vertexes=[
                {"digest": export, "name": "exporting to image", "started": "2026-11-25T10:00:03Z"}
            ],
            statuses=[
                {"id": "exporting layers", "vertex": export, "started": "2026-11-25T10:00:03Z"},
                {**pushing, "current": 1, "total": 4},
            ],
        )
    )
    assert [e.name for e in events if isinstance(e, Step)] == [
        "exporting to image",
        "pushing layers",
    ]
    # Progress within a push status changes nothing a step shows; its end does.
    assert parser.feed(line(statuses=[{**pushing, "current": 3, "total": 4}])) == []
    [done, second] = parser.feed(
        line(
            statuses=[
                {**pushing, "completed": "2026-11-25T10:00:05Z"},
                {"id": manifest, "vertex": export, "started": "2026-11-25T10:00:05Z",
                 "completed": "2026-11-25T10:00:05.5Z"},
            ]
        )
    )  # fmt: skip
    assert isinstance(done, Step) and isinstance(second, Step)
    assert (done.vertex, done.name) == (f"{export}/pushing layers", "pushing layers")
    assert done.started is not None and done.completed is not None
    assert done.completed - done.started == 1.0
    assert second.name == manifest and second.vertex != done.vertex


def test_cached_steps_are_marked() -> None:
    parser = ProgressParser("b1", attempt=1)
    [step] = parser.feed(line(vertexes=[{"digest": FROM, "name": "[1/2] FROM x", "cached": True}]))
    assert isinstance(step, Step) and step.cached


def test_logs_are_decoded_and_the_failing_step_keeps_its_tail() -> None:
    parser = ProgressParser("b1", attempt=1, tail_lines=2)
    parser.feed(line(vertexes=[{"digest": RUN, "name": "[2/2] RUN ./test"}]))
    [log] = parser.feed(line(logs=[log_entry(RUN, "one\ntwo\nthree\n", stream=2)]))
    assert isinstance(log, Log) and log.text == "one\ntwo\nthree\n" and log.stream == 2
    parser.feed(line(vertexes=[{"digest": RUN, "name": "[2/2] RUN ./test", "error": "exit 3"}]))
    failed = parser.failed_step
    assert failed is not None and failed.name == "[2/2] RUN ./test"
    assert parser.log_tail(RUN) == ("two", "three")


def test_lines_that_are_not_json_are_kept_as_buildctl_output() -> None:
    parser = ProgressParser("b1", attempt=1)
    assert parser.feed(b"error: failed to solve: something\n") == []
    assert list(parser.other_output) == ["error: failed to solve: something"]


def test_the_log_budget_truncates_once_with_a_marker() -> None:
    budget = LogBudget(cap_bytes=10)
    assert budget.admit(Log(build_id="b", text="12345")) is not None
    marker = budget.admit(Log(build_id="b", text="1234567890"))
    assert marker is not None and "truncated" in marker.text
    assert budget.admit(Log(build_id="b", text="more")) is None
    assert budget.dropped == 14


def _step(vertex: str, **fields: object) -> Step:
    fields = {"name": f"step {vertex}", **fields}
    return Step(build_id="b", attempt=1, at=0.0, vertex=vertex, **fields)  # type: ignore[arg-type]


def test_a_step_that_started_and_completed_between_two_flushes_goes_out_once() -> None:
    buffer = ProgressBuffer()
    buffer.add(_step("a", started=1.0))
    buffer.add(_step("b", started=1.5))
    buffer.add(_step("a", started=1.0, completed=2.0))
    assert buffer.flush() == [_step("b", started=1.5), _step("a", started=1.0, completed=2.0)]
    assert not buffer
    assert buffer.flush() == []


def test_a_step_whose_state_did_not_change_is_not_published_again() -> None:
    buffer = ProgressBuffer()
    buffer.add(_step("push", started=1.0))
    buffer.flush()
    buffer.add(_step("push", name="pushing layers", started=1.5))  # progress only
    assert buffer.flush() == []
    buffer.add(_step("push", started=1.0, completed=3.0))
    buffer.add(_step("bad", started=1.0, completed=2.0, error="exit code 1"))
    assert [(s.vertex, s.completed) for s in buffer.flush() if isinstance(s, Step)] == [
        ("push", 3.0),
        ("bad", 2.0),
    ]


def test_log_lines_of_one_vertex_and_stream_go_out_as_one_log_in_order() -> None:
    buffer = ProgressBuffer()
    for text, vertex, stream in [
        ("a1\n", "a", 1),
        ("e\n", "a", 2),
        ("a2\n", "a", 1),
        ("b\n", "b", 1),
    ]:
        buffer.add(Log(build_id="b", attempt=1, vertex=vertex, stream=stream, text=text))  # type: ignore[arg-type]
    logs = buffer.flush()
    assert [(log.vertex, log.stream, log.text) for log in logs if isinstance(log, Log)] == [
        ("a", 1, "a1\na2\n"),
        ("a", 2, "e\n"),
        ("b", 1, "b\n"),
    ]


def test_the_truncation_marker_is_a_log_of_its_own_after_what_was_admitted() -> None:
    budget, buffer = LogBudget(cap_bytes=8), ProgressBuffer()
    for text in ("line-1\n", "line-2\n", "line-3\n"):  # builders without vertices: all None
        if (admitted := budget.admit(Log(build_id="b", attempt=1, text=text))) is not None:
            buffer.add(admitted)
    assert [log.text for log in buffer.flush() if isinstance(log, Log)] == [
        "line-1\n",
        TRUNCATION_MARKER,
    ]


def test_steps_go_out_in_the_order_they_ran_not_the_order_buildkit_listed_them() -> None:
    buffer = ProgressBuffer()
    for vertex in ("run", "copy", "from"):  # BuildKit's first status: every vertex, unstarted
        buffer.add(_step(vertex))
    buffer.add(_step("from", started=1.0, completed=1.1))
    buffer.add(_step("copy", started=1.1, completed=1.2))
    buffer.add(_step("run", started=1.2))
    buffer.add(Log(build_id="b", attempt=1, vertex="run", text="hello\n"))
    buffer.add(_step("run", started=1.2, completed=1.5))
    assert [(e.vertex, type(e).__name__) for e in buffer.flush()] == [
        ("from", "Step"),
        ("copy", "Step"),
        ("run", "Log"),
        ("run", "Step"),
    ]
