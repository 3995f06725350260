"""Which images a Dockerfile builds FROM, read the way BuildKit's Dockerfile frontend reads it.
Pure: text in, stages out.

- Parser directives at the top (`# escape=`) set the escape character; it continues a line
  when it ends one; comment lines inside an instruction are dropped; the bodies of heredocs
  (`RUN <<EOF ... EOF`) are skipped, so a `FROM` inside one is not an instruction.
- `ARG`s before the first `FROM` are global: their defaults (which may use earlier ones),
  overridden by build args, are what `FROM` expands: `$X`, `${X}`, `${X:-default}`,
  `${X-default}`, `${X:+alt}`, `${X+alt}`, `${X#prefix}`, `${X%suffix}` (and `##`, `%%`).
  A name never declared expands to nothing, as in BuildKit.
- `FROM name` where `name` is an earlier stage (`AS name`, compared case-insensitively)
  builds on that stage rather than pulling an image.
- Only the stages the target (or else the last stage) needs are built: its FROM chain and
  the stages named by `COPY --from=` / `ADD --from=` and `RUN --mount=...,from=`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from buildfleet.rebuild.reference import ImageRef, ReferenceError, parse_reference

_DIRECTIVE: Final = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*?)\s*$")
_HEREDOC: Final = re.compile(r"^\d*<<(-?)([\"']?)([^<\"']+)\2$")
"""A word that opens a heredoc, as BuildKit tells one: `<<EOF`, `<<-EOF`, `<<"EOF"`, `3<<EOF`
(so `<<<` here-strings and `a<<b` inside a word are not)."""
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEREDOC_KEYWORDS: Final = frozenset({"RUN", "COPY", "ADD"})
_OPERATORS: Final = (":-", ":+", ":?", "-", "+", "?", "##", "#", "%%", "%")
PLATFORM_ARGS: Final = frozenset(
    {
        "BUILDPLATFORM", "BUILDOS", "BUILDARCH", "BUILDVARIANT",
        "TARGETPLATFORM", "TARGETOS", "TARGETARCH", "TARGETVARIANT",
    }
)  # fmt: skip
"""BuildKit's automatic ARGs: usable in FROM without a declaration (from build args here)."""


class DockerfileError(ValueError):
    """The Dockerfile cannot be read as BuildKit would; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


class ExpansionError(ValueError):
    """A `${...}` this reader does not expand, or one that BuildKit itself would refuse."""


@dataclass(frozen=True, slots=True)
class Instruction:
    line: int
    """Where the instruction starts (1-based)."""
    keyword: str
    """Upper case: FROM, ARG, RUN, ..."""
    args: str
    """Everything after the keyword, continuation lines joined."""


@dataclass(frozen=True, slots=True)
class Stage:
    index: int
    name: str | None
    line: int
    """Where its FROM is."""
    text: str
    """The FROM instruction as written (continuations joined)."""
    image: str
    """The FROM argument after ARG substitution: an image, `scratch`, or a stage's name."""
    parent: int | None
    """The stage it builds on, when `image` names an earlier stage."""
    needs: tuple[int, ...]
    """Every stage it needs: its parent and those it copies or mounts from."""
    problem: str | None = None
    """Why `image` could not be worked out (an unsupported or failing substitution)."""


@dataclass(frozen=True, slots=True)
class BaseUse:
    """One FROM of a stage the build needs that pulls an image."""

    stage: Stage
    ref: ImageRef | None
    problem: str | None = None

    def describe(self) -> str:
        what = str(self.ref) if self.ref is not None else self.stage.image or "(empty)"
        note = f" ({self.problem})" if self.problem else ""
        return f"line {self.stage.line}: {self.stage.text} -> {what}{note}"


# --- lines and instructions ---------------------------------------------------------------


def _directives(lines: Sequence[str]) -> tuple[str, int]:
    """The escape character, and the index of the first line after the parser directives."""
    escape = "\\"
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line.strip())
        if match is None:
            return escape, index
        if match.group(1).lower() == "escape":
            if match.group(2) not in ("\\", "`"):
                raise DockerfileError(index + 1, f"escape must be \\ or `, got {match.group(2)!r}")
            escape = match.group(2)
    return escape, len(lines)


def _skip_heredocs(args: str, escape: str, lines: Sequence[str], index: int) -> int:
    """Past the bodies of the heredocs `args` opens, which start at `lines[index]`."""
    for match in filter(None, map(_HEREDOC.match, split_words(args, escape))):
        strip_tabs, word = match.group(1) == "-", match.group(3)
        while index < len(lines):
            line = lines[index].lstrip("\t") if strip_tabs else lines[index]
            index += 1
            if line.rstrip("\r") == word:
                break
    return index


