"""Just enough of Dockerfile and .dockerignore syntax to replay this repo's image outside Docker.

No Docker engine runs in CI, so tests/test_container.py reads the Dockerfile, replays its
build stage verbatim and runs the runtime stage's entrypoint and health check as written.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str


@dataclass(frozen=True)
class Stage:
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs, unexpanded."""
        pairs = [p for args in self.all("ENV") for p in shlex.split(args)]
        return dict(p.split("=", 1) for p in pairs)

    def exec_form(self, keyword: str) -> list[str]:
        """An exec-form (JSON array) ENTRYPOINT, CMD or HEALTHCHECK command."""
        args = self.one(keyword)
        if keyword == "HEALTHCHECK":
            args = args.split(" CMD ", 1)[1]
        command = json.loads(args)
        assert isinstance(command, list), f"{keyword} is not in exec form"
        return [str(part) for part in command]


def parse(path: Path) -> dict[str, Stage]:
    """Stages by name, in order; continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: dict[str, Stage] = {}
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)$", args, flags=re.IGNORECASE)
            name = match.group(1) if match else str(len(stages))
            stages[name] = Stage(name, [])
        elif stages:
            list(stages.values())[-1].instructions.append(
                Instruction(keyword, " ".join(args.split()))
            )
    return stages


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``*`` within one path segment, ``**`` across."""
    out = ""
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[":
            end = glob.index("]", i)
            out, i = out + glob[i : end + 1], end + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's rule: the last pattern matching a path or one of its parents decides."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            self.rules.append((keep, _pattern(line.lstrip("!").strip("/"))))

    def excluded(self, rel: str) -> bool:
        parts = rel.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for keep, pattern in self.rules:
            if any(pattern.match(p) for p in prefixes):
                verdict = not keep
        return verdict
