"""Dependencies that hand the app's runtime and settings to handlers (tests override them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.serving.dataplane import Runtime
from service.settings import Settings


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