def instructions(text: str) -> Iterator[Instruction]:
    lines = text.splitlines()
    escape, index = _directives(lines)
    while index < len(lines):
        stripped = lines[index].strip()
        if not stripped or stripped.startswith("#"):
            index += 1
            continue
        start = index
        parts: list[str] = []
        while index < len(lines):
            line = lines[index].rstrip()
            index += 1
            if index - 1 > start and (not line.strip() or line.lstrip().startswith("#")):
                continue  # blank and comment lines inside an instruction are dropped
            if line.endswith(escape):
                parts.append(line[:-1])
                continue
            parts.append(line)
            break
        keyword, _, args = "".join(parts).strip().partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword in _HEREDOC_KEYWORDS and "<<" in args:
            index = _skip_heredocs(args, escape, lines, index)
        yield Instruction(start + 1, keyword, args)


# --- words and substitution ---------------------------------------------------------------


def split_words(args: str, escape: str = "\\") -> list[str]:
    """`args` split on unquoted whitespace, quotes and escapes kept (expand removes them)."""
    words: list[str] = []
    current: list[str] = []
    quote: str | None = None
    index = 0
    while index < len(args):
        char = args[index]
        if char == escape and quote != "'" and index + 1 < len(args):
            current.append(args[index : index + 2])
            index += 2
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char.isspace() and quote is None:
            if current:
                words.append("".join(current))
                current = []
            index += 1
            continue
        current.append(char)
        index += 1
    if current:
        words.append("".join(current))
    return words


