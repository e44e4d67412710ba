"""HTTP: the ASGI middlewares, the v1, v2 and health routes, their schemas and error tables,
and how uvicorn serves them."""
