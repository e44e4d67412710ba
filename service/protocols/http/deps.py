"""The data plane, handed to route handlers as a dependency (tests may override it)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.serving.dataplane import DataPlane


def plane_of(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.plane
    return plane


async def get_plane(request: Request) -> DataPlane:
    return plane_of(request)


PlaneDep = Annotated[DataPlane, Depends(get_plane)]