def expand(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """`word` with its variables substituted and its quotes and escapes removed."""
    out: list[str] = []
    quote: str | None = None
    index = 0
    while index < len(word):
        char = word[index]
        if char == escape and quote != "'" and index + 1 < len(word):
            out.append(word[index + 1])
            index += 2
        elif char in "'\"" and quote in (None, char):
            quote = None if quote else char
            index += 1
        elif char == "$" and quote != "'":
            value, index = _variable(word, index + 1, env, escape)
            out.append(value)
        else:
            out.append(char)
            index += 1
    if quote is not None:
        raise ExpansionError(f"unterminated {quote} quote in {word!r}")
    return "".join(out)


def _variable(word: str, index: int, env: Mapping[str, str], escape: str) -> tuple[str, int]:
    if index < len(word) and word[index] == "{":
        end = _closing_brace(word, index)
        return _braced(word[index + 1 : end], env, escape), end + 1
    match = _NAME.match(word, index)
    if match is None:
        return "$", index
    return env.get(match.group(), ""), match.end()


def _closing_brace(word: str, start: int) -> int:
    depth = 0
    for index in range(start, len(word)):
        if word[index] == "{":
            depth += 1
        elif word[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    raise ExpansionError(f"missing }} in {word!r}")


def _braced(inner: str, env: Mapping[str, str], escape: str) -> str:
    match = _NAME.match(inner)
    if match is None:
        raise ExpansionError(f"bad substitution ${{{inner}}}")
    name, rest = match.group(), inner[match.end() :]
    value = env.get(name)
    if not rest:
        return value or ""
    operator = next((op for op in _OPERATORS if rest.startswith(op)), None)
    if operator is None:
        raise ExpansionError(f"unsupported substitution ${{{inner}}}")
    arg = expand(rest[len(operator) :], env, escape)
    match operator:
        case ":-":
            return value if value else arg
        case "-":
            return value if value is not None else arg
        case ":+":
            return arg if value else ""
        case "+":
            return arg if value is not None else ""
        case ":?" | "?":
            if value or (operator == "?" and value is not None):
                return value
            raise ExpansionError(f"{name}: {arg or 'parameter not set'}")
        case _:
            return _trim(value or "", operator, arg)


def _trim(value: str, operator: str, pattern: str) -> str:
    """`${X#p}`, `${X##p}`, `${X%p}`, `${X%%p}`: shortest/longest prefix/suffix removed."""
    cuts = range(len(value) + 1)
    if operator in ("##", "%%"):
        cuts = range(len(value), -1, -1)
    for cut in cuts:
        if operator.startswith("#") and fnmatch.fnmatchcase(value[:cut], pattern):
            return value[cut:]
        if operator.startswith("%") and fnmatch.fnmatchcase(value[len(value) - cut :], pattern):
            return value[: len(value) - cut]
    return value


# --- stages -------------------------------------------------------------------------------


def global_args(
    preamble: Sequence[Instruction], build_args: Mapping[str, str], escape: str
) -> dict[str, str]:
    """The values FROM lines see: declared global ARGs (defaults overridden by build args)
    and BuildKit's platform ARGs when given as build args."""
    env = {name: value for name, value in build_args.items() if name in PLATFORM_ARGS}
    for instruction in preamble:
        if instruction.keyword != "ARG":
            continue
        for word in split_words(instruction.args, escape):
            name, has_default, default = word.partition("=")
            if not _NAME.fullmatch(name):
                raise DockerfileError(instruction.line, f"ARG {word!r}: bad name")
            if name in build_args:
                env[name] = build_args[name]
            elif has_default:
                try:
                    env[name] = expand(default, env, escape)
                except ExpansionError as exc:
                    raise DockerfileError(instruction.line, str(exc)) from None
    return env


def _from_stage(
    instruction: Instruction, names: Mapping[str, int], env: Mapping[str, str], escape: str
) -> tuple[str, str | None, int | None, str | None]:
    """A FROM's (image, stage name, parent stage, problem)."""
    words = [w for w in split_words(instruction.args, escape) if not w.startswith("--")]
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
        raise DockerfileError(
            instruction.line, f"FROM {instruction.args!r}: expected [--platform=P] IMAGE [AS NAME]"
        )
    name = words[2].lower() if len(words) == 3 else None
    try:
        image = expand(words[0], env, escape)
    except ExpansionError as exc:
        return words[0], name, None, str(exc)
    return image, name, names.get(image.lower()), None


def _stage_refs(instruction: Instruction, escape: str) -> Iterator[str]:
    """What `COPY --from=`, `ADD --from=` and `RUN --mount=...,from=` name (unexpanded)."""
    for word in split_words(instruction.args, escape):
        if not word.startswith("--"):
            return
        flag, _, value = word[2:].partition("=")
        if flag == "from" and instruction.keyword in ("COPY", "ADD"):
            yield value
        elif flag == "mount" and instruction.keyword == "RUN":
            for option in value.split(","):
                key, _, option_value = option.partition("=")
                if key.strip() == "from":
                    yield option_value


def _stage_index(
    ref: str, names: Mapping[str, int], env: Mapping[str, str], escape: str, current: int
) -> int | None:
    """The earlier stage `ref` names (by name or number), None when it names an image."""
    try:
        value = expand(ref, env, escape).lower()
    except ExpansionError:
        return None
    if value in names:
        return names[value]
    if value.isdigit() and int(value) < current:
        return int(value)
    return None


def stages(text: str, build_args: Mapping[str, str] | None = None) -> list[Stage]:
    """Every stage of the Dockerfile, in order."""
    escape, _ = _directives(text.splitlines())
    preamble: list[Instruction] = []
    found: list[Stage] = []
    needs: list[set[int]] = []
    names: dict[str, int] = {}
    env: dict[str, str] | None = None
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            if env is None:
                env = global_args(preamble, build_args or {}, escape)
            image, name, parent, problem = _from_stage(instruction, names, env, escape)
            found.append(
                Stage(
                    index=len(found),
                    name=name,
                    line=instruction.line,
                    text=f"FROM {instruction.args}",
                    image=image,
                    parent=parent,
                    needs=(),
                    problem=problem,
                )
            )
            needs.append({parent} if parent is not None else set())
            if name is not None:
                names[name] = len(found) - 1
        elif env is None:
            preamble.append(instruction)
        elif instruction.keyword in ("COPY", "ADD", "RUN"):
            for ref in _stage_refs(instruction, escape):
                index = _stage_index(ref, names, env, escape, len(found) - 1)
                if index is not None:
                    needs[-1].add(index)
    if not found:
        raise DockerfileError(1, "no FROM instruction")
    return [
        dataclasses.replace(stage, needs=tuple(sorted(stage_needs)))
        for stage, stage_needs in zip(found, needs, strict=True)
    ]


def needed(all_stages: Sequence[Stage], target: str | None = None) -> list[Stage]:
    """The stages a build of `target` (or of the last stage) runs, in file order."""
    if target is None:
        wanted = all_stages[-1].index
    else:
        by_name = {stage.name: stage.index for stage in all_stages if stage.name}
        if target.lower() not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            message = f"target {target!r} is not a stage ({known})"
            raise DockerfileError(all_stages[-1].line, message)
        wanted = by_name[target.lower()]
    seen: set[int] = set()
    pending = [wanted]
    while pending:
        index = pending.pop()
        if index not in seen:
            seen.add(index)
            pending.extend(all_stages[index].needs)
    return [stage for stage in all_stages if stage.index in seen]


def base_uses(
    text: str, build_args: Mapping[str, str] | None = None, target: str | None = None
) -> list[BaseUse]:
    """Every image the build pulls through a FROM, one per stage that needs it."""
    uses: list[BaseUse] = []
    for stage in needed(stages(text, build_args), target):
        if stage.parent is not None or stage.image.lower() == "scratch":
            continue
        if stage.problem is not None:
            uses.append(BaseUse(stage, None, stage.problem))
            continue
        try:
            uses.append(BaseUse(stage, parse_reference(stage.image)))
        except ReferenceError as exc:
            uses.append(BaseUse(stage, None, str(exc)))
    return uses


def uses_of(base: ImageRef, uses: Sequence[BaseUse]) -> list[BaseUse]:
    """The FROMs among `uses` that pull `base`."""
    return [use for use in uses if use.ref is not None and base.matches(use.ref)]
