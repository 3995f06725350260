"""Tiny Maven projects for the jib backend's tests: one class, no dependencies.

Debian's Maven (3.8) defaults the compiler plugin to Java 5, which JDK 17 refuses: the pom
sets `maven.compiler.source/target`. The Maven repository the builds use is the worker's
default, under ~/.cache/buildfleet/maven, shared by every test run (warm after the first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from worker.settings import JibSettings

MAIN_CLASS = "example.Hello"
GREETING = "hello from jib"

POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>example</groupId>
  <artifactId>{artifact}</artifactId>
  <version>1.0</version>
  <properties>
    <maven.compiler.source>17</maven.compiler.source>
    <maven.compiler.target>17</maven.compiler.target>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
  </properties>
</project>
"""

HELLO = """\
package example;

public class Hello {{
    public static void main(String[] args) {{
        System.out.println("{greeting}");
    }}
}}
"""


def maven_project(
    module: str = ".", *, greeting: str = GREETING, artifact: str = "hello", broken: bool = False
) -> dict[str, str]:
    """The files of a one-class Maven project in `module`; `broken` adds a syntax error."""
    prefix = "" if module == "." else f"{module}/"
    files = {
        f"{prefix}pom.xml": POM.format(artifact=artifact),
        f"{prefix}src/main/java/example/Hello.java": HELLO.format(greeting=greeting),
    }
    if broken:
        files[f"{prefix}src/main/java/example/Broken.java"] = (
            "package example;\n\npublic class Broken {\n    int x = ;\n}\n"
        )
    return files


def jib_settings(*insecure: str) -> JibSettings:
    """The backend's settings for the test registries (plain HTTP)."""
    return JibSettings(insecure_registries=insecure, cancel_grace_s=1.0)


@contextlib.asynccontextmanager
async def silent_registry() -> AsyncIterator[str]:
    """A "registry" at 127.0.0.1:PORT that accepts connections and never answers: Jib
    waits on it, as on a registry that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
